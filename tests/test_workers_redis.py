"""Workers on Redis (a real redis-server): the state store contract on both stores, and
exactness of several workers sharing a group on a ``RedisStreamLog``."""

from __future__ import annotations

import logging
import random
import uuid
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from hypervisor.observability._backends.log import parse_id
from hypervisor.observability._backends.memory_log import MemoryStreamLog
from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.ring import RING_EVENTS, RingMetricsState
from hypervisor.observability.testing import RecordingSpanSink
from hypervisor.observability.workers import (
    Applier,
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
from hypervisor.observability.workers._apply import restore_state
from hypervisor.observability.workers._http import SnapshotView
from hypervisor.observability.workers._snapshot import load_state
from manual_clock import ManualClock
from redis_server import RedisServer
from workers_support import random_events, reference, span_key

# Per test, not per module: the state store contract runs on the in-memory store without a
# redis-server too.
pytestmark = pytest.mark.anyio


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
    assert await store.seen(meta) == ([], ["e1", "e2"])
    rotated = Commit(1, b"snap-2", StateMeta(2, "3-0", 1, 1), ["e3"], seen_drop_gen=-1)
    assert await store.commit(rotated)
    assert await store.seen(await store.meta()) == (["e1", "e2"], ["e3"])
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


async def test_memory_store_lease_passes_on_when_its_ttl_runs_out() -> None:
    """An unreleased lease goes to another token once its time to live has run out, not
    before; the holder extending it starts the time to live again. (Redis expires its lease
    key by the server's clock, which no test moves.)"""
    clock = ManualClock()
    store = MemoryStateStore(clock=clock)
    assert await store.acquire_lease("a", 5.0)
    clock.advance(4.5)
    assert not await store.acquire_lease("b", 5.0)
    assert await store.acquire_lease("a", 5.0)
    clock.advance(4.5)
    assert not await store.acquire_lease("b", 5.0)
    clock.advance(0.5)
    assert await store.acquire_lease("b", 5.0)
    assert await store.lease_round("a", 5.0) is None


async def settled(log: RedisStreamLog, stores: list[Any]) -> None:
    """Wait until every entry is acknowledged by the group and every staged entry applied."""
    head = parse_id(await log.head_id())
    with anyio.fail_after(30):
        while True:
            mark = parse_id(await watermark(log, "g"))
            if mark > head and not any([await s.backlog() for s in stores]):
                return
            await anyio.sleep(0.01)


@pytest.mark.redis
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


async def test_store_merges_overlapping_batches_each_id_once(store: StateStore) -> None:
    """A redelivered or reclaimed subset of a batch staged as a batch of its own overlaps the
    first one: ranges still return each id once, in id order, and the backlog counts each id
    once; an identical batch staged again changes nothing."""
    await store.stage([("1-0", b"a"), ("2-0", b"b"), ("3-0", b"c"), ("4-0", b"d")])
    await store.stage([("2-0", b"b"), ("3-0", b"c")])  # a claimed subset
    await store.stage([("3-0", b"c"), ("6-0", b"f")])  # a re-read mixing old and new ids
    await store.stage([("5-0", b"e")])  # another consumer's batch between them
    await store.stage([("2-0", b"b"), ("3-0", b"c")])  # the same batch again
    assert await store.backlog() == 6
    expected = [(f"{n}-0", bytes([data])) for n, data in zip(range(1, 7), b"abcdef", strict=True)]
    assert await store.staged("0-0", "99-0", 100) == expected
    assert await store.staged("2-0", "6-0", 100) == expected[2:5]
    assert await store.staged("0-0", "99-0", 3) == expected[:3]


async def test_store_keeps_redo_records_until_a_checkpoint(store: StateStore) -> None:
    """A commit without a snapshot keeps the applied entries staged as the redo log: restore
    returns them after the checkpoint, with the skipped ids, and replay returns the part after
    a given id; a commit with a snapshot drops those up to the previous checkpoint (the ones
    since it stay for replays one interval behind) and an older replay is refused."""
    await store.stage([("1-0", b"a"), ("2-0", b"b"), ("3-0", b"c"), ("4-0", b"d")])
    assert await store.commit(Commit(0, None, StateMeta(1, "2-0"), ["e1"], None, ["2-0"]))
    restored = await store.restore()
    assert (restored.meta, restored.snapshot, restored.checkpoint_id) == (
        StateMeta(1, "2-0"),
        None,
        "0-0",
    )
    assert restored.records == [("1-0", b"a"), ("2-0", b"b")]
    assert restored.skipped == {"2-0"}
    assert await store.backlog() == 2
    assert await store.staged("2-0", "9-0", 10) == [("3-0", b"c"), ("4-0", b"d")]
    assert await store.commit(Commit(1, None, StateMeta(2, "3-0"), ["e3"]))
    assert await store.replay("1-0", "3-0") == (
        [("2-0", b"b"), ("3-0", b"c")],
        frozenset({"2-0"}),
    )
    assert await store.commit(Commit(2, b"snap", StateMeta(3, "3-0")))
    # The records since the previous checkpoint stay one more interval: a view behind replays.
    assert await store.replay("1-0", "3-0") == (
        [("2-0", b"b"), ("3-0", b"c")],
        frozenset({"2-0"}),
    )
    assert await store.replay("3-0", "3-0") == ([], frozenset())
    restored = await store.restore()
    assert (restored.snapshot, restored.checkpoint_id, restored.records) == (b"snap", "3-0", [])
    assert restored.skipped == frozenset()
    assert await store.staged("0-0", "9-0", 10) == [("4-0", b"d")]
    assert await store.backlog() == 1
    # The next checkpoint drops what the previous one holds: an older replay is refused.
    assert await store.commit(Commit(3, None, StateMeta(4, "4-0"), ["e4"]))
    assert await store.commit(Commit(4, b"snap2", StateMeta(5, "4-0")))
    assert await store.replay("1-0", "4-0") is None
    assert await store.replay("3-0", "4-0") == ([("4-0", b"d")], frozenset())
    restored = await store.restore()
    assert (restored.snapshot, restored.checkpoint_id, restored.records) == (b"snap2", "4-0", [])


async def test_store_notify_wakes_one_wait(store: StateStore) -> None:
    """A notification wakes the next wait once; a wait without one times out."""
    assert not await store.wait_notified(0.01)
    await store.notify()
    await store.notify()
    assert await store.wait_notified(1.0)
    assert not await store.wait_notified(0.01)
    assert await store.lease_round("a", 5.0) == StateMeta()
    assert await store.lease_round("b", 5.0) is None


def ring_events(seed: int, count: int) -> list[Any]:
    """``count`` ring events (transitions and breaches) of a random stream."""
    events = random_events(random.Random(seed), count * 4)
    return [e for e in events if e.event_type in RING_EVENTS][:count]


async def test_applier_folds_below_watermark_and_a_reclaimed_subset_once(
    store: StateStore,
) -> None:
    """A consumer staged its whole batch and died before acknowledging it; another claims a
    subset, stages it as a batch of its own and acknowledges it. The applier folds exactly the
    ids below the watermark (inside the first batch), in order, keeps the rest staged, and folds
    them once when they are acknowledged: the state equals the in-process reference."""
    events = ring_events(31, 40)
    log = MemoryStreamLog("events")
    ids = await log.append_many([encode_event(e) for e in events])
    await log.ensure_group("g", "0")
    batch = await log.read_group("g", "dead", 40)
    await store.stage([(e.id, e.data) for e in batch if e.data is not None])
    applier = Applier(log, "g", RingMetricsDerivation(store), checkpoint_interval_s=3600)

    async def claim_and_stage(count: int) -> None:
        claimed = (await log.claim_idle("g", "alive", 0.0, count)).entries
        await store.stage([(e.id, e.data) for e in claimed if e.data is not None])
        await log.ack("g", [e.id for e in claimed])

    assert await applier.round() == 0  # nothing acknowledged: the watermark is the first id
    await claim_and_stage(15)
    assert await applier.round() == 15
    assert applier.applied_id == ids[14]
    assert await store.backlog() == 25
    partial = restore_state(applier.derivation, await store.restore())
    assert partial.snapshot() == reference(events[:15]).ring
    await claim_and_stage(25)
    assert await applier.round() == 25
    assert await store.backlog() == 0
    assert (applier.duplicates, applier.checkpoints) == (0, 0)
    committed = restore_state(applier.derivation, await store.restore())
    assert committed.snapshot() == reference(events).ring
    assert applier.state.snapshot() == reference(events).ring


async def test_applier_checkpoints_once_its_interval_has_passed(store: StateStore) -> None:
    """A commit carries a snapshot once ``checkpoint_interval_s`` has passed since the applier
    started or last checkpointed, and not before; an idle round checkpoints what was applied
    since when one is due. The checkpoint holds everything applied."""
    clock = ManualClock()
    events = ring_events(13, 40)
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    derivation = RingMetricsDerivation(store)
    applier = Applier(log, "g", derivation, checkpoint_interval_s=10.0, clock=clock)

    async def deliver(batch_events: list[Any]) -> int:
        await log.append_many([encode_event(e) for e in batch_events])
        batch = await log.read_group("g", "c", 100)
        await store.stage([(e.id, e.data) for e in batch if e.data is not None])
        await log.ack("g", [e.id for e in batch])
        return await applier.round()

    assert await deliver(events[:10]) == 10
    clock.advance(9.5)
    assert await deliver(events[10:20]) == 10
    assert applier.checkpoints == 0
    clock.advance(0.5)
    assert await deliver(events[20:30]) == 10
    assert applier.checkpoints == 1
    assert (await store.restore()).checkpoint_id == applier.applied_id
    clock.advance(9.5)
    assert await deliver(events[30:]) == 10
    assert await applier.round() == 0
    assert applier.checkpoints == 1
    clock.advance(0.5)
    assert await applier.round() == 0
    assert applier.checkpoints == 2
    restored = await store.restore()
    assert (restored.checkpoint_id, restored.records) == (applier.applied_id, [])
    assert restore_state(derivation, restored).snapshot() == reference(events).ring


async def test_view_follows_commits_by_replay_and_rebuilds_after_checkpoints(
    store: StateStore,
) -> None:
    """A metrics view folds only the records committed since its last refresh while they are
    staged (up to one checkpoint interval behind), rebuilds from the checkpoint once a
    checkpoint dropped them, and always equals the applier's state; a duplicate append skipped
    by the applier is skipped by the view too."""
    events = ring_events(47, 90)
    events.insert(50, events[10])  # a producer retry: same event id, new stream id
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    applier = Applier(log, "g", RingMetricsDerivation(store), checkpoint_interval_s=3600)
    view = SnapshotView(RingMetricsDerivation(store))
    for start in range(0, len(events), 10):
        if start == 60:
            applier.final = True  # checkpoint at every commit from here on
        await log.append_many([encode_event(e) for e in events[start : start + 10]])
        batch = await log.read_group("g", "c", 10)
        await store.stage([(e.id, e.data) for e in batch if e.data is not None])
        await log.ack("g", [e.id for e in batch])
        assert await applier.round() == len(batch)
        if start % 20 == 0:
            await view.refresh()
            assert view.state.snapshot() == applier.state.snapshot()
            assert view.meta == await store.meta()
    await view.refresh()
    assert view.state.snapshot() == applier.state.snapshot() == reference(events).ring
    assert applier.duplicates == 1
    # Rebuilt at the first refresh and at 80, which comes after two checkpoints (the rounds of
    # 70 and 80: the records up to the older one are gone); replayed at 20, 40 and 60 (at most
    # one checkpoint behind: the records since it are retained).
    assert view.rebuilds == 2


@pytest.mark.redis
@pytest.mark.parametrize("vanish", ["destroy-group", "delete-stream"])
async def test_worker_recreates_a_vanished_group_and_keeps_going(
    redis_server: RedisServer, vanish: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The consumer group (``XGROUP DESTROY``) or the whole stream (``DEL``) disappears while a
    worker runs: the worker meets NOGROUP, recreates the group, counts it, warns that entries
    may be lost, and applies what is appended afterwards. Here nothing was lost (everything
    before had been applied), so the state equals the reference over every event."""
    events = random_events(random.Random(61), 600)
    stream = f"t{uuid.uuid4().hex[:8]}"
    url = redis_server.url
    store = RedisStateStore(url, state_prefix(stream, "g", "ring"))
    config = WorkerConfig(
        group="g", consumer="w0", batch_size=50, block_s=0.05, apply_interval_s=0.002
    )
    caplog.set_level(logging.WARNING, logger="hypervisor.observability.workers")
    async with (
        RedisStreamLog(url, stream) as log,
        RedisStreamLog(url, stream) as worker_log,
        RedisStreamLog(url, f"{stream}:dlq") as dlq,
        aioredis.Redis.from_url(url) as client,
    ):
        worker = Worker(worker_log, [RingMetricsDerivation(store)], config, dlq=dlq)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await worker.ready.wait()
            await log.append_many([encode_event(e) for e in events[:300]])
            await settled(log, [store])
            if vanish == "destroy-group":
                await client.xgroup_destroy(stream, "g")
            else:
                await client.delete(stream)
            await log.append_many([encode_event(e) for e in events[300:]])
            with anyio.fail_after(30):  # no event marks the recreation: poll the counter
                while True:
                    if worker.stats.group_recreated:
                        break
                    await anyio.sleep(0.01)
            await settled(log, [store])
            worker.stop()
        assert worker.stats.group_recreated >= 1
        state = restore_state(worker.derivations[0], await store.restore())
        await store.reset()
        await store.aclose()
    assert state.snapshot() == reference(events).ring
    assert any("is gone" in r.getMessage() for r in caplog.records)
