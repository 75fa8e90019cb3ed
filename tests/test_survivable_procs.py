"""Hostile entries against real ``hvobs worker`` processes on a real redis-server (issue 9,
items 3 and 4): a raw client mixes deep nesting, oversized entries, garbage, wrong types,
entries without an id, and valid events at the edges of time and of 64 bits among good events;
the groups' applied ids pass them all, each hostile entry is in the dead-letter log with its
reason, and the metrics and spans of the rest equal the in-process collectors'."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
from hypervisor.observability._core.codec import decode_event, encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RING_EVENTS, RingMetricsState
from hypervisor.observability._core.spans import SAGA_SPAN_EVENTS, SagaSpanState
from hypervisor.observability.errors import EventDecodeError
from hypervisor.observability.workers import (
    REASON_APPLY_ERROR,
    REASON_OVERSIZED,
    REASON_UNDECODABLE,
    dlq_name,
    list_dead_letters,
    span_to_dict,
)
from redis_server import RedisServer
from test_survivable import hostile_entries, nested_entry
from worker_procs import (
    WorkerProc,
    expected_samples,
    kill_mid_batch,
    scrape,
    settled,
    worker_argv,
)
from workers_support import random_events, reference

pytestmark = [pytest.mark.redis]

_LIMIT = 65_536


@pytest.fixture
def workers() -> Iterator[list[WorkerProc]]:
    """Worker processes started by the test, killed at the end whatever happens."""
    started: list[WorkerProc] = []
    yield started
    for proc in started:
        proc.close()


def edge_events() -> list[HypervisorEvent]:
    """Valid events a bus accepts, at the edges: years 1 and 9999, odd offsets, naive times
    (the ones local time cannot convert raise in process too), 64-bit and absurd rings."""
    stamps = [
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 3, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
        datetime(1, 1, 1),
        datetime(9999, 12, 31, 23, 59, 59),
        datetime(2026, 1, 1, 12),
    ]
    rings: list[Any] = [2**64 - 1, "9" * 5000, 1e300, 3]
    out: list[HypervisorEvent] = []
    for index, stamp in enumerate(stamps):
        for ring in rings:
            out.append(
                HypervisorEvent(
                    event_type=[EventType.RING_ELEVATED, EventType.RING_DEMOTED][index % 2],
                    timestamp=stamp,
                    agent_did=f"did:edge:{index % 3}",
                    session_id="edge",
                    payload={"to_ring": ring},
                )
            )
        for kind in (EventType.SAGA_CREATED, EventType.SAGA_STEP_STARTED, EventType.SAGA_COMPLETED):
            out.append(
                HypervisorEvent(
                    event_type=kind,
                    timestamp=stamp,
                    payload={"saga_id": f"edge-{index}", "step_id": 1, "reason": [index]},
                )
            )
    return out


def _readable(data: bytes) -> HypervisorEvent | None:
    """The event a worker applies from ``data``, or ``None`` if it dead-letters it unread."""
    if len(data) > _LIMIT:
        return None
    try:
        return decode_event(data, strict=True)
    except EventDecodeError:
        return None


async def _letters(url: str, stream: str) -> list[Any]:
    async with RedisStreamLog(url, dlq_name(stream)) as dlq:
        return [letter for _, letter in await list_dead_letters(dlq, 100_000)]


async def _applied_id(url: str, stream: str, group: str) -> str:
    async with RedisStateStore(url, state_prefix(stream, group, group)) as store:
        return (await store.meta()).applied_id


def test_hostile_entries_do_not_stop_worker_processes(
    redis_server: RedisServer, workers: list[WorkerProc], tmp_path: Path
) -> None:
    """Two ring-metrics workers and a saga-spans worker; a raw Redis client writes good events
    with hostile entries and valid edge events among them, and one ring worker is SIGKILLed
    while holding a batch and restarted. Every worker stays up; each group's applied id reaches
    its last event; each hostile entry is dead-lettered once per group with its reason and
    bytes, each event the state machines raise on once by the applier; the scraped metrics and
    the exported spans equal the in-process reference over the readable events."""
    url, stream = redis_server.url, f"h{uuid.uuid4().hex[:8]}"
    rng = random.Random(99)
    extra = ("--max-event-bytes", str(_LIMIT))
    spans_path = tmp_path / "spans.jsonl"
    for name in ("r0", "r1"):
        workers.append(WorkerProc(worker_argv("ring-metrics", url, stream, name, *extra)))
    workers.append(
        WorkerProc(worker_argv("saga-spans", url, stream, "s0", "--jsonl", str(spans_path), *extra))
    )
    hostile = hostile_entries(_LIMIT)
    hostile["deeper than any recursion limit"] = (nested_entry(60_000), REASON_UNDECODABLE)
    bad = [data for data, _ in hostile.values()]
    good = [encode_event(e, exact=True) for e in random_events(rng, 1500, agents=8, sagas=10)]
    for event in edge_events():
        good.insert(rng.randrange(len(good) + 1), encode_event(event, exact=True))
    entries = list(good)
    for data in bad * 3:  # each kind several times, spread over the stream
        entries.insert(rng.randrange(len(entries) + 1), data)
    client = redis.Redis.from_url(url)
    chunks = iter([entries[start : start + 40] for start in range(0, len(entries), 40)])

    def write_chunk() -> bool:
        chunk = next(chunks, None)
        if chunk is None:
            return False
        with client.pipeline(transaction=False) as pipe:
            for data in chunk:
                pipe.xadd(stream, {"e": data})
            pipe.execute()
        return True

    try:
        for _ in range(10):
            write_chunk()
        # Kill r1 holding a batch; each miss writes the next chunk, so there is work to catch.
        kill_mid_batch(url, stream, "ring-metrics", workers[1], "r1", feed=write_chunk)
        workers[1] = WorkerProc(worker_argv("ring-metrics", url, stream, "r1", *extra))
        while write_chunk():
            pass
    finally:
        client.close()
    for group in ("ring-metrics", "saga-spans"):
        anyio.run(settled, url, stream, group, group)
    assert all(w.proc.poll() is None for w in workers), "a worker died"

    with redis.Redis.from_url(url) as reader:
        stream_ids = [entry_id.decode() for entry_id, _ in reader.xrange(stream)]
    assert len(stream_ids) == len(entries)
    decoded = [_readable(data) for data in entries]
    readable = [event for event in decoded if event is not None]
    for group, types in (("ring-metrics", RING_EVENTS), ("saga-spans", SAGA_SPAN_EVENTS)):
        last = max(i for i, e in enumerate(decoded) if e is not None and e.event_type in types)
        assert anyio.run(_applied_id, url, stream, group) == stream_ids[last]

    # Each hostile entry is dead-lettered unread, with its reason, by each group (at least once:
    # the killed worker may have written a letter and died before acknowledging its entry);
    # each readable event its state machine raises on, by that group's applier.
    letters = anyio.run(_letters, url, stream)
    hostile_ids = {stream_ids[i] for i, data in enumerate(entries) if data in bad}
    reasons = {data: reason for data, reason in hostile.values()}
    raising = _raising(readable)
    for group in ("ring-metrics", "saga-spans"):
        unread = [lt for lt in letters if lt.group == group and not lt.derivation]
        assert {lt.original_id for lt in unread} == hostile_ids
        assert all(lt.reason == reasons[lt.data] and lt.error for lt in unread)
        applied = [lt for lt in letters if lt.derivation == group]
        assert {lt.reason for lt in applied} == {REASON_APPLY_ERROR}
        assert {decode_event(lt.data).event_id for lt in applied} == raising[group]
        assert all("out of range" in lt.error for lt in applied)
    assert {lt.reason for lt in letters} == {
        REASON_OVERSIZED,
        REASON_UNDECODABLE,
        REASON_APPLY_ERROR,
    }

    expected = expected_samples(reference([e for e in readable if e.event_type in RING_EVENTS]))
    for worker in (workers[0], workers[1]):
        got = scrape(worker)
        for name, samples in expected.items():
            assert got.get(name, {}) == samples, name
    by_id: dict[str, Any] = {}
    for line in spans_path.read_text().splitlines():
        span = json.loads(line)
        assert by_id.setdefault(span["span_id"], span) == span
    ref = reference([e for e in readable if e.event_type in SAGA_SPAN_EVENTS])
    assert len(ref.spans) > 50
    assert by_id == {r.span_id: json.loads(json.dumps(span_to_dict(r))) for r in ref.spans}


def _raising(events: list[HypervisorEvent]) -> dict[str, set[str]]:
    """The ids of the events whose state-machine call raises, per derivation, in process."""
    ring, saga = RingMetricsState(), SagaSpanState(max_spans=0)
    out: dict[str, set[str]] = {"ring-metrics": set(), "saga-spans": set()}
    seen: set[str] = set()
    for event in events:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        for name, state, types in (
            ("ring-metrics", ring, RING_EVENTS),
            ("saga-spans", saga, SAGA_SPAN_EVENTS),
        ):
            if event.event_type in types:
                try:
                    state.apply(event)
                except Exception:
                    out[name].add(event.event_id)
    return out
