"""Bytes per stored event in a ``RedisEventBus``'s local index, and the reader's events/s.

Workload: ``--events`` (100k) events whose session and agent strings are distinct per session
and agent (``--sessions`` 2,000 ``sess-...`` ids, ``--agents`` 10,000 ``did:mesh:...`` dids,
each agent in one session), ten event types, increasing timestamps and a two-key payload
(``{"tool": "file_read", "ring": 2}``, the tool drawn from a few names). A producer bus writes
them to a real ``redis-server`` started here; then a fresh bus starts on the stream and its
reader backfills every entry (read, decoded from the wire and stored as in production).

Figures:

* bytes per stored event: ``tracemalloc`` traced memory after the reading bus has indexed
  every entry (then a full collection), minus the traced memory before it started, divided by
  the number of events: the event objects decoded from the wire (struct, id, timestamp,
  strings, payload) and the store with its indexes, plus the reader's dedup window of event
  ids. Measured with ``dedup_window=0`` too: that is the local index the target (450 B per
  stored event, indexes included) is about; the window is a separate structure bounded by its
  own size (``dedup_window`` ids, whatever the index holds), so its cost is printed per
  remembered id.
* where the bytes go: ``tracemalloc`` statistics of that run grouped by the line that
  allocated them (top lines).
* reader events/s: the same backfill without tracing, from ``start()`` until every entry is
  indexed, best of ``--runs``.

Usage: ``python scripts/bench_index_memory.py [--events 100000] [--sessions 2000]
[--agents 10000] [--runs 3] [--top 12]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import os
import random
import sys
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypervisor.observability import RedisEventBus
from hypervisor.observability._core.events import EventType, HypervisorEvent
from redis_server import RedisServer

TARGET_BYTES_PER_EVENT = 450.0
STREAM = "bench:index-memory"
_TYPES = (
    EventType.SESSION_JOINED,
    EventType.RING_ASSIGNED,
    EventType.VFS_WRITE,
    EventType.VFS_DELETE,
    EventType.SAGA_STEP_STARTED,
    EventType.SAGA_STEP_COMMITTED,
    EventType.AUDIT_DELTA_CAPTURED,
    EventType.IDENTITY_VERIFIED,
    EventType.RATE_LIMITED,
    EventType.BEHAVIOR_DRIFT,
)
_TOOLS = ("file_read", "file_write", "shell", "http_get", "search")


def workload(events: int, sessions: int, agents: int, seed: int = 7) -> list[HypervisorEvent]:
    """The events, oldest first (seeded: the same every run)."""
    rng = random.Random(seed)
    session_ids = [f"sess-{rng.getrandbits(64):016x}-{i}" for i in range(sessions)]
    dids = [f"did:mesh:{rng.getrandbits(128):032x}" for _ in range(agents)]
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    out = []
    for i in range(events):
        agent = rng.randrange(agents)
        out.append(
            HypervisorEvent(
                event_id=f"{rng.getrandbits(64):016x}",
                event_type=_TYPES[i % len(_TYPES)],
                timestamp=t0 + timedelta(microseconds=250 * i),
                session_id=session_ids[agent % sessions],
                agent_did=dids[agent],
                payload={"tool": rng.choice(_TOOLS), "ring": rng.randrange(4)},
            )
        )
    return out


async def fill(url: str, events: list[HypervisorEvent]) -> None:
    """Write ``events`` to the stream through a producer bus (no reader)."""
    async with RedisEventBus.from_url(url, STREAM, reader=False) as producer:
        for start in range(0, len(events), 5000):
            await producer.emit_many(events[start : start + 5000])
        await producer.flush()


async def _backfill(url: str, count: int, **options: Any) -> RedisEventBus:
    bus = RedisEventBus.from_url(url, STREAM, max_events=None, **options)
    await bus.start()
    await bus.sync()
    if await bus.event_count() != count:
        raise RuntimeError(f"indexed {await bus.event_count()} events, expected {count}")
    return bus


async def traced_bytes(url: str, count: int, top: int, **options: Any) -> float:
    """Bytes per event the reading bus holds once it has indexed ``count`` entries; prints the
    top ``top`` allocating lines when ``top`` > 0."""
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    base = tracemalloc.get_traced_memory()[0]
    bus = await _backfill(url, count, **options)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    if top:
        after = tracemalloc.take_snapshot()
        print(f"\nwhere the bytes go (top {top} lines, bytes per event):\n")
        for stat in after.compare_to(before, "lineno")[:top]:
            frame = stat.traceback[0]
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            print(f"  {stat.size_diff / count:7.1f}  {where}")
    tracemalloc.stop()
    await bus.aclose()
    return used / count


async def reader_rate(url: str, count: int, runs: int) -> float:
    """Best events/s of a fresh bus's backfill of ``count`` entries (no tracing)."""
    best = 0.0
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        bus = await _backfill(url, count)
        best = max(best, count / (time.perf_counter() - start))
        await bus.aclose()
    return best


async def measure(url: str, args: argparse.Namespace) -> dict[str, float]:
    """Fill the stream on ``url`` and return the figures."""
    events = workload(args.events, args.sessions, args.agents)
    await fill(url, events)
    del events
    count: int = args.events
    return {
        "bytes": await traced_bytes(url, count, args.top),
        "bytes_no_dedup": await traced_bytes(url, count, 0, dedup_window=0),
        "rate": await reader_rate(url, count, args.runs),
    }


def report(figures: dict[str, float], args: argparse.Namespace) -> None:
    """Print the figures and the target (the store and its indexes; the reader's dedup window
    is a separate bounded structure, priced per remembered id)."""
    total = figures["bytes"]
    index = figures["bytes_no_dedup"]
    window = inspect.signature(RedisEventBus).parameters["dedup_window"].default
    remembered = min(args.events, window)
    per_id = (total - index) * args.events / remembered
    print(
        f"\nlocal index, {args.events:,} events, {args.sessions:,} sessions, "
        f"{args.agents:,} agents, two-key payload:"
    )
    print(f"  store and its indexes (dedup_window=0): {index:,.0f} B per stored event")
    print(
        f"  the reader's dedup window: {per_id:,.0f} B per remembered id (at most "
        f"dedup_window ids, {window:,} by default: {per_id * window / 2**20:,.1f} MiB whatever "
        "the index holds)"
    )
    print(f"  the whole bus with the default window: {total:,.0f} B per stored event")
    print(f"  reader backfill: {figures['rate']:,.0f} events/s (best of {args.runs})")
    verdict = "met" if index <= TARGET_BYTES_PER_EVENT else "NOT met"
    print(
        f"  target <= {TARGET_BYTES_PER_EVENT:.0f} B per stored event, indexes included: "
        f"{verdict} ({index:,.0f} B)"
    )


def parser() -> argparse.ArgumentParser:
    """The command line (shared with bench_cluster's index section)."""
    parse = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parse.add_argument("--events", type=int, default=100_000)
    parse.add_argument("--sessions", type=int, default=2_000)
    parse.add_argument("--agents", type=int, default=10_000)
    parse.add_argument("--runs", type=int, default=3, help="backfills timed for events/s")
    parse.add_argument("--top", type=int, default=12, help="allocating lines shown (0: none)")
    return parse


def main() -> None:
    """Start a redis-server, fill it, measure and print."""
    args = parser().parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    with RedisServer() as server:
        report(asyncio.run(measure(server.url, args)), args)


if __name__ == "__main__":
    main()
