"""``hvobs demo --redis`` on a real redis-server: its stream, its report, its clean-up.

The demo appends to ``--stream`` (``hvobs:events`` by default, the workers' stream) from one
process per agent; it reports only what it appended itself, deletes a stream it created unless
``--keep-stream``, and never deletes a stream that existed before it (workers reading it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import redis

from hypervisor.observability.demo import generate_fleet
from redis_server import RedisServer
from test_demo import check_report

# Several processes per run (one per agent): slow by the suite's definition.
pytestmark = [pytest.mark.redis, pytest.mark.slow]

HVOBS = [sys.executable, "-m", "hypervisor.observability.cli"]
FLEET = ("--seed", "5", "--agents", "2", "--sagas", "3")


def demo(url: str, *args: str) -> list[str]:
    """Run ``hvobs demo --redis`` to success; return its stdout lines."""
    env = {k: v for k, v in os.environ.items() if k != "HVOBS_REDIS_URL"}
    result = subprocess.run(
        [*HVOBS, "demo", *FLEET, "--redis", url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout.splitlines()


def report_of(lines: list[str]) -> str:
    """The report without its last line (what became of the stream)."""
    return "\n".join(lines[:-2])


def test_demo_stream_is_its_own_unless_kept(redis_server: RedisServer) -> None:
    """A stream the demo makes is deleted at the end; with ``--keep-stream`` it stays with the
    demo's events; a stream that existed is kept, and the report counts only this run's events
    (the same report as on a fresh stream)."""
    url, stream = redis_server.url, f"demo:{uuid.uuid4().hex[:8]}"
    fleet = generate_fleet(seed=5, agents=2, sagas=3)
    client = redis.Redis.from_url(url)
    try:
        fresh = demo(url, "--stream", stream)
        check_report(report_of(fresh) + "\n", fleet)
        assert f"stream {stream} deleted" in fresh[-1]
        assert client.exists(stream) == 0

        kept = demo(url, "--stream", stream, "--keep-stream")
        assert f"stream {stream} kept" in kept[-1]
        assert client.xlen(stream) == len(fleet.events)

        again = demo(url, "--stream", stream)
        assert "existed before the demo" in again[-1]
        assert client.xlen(stream) == 2 * len(fleet.events)
        assert report_of(again) == report_of(fresh)
        check_report(report_of(again) + "\n", fleet)
    finally:
        client.delete(stream)
        client.close()
