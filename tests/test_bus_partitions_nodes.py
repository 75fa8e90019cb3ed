"""A partitioned bus's producer sends each flush as one pipeline per Redis node: counted on a
real single redis-server and on the real cluster (one ``WAIT`` per node pipeline when durable,
one lost reply per flush), with each partition group still stored, retried or failed on its
own, and each partition log's retention still run."""

from __future__ import annotations

import uuid
from collections import Counter

import anyio
import pytest
import redis

from hypervisor.observability import HypervisorEvent, RedisEventBus
from hypervisor.observability._backends.log import (
    DurableWait,
    LogUnavailableError,
    TrimPolicy,
)
from hypervisor.observability._backends.memory_log import MemoryStreamLog
from hypervisor.observability._backends.partition_set import PartitionSet
from hypervisor.observability._core.partition import PartitionLayout
from hypervisor.observability.errors import BusClosedError, BusDurabilityError, BusUnavailableError
from redis_cluster import RedisCluster
from redis_proxy import ReplyDroppingProxy
from redis_server import RedisServer, server_info, wait_until
from test_bus_partitions import assert_each_once_in_key_order, fleet

pytestmark = pytest.mark.anyio


def _stream() -> str:
    return f"hvobs:test:{uuid.uuid4().hex[:10]}"


def _calls(port: int, command: str) -> int:
    """``calls=`` of one command in the ``INFO commandstats`` of the server on ``port`` (0
    when it never ran)."""
    client = redis.Redis(port=port, decode_responses=True)
    client.response_callbacks.clear()  # the server's text, whatever redis-py's version
    try:
        text = client.execute_command("INFO", "commandstats")  # type: ignore[no-untyped-call]
    finally:
        client.close()
    for line in text.splitlines():
        name, _, stats = line.partition(":")
        if name == f"cmdstat_{command}":
            return int(dict(field.split("=", 1) for field in stats.split(","))["calls"])
    return 0


def _flushes(events: list[HypervisorEvent], batch_size: int) -> list[list[HypervisorEvent]]:
    """The flushes of one ``emit_many`` of ``events`` (all buffered at once, then drained
    ``batch_size`` at a time)."""
    return [events[i : i + batch_size] for i in range(0, len(events), batch_size)]


@pytest.mark.redis
async def test_single_redis_one_pipeline_per_flush_one_wait_each(
    replicated: tuple[RedisServer, RedisServer],
) -> None:
    """Durable on a single Redis with a replica and 12 partitions: each flush is one pipeline
    ending with one ``WAIT`` (so the server runs exactly one ``WAIT`` per flush, not one per
    partition), every event is stored once on its partition and the replica holds them."""
    primary, replica = replicated
    stream = _stream()
    layout = PartitionLayout(stream, 12)
    events = fleet(400)
    flushes = _flushes(events, 100)
    assert all(len({layout.partition(e) for e in flush}) > 6 for flush in flushes)
    async with RedisEventBus.from_url(
        primary.url,
        stream,
        partitions=12,
        reader=False,
        durable=True,
        durable_timeout_s=5.0,
        batch_size=100,
    ) as bus:
        before = _calls(primary.port, "wait")
        await bus.emit_many(events)
        waits = _calls(primary.port, "wait") - before
        assert waits == len(flushes)
        assert bus.emitted == len(events)
        assert bus.retries == bus.failed == 0
    client = redis.Redis.from_url(replica.url)
    try:
        for part in range(12):
            wanted = sum(1 for e in events if layout.partition(e) == part)
            assert client.xlen(layout.stream_key(part)) == wanted
    finally:
        client.close()


@pytest.mark.redis
async def test_single_redis_a_missing_replica_fails_every_group_of_the_flush(
    replicated: tuple[RedisServer, RedisServer],
) -> None:
    """The one ``WAIT`` of a node pipeline confirms every group in it or none: with the
    replica gone, ``emit_many`` over 4 partitions raises ``BusDurabilityError`` carrying all
    the events (stored on the primary, fate said unknown)."""
    primary, replica = replicated
    stream = _stream()
    async with RedisEventBus.from_url(
        primary.url, stream, partitions=4, reader=False, durable=True, durable_timeout_s=0.3
    ) as bus:
        replica.stop()
        wait_until(
            "replica gone",
            lambda: server_info(primary.url, "replication").get("connected_slaves") == "0",
        )
        events = fleet(40)
        with pytest.raises(BusDurabilityError) as caught:
            await bus.emit_many(events)
        assert caught.value.stored_unknown
        assert Counter(e.event_id for e in caught.value.events) == Counter(
            e.event_id for e in events
        )
        assert "0 of 1 replicas confirmed (WAIT)" in str(caught.value)
        assert bus.failed == len(events)


@pytest.mark.redis
async def test_lost_replies_fail_every_group_of_the_node_pipeline_as_unknown(
    redis_server: RedisServer,
) -> None:
    """Every reply to a pipeline with ``XADD`` lost (a proxy closes the connection): each
    attempt of a flush over 4 partitions is one pipeline (one dropped reply), all 4 groups
    are retried with it, and past the deadline they fail with ``stored_unknown`` and all
    their events; re-emitting them once replies flow stores each event."""
    stream = _stream()
    layout = PartitionLayout(stream, 4)
    events = fleet(40)
    assert len({layout.partition(e) for e in events}) == 4
    async with ReplyDroppingProxy(redis_server.port, drop_all=True) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        async with RedisEventBus.from_url(
            url,
            stream,
            partitions=4,
            max_events=None,
            retry_deadline_s=0.5,
            retry_base_s=0.01,
            retry_cap_s=0.05,
        ) as bus:
            proxy.armed = True
            with pytest.raises(BusUnavailableError) as caught:
                await bus.emit_many(events)
            error = caught.value
            assert error.stored_unknown
            assert {e.event_id for e in error.events} == {e.event_id for e in events}
            assert "fate is unknown" in str(error)
            assert proxy.dropped >= 2
            # One pipeline per attempt, carrying the 4 groups: each retry counts 4.
            assert bus.retries == 4 * (proxy.dropped - 1)
            assert bus.failed == len(events)

            proxy.drop_all = proxy.armed = False
            await bus.emit_many(error.events)
            await bus.sync()
            assert_each_once_in_key_order(await bus.all_events(), events)


@pytest.mark.redis
async def test_refused_connections_fail_every_group_as_not_stored() -> None:
    """The server gone after ``start()`` (the producer's first flush connects, and is
    refused: nothing sent): every group of the flush fails with ``stored_unknown`` false and
    its events."""
    with RedisServer() as server:
        stream = _stream()
        async with RedisEventBus.from_url(
            server.url,
            stream,
            partitions=4,
            reader=False,  # start() connects for the layout record only
            retry_deadline_s=0.3,
            retry_base_s=0.01,
            retry_cap_s=0.05,
        ) as bus:
            server.stop()
            events = fleet(40)
            with pytest.raises(BusUnavailableError) as caught:
                await bus.emit_many(events)
            assert not caught.value.stored_unknown
            assert "were not stored (no request reached redis)" in str(caught.value)
            assert "connection refused" in str(caught.value)
            assert {e.event_id for e in caught.value.events} == {e.event_id for e in events}
            assert bus.failed == 40
            assert bus.retries >= 4


@pytest.mark.redis
async def test_a_refused_group_fails_alone_in_the_node_pipeline(
    redis_server: RedisServer,
) -> None:
    """One partition's key holds a string (``WRONGTYPE`` for its ``XADD``s): that group fails
    with exactly its events (``stored_unknown``: an error reply in a sent pipeline), the other
    groups of the same pipeline are stored, and nothing is retried."""
    stream = _stream()
    layout = PartitionLayout(stream, 4)
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.set(layout.stream_key(2), b"not a stream")
        events = fleet(200)
        async with RedisEventBus.from_url(
            redis_server.url, stream, partitions=4, reader=False
        ) as bus:
            with pytest.raises(BusUnavailableError) as caught:
                await bus.emit_many(events)
            expected = [e.event_id for e in events if layout.partition(e) == 2]
            assert [e.event_id for e in caught.value.events] == expected
            assert caught.value.stored_unknown
            assert "WRONGTYPE" in str(caught.value)
            assert bus.failed == len(expected)
            assert bus.emitted == len(events) - len(expected)
            assert bus.retries == 0
        for part in (0, 1, 3):
            wanted = sum(1 for e in events if layout.partition(e) == part)
            assert client.xlen(layout.stream_key(part)) == wanted
    finally:
        client.close()


@pytest.mark.redis
async def test_retention_trims_partitions_written_through_the_node_pipeline(
    redis_server: RedisServer,
) -> None:
    """``max_len`` 400 over 4 partitions (exact trimming): after 4,000 events each partition
    keeps its 100 plus at most the entries since its last trim (a quarter of its bound)."""
    stream = _stream()
    layout = PartitionLayout(stream, 4)
    events = fleet(4000)
    async with RedisEventBus.from_url(
        redis_server.url,
        stream,
        partitions=4,
        reader=False,
        retention=TrimPolicy(max_len=400, approximate=False),
        batch_size=200,
    ) as bus:
        await bus.emit_many(events)
        assert bus.emitted == len(events)
    client = redis.Redis.from_url(redis_server.url)
    try:
        lengths = [client.xlen(layout.stream_key(part)) for part in range(4)]
    finally:
        client.close()
    assert all(100 <= length < 125 for length in lengths), lengths


class _FlakyLog(MemoryStreamLog):
    """A partition log whose first ``failures`` appends fail as transient (nothing stored)."""

    def __init__(self, name: str, failures: int) -> None:
        super().__init__(name)
        self.failures = failures
        self.calls = 0

    async def append_many(
        self, entries: list[bytes], durable: DurableWait | None = None
    ) -> list[str]:
        self.calls += 1
        if self.calls <= self.failures:
            raise LogUnavailableError("unreachable for the test")
        return await super().append_many(entries, durable)


class _CountingLog(MemoryStreamLog):
    """A partition log that counts its appends."""

    calls = 0

    async def append_many(
        self, entries: list[bytes], durable: DurableWait | None = None
    ) -> list[str]:
        self.calls += 1
        return await super().append_many(entries, durable)


async def test_only_the_failed_groups_are_retried() -> None:
    """A flush over 4 partitions whose partition 1 fails twice (transient): partition 1's
    group is sent three times, the others once, ``retries`` counts the two retries, and every
    event is stored once."""
    layout = PartitionLayout("fleet", 4)
    logs: list[MemoryStreamLog] = [_CountingLog(layout.stream_key(i)) for i in range(4)]
    flaky = _FlakyLog(layout.stream_key(1), failures=2)
    logs[1] = flaky
    events = fleet(200)
    async with RedisEventBus(
        PartitionSet(layout, logs), max_events=None, retry_base_s=0.01, batch_size=1000
    ) as bus:
        await bus.emit_many(events)
        await bus.sync()
        assert_each_once_in_key_order(await bus.all_events(), events)
        assert flaky.calls == 3
        assert all(
            isinstance(log, _CountingLog) and log.calls == 1 for log in logs if log is not flaky
        )
        assert bus.retries == 2
        assert bus.failed == 0
        assert bus.batches == 4


class _StuckLog(MemoryStreamLog):
    """A partition log whose first append fails as transient and whose second never returns
    (``entered`` set once it started)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.entered = anyio.Event()
        self.calls = 0

    async def append_many(
        self, entries: list[bytes], durable: DurableWait | None = None
    ) -> list[str]:
        self.calls += 1
        if self.calls == 1:
            raise LogUnavailableError("unreachable for the test")
        self.entered.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def test_closing_during_a_retry_fails_only_the_unsettled_group() -> None:
    """``aclose`` past its flush timeout while partition 3's retry hangs: the groups stored
    by the first attempt count as stored, partition 3's events fail (``BusClosedError``) and
    ``aclose`` reports them unstored."""
    layout = PartitionLayout("fleet", 4)
    logs = [MemoryStreamLog(layout.stream_key(i)) for i in range(4)]
    stuck_log = _StuckLog(layout.stream_key(3))
    logs[3] = stuck_log
    events = fleet(200)
    stuck = [e for e in events if layout.partition(e) == 3]
    bus = RedisEventBus(
        PartitionSet(layout, logs), reader=False, batch_size=1000, retry_base_s=0.01
    )
    await bus.start()
    for event in events:
        bus.emit_nowait(event)
    with anyio.fail_after(10):
        await stuck_log.entered.wait()
    assert bus.emitted == len(events) - len(stuck)
    assert sum([await log.length() for log in logs[:3]]) == len(events) - len(stuck)
    unstored = await bus.aclose(flush_timeout_s=0.2)
    assert unstored == len(stuck)
    assert bus.failed == len(stuck)
    assert bus.emitted == len(events) - len(stuck)
    with pytest.raises(BusClosedError):
        await bus.emit(events[0])


@pytest.mark.redis
@pytest.mark.slow
async def test_cluster_a_moved_slot_retries_only_its_group_and_each_event_lands_once(
    redis_cluster: RedisCluster,
) -> None:
    """A partition's slot moved to another master after the producer read the slot map: the
    next flush's pipeline to the old master gets ``MOVED`` for that partition's ``XADD``s
    only; that one group is retried (at the new owner, the slot map read again) and every
    other group is stored at once, each event exactly once."""
    stream = _stream()
    layout = PartitionLayout(stream, 12)
    events = fleet(600)
    url = redis_cluster.url
    async with RedisEventBus.from_url(
        url, stream, partitions=12, reader=False, batch_size=1000
    ) as producer:
        await producer.emit_many(events[:300])
        assert producer.retries == 0
        slot = layout.slot(0)
        source = redis_cluster.master_of_slot(slot)
        target = next(m for m in redis_cluster.masters() if m.port != source.port)
        moved = await anyio.to_thread.run_sync(redis_cluster.move_slot, slot, target.port)
        assert moved == 1
        await producer.emit_many(events[300:])
        assert producer.retries == 1
        assert producer.failed == 0
    for part in range(12):
        master = redis_cluster.master_of_slot(layout.slot(part))
        wanted = sum(1 for e in events if layout.partition(e) == part)
        assert int(redis_cluster.command(master.port, "XLEN", layout.stream_key(part))) == wanted
    assert redis_cluster.master_of_slot(slot).port == target.port
    async with RedisEventBus.from_url(url, stream, partitions=12, max_events=None) as reader:
        assert_each_once_in_key_order(await reader.all_events(), events)
