"""``hvobs serve`` as an operator runs it: a real subprocess, its one-line errors and exit codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from redis_server import free_port

HVOBS = [sys.executable, "-m", "hypervisor.observability.cli"]


def run_hvobs(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``hvobs`` to completion, capturing its output."""
    env = {**os.environ}
    env.pop("HVOBS_TOKEN", None)
    return subprocess.run(
        [*HVOBS, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``hvobs serve --demo --port 0`` running, and the URL it printed."""
    env = {**os.environ, "HVOBS_TOKEN": "env-token-1234"}
    process = subprocess.Popen(
        [*HVOBS, "serve", "--demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert " on http://127.0.0.1:" in line, line
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_serve_demo_answers_and_stops_cleanly_on_sigint(
    serving: tuple[subprocess.Popen[str], str],
) -> None:
    """The served demo answers with the token from HVOBS_TOKEN (401 without), its startup
    line names the URL and not the token, and SIGINT ends it with status 0 promptly even
    with a stream client connected."""
    process, url = serving
    auth = {"Authorization": "Bearer env-token-1234"}
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/api/agents").status_code == 401
        agents = http.get("/api/agents", headers=auth).json()["agents"]
        assert len(agents) >= 7
        with http.stream("GET", "/api/stream", headers=auth) as stream:
            assert stream.status_code == 200
            started = time.monotonic()
            process.send_signal(signal.SIGINT)
            assert process.wait(10) == 0
            assert time.monotonic() - started < 8
    out, err = process.communicate(timeout=5)
    assert "env-token-1234" not in out + err
    assert "Traceback" not in err


def test_port_in_use_is_one_line_naming_the_port() -> None:
    """A port already in use gives one line naming it and how to choose another; exit 1."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_hvobs("serve", "--demo", "--port", str(port))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {port}" in lines[0]
    assert "--port" in lines[0]


def test_redis_url_without_scheme_is_refused() -> None:
    """A Redis URL without a scheme is refused before anything starts, saying what a URL
    looks like; no traceback."""
    result = run_hvobs("serve", "--redis", "localhost:6379")
    assert result.returncode == 2
    assert "redis://" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_redis_names_host_and_port() -> None:
    """Redis not running gives one line naming its host and port; exit 1."""
    port = free_port()
    result = run_hvobs("serve", "--redis", f"redis://user:pw@127.0.0.1:{port}/0", "--port", "0")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}" in lines[0]
    assert "pw" not in lines[0]


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["serve"], "--redis"),
        (["serve", "--demo", "--port", "70000"], "65535"),
        (["serve", "--demo", "--max-events", "0"], "at least 1"),
        (["serve", "--demo", "--token", "short"], "at least 8"),
    ],
)
def test_bad_options_get_one_clear_error(args: list[str], mentions: str) -> None:
    """Bad option values are refused with a message saying what is expected; no traceback."""
    result = run_hvobs(*args)
    assert result.returncode == 2
    assert mentions in result.stderr
    assert "Traceback" not in result.stderr


def test_help_shows_defaults_and_units() -> None:
    """``hvobs serve --help`` shows every option with its default."""
    out = " ".join(run_hvobs("serve", "--help").stdout.split())  # unwrapped
    for text in (
        "--demo",
        "--redis",
        "(default: hvobs:events)",
        "(default: 127.0.0.1",
        "(default: 8765",
        "HVOBS_TOKEN",
        "(default: 100000 events)",
    ):
        assert text in out, text
