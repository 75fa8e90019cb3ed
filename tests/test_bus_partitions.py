"""A partitioned bus: routing by family, merged reading, layout record, on memory, a single
Redis (partitions=4) and a real Redis Cluster (partitions=12)."""

from __future__ import annotations

import uuid
from collections import defaultdict

import pytest
import redis

from hypervisor.observability import EventType, HypervisorEvent, RedisEventBus
from hypervisor.observability._backends.log import DurableWait, LogError
from hypervisor.observability._backends.memory_log import MemoryStreamLog
from hypervisor.observability._backends.partition_set import PartitionSet
from hypervisor.observability._backends.redis_cluster import parse_cluster_slots
from hypervisor.observability._core.partition import PartitionLayout
from hypervisor.observability.errors import BusUnavailableError, PartitionLayoutError
from redis_cluster import RedisCluster
from redis_server import RedisServer

pytestmark = pytest.mark.anyio


def _stream() -> str:
    return f"hvobs:test:{uuid.uuid4().hex[:10]}"


def fleet(count: int, tag: str = "") -> list[HypervisorEvent]:
    """Ring events of 30 agents, saga steps of 10 sagas (each handed off once, so the saga's
    events carry two agents) and session events of 8 sessions, each with a sequence number."""
    events = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            events.append(
                HypervisorEvent(
                    event_type=EventType.RING_ASSIGNED,
                    agent_did=f"{tag}a{i % 30}",
                    payload={"seq": i},
                )
            )
        elif kind == 1:
            saga = f"{tag}saga-{i % 10}"
            handoff = i % 20 == 1
            events.append(
                HypervisorEvent(
                    event_type=EventType.SAGA_HANDOFF if handoff else EventType.SAGA_STEP_STARTED,
                    agent_did=f"{tag}a{(i // 10) % 30}",
                    payload={"saga_id": saga, "seq": i},
                )
            )
        else:
            events.append(
                HypervisorEvent(
                    event_type=EventType.SESSION_CREATED,
                    session_id=f"{tag}s{i % 8}",
                    payload={"seq": i},
                )
            )
    return events


def order_key(event: HypervisorEvent) -> str:
    """The key whose events must stay in emit order (agent for ring, saga, session)."""
    if event.event_type in (EventType.SAGA_HANDOFF, EventType.SAGA_STEP_STARTED):
        return f"saga:{event.payload['saga_id']}"
    if event.event_type is EventType.RING_ASSIGNED:
        return f"agent:{event.agent_did}"
    return f"session:{event.session_id}"


def assert_each_once_in_key_order(
    seen: list[HypervisorEvent], emitted: list[HypervisorEvent]
) -> None:
    """Every emitted event indexed exactly once, and per order key in emit order."""
    ids = [e.event_id for e in seen]
    assert len(ids) == len(set(ids)), "an event was indexed twice"
    assert set(ids) == {e.event_id for e in emitted}
    position = {e.event_id: n for n, e in enumerate(emitted)}
    by_key: dict[str, list[int]] = defaultdict(list)
    for event in seen:
        by_key[order_key(event)].append(position[event.event_id])
    for key, positions in by_key.items():
        assert positions == sorted(positions), f"{key} out of order"


async def test_in_memory_partitions_route_by_family_and_merge_into_one_index() -> None:
    """Events go to the partition of their family's key (saga hand-offs with their saga),
    the reader merges all partitions: each event once, each key's events in emit order."""
    events = fleet(600)
    async with RedisEventBus.in_memory("fleet", partitions=4, max_events=None) as bus:
        assert bus.partitions == 4
        await bus.emit_many(events[:300])
        for event in events[300:]:
            await bus.emit(event)
        await bus.sync()
        layout = PartitionLayout("fleet", 4)
        for part, log in enumerate(bus.logs):
            assert log.name == layout.stream_key(part)
            assert await log.length() == sum(1 for e in events if layout.partition(e) == part)
            assert await log.length() > 0
        assert_each_once_in_key_order(await bus.all_events(), events)
        assert bus.applied == len(events)
        lag = await bus.index_lag()
        assert (lag.entries, lag.trimmed, lag.gap_entries) == (0, 0, 0)
        assert len(lag.partitions) == 4


async def test_read_partitions_index_only_the_chosen_keys() -> None:
    """A bus reading a subset of partitions indexes exactly the events routed there;
    ``partition_of`` finds a session's partition from its id."""
    events = fleet(300)
    async with RedisEventBus.in_memory("fleet", partitions=4, max_events=None) as producer:
        await producer.emit_many(events)
        wanted = producer.partition_of("s3")  # session events are routed by session id
        assert wanted == producer.partition_of(next(e for e in events if e.session_id == "s3"))
        async with RedisEventBus(
            _shared(producer), read_partitions=[wanted], owns_log=False, max_events=None
        ) as reader:
            assert reader.read_partitions == (wanted,)
            seen = await reader.all_events()
        expected = [e for e in events if producer.partition_of(e) == wanted]
        assert [e.event_id for e in seen] == [e.event_id for e in expected]
        assert any(e.session_id == "s3" for e in seen)
    with pytest.raises(ValueError, match="read_partitions"):
        RedisEventBus.in_memory("fleet", partitions=4, read_partitions=[4])
    with pytest.raises(ValueError, match="read_partitions"):
        RedisEventBus.in_memory("fleet", read_partitions=[0])


def _shared(bus: RedisEventBus) -> PartitionSet:
    """The same in-memory partition logs, for a second bus in-process."""
    assert bus._parts is not None
    return bus._parts


async def test_max_len_bounds_the_whole_partitioned_stream() -> None:
    """``max_len`` is split across partitions (each keeps ``ceil(max_len / N)``)."""
    async with RedisEventBus.in_memory(
        "fleet", partitions=4, max_len=100, retention=None, reader=False
    ) as bus:
        await bus.emit_many(fleet(2000))
        lengths = [await log.length() for log in bus.logs]
        assert all(length <= 25 for length in lengths), lengths
        assert sum(lengths) <= 100


@pytest.mark.redis
async def test_single_redis_four_partitions_each_event_once_and_layout_recorded(
    redis_server: RedisServer,
) -> None:
    """On a single Redis, partitions=4 writes the four partition keys, records the layout,
    and a second process's bus reads each event once in per-key order; a bus started with
    another count is refused naming both counts; partitions=1 keeps the plain key."""
    stream = _stream()
    events = fleet(900)
    async with RedisEventBus.from_url(redis_server.url, stream, partitions=4) as producer:
        await producer.emit_many(events[:450])
        async with RedisEventBus.from_url(
            redis_server.url, stream, partitions=4, max_events=None
        ) as reader:
            await producer.emit_many(events[450:])
            await reader.sync()
            assert_each_once_in_key_order(await reader.all_events(), events)
            lag = await reader.index_lag()
            assert lag.entries == 0
            assert len(lag.partitions) == 4
    client = redis.Redis.from_url(redis_server.url)
    try:
        layout = PartitionLayout(stream, 4)
        assert client.exists(stream) == 0
        sizes = [client.xlen(layout.stream_key(i)) for i in range(4)]
        assert sum(sizes) == len(events)
        assert min(sizes) > 0
        assert b'"partitions":4' in (client.get(layout.layout_key) or b"")
        with pytest.raises(PartitionLayoutError, match=r"4 partitions recorded.*started with 8"):
            async with RedisEventBus.from_url(redis_server.url, stream, partitions=8):
                pass
        plain = _stream()
        async with RedisEventBus.from_url(redis_server.url, plain, reader=False) as bus:
            await bus.emit(events[0])
        assert client.xlen(plain) == 1
        assert client.exists(PartitionLayout(plain, 1).layout_key) == 0
    finally:
        client.close()


@pytest.mark.redis
@pytest.mark.slow
async def test_cluster_twelve_partitions_land_on_their_masters_and_read_back(
    redis_cluster: RedisCluster,
) -> None:
    """Against a cluster (any node's URL), each partition's entries are on the master of its
    slot, and a reader bus sees each event once in per-key order."""
    stream = _stream()
    events = fleet(1200)
    url = redis_cluster.url
    async with RedisEventBus.from_url(url, stream, partitions=12, reader=False) as producer:
        assert producer._parts is not None
        await producer.emit_many(events)
        assert producer._parts.cluster
        async with RedisEventBus.from_url(url, stream, partitions=12, max_events=None) as reader:
            assert_each_once_in_key_order(await reader.all_events(), events)
    layout = PartitionLayout(stream, 12)
    total = 0
    masters = set()
    for part in range(12):
        master = redis_cluster.master_of_slot(layout.slot(part))
        masters.add(master.port)
        total += int(redis_cluster.command(master.port, "XLEN", layout.stream_key(part)))
    assert total == len(events)
    assert len(masters) == 3


class _RefusingLog(MemoryStreamLog):
    """A partition log whose appends fail for good (a non-transient error)."""

    async def append_many(
        self, entries: list[bytes], durable: DurableWait | None = None
    ) -> list[str]:
        raise LogError("refused for the test")


async def test_a_failed_partition_group_fails_only_its_events() -> None:
    """When one partition's append fails, ``emit_many``'s error carries exactly that
    partition's events (stored_unknown: a LogError may come after a request was sent), and
    the other partitions' events are stored."""
    layout = PartitionLayout("fleet", 4)
    logs = [MemoryStreamLog(layout.stream_key(i)) for i in range(4)]
    logs[2] = _RefusingLog(layout.stream_key(2))
    events = fleet(200)
    async with RedisEventBus(PartitionSet(layout, logs), max_events=None) as bus:
        with pytest.raises(BusUnavailableError) as caught:
            await bus.emit_many(events)
        expected = [e.event_id for e in events if layout.partition(e) == 2]
        assert [e.event_id for e in caught.value.events] == expected
        assert caught.value.stored_unknown
        stored = sum([await logs[i].length() for i in (0, 1, 3)])
        assert stored == len(events) - len(expected)
        assert bus.failed == len(expected)


def test_a_hostile_slot_map_reply_is_read_safely() -> None:
    """``CLUSTER SLOTS`` replies are server input: malformed ranges and nodes are skipped, an
    empty host means the node asked, and ranges come back sorted."""
    raw = [
        [b"5461", b"10922", [b"", b"7001", b"id"], [b"127.0.0.1", b"7004", b"id"]],
        [b"0", b"5460", [b"127.0.0.1", b"7000", b"id"]],
        [b"x", b"5", [b"h", b"1"]],
        [b"10923", b"99999", [b"h", b"7002"]],
        [b"10923", b"16383"],
        b"garbage",
    ]
    ranges, known = parse_cluster_slots(raw, "10.0.0.9")
    assert ranges == [(0, 5460, "127.0.0.1", 7000), (5461, 10922, "10.0.0.9", 7001)]
    assert ("127.0.0.1", 7004) in known
    assert parse_cluster_slots(b"not a list", "h") == ([], [])


def _wait_calls(cluster: RedisCluster, port: int) -> int:
    """How many ``WAIT``s the node on ``port`` ran (``INFO commandstats``)."""
    text = cluster.command(port, "INFO", "commandstats")
    for line in text.splitlines():
        name, _, stats = line.partition(":")
        if name == "cmdstat_wait":
            return int(dict(field.split("=", 1) for field in stats.split(","))["calls"])
    return 0


@pytest.mark.redis
@pytest.mark.slow
async def test_durable_partitions_on_the_cluster_wait_for_each_masters_replica(
    redis_cluster: RedisCluster,
) -> None:
    """``durable=True`` with partitions on a cluster: each flush is one pipeline per master,
    ending with one WAIT on it (each master runs one WAIT per flush that wrote to it, not one
    per partition), so every emit returns confirmed by a replica, and each master's replica
    holds its partitions' entries at once."""
    stream = _stream()
    layout = PartitionLayout(stream, 12)
    events = fleet(300)
    url = redis_cluster.url
    masters = {m.port: m for m in redis_cluster.masters()}
    owner = {p: redis_cluster.master_of_slot(layout.slot(p)).port for p in range(12)}
    flushes = [events[i : i + 100] for i in range(0, len(events), 100)]
    expected = {
        port: sum(1 for flush in flushes if port in {owner[layout.partition(e)] for e in flush})
        for port in masters
    }
    async with RedisEventBus.from_url(
        url,
        stream,
        partitions=12,
        reader=False,
        durable=True,
        durable_timeout_s=5.0,
        batch_size=100,
    ) as bus:
        assert bus._writer.durable is not None
        assert bus._writer.durable.replicas == 1
        before = {port: _wait_calls(redis_cluster, port) for port in masters}
        await bus.emit_many(events)
        waits = {port: _wait_calls(redis_cluster, port) - before[port] for port in masters}
        assert waits == expected
        assert sum(waits.values()) == 3 * len(flushes)  # every flush wrote to every master
    nodes = redis_cluster.nodes()
    for part in range(12):
        master = masters[owner[part]]
        replica = next(n for n in nodes if n.master_id == master.node_id)
        wanted = sum(1 for e in events if layout.partition(e) == part)
        client = redis.Redis(port=replica.port)
        try:
            client.execute_command("READONLY")  # type: ignore[no-untyped-call]
            assert client.xlen(layout.stream_key(part)) == wanted
        finally:
            client.close()


async def test_an_unreachable_start_names_the_stream_not_a_partition_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A partitioned bus that cannot reach Redis at start fails (and warns) naming the stream
    the user gave, not the first partition's key, and says what failed (not "append")."""
    url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    with pytest.raises(BusUnavailableError) as raised:
        async with RedisEventBus.from_url(url, "fleet-x", partitions=4, retry_deadline_s=0.3):
            pass
    message = str(raised.value)
    assert message.startswith("fleet-x: backend unavailable for 0.3 s:"), message
    assert "{fleet-x:p" not in message
    warned = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert warned
    assert all(m.startswith("fleet-x: request failed, retrying") for m in warned)
