"""Workers on Redis (a real redis-server): the state store contract on both stores, and
exactness of several workers sharing a group on a ``RedisStreamLog``."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.ring import RingMetricsState
from hypervisor.observability._log.base import parse_id
from hypervisor.observability._log.redis import RedisStreamLog
from hypervisor.observability.testing import RecordingSpanSink
from hypervisor.observability.workers import (
    Commit,
    MemoryStateStore,
    RingMetricsDerivation,
    SagaSpansDerivation,
    StateMeta,
    StateStore,
    Worker,
    WorkerConfig,
    watermark,
)
from hypervisor.observability.workers._redis_state import RedisStateStore, state_prefix
from hypervisor.observability.workers._snapshot import load_state
from redis_server import RedisServer
from test_workers_support import random_events, reference, span_key

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture(params=["memory", "redis"])
async def store(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[StateStore]:
    """A fresh state store of each kind."""
    if request.param == "memory":
        yield MemoryStateStore()
        return
    prefix = state_prefix(f"t{uuid.uuid4().hex[:8]}", "g", "ring")
    async with RedisStateStore(redis_server.url, prefix) as made:
        yield made
        await made.reset()


async def test_store_stages_idempotently_in_id_order(store: StateStore) -> None:
    """Staging is keyed by stream id (a re-stage changes nothing) and ranges come back in id
    order, both bounds exclusive, limited."""
    await store.stage([("5-0", b"e"), ("10-1", b"g"), ("2-3", b"a")])
    await store.stage([("10-0", b"f"), ("2-3", b"a")])
    assert await store.backlog() == 4
    assert await store.staged("0-0", "99-0", 10) == [
        ("2-3", b"a"),
        ("5-0", b"e"),
        ("10-0", b"f"),
        ("10-1", b"g"),
    ]
    assert await store.staged("2-3", "10-1", 10) == [("5-0", b"e"), ("10-0", b"f")]
    assert await store.staged("0-0", "99-0", 1) == [("2-3", b"a")]
    assert await store.staged("10-1", "10-2", 5) == []


async def test_store_commit_is_version_checked_and_drops_applied(store: StateStore) -> None:
    """A commit applies only on the expected version; it removes staged entries up to the
    applied id, records seen ids and can drop a generation."""
    await store.stage([("1-0", b"a"), ("2-0", b"b"), ("3-0", b"c")])
    first = Commit(0, b"snap-1", StateMeta(1, "2-0", 0, 2), ["e1", "e2"])
    assert await store.commit(first)
    assert not await store.commit(Commit(0, b"other", StateMeta(1, "3-0", 0, 3)))
    meta, snapshot = await store.load()
    assert (meta, snapshot) == (StateMeta(1, "2-0", 0, 2), b"snap-1")
    assert await store.staged("0-0", "9-0", 10) == [("3-0", b"c")]
    assert await store.seen(meta) == (set(), {"e1", "e2"})
    rotated = Commit(1, b"snap-2", StateMeta(2, "3-0", 1, 1), ["e3"], seen_drop_gen=-1)
    assert await store.commit(rotated)
    assert await store.seen(await store.meta()) == ({"e1", "e2"}, {"e3"})
    assert await store.backlog() == 0


async def test_store_lease_is_exclusive_until_released(store: StateStore) -> None:
    """One token holds the lease; the holder can extend it; release frees it."""
    assert await store.acquire_lease("a", 5.0)
    assert not await store.acquire_lease("b", 5.0)
    assert await store.acquire_lease("a", 5.0)
    await store.release_lease("b")
    assert not await store.acquire_lease("b", 5.0)
    await store.release_lease("a")
    assert await store.acquire_lease("b", 5.0)


async def settled(log: RedisStreamLog, stores: list[Any]) -> None:
    """Wait until every entry is acknowledged by the group and every staged entry applied."""
    head = parse_id(await log.head_id())
    with anyio.fail_after(30):
        while True:
            mark = parse_id(await watermark(log, "g"))
            if mark > head and not any([await s.backlog() for s in stores]):
                return
            await anyio.sleep(0.01)


async def test_workers_on_redis_equal_in_process_reference(redis_server: RedisServer) -> None:
    """Three workers on a Redis stream and Redis state produce the in-process metrics and
    spans exactly."""
    rng = random.Random(21)
    events = random_events(rng, 1500)
    stream = f"t{uuid.uuid4().hex[:8]}"
    sink = RecordingSpanSink()
    async with RedisStreamLog(redis_server.url, stream) as log:
        stores: list[Any] = [
            RedisStateStore(redis_server.url, state_prefix(stream, "g", name))
            for name in ("ring", "saga")
        ]
        workers = [
            Worker(
                RedisStreamLog(redis_server.url, stream),
                [RingMetricsDerivation(stores[0]), SagaSpansDerivation(stores[1], [sink])],
                WorkerConfig(
                    group="g",
                    consumer=f"w{i}",
                    batch_size=rng.randint(5, 60),
                    block_s=0.05,
                    apply_interval_s=0.002,
                    max_apply_batch=100,
                ),
                dlq=RedisStreamLog(redis_server.url, f"{stream}:dlq"),
            )
            for i in range(3)
        ]
        async with anyio.create_task_group() as tg:
            for worker in workers:
                tg.start_soon(worker.run)
            for worker in workers:
                await worker.ready.wait()
            for start in range(0, len(events), 50):
                await log.append_many([encode_event(e) for e in events[start : start + 50]])
            await settled(log, stores)
            for worker in workers:
                worker.stop()
        for worker in workers:
            await worker.log.aclose()
            await worker.dlq.aclose()
        _, snapshot = await stores[0].load()
        for made in stores:
            await made.reset()
            await made.aclose()
    assert snapshot is not None
    state = load_state(snapshot)
    assert isinstance(state, RingMetricsState)
    expected = reference(events)
    assert state.snapshot() == expected.ring
    assert state.open_elevations() == expected.open_elevations
    assert sorted(span_key(r) for r in sink.records) == sorted(span_key(r) for r in expected.spans)
    assert sum(w.stats.events for w in workers) >= len(events)
    assert sum(1 for w in workers if w.stats.events) >= 2
