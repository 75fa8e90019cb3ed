"""A real Redis Cluster for tests and benchmarks: six ``redis-server`` processes, no Docker.

``RedisCluster`` starts 3 masters and 3 replicas (by default) from the same ``redis-server``
binary as :class:`redis_server.RedisServer`, each on a free loopback port with its own directory
and cluster bus port, joins them with ``redis-cli --cluster create ... --cluster-replicas 1``,
and waits until every node reports ``cluster_state:ok`` and every replica is in sync. It can
kill a master and wait for its replica's promotion, restart a node (it rejoins from its
``nodes.conf``), move a slot between masters while clients keep writing (``CLUSTER SETSLOT``
and ``MIGRATE``, as ``redis-cli --cluster reshard`` does), and tear everything down.

Every wait polls a condition with a deadline; ``cluster-node-timeout`` is low (2 s by default)
so a failover takes a few seconds. Nothing here talks to the machine's shared Redis.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from redis_server import RedisServer, free_port

__all__ = ["ClusterNode", "RedisCluster", "redis_cli_binary"]

HOST = "127.0.0.1"


def redis_cli_binary() -> str | None:
    """Return the path of ``redis-cli`` (next to ``redis-server``), or ``None``."""
    return shutil.which("redis-cli")


@dataclass(frozen=True)
class ClusterNode:
    """One node as the cluster sees it (a line of ``CLUSTER NODES``).

    Attributes:
        node_id: the node's 40-character id.
        port: its client port on 127.0.0.1.
        role: ``"master"`` or ``"replica"``.
        master_id: the id of its master (replicas), else ``None``.
        failed: the cluster marks it ``fail`` or ``fail?``.
        slots: the slots it serves (masters), as ``(first, last)`` ranges.
    """

    node_id: str
    port: int
    role: str
    master_id: str | None
    failed: bool
    slots: tuple[tuple[int, int], ...]

    def owns(self, slot: int) -> bool:
        """Whether this node serves ``slot``."""
        return any(first <= slot <= last for first, last in self.slots)


def _parse_nodes(text: str) -> list[ClusterNode]:
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@", 1)[0].split(",", 1)[0]
        flags = set(parts[2].split(","))
        slots = []
        for word in parts[8:]:
            if word.startswith("["):  # a slot being imported or migrated: not served yet
                continue
            first, _, last = word.partition("-")
            slots.append((int(first), int(last or first)))
        nodes.append(
            ClusterNode(
                node_id=parts[0],
                port=int(address.rsplit(":", 1)[1]) if ":" in address else 0,
                role="master" if "master" in flags else "replica",
                master_id=None if parts[3] == "-" else parts[3],
                failed="fail" in flags or "fail?" in flags,
                slots=tuple(slots),
            )
        )
    return nodes


def _wait(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class RedisCluster:
    """A Redis Cluster of child processes on loopback ports.

    Args:
        masters: how many masters (at least 3, as ``redis-cli --cluster create`` requires).
        replicas: replicas per master.
        node_timeout_ms: ``cluster-node-timeout``; failures are detected after about this long.
    """

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000) -> None:
        if redis_cli_binary() is None:
            raise RuntimeError("redis-cli is not installed")
        self.masters_wanted = masters
        self.replicas_wanted = replicas
        self.node_timeout_ms = node_timeout_ms
        self.directory = Path(tempfile.mkdtemp(prefix="hvobs-cluster-"))
        self.servers: dict[int, RedisServer] = {}

    # --- talking to one node ----------------------------------------------------------------

    def command(self, port: int, *args: Any, timeout_s: float = 5.0, decode: bool = True) -> Any:
        """Send one command to the node on ``port`` and return its raw reply (strings decoded
        unless ``decode`` is false).

        No cluster redirection: this talks to exactly that node.
        """
        client = redis.Redis(
            host=HOST,
            port=port,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=decode,
        )
        client.response_callbacks.clear()  # the server's reply shapes, whatever redis-py's version
        try:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def _try(self, port: int, *args: Any) -> Any:
        try:
            return self.command(port, *args, timeout_s=1.0)
        except (redis.RedisError, OSError):
            return None

    def info_field(self, port: int, section: str, field: str) -> str | None:
        """One field of ``INFO <section>`` of a node (``None`` when unreachable or absent)."""
        text = self._try(port, "INFO", section)
        if not isinstance(text, str):
            return None
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return value.strip()
        return None

    def cluster_state(self, port: int) -> str | None:
        """``cluster_state`` of ``CLUSTER INFO`` on one node (``ok``, ``fail``) or ``None``."""
        text = self._try(port, "CLUSTER", "INFO")
        if not isinstance(text, str):
            return None
        for line in text.splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return None

    # --- topology --------------------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        """The client ports of every node, alive or not."""
        return sorted(self.servers)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node, alive or not."""
        return [(HOST, port) for port in self.ports]

    def alive(self, port: int) -> bool:
        """Whether the node's process is running."""
        process = self.servers[port].process
        return process is not None and process.poll() is None

    def nodes(self) -> list[ClusterNode]:
        """The cluster as a live node sees it (its ``CLUSTER NODES``)."""
        for port in self.ports:
            if self.alive(port):
                text = self._try(port, "CLUSTER", "NODES")
                if isinstance(text, str):
                    return _parse_nodes(text)
        raise RuntimeError("no cluster node answers")

    def masters(self) -> list[ClusterNode]:
        """The masters that serve slots and are not marked failed, by port."""
        return sorted(
            (n for n in self.nodes() if n.role == "master" and n.slots and not n.failed),
            key=lambda n: n.port,
        )

    def master_of_slot(self, slot: int) -> ClusterNode:
        """The master serving ``slot``."""
        for node in self.masters():
            if node.owns(slot):
                return node
        raise LookupError(f"no master serves slot {slot}")

    def keyslot(self, key: str) -> int:
        """The slot of ``key`` as the server computes it (``CLUSTER KEYSLOT``)."""
        port = next(p for p in self.ports if self.alive(p))
        return int(self.command(port, "CLUSTER", "KEYSLOT", key))

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` of one live master: a startup URL for a client."""
        return f"redis://{HOST}:{self.masters()[0].port}/0"

    # --- lifecycle -------------------------------------------------------------------------------

    def _node_args(self, bus_port: int) -> list[str]:
        return [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--cluster-port",
            str(bus_port),
            "--appendonly",
            "no",
        ]

    def start(self, timeout_s: float = 60.0) -> Self:
        """Start the nodes, create the cluster and wait until it is ready (:meth:`wait_ready`)."""
        count = self.masters_wanted * (1 + self.replicas_wanted)
        try:
            for index in range(count):
                directory = self.directory / f"node{index}"
                directory.mkdir()
                port = free_port()
                bus_port = free_port()
                while bus_port == port:
                    bus_port = free_port()
                server = RedisServer(*self._node_args(bus_port), directory=directory, port=port)
                self.servers[port] = server
                server.start()
            create = [
                str(redis_cli_binary()),
                "--cluster",
                "create",
                *(f"{HOST}:{port}" for port in self.ports),
                "--cluster-replicas",
                str(self.replicas_wanted),
                "--cluster-yes",
            ]
            done = subprocess.run(create, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")
            self.wait_ready(timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def _ready(self) -> bool:
        for port in self.ports:
            if not self.alive(port):
                return False
            if self.cluster_state(port) != "ok":
                return False
            text = self._try(port, "CLUSTER", "NODES")
            if not isinstance(text, str):
                return False
            # Every node must see the whole topology: the wanted masters serving every slot,
            # the wanted replicas, and nobody failed.
            nodes = _parse_nodes(text)
            masters = [n for n in nodes if n.role == "master" and n.slots]
            replicas = [n for n in nodes if n.role == "replica"]
            if any(n.failed for n in nodes) or len(masters) != self.masters_wanted:
                return False
            if len(replicas) != self.masters_wanted * self.replicas_wanted:
                return False
            if sum(last - first + 1 for n in masters for first, last in n.slots) != 16384:
                return False
            role = self.info_field(port, "replication", "role")
            if role == "slave":
                link = self.info_field(port, "replication", "master_link_status")
                if link != "up":
                    return False
        return True

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until every node runs and reports ``cluster_state:ok``, sees the whole topology
        (the wanted masters serving all 16384 slots, the wanted replicas, no node failed), and
        every replica's link to its master is up."""
        _wait(self._ready, "the cluster to be ready", timeout_s)

    def kill_master(self, port: int | None = None, timeout_s: float = 60.0) -> tuple[int, int]:
        """SIGKILL a master (``port``, or the first master that has a live replica) and wait
        until one of its replicas has been promoted and the cluster is ``ok`` again.

        Returns:
            ``(killed port, promoted port)``.
        """
        nodes = self.nodes()
        if port is None:
            port = next(
                m.port
                for m in self.masters()
                if any(n.master_id == m.node_id and self.alive(n.port) for n in nodes)
            )
        victim = next(n for n in nodes if n.port == port)
        replicas = [n.port for n in nodes if n.master_id == victim.node_id and self.alive(n.port)]
        if victim.role != "master" or not replicas:
            raise ValueError(f"node {port} is not a master with a live replica")
        self.servers[port].kill()
        promoted: list[int] = []

        def replica_promoted() -> bool:
            for replica in replicas:
                if self.info_field(replica, "replication", "role") == "master":
                    promoted.append(replica)
                    return True
            return False

        _wait(replica_promoted, f"a replica of {port} to be promoted", timeout_s)
        _wait(self._ready_without_dead, "the cluster to be ok after the failover", timeout_s)
        return port, promoted[0]

    def _ready_without_dead(self) -> bool:
        live = [port for port in self.ports if self.alive(port)]
        if not all(self.cluster_state(port) == "ok" for port in live):
            return False
        try:
            masters = self.masters()
        except RuntimeError:
            return False
        live_masters = [m for m in masters if m.port in live]
        served = sum(last - first + 1 for m in live_masters for first, last in m.slots)
        return served == 16384

    def restart(self, port: int, timeout_s: float = 60.0) -> None:
        """Restart the node on ``port`` (after a kill, or SIGKILL it first) on the same port,
        directory and ``nodes.conf``, and wait until the cluster is ready with it (a former
        master rejoins as a replica of its promoted replica)."""
        self.servers[port].restart()
        self.wait_ready(timeout_s)

    def heal(self, timeout_s: float = 60.0) -> None:
        """Restart every node that is not running and wait until the cluster is ready."""
        for port in self.ports:
            if not self.alive(port):
                self.servers[port].restart()
        self.wait_ready(timeout_s)

    def move_slot(self, slot: int, to_port: int, timeout_s: float = 60.0) -> int:
        """Move ``slot`` with its keys to the master on ``to_port``, as ``redis-cli --cluster
        reshard`` does: ``SETSLOT IMPORTING``/``MIGRATING``, ``MIGRATE`` the keys in batches
        (clients meanwhile get ``ASK`` for keys already moved), then ``SETSLOT NODE`` on every
        master. Waits until every live node agrees on the new owner.

        Returns:
            the number of keys moved.
        """
        source = self.master_of_slot(slot)
        target = next(m for m in self.masters() if m.port == to_port)
        if source.node_id == target.node_id:
            return 0
        self.command(target.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        self.command(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        moved = 0
        while True:
            keys = self.command(source.port, "CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            self.command(source.port, "MIGRATE", HOST, target.port, "", 0, 10_000, "KEYS", *keys)
            moved += len(keys)
        # The target first, so the source never redirects to a node that refuses the slot.
        self.command(target.port, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        self.command(source.port, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        for master in self.masters():
            if master.port not in (source.port, target.port):
                self.command(master.port, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)

        def agreed() -> bool:
            for port in self.ports:
                if not self.alive(port):
                    continue
                text = self._try(port, "CLUSTER", "NODES")
                if not isinstance(text, str):
                    return False
                owner = [n for n in _parse_nodes(text) if n.role == "master" and n.owns(slot)]
                if len(owner) != 1 or owner[0].node_id != target.node_id:
                    return False
            return True

        _wait(agreed, f"every node to agree that slot {slot} moved", timeout_s)
        return moved

    def close(self) -> None:
        """Stop every node (SIGKILL: nothing is kept) and remove the cluster's directory."""
        for server in self.servers.values():
            server.kill()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.directory)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
