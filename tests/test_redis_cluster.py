"""Cluster detection, the cluster client, its errors and the layout record, on real servers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
import redis.exceptions as rexc

from hypervisor.observability._backends.redis_client import make_client
from hypervisor.observability._backends.redis_cluster import (
    detect_cluster,
    ensure_layout,
    execute_pipeline,
    make_cluster_client,
    read_layout,
    translate_cluster_errors,
)
from hypervisor.observability._core.codec import decode_event, encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.partition import (
    LayoutRecord,
    PartitionLayout,
    encode_layout_record,
)
from hypervisor.observability.errors import LogError, LogUnavailableError, PartitionLayoutError
from redis_cluster import RedisCluster
from redis_server import RedisServer, free_port

pytestmark = pytest.mark.anyio


def _stream() -> str:
    return f"hvobs:test:{uuid.uuid4().hex[:10]}"


def _fleet(count: int) -> list[HypervisorEvent]:
    """Ring events of 40 agents and saga events of 15 sagas."""
    events = []
    for i in range(count):
        if i % 3:
            events.append(
                HypervisorEvent(event_type=EventType.RING_ASSIGNED, agent_did=f"a{i % 40}")
            )
        else:
            saga = {"saga_id": f"saga-{i % 15}", "step_id": str(i)}
            events.append(HypervisorEvent(event_type=EventType.SAGA_STEP_STARTED, payload=saga))
    return events


@pytest.mark.redis
async def test_a_single_redis_is_not_a_cluster(redis_server: RedisServer) -> None:
    """``INFO cluster`` of a plain redis-server says ``cluster_enabled:0``."""
    assert await detect_cluster(redis_server.url) is False


@pytest.mark.redis
@pytest.mark.slow
async def test_any_node_of_a_cluster_is_detected_as_one(redis_cluster: RedisCluster) -> None:
    """Masters and replicas alike report ``cluster_enabled:1``; a cluster URL naming a
    database other than 0 is refused with a clear error."""
    for port in redis_cluster.ports:
        assert await detect_cluster(f"redis://127.0.0.1:{port}/0") is True
    with pytest.raises(LogError, match="only database 0"):
        await detect_cluster(f"redis://127.0.0.1:{redis_cluster.ports[0]}/3")


async def test_detection_of_an_unreachable_node_is_retryable() -> None:
    """Nothing listening: ``LogUnavailableError``, which callers retry."""
    with pytest.raises(LogUnavailableError):
        await detect_cluster(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=1.0)


@pytest.fixture
async def cluster_client(redis_cluster: RedisCluster) -> AsyncIterator[object]:
    """A cluster client started from one replica's URL (the masters are discovered)."""
    replica = next(n for n in redis_cluster.nodes() if n.role == "replica")
    client = make_cluster_client(
        f"redis://127.0.0.1:{replica.port}/0", socket_timeout_s=10.0, connect_timeout_s=5.0
    )
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.redis
@pytest.mark.slow
async def test_a_pipeline_over_twelve_partitions_lands_each_entry_on_its_master(
    redis_cluster: RedisCluster, cluster_client: object
) -> None:
    """One non-transactional cluster pipeline of XADDs to 12 partition streams puts every
    partition's entries, in order, on the master serving that partition's slot, and nowhere
    else."""
    from redis.asyncio.cluster import RedisCluster as Client

    assert isinstance(cluster_client, Client)
    layout = PartitionLayout(_stream(), 12)
    events = _fleet(600)
    groups = layout.split(events)
    assert len(groups) == 12
    pipe = cluster_client.pipeline(transaction=False)
    for index, group in groups.items():
        for event in group:
            pipe.xadd(layout.stream_key(index), {b"e": encode_event(event)})
    ids = await execute_pipeline(cluster_client, pipe, "test append")
    assert len(ids) == len(events)
    masters = redis_cluster.masters()
    used = set()
    for index, group in groups.items():
        key = layout.stream_key(index)
        owner = redis_cluster.master_of_slot(layout.slot(index))
        used.add(owner.port)
        entries = redis_cluster.command(owner.port, "XRANGE", key, "-", "+", decode=False)
        assert [decode_event(fields[1]).event_id for _, fields in entries] == [
            e.event_id for e in group
        ]
        for other in masters:
            if other.port != owner.port:
                with pytest.raises(rexc.MovedError):
                    redis_cluster.command(other.port, "XLEN", key)
    assert len(used) > 1  # twelve partitions do not all sit on one master


@pytest.mark.redis
@pytest.mark.slow
async def test_a_moved_slot_is_followed_transparently(
    redis_cluster: RedisCluster, cluster_client: object
) -> None:
    """After a partition's slot moves to another master (the client still maps it to the old
    one), the next XADD and pipeline follow the MOVED redirection and land on the new
    owner."""
    from redis.asyncio.cluster import RedisCluster as Client

    assert isinstance(cluster_client, Client)
    layout = PartitionLayout(_stream(), 3)
    key = layout.stream_key(0)
    await cluster_client.xadd(key, {b"e": b"before"})
    source = redis_cluster.master_of_slot(layout.slot(0))
    target = next(m for m in redis_cluster.masters() if m.port != source.port)
    assert redis_cluster.move_slot(layout.slot(0), target.port) == 1
    with translate_cluster_errors("test append"):
        await cluster_client.xadd(key, {b"e": b"after"})
        pipe = cluster_client.pipeline(transaction=False)
        pipe.xadd(key, {b"e": b"piped"})
        pipe.xadd(layout.stream_key(1), {b"e": b"elsewhere"})
        await execute_pipeline(cluster_client, pipe, "test append")
    entries = redis_cluster.command(target.port, "XRANGE", key, "-", "+")
    assert [fields[1] for _, fields in entries] == ["before", "after", "piped"]


@pytest.mark.redis
@pytest.mark.slow
async def test_a_failover_surfaces_as_retryable_and_a_retry_lands_on_the_promoted_replica(
    redis_cluster: RedisCluster, cluster_client: object
) -> None:
    """Pipelines and single writes to a partition whose master was SIGKILLed fail only with
    the retryable ``LogUnavailableError`` and succeed, retried, on the promoted replica (the
    pipeline through ``execute_pipeline``, which makes the client rediscover the cluster)."""
    from redis.asyncio.cluster import RedisCluster as Client

    assert isinstance(cluster_client, Client)
    layout = PartitionLayout(_stream(), 3)
    key = layout.stream_key(0)
    await cluster_client.xadd(key, {b"e": b"before"})
    master = redis_cluster.master_of_slot(layout.slot(0))
    assert redis_cluster.command(master.port, "WAIT", 1, 5000) >= 1
    try:
        _, promoted = redis_cluster.kill_master(master.port)
        failures = 0
        with anyio.fail_after(60):
            while True:
                pipe = cluster_client.pipeline(transaction=False)
                pipe.xadd(key, {b"e": b"piped"})
                pipe.xadd(layout.stream_key(1), {b"e": b"elsewhere"})
                try:
                    await execute_pipeline(cluster_client, pipe, "test append")
                    break
                except LogUnavailableError:
                    failures += 1
                    await anyio.sleep(0.1)
        assert failures >= 1  # the first pipeline met the dead master's closed connection
        with translate_cluster_errors("test append"):
            await cluster_client.xadd(key, {b"e": b"after"})
        entries = redis_cluster.command(promoted, "XRANGE", key, "-", "+")
        assert [fields[1] for _, fields in entries] == ["before", "piped", "after"]
    finally:
        redis_cluster.heal()


MakeClient = Callable[[str], object]


@pytest.fixture(
    params=[
        pytest.param("single", marks=pytest.mark.redis),
        pytest.param("cluster", marks=[pytest.mark.redis, pytest.mark.slow]),
    ]
)
async def any_client(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    """A client of a single redis-server or of the cluster (started from one node's URL)."""
    if request.param == "single":
        server: RedisServer = request.getfixturevalue("redis_server")
        client: object = make_client(server.url, socket_timeout_s=10.0, connect_timeout_s=5.0)
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        client = make_cluster_client(cluster.url, socket_timeout_s=10.0, connect_timeout_s=5.0)
    try:
        yield client
    finally:
        await client.aclose()  # type: ignore[attr-defined]


async def test_the_layout_record_is_created_once_and_checked_by_every_later_starter(
    any_client: object,
) -> None:
    """Concurrent starters with one count all succeed on one record; a starter with another
    count is refused with the stream and both counts named; the first starter may be a worker
    or a producer (the record does not say which)."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster as Client

    assert isinstance(any_client, Redis | Client)
    stream = _stream()
    assert await read_layout(any_client, stream) is None
    records = []

    async def start() -> None:
        records.append(await ensure_layout(any_client, PartitionLayout(stream, 12)))

    async with anyio.create_task_group() as tasks:
        for _ in range(5):
            tasks.start_soon(start)
    assert records == [PartitionLayout(stream, 12).record()] * 5
    assert await read_layout(any_client, stream) == records[0]
    with pytest.raises(PartitionLayoutError) as refused:
        await ensure_layout(any_client, PartitionLayout(stream, 6))
    message = str(refused.value)
    assert f"stream {stream!r} has 12 partitions recorded" in message
    assert "started with 6" in message
    assert (refused.value.recorded, refused.value.requested) == (12, 6)


async def test_an_unreadable_layout_record_is_refused(any_client: object) -> None:
    """A record that is not ours (garbage, a wrong shape) stops a starter with a clear error
    instead of being overwritten or trusted."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster as Client

    assert isinstance(any_client, Redis | Client)
    layout = PartitionLayout(_stream(), 4)
    await any_client.set(layout.layout_key, b"\xff not json")
    with pytest.raises(PartitionLayoutError, match="unreadable") as refused:
        await ensure_layout(any_client, layout)
    assert (refused.value.recorded, refused.value.requested) == (None, 4)
    with pytest.raises(PartitionLayoutError, match="unreadable"):
        await read_layout(any_client, layout.stream)


async def test_a_record_of_another_hash_or_tag_scheme_is_refused(any_client: object) -> None:
    """A record with the same count but another tag scheme (other key names) is refused: the
    processes would write to different keys."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster as Client

    assert isinstance(any_client, Redis | Client)
    layout = PartitionLayout(_stream(), 4)
    other = encode_layout_record(LayoutRecord(partitions=4, tags="plain"))
    await any_client.set(layout.layout_key, other)
    with pytest.raises(PartitionLayoutError, match="tags 'plain'") as refused:
        await ensure_layout(any_client, layout)
    assert (refused.value.recorded, refused.value.requested) == (4, 4)


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (rexc.MovedError("3999 127.0.0.1:6381"), True),
        (rexc.AskError("3999 127.0.0.1:6381"), True),
        (rexc.TryAgainError("TRYAGAIN"), True),
        (rexc.ClusterDownError("CLUSTERDOWN The cluster is down"), True),
        (rexc.MasterDownError("MASTERDOWN"), True),
        (rexc.ClusterError("TTL exhausted."), True),
        (rexc.SlotNotCoveredError("slot 3 is not covered"), True),
        (rexc.RedisClusterException("Redis Cluster cannot be connected."), True),
        (rexc.ConnectionError("reset"), True),
        (rexc.ClusterCrossSlotError("CROSSSLOT Keys in request don't hash"), False),
        (rexc.RedisClusterException("No targets were found"), False),
    ],
)
def test_cluster_errors_translate_to_retryable_or_not(error: Exception, retryable: bool) -> None:
    """A failover's or migration's errors are the retryable ``LogUnavailableError``; wrong
    keys (CROSSSLOT) and client misuse are a plain ``LogError``."""
    with pytest.raises(LogError) as caught, translate_cluster_errors("op"):
        raise error
    assert isinstance(caught.value, LogUnavailableError) is retryable
    assert caught.value.__cause__ is error
