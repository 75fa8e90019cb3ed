"""Worker runtime on the in-memory log: exactness against the in-process classes, redelivery,
crashes between stage and ack and during apply, dead letters, shutdown, snapshots, sinks."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from hypervisor.observability._backends.log import LogUnavailableError, parse_id
from hypervisor.observability._backends.memory_log import MemoryStreamLog
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RingMetricsState
from hypervisor.observability._core.spans import SagaSpanRecord
from hypervisor.observability.testing import RecordingSpanSink
from hypervisor.observability.workers import (
    REASON_MAX_DELIVERIES,
    REASON_UNDECODABLE,
    Commit,
    JsonLinesSpanSink,
    MemoryStateStore,
    RingMetricsDerivation,
    SagaSpansDerivation,
    Worker,
    WorkerConfig,
    WorkerStateError,
    list_dead_letters,
    replay_dead_letters,
    watermark,
)
from hypervisor.observability.workers._snapshot import LEGACY_PICKLE_PREFIX, dump_state, load_state
from workers_support import Reference, random_events, reference, span_key

pytestmark = pytest.mark.anyio

GROUP = "g"


class FlakyAckLog(MemoryStreamLog):
    """A memory log whose first ``fail_acks`` acks raise, as if the worker died before acking."""

    def __init__(self, fail_acks: int) -> None:
        super().__init__("flaky")
        self.fail_acks = fail_acks

    async def ack(self, group: str, ids: list[str]) -> int:
        if self.fail_acks > 0:
            self.fail_acks -= 1
            raise LogUnavailableError("connection lost before XACK")
        return await super().ack(group, ids)


class AckWatchLog(MemoryStreamLog):
    """A memory log that sets ``reached`` once ``threshold`` entries were acknowledged."""

    def __init__(self, threshold: int) -> None:
        super().__init__("events")
        self.threshold = threshold
        self.acked = 0
        self.reached = anyio.Event()

    async def ack(self, group: str, ids: list[str]) -> int:
        done = await super().ack(group, ids)
        self.acked += done
        if self.acked >= self.threshold:
            self.reached.set()
        return done


class CrashingCommitStore(MemoryStateStore):
    """A state store whose first ``fail_commits`` commits raise after the spans were exported."""

    def __init__(self, fail_commits: int) -> None:
        super().__init__("crashing")
        self.fail_commits = fail_commits

    async def commit(self, commit: Commit) -> bool:
        if self.fail_commits > 0:
            self.fail_commits -= 1
            raise LogUnavailableError("applier died before its commit")
        return await super().commit(commit)


class PoisonRing(RingMetricsDerivation):
    """Ring metrics that refuse one event id (a handler bug triggered by one entry)."""

    def __init__(self, store: MemoryStateStore, poison: str) -> None:
        super().__init__(store)
        self.poison = poison

    def prepare(self, event: HypervisorEvent) -> None:
        if event.event_id == self.poison:
            raise RuntimeError("cannot prepare this one")


def config(consumer: str, **overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {
        "group": GROUP,
        "consumer": consumer,
        "batch_size": 7,
        "block_s": 0.05,
        "claim_interval_s": 0.05,
        "claim_min_idle_s": 0.2,
        "apply_interval_s": 0.002,
        "max_apply_batch": 13,
        "retry_max_s": 0.02,
    }
    values.update(overrides)
    return WorkerConfig(**values)


async def settled(log: MemoryStreamLog, stores: Sequence[MemoryStateStore]) -> None:
    """Wait until every entry of the log is acknowledged and every staged entry applied."""
    head = parse_id(await log.head_id())
    with anyio.fail_after(20):
        while True:
            mark = parse_id(await watermark(log, GROUP))
            backlogs = [await store.backlog() for store in stores]
            if mark > head and not any(backlogs):
                return
            await anyio.sleep(0.005)


def check_ring(expected: Reference, store_state: object) -> None:
    assert isinstance(store_state, RingMetricsState)
    assert store_state.snapshot() == expected.ring
    assert store_state.open_elevations() == expected.open_elevations
    assert store_state.bad_events == expected.bad_events


async def committed_state(store: MemoryStateStore) -> object:
    _, snapshot = await store.load()
    assert snapshot is not None
    return load_state(snapshot)


def unique_spans(records: list[SagaSpanRecord]) -> list[tuple[Any, ...]]:
    """Spans by id; a span exported twice must be the same span both times."""
    by_id: dict[str, tuple[Any, ...]] = {}
    for record in records:
        key = span_key(record)
        assert by_id.setdefault(record.span_id, key) == key
    return sorted(by_id.values())


async def run_workers(
    log: MemoryStreamLog,
    events: list[HypervisorEvent],
    workers: list[Worker],
    rng: random.Random,
) -> None:
    """Append ``events`` in random chunks while ``workers`` consume; wait until all is applied."""
    stores = [d.store for d in workers[0].derivations]
    async with anyio.create_task_group() as tg:
        for worker in workers:
            tg.start_soon(worker.run)
        for worker in workers:
            await worker.ready.wait()
        position = 0
        while position < len(events):
            size = rng.randint(1, 40)
            await log.append_many([encode_event(e) for e in events[position : position + size]])
            position += size
            await anyio.sleep(rng.random() * 0.003)
        await settled(log, stores)  # type: ignore[arg-type]
        for worker in workers:
            worker.stop()


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("n_workers", [1, 3])
async def test_workers_equal_in_process_reference(seed: int, n_workers: int) -> None:
    """W workers sharing a group produce exactly the in-process metrics and spans, whatever
    portion of the stream (and of each agent's and saga's events) each worker gets."""
    rng = random.Random(seed)
    events = random_events(rng, 600)
    # A producer retry: some events appended a second time, later in the stream.
    repeated = [events[i] for i in rng.sample(range(len(events)), 15)]
    events += repeated
    log = MemoryStreamLog("events")
    ring_store, saga_store = MemoryStateStore("ring"), MemoryStateStore("saga")
    sink = RecordingSpanSink()
    workers = [
        Worker(
            log,
            [RingMetricsDerivation(ring_store), SagaSpansDerivation(saga_store, [sink])],
            config(f"w{i}", batch_size=rng.randint(1, 20)),
        )
        for i in range(n_workers)
    ]
    await run_workers(log, events, workers, rng)
    expected = reference(events)
    check_ring(expected, await committed_state(ring_store))
    assert unique_spans(sink.records) == sorted(span_key(r) for r in expected.spans)
    assert len(sink.records) == len(expected.spans)  # no crash here: each span exported once
    used = RingMetricsDerivation.event_types | SagaSpansDerivation.event_types
    assert sum(a.duplicates for w in workers for a in w.appliers) == sum(
        e.event_type in used for e in repeated
    )


async def test_redelivery_after_crash_between_stage_and_ack_counts_once() -> None:
    """Entries staged but not acknowledged (the worker lost its connection before XACK) are
    delivered again and staged again; the results still count each event once."""
    rng = random.Random(7)
    events = random_events(rng, 300)
    log = FlakyAckLog(fail_acks=6)
    store = MemoryStateStore()
    worker = Worker(log, [RingMetricsDerivation(store)], config("w0"))
    await run_workers(log, events, [worker], rng)
    assert worker.stats.redeliveries > 0
    check_ring(reference(events), await committed_state(store))


async def test_dead_consumer_entries_are_claimed_and_applied() -> None:
    """A worker that dies with entries pending (never acknowledged) has them claimed by a live
    worker after the idle time; the results equal the reference."""
    rng = random.Random(11)
    events = random_events(rng, 200)
    log = MemoryStreamLog("events")
    store = MemoryStateStore()
    await log.append_many([encode_event(e) for e in events[:100]])
    await log.ensure_group(GROUP, "0")
    # The dead consumer: it read two batches and died before staging or acknowledging.
    await log.read_group(GROUP, "dead", 30)
    await log.read_group(GROUP, "dead", 30)
    survivor = Worker(log, [RingMetricsDerivation(store)], config("alive"))
    await run_workers(log, events[100:], [survivor], rng)
    assert survivor.stats.claimed == 60
    check_ring(reference(events), await committed_state(store))


async def test_crash_during_apply_reexports_identical_spans() -> None:
    """An applier that dies after exporting spans and before committing leaves the state as it
    was; the next round exports the same spans again (same ids), and the committed state and
    the set of spans equal the reference."""
    rng = random.Random(5)
    events = random_events(rng, 400)
    log = MemoryStreamLog("events")
    store = CrashingCommitStore(fail_commits=3)
    sink = RecordingSpanSink()
    worker = Worker(log, [SagaSpansDerivation(store, [sink])], config("w0"))
    await run_workers(log, events, [worker], rng)
    expected = reference(events)
    assert len(sink.records) > len(expected.spans)  # the re-exports happened
    assert unique_spans(sink.records) == sorted(span_key(r) for r in expected.spans)


async def test_undecodable_entry_is_dead_lettered_at_once() -> None:
    """An entry that is not an event goes to the dead-letter log on first delivery, with its
    reason, original id and bytes, is acknowledged, and the worker carries on."""
    rng = random.Random(3)
    events = random_events(rng, 50)
    log = MemoryStreamLog("events")
    store = MemoryStateStore()
    await log.append_many([encode_event(e) for e in events[:20]])
    (bad_id,) = await log.append_many([b"\xc1not msgpack"])
    worker = Worker(log, [RingMetricsDerivation(store)], config("w0"))
    await run_workers(log, events[20:], [worker], rng)
    letters = await list_dead_letters(worker.dlq)
    assert [(letter.reason, letter.original_id, letter.data) for _, letter in letters] == [
        (REASON_UNDECODABLE, bad_id, b"\xc1not msgpack")
    ]
    assert letters[0][1].deliveries == 1
    assert letters[0][1].error
    assert worker.stats.decode_errors == 1
    check_ring(reference(events), await committed_state(store))


async def test_poison_entry_dead_lettered_after_max_deliveries() -> None:
    """An entry whose processing keeps failing stays pending, is retried by the sweep, and after
    ``max_deliveries`` deliveries goes to the dead-letter log with the error; everything else
    is applied."""
    rng = random.Random(9)
    events = random_events(rng, 120)
    poison = next(e for e in events if e.event_type is EventType.RING_ELEVATED)
    log = MemoryStreamLog("events")
    store = MemoryStateStore()
    worker = Worker(
        log,
        [PoisonRing(store, poison.event_id)],
        config("w0", claim_min_idle_s=0.01, max_deliveries=3),
    )
    await run_workers(log, events, [worker], rng)
    letters = [letter for _, letter in await list_dead_letters(worker.dlq)]
    assert [(lt.reason, lt.deliveries) for lt in letters] == [(REASON_MAX_DELIVERIES, 4)]
    assert "cannot prepare this one" in letters[0].error
    assert worker.stats.processing_errors == 3
    check_ring(reference([e for e in events if e is not poison]), await committed_state(store))


async def test_stop_drains_batch_and_leaves_nothing_pending() -> None:
    """stop() while entries flow: the worker finishes and acknowledges what it holds, applies
    it, releases the lease; nothing stays pending on its consumer."""
    rng = random.Random(13)
    events = random_events(rng, 500)
    log = AckWatchLog(threshold=100)
    await log.append_many([encode_event(e) for e in events])
    store = MemoryStateStore()
    worker = Worker(log, [RingMetricsDerivation(store)], config("w0", batch_size=50))
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await log.reached.wait()
        worker.stop()
    summary = await log.pending_summary(GROUP)
    assert summary.count == 0
    meta = await store.meta()
    delivered = next(g.last_delivered_id for g in await log.group_info())
    assert parse_id(meta.applied_id) <= parse_id(delivered)
    assert await store.backlog() == 0
    assert await store.acquire_lease("someone-else", 1.0)  # released on the way out


async def test_applied_prefix_equals_reference_prefix() -> None:
    """After a drained stop, the committed state equals the reference over exactly the entries
    up to the applied id (a prefix of the stream)."""
    rng = random.Random(17)
    events = random_events(rng, 400)
    log = AckWatchLog(threshold=120)
    ids = await log.append_many([encode_event(e) for e in events])
    store = MemoryStateStore()
    worker = Worker(log, [RingMetricsDerivation(store)], config("w0", batch_size=40))
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await log.reached.wait()
        worker.stop()
    applied = parse_id((await store.meta()).applied_id)
    prefix = [e for e, i in zip(events, ids, strict=True) if parse_id(i) <= applied]
    assert 0 < len(prefix) < len(events)
    check_ring(reference(prefix), await committed_state(store))


async def test_dlq_replay_appends_once() -> None:
    """Replaying dead letters appends their bytes to the log again, and a second replay
    appends nothing."""
    log = MemoryStreamLog("events")
    store = MemoryStateStore()
    await log.append_many([b"junk-1", b"junk-2"])
    worker = Worker(log, [RingMetricsDerivation(store)], config("w0"))
    await run_workers(log, [], [worker], random.Random(0))
    first = await replay_dead_letters(worker.dlq, log)
    second = await replay_dead_letters(worker.dlq, log)
    assert len(first) == 2
    assert second == []
    tail = await log.read(first[0][1], 10)
    assert [e.data for e in await log.read("0-0", 10)][-2:] == [b"junk-1", b"junk-2"]
    assert [e.id for e in tail] == [first[1][1]]


def test_snapshot_refuses_other_formats() -> None:
    """A snapshot of an earlier release (a pickle) or in any other format is refused with
    WorkerStateError; a state round-trips through dump_state/load_state."""
    with pytest.raises(WorkerStateError, match="--reset-state"):
        load_state(LEGACY_PICKLE_PREFIX + b"\x80\x05N.")
    with pytest.raises(WorkerStateError):
        load_state(b"something else")
    state = RingMetricsState()
    state.apply(
        HypervisorEvent(event_type=EventType.RING_ASSIGNED, agent_did="a", payload={"ring": 2})
    )
    restored = load_state(dump_state(state))
    assert isinstance(restored, RingMetricsState)
    assert restored.snapshot() == state.snapshot()


def test_json_lines_sink_writes_one_span_per_line(tmp_path: Path) -> None:
    """The JSON-lines sink writes name, ids, parent, epoch-second times, status and attributes."""
    record = SagaSpanRecord(
        "saga.step.a",
        "s1",
        "st",
        "a",
        10.5,
        12.25,
        "ok",
        {"agent.saga.id": "s1"},
        "ab" * 16,
        "cd" * 8,
        "ef" * 8,
    )
    path = tmp_path / "spans.jsonl"
    with JsonLinesSpanSink(path) as sink:
        sink.export_span(record)
        sink.export_span(record)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0] == {
        "name": "saga.step.a",
        "trace_id": "ab" * 16,
        "span_id": "cd" * 8,
        "parent_span_id": "ef" * 8,
        "start_time": 10.5,
        "end_time": 12.25,
        "status": "ok",
        "saga_id": "s1",
        "step_id": "st",
        "step_action": "a",
        "attributes": {"agent.saga.id": "s1"},
    }


async def test_a_stop_before_the_worker_is_ready_ends_run_promptly() -> None:
    """A stop that arrives before the worker re-read its own pending entries (a SIGTERM right
    after start) still ends run(): no loop waits for a readiness that never comes."""
    log = MemoryStreamLog("events")
    worker = Worker(log, [RingMetricsDerivation(MemoryStateStore())], config("w0"))
    worker.stop()
    with anyio.fail_after(10):  # a bound on a hang, not a speed target
        await worker.run()
    assert worker.stopped.is_set()
    assert not worker.ready.is_set()


async def test_an_idle_applier_backs_off_and_a_batch_still_wakes_it_at_once() -> None:
    """An idle applier's fallback poll doubles after each empty round up to a second (it was
    one round every ``apply_interval_s``: hundreds of round trips a second per derivation),
    and it still polls (the lease, 5 s here, is extended); events appended afterwards are all
    applied."""
    log = MemoryStreamLog("events")
    store = MemoryStateStore()
    worker = Worker(log, [RingMetricsDerivation(store)], config("w0"))
    applier = worker.appliers[0]
    rounds = 0
    real_round = applier.round

    async def counted() -> int:
        nonlocal rounds
        rounds += 1
        return await real_round()

    applier.round = counted  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.ready.wait()
        await anyio.sleep(2.0)
        rounds = 0
        await anyio.sleep(3.0)
        idle_rounds = rounds
        events = [
            e for e in random_events(random.Random(3), 200) if e.event_type.startswith("ring")
        ]
        await log.append_many([encode_event(e) for e in events])
        with anyio.fail_after(10):  # a bound on a hang, not a speed target
            head = await log.head_id()
            while (await store.meta()).applied_id != head:  # noqa: ASYNC110 - a store poll
                await anyio.sleep(0.005)
        worker.stop()
    # 3 s at the ceiling of 1 s is 3 rounds; at apply_interval_s (2 ms here) about 1,500.
    assert 1 <= idle_rounds <= 8
    assert applier.state.snapshot() == reference(events).ring


async def test_a_trickle_is_coalesced_into_few_reads_and_rounds() -> None:
    """Under a steady trickle (a few entries every 2 ms) a worker lets entries gather for
    ``coalesce_s`` before its next read and its next apply round: reads and commits are
    bounded by the elapsed time over ``coalesce_s`` (a read per trickle chunk without it),
    and every event is applied."""
    log = MemoryStreamLog("events")
    store = MemoryStateStore()
    settings = config("w0", batch_size=500, max_apply_batch=20_000, coalesce_s=0.05)
    worker = Worker(log, [RingMetricsDerivation(store)], settings)
    events = [e for e in random_events(random.Random(5), 2_400) if e.event_type.startswith("ring")]
    chunks = [events[i : i + 4] for i in range(0, len(events), 4)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.ready.wait()
        started = anyio.current_time()
        for chunk in chunks:
            await log.append_many([encode_event(e) for e in chunk])
            await anyio.sleep(0.002)
        elapsed = anyio.current_time() - started
        head = await log.head_id()
        with anyio.fail_after(10):  # a bound on a hang, not a speed target
            while (await store.meta()).applied_id != head:  # noqa: ASYNC110 - a store poll
                await anyio.sleep(0.01)
        worker.stop()
    bound = elapsed / 0.05 + 5
    assert len(chunks) > 2 * bound  # without coalescing, about a read per chunk
    assert worker.stats.batches <= bound
    assert store.commits <= bound
    assert worker.appliers[0].state.snapshot() == reference(events).ring


def test_coalescing_is_on_by_default_only_on_partitions() -> None:
    """``--coalesce`` unless given: 0 on one stream (the latency target of one stream's
    workers), 50 ms with ``--partitions`` above 1; given, it is what was given."""
    from argparse import Namespace

    from hypervisor.observability.workers._cli import coalesce_of

    assert coalesce_of(Namespace(coalesce=None, partitions=1)) == 0.0
    assert coalesce_of(Namespace(coalesce=None, partitions=12)) == 0.05
    assert coalesce_of(Namespace(coalesce=0.0, partitions=12)) == 0.0
    assert coalesce_of(Namespace(coalesce=0.02, partitions=1)) == 0.02


def test_only_a_sustained_trickle_is_coalesced() -> None:
    """A read is coalesced (the next one waits ``coalesce_s``) only when it is small (under
    a quarter of a batch) and did not wait long for its entries: the first entries after a
    quiet spell come back from a long blocking read, and the rest of their burst is read at
    once; a full read is a backlog; ``coalesce_s=0`` never waits."""
    log = MemoryStreamLog("events")
    derivations = [RingMetricsDerivation(MemoryStateStore())]
    worker = Worker(log, derivations, config("w0", batch_size=500, coalesce_s=0.05))
    assert worker._trickle(10, 0.002)
    assert worker._trickle(124, 0.2)
    assert not worker._trickle(125, 0.002)
    assert not worker._trickle(500, 0.002)
    assert not worker._trickle(1, 1.5)  # woken from a long block: a burst may follow
    off = Worker(log, derivations, config("w1", batch_size=500, coalesce_s=0.0))
    assert not off._trickle(10, 0.002)
