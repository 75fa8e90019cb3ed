"""``hvobs acl --partitions N``: the grants of a partitioned bus, on a real single Redis
(partitions=4) and on the real cluster (the same lines loaded on every node)."""

from __future__ import annotations

import fnmatch
import uuid

import pytest
import redis
import redis.exceptions as rexc

from hypervisor.observability import RedisEventBus
from hypervisor.observability._core.partition import PartitionLayout
from hypervisor.observability.acl import acl_line, acl_rules
from hypervisor.observability.errors import AclArgumentError, BusPermissionError
from redis_cluster import RedisCluster
from redis_server import RedisServer
from test_bus_partitions import assert_each_once_in_key_order, fleet

pytestmark = pytest.mark.anyio


def _patterns(role: str, stream: str) -> list[str]:
    """The key patterns of ``role``'s rules (every selector), without their permission."""
    keys = []
    for rule in acl_rules(
        role, stream, ("g",) if role in ("worker", "admin") else (), partitions=12
    ):
        for token in rule.strip("()").split():
            if "~" in token:
                keys.append(token.split("~", 1)[1])
    return keys


def test_partitioned_patterns_cover_exactly_the_layouts_keys() -> None:
    """Every key ``PartitionLayout`` names for the stream (each partition's stream, dead
    letters and state, the layout record) matches a pattern of the role that uses it; another
    stream's partitions and the unpartitioned key do not."""
    stream = "fleet-a"
    layout = PartitionLayout(stream, 12)
    for part in range(12):
        assert any(
            fnmatch.fnmatchcase(layout.stream_key(part), p) for p in _patterns("producer", stream)
        )
        assert any(
            fnmatch.fnmatchcase(layout.dead_letter_key(part), p)
            for p in _patterns("reader", stream)
        )
        state = layout.state_prefix(part, "g", "ring") + ":meta"
        assert any(fnmatch.fnmatchcase(state, p) for p in _patterns("worker", stream))
    for role in ("producer", "reader", "worker", "admin"):
        patterns = _patterns(role, stream)
        assert any(fnmatch.fnmatchcase(layout.layout_key, p) for p in patterns)
        others = [PartitionLayout("fleet-b", 12).stream_key(0), stream, "{fleet-a:q0}"]
        assert not any(fnmatch.fnmatchcase(k, p) for k in others for p in patterns)
    with pytest.raises(AclArgumentError, match="partitions must be 1"):
        acl_rules("producer", stream, partitions=0)
    with pytest.raises(AclArgumentError, match="braces"):
        acl_rules("producer", "a{b}", partitions=4)


def _url(base: str, user: str, password: str) -> str:
    return base.replace("redis://", f"redis://{user}:{password}@", 1)


def _load(ports: list[int], line: str) -> None:
    """Run an ``ACL SETUSER`` line on every node (ACLs are per node, also in a cluster)."""
    words = line.split()
    assert words[:2] == ["ACL", "SETUSER"]
    for port in ports:
        client = redis.Redis(port=port)
        try:
            assert client.execute_command(*words) in (b"OK", "OK", True)  # type: ignore[no-untyped-call]
        finally:
            client.close()


async def _producer_and_reader(url: str, ports: list[int], partitions: int) -> None:
    """A producer user emits through a partitioned bus, a reader user indexes each event once;
    the producer user may not read, the reader user may not append."""
    stream = f"acl-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:6]
    lines = {
        role: acl_line(role, stream, f"{role}-{tag}", "pw-" + tag, partitions=partitions)
        for role in ("producer", "reader")
    }
    for line in lines.values():
        _load(ports, line)
    producer_url = _url(url, f"producer-{tag}", "pw-" + tag)
    reader_url = _url(url, f"reader-{tag}", "pw-" + tag)
    events = fleet(400)
    async with RedisEventBus.from_url(
        producer_url, stream, partitions=partitions, reader=False
    ) as bus:
        await bus.emit_many(events)
    async with RedisEventBus.from_url(
        reader_url, stream, partitions=partitions, max_events=None
    ) as bus:
        assert_each_once_in_key_order(await bus.all_events(), events)
        with pytest.raises(BusPermissionError, match="xadd"):
            await bus.emit(events[0])
    with pytest.raises(BusPermissionError):
        async with RedisEventBus.from_url(producer_url, stream, partitions=partitions):
            pass
    # The grants do not reach the same stream's unpartitioned key.
    client = redis.Redis.from_url(_url(redis_url_of_first(ports), f"producer-{tag}", "pw-" + tag))
    try:
        with pytest.raises(rexc.NoPermissionError):
            client.xadd(stream, {"e": "x"})
    finally:
        client.close()


def redis_url_of_first(ports: list[int]) -> str:
    """A URL of the first node, to check a refusal there (any node refuses alike)."""
    return f"redis://127.0.0.1:{ports[0]}/0"


@pytest.mark.redis
async def test_partitioned_producer_and_reader_users_on_a_single_redis(
    redis_server: RedisServer,
) -> None:
    """On a single Redis with partitions=4, the producer and reader roles' lines are enough
    to run their buses (layout record, detection included) and no more."""
    await _producer_and_reader(redis_server.url, [redis_server.port], 4)


@pytest.mark.redis
@pytest.mark.slow
async def test_partitioned_producer_and_reader_users_on_the_cluster(
    redis_cluster: RedisCluster,
) -> None:
    """On the cluster (the lines loaded on every node), the same users run partitions=12
    buses: slot map, cluster client for the layout record, per-node pipelines."""
    await _producer_and_reader(redis_cluster.url, redis_cluster.ports, 12)


def test_cli_prints_the_partitioned_grants() -> None:
    """``hvobs acl --partitions 4`` prints the partitioned rules; a count out of range ends
    with one line and exit status 2."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "hypervisor.observability.cli", "acl", "--role", "producer"]
    done = subprocess.run(
        [*base, "--stream", "fleet", "--user", "u", "--password", "p", "--partitions", "4"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "%W~{fleet:p*} +xadd" in done.stdout
    assert "(~hvobs:layout:{fleet} +get +set)" in done.stdout
    bad = subprocess.run(
        [*base, "--stream", "fleet", "--user", "u", "--password", "p", "--partitions", "999"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("hvobs acl: partitions must be 1 .. 256")
