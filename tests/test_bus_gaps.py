"""Gaps: entries trimmed before the bus's tailing reader read them are counted, logged with
their id range and shown by ``index_lag()`` (``docs/redis-bus.md``, "Gaps").

In memory, a log whose reads wait at a gate stands for a paused reader; on Redis, a reader
process is stopped (SIGSTOP) while a producer runs past the retention, and continued.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from hypervisor.observability._backends import (
    Entry,
    MemoryStreamLog,
    StreamInfo,
    TrimPolicy,
    trimmed_before_first,
)
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.redis_bus import RedisEventBus
from redis_server import RedisServer
from worker_procs import child_env, children, procs

__all__ = ["procs"]

pytestmark = pytest.mark.anyio


def _events(n: int, session: str = "s") -> list[HypervisorEvent]:
    return [
        HypervisorEvent(event_type=EventType.SESSION_CREATED, session_id=f"{session}{i}")
        for i in range(n)
    ]


class GatedLog(MemoryStreamLog):
    """A memory log whose counted reads wait while its gate is closed (a paused reader)."""

    def __init__(self, retention: TrimPolicy) -> None:
        super().__init__(retention=retention)
        self.gate = anyio.Event()
        self.gate.set()

    async def read_with_info(self, after_id: str, count: int) -> tuple[list[Entry], StreamInfo]:
        await self.gate.wait()
        return await super().read_with_info(after_id, count)


async def test_gap_counted_logged_and_shown_by_index_lag(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reader paused while retention removes entries it has not read counts exactly those
    entries when it resumes, logs one warning naming the id range, indexes the rest, and
    ``index_lag()`` shows the entries already trimmed while it is paused."""
    log = GatedLog(TrimPolicy(max_len=10, approximate=False))
    async with RedisEventBus(log, max_events=None) as bus:
        await bus.emit_many(_events(5, "early"))
        await bus.sync()
        applied_before = bus.applied_id
        log.gate = anyio.Event()
        await bus.emit_many(_events(100, "late"))
        lag = await bus.index_lag()
        assert (lag.trimmed, lag.gap_entries, lag.entries) == (90, 0, 10)
        assert lag.seconds >= 0.0
        with caplog.at_level(logging.WARNING, "hypervisor.observability.redis_bus"):
            log.gate.set()
            await bus.sync()
        assert bus.gap_entries == 90
        assert bus.gaps == 1
        assert await bus.event_count() == 15
        late = await bus.query(event_type=EventType.SESSION_CREATED)
        assert [e.session_id for e in late[5:]] == [f"late{i}" for i in range(90, 100)]
        lag = await bus.index_lag()
        assert (lag.trimmed, lag.gap_entries, lag.entries) == (0, 90, 0)
        first_kept = await log.first_id()
    warnings = [r.getMessage() for r in caplog.records if "were trimmed" in r.getMessage()]
    assert len(warnings) == 1
    assert f"90 entries after {applied_before}, before {first_kept}" in warnings[0]


async def test_no_gap_while_the_reader_keeps_up() -> None:
    """Retention that only removes entries the reader has applied counts no gap."""
    log = MemoryStreamLog(retention=TrimPolicy(max_len=10, approximate=False))
    async with RedisEventBus(log, max_events=None) as bus:
        for chunk in range(20):
            await bus.emit_many(_events(5, f"c{chunk}-"))
            await bus.sync()
        assert bus.gap_entries == 0
        assert await bus.event_count() == 100
        assert (await bus.index_lag()).trimmed == 0


def _read_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().decode()


@pytest.mark.redis
@pytest.mark.slow
async def test_stopped_reader_process_counts_the_gap(
    redis_server: RedisServer, stream_name: str, procs: object
) -> None:
    """A reader process stopped (SIGSTOP) while a producer with ``max_len`` runs far past it,
    then continued, counts exactly the entries trimmed before it read them (from Redis's
    ``entries-added``), logs the gap, indexes everything retained, and ``index_lag()`` shows
    the gap."""
    url = redis_server.url
    async with RedisEventBus.from_url(url, stream_name, max_len=1000, reader=False) as producer:
        await producer.emit_many(_events(100, "before"))
        child = subprocess.Popen(  # noqa: ASYNC220 - starts at once; its output is read in a thread
            [
                sys.executable,
                str(Path(__file__).with_name("gap_reader_child.py")),
                url,
                stream_name,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        children.append(child)
        with anyio.fail_after(60):
            ready = await anyio.to_thread.run_sync(_read_line, child)
        assert ready.split() == ["ready", "100"]
        child.send_signal(signal.SIGSTOP)
        try:
            await producer.emit_many(_events(6000, "during"))
            await producer.log.trim(TrimPolicy(max_len=1000))
            info = await producer.log.stream_info()
        finally:
            child.send_signal(signal.SIGCONT)
    try:
        trimmed = trimmed_before_first(info)
        assert trimmed is not None
        expected = trimmed - 100
        assert expected > 4000
        with anyio.fail_after(60):
            line = await anyio.to_thread.run_sync(_read_line, child)
        report = json.loads(line)
        assert report["gap_entries"] == expected
        assert report["gaps"] == 1
        assert report["events"] == 100 + info.length
        assert (report["lag_entries"], report["lag_trimmed"]) == (0, 0)
        assert report["lag_gap_entries"] == expected
    finally:
        _, err = child.communicate(timeout=60)
    assert child.returncode == 0
    stderr = err.decode()
    assert f"{expected} entries after" in stderr
    assert "were trimmed before the reader read them" in stderr
