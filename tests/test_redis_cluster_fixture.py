"""The cluster fixture is a real Redis Cluster: slots split over masters, failover, resharding."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis
from redis.cluster import RedisCluster as SyncClusterClient

from redis_cluster import RedisCluster

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _key_on(cluster: RedisCluster, port: int, prefix: str) -> str:
    """A key whose slot the master on ``port`` serves (searched with ``CLUSTER KEYSLOT``)."""
    master = next(m for m in cluster.masters() if m.port == port)
    for index in range(10_000):
        key = f"{prefix}:{index}"
        if master.owns(cluster.keyslot(key)):
            return key
    raise AssertionError(f"no key of {prefix!r} lands on {port}")


def test_every_master_serves_its_own_keys_and_redirects_the_others(
    redis_cluster: RedisCluster,
) -> None:
    """The fixture has 3 masters with a replica each; a key written to the master of its slot
    is read back there, and another master answers MOVED naming the owner."""
    nodes = redis_cluster.nodes()
    masters = redis_cluster.masters()
    assert len(masters) == 3
    assert sum(1 for n in nodes if n.role == "replica") == 3
    prefix = f"fixture:{uuid.uuid4().hex[:8]}"
    for master in masters:
        key = _key_on(redis_cluster, master.port, prefix)
        assert redis_cluster.command(master.port, "SET", key, str(master.port)) == "OK"
        assert redis_cluster.command(master.port, "GET", key) == str(master.port)
        other = next(m for m in masters if m.port != master.port)
        # redis-py reads the MOVED reply as MovedError("<slot> <host>:<port>").
        owner = rf"^{redis_cluster.keyslot(key)} 127\.0\.0\.1:{master.port}$"
        with pytest.raises(redis.exceptions.MovedError, match=owner):
            redis_cluster.command(other.port, "GET", key)


def test_killing_a_master_promotes_its_replica_and_keeps_its_keys(
    redis_cluster: RedisCluster,
) -> None:
    """A SIGKILLed master's replica becomes master of the same slots with the keys it had
    replicated (WAIT made sure), and the restarted old master rejoins as a replica."""
    master = redis_cluster.masters()[0]
    key = _key_on(redis_cluster, master.port, f"failover:{uuid.uuid4().hex[:8]}")
    redis_cluster.command(master.port, "SET", key, "kept")
    assert redis_cluster.command(master.port, "WAIT", 1, 5000) >= 1
    try:
        killed, promoted = redis_cluster.kill_master(master.port)
        assert killed == master.port
        assert redis_cluster.info_field(promoted, "replication", "role") == "master"
        slot = redis_cluster.keyslot(key)
        assert redis_cluster.master_of_slot(slot).port == promoted
        assert redis_cluster.command(promoted, "GET", key) == "kept"
    finally:
        redis_cluster.heal()
    assert redis_cluster.info_field(master.port, "replication", "role") == "slave"
    assert len(redis_cluster.masters()) == 3


def test_moving_a_slot_takes_its_keys_while_a_client_keeps_writing(
    redis_cluster: RedisCluster,
) -> None:
    """A slot moved between masters arrives with every key written to it, those written by a
    cluster client during the move included (redirected by ASK/MOVED), and every node then
    routes the slot to the new master."""
    tag = f"reshard:{uuid.uuid4().hex[:8]}"
    slot = redis_cluster.keyslot(f"{{{tag}}}")
    source = redis_cluster.master_of_slot(slot)
    target = next(m for m in redis_cluster.masters() if m.port != source.port)
    for index in range(300):
        redis_cluster.command(source.port, "SET", f"{{{tag}}}:before:{index}", index)
    client = SyncClusterClient(host="127.0.0.1", port=source.port, decode_responses=True)
    written: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            index = 0
            while not stop.is_set() or index < 50:
                key = f"{{{tag}}}:during:{index}"
                client.set(key, index)
                written.append(key)
                index += 1
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        moved = redis_cluster.move_slot(slot, target.port)
    finally:
        stop.set()
        thread.join(timeout=60)
        client.close()
    assert not errors
    assert moved >= 300
    assert redis_cluster.master_of_slot(slot).port == target.port
    keys = set(redis_cluster.command(target.port, "CLUSTER", "GETKEYSINSLOT", slot, 100_000))
    assert {f"{{{tag}}}:before:{index}" for index in range(300)} <= keys
    assert set(written) <= keys
    assert redis_cluster.command(source.port, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0


def test_a_closed_cluster_leaves_no_process_and_no_directory() -> None:
    """Closing a cluster ends every node's process and removes its directory (a cluster of its
    own here, so the session's cluster is untouched)."""
    cluster = RedisCluster()
    with cluster:
        processes = [server.process for server in cluster.servers.values()]
        assert len(processes) == 6
        assert all(p is not None and p.poll() is None for p in processes)
    assert all(p is not None and p.poll() is not None for p in processes)
    assert not cluster.directory.exists()
