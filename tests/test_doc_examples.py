"""Every Python example of the README and ``docs/`` runs as written.

Each fenced ``python`` block is run on its own, in a fresh interpreter, as a reader would paste
it into a file. Only what points at the reader's machine is redirected: the Redis URL
``redis://localhost:6379/0`` to a database of its own on a test server (emptied after each
example, so the examples' streams never meet other tests), and the example metrics port 8000
to a free port.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from redis_server import RedisServer, free_port
from worker_procs import child_env

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_REDIS_URL = "redis://localhost:6379/0"
_EXAMPLES_DB = 9  # the other tests use database 0 of the shared test server


def _examples() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match.group(1)))
    return found


EXAMPLES = _examples()


def test_examples_are_found() -> None:
    """The collection sees the examples it is meant to run (a changed fence would skip them)."""
    assert len(EXAMPLES) >= 10
    assert any(_REDIS_URL in code for _, code in EXAMPLES)


@pytest.mark.parametrize(
    ("where", "code"),
    [
        pytest.param(where, code, id=where, marks=[pytest.mark.redis] if _REDIS_URL in code else [])
        for where, code in EXAMPLES
    ],
)
def test_example_runs_as_written(
    where: str, code: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The example exits 0 (its own prints aside, nothing is checked but that it runs)."""
    database: redis.Redis | None = None
    if _REDIS_URL in code:
        server: RedisServer = request.getfixturevalue("redis_server")
        url = f"redis://127.0.0.1:{server.port}/{_EXAMPLES_DB}"
        code = code.replace(_REDIS_URL, url)
        database = redis.Redis.from_url(url)
        request.addfinalizer(database.close)
        request.addfinalizer(database.flushdb)
    code = code.replace('"127.0.0.1", 8000', f'"127.0.0.1", {free_port()}')
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=child_env(),
        check=False,
    )
    assert done.returncode == 0, f"{where}:\n{done.stdout}\n{done.stderr}"
