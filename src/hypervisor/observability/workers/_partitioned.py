"""A worker on a partitioned stream: dynamic assignment of the partitions among a group's workers.

Each partition is today's single-stream machinery on its own keys: a ``Worker`` on the
partition's stream key, its dead letters and its derivations' state stores (the layout's
``state_prefix(i, ...)``), with its own applier lease per derivation. A
:class:`PartitionedWorker` decides which partitions it runs:

* every ``heartbeat_s`` it stamps itself in the group's registry (a sorted set of consumer
  name -> the server's clock at its last beat) and reads the names seen within ``lease_ttl_s``;
* the live names, sorted, own the partitions round robin: partition ``i`` is
  ``live[i % len(live)]``'s;
* it starts a ``Worker`` for each partition newly its own (the partition's applier lease is
  taken when free or expired: the lease and the version-checked commit fence the previous
  owner, so the state stays exact even while two workers overlap during a handover), and stops
  (drains: the batch in hand, a last apply round, the lease released) the ones no longer its
  own. Entries a killed owner left pending are claimed by the new owner's claim sweep
  (``claim_min_idle_s``).

A worker that stops leaves the registry, so its partitions move at the others' next beat; a
killed one drops out after ``lease_ttl_s``. While the registry cannot be reached, a worker keeps
what it runs (correctness never depends on the assignment, only throughput does).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import anyio

from hypervisor.observability._backends.log import LogError, StreamLog
from hypervisor.observability._util.aio import AsyncResource
from hypervisor.observability._util.retry import Backoff
from hypervisor.observability.errors import LogPermanentError, PermissionDeniedError
from hypervisor.observability.workers._config import WorkerConfig, WorkerStats
from hypervisor.observability.workers._derivations import Derivation
from hypervisor.observability.workers._runtime import Worker

__all__ = ["Partition", "PartitionedWorker", "WorkerRegistry", "assign_partitions"]

_log = logging.getLogger("hypervisor.observability.workers")
_PERMANENT = (LogPermanentError, PermissionDeniedError)
_PARTITION_APPLY_INTERVAL_S = 0.05
"""The shortest idle time between a partition's apply rounds (see ``PartitionedWorker``)."""


class WorkerRegistry(Protocol):
    """Where the live workers of a group are known (``RedisWorkerRegistry`` on Redis)."""

    async def heartbeat(self, consumer: str, ttl_s: float) -> list[str]:
        """Stamp ``consumer`` as live; return the names live within ``ttl_s``, sorted."""
        ...

    async def leave(self, consumer: str) -> None:
        """Remove ``consumer`` (a clean stop)."""
        ...


def assign_partitions(live: Sequence[str], partitions: int) -> list[str]:
    """The owner of each partition: the live names sorted, partition ``i`` to
    ``live[i % len(live)]`` (every worker computes the same from the same names)."""
    names = sorted(set(live))
    if not names:
        return [""] * partitions
    return [names[index % len(names)] for index in range(partitions)]


@dataclass(slots=True)
class Partition:
    """One partition as a worker runs it: its logs and its derivations (with their stores).

    Attributes:
        index: the partition's number.
        log: the partition's stream.
        dlq: the partition's dead-letter stream.
        derivations: the derivations run on it, each with the partition's state store.
        stats: what this process counted on it (across its successive runs).
        worker: the running ``Worker`` while this process owns the partition.
    """

    index: int
    log: StreamLog
    dlq: StreamLog
    derivations: list[Derivation]
    stats: WorkerStats = field(default_factory=WorkerStats)
    worker: Worker | None = None
    runs: int = 0
    """Times this process started a worker on the partition."""
    applied: dict[str, int] = field(default_factory=dict)
    """Entries applied per derivation by this process's finished runs on the partition."""
    home: str = ""
    """The node its keys live on (on a Redis Cluster: the master of its slot)."""
    generation: int = 0
    """Times the partition was reopened on another node (its logs and stores replaced)."""
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """What releases its logs and stores."""

    async def aclose(self) -> None:
        """Close its logs and stores (errors are logged: the node may be gone)."""
        for close in reversed(self.closers):
            try:
                await close()
            except (LogError, OSError) as exc:
                _log.debug("closing partition %d: %s", self.index, exc)
        self.closers.clear()


Router = Callable[[], Awaitable[list[str]]]
"""Returns the node (URL) each partition's keys live on now (a Redis Cluster's slot map)."""
Opener = Callable[[int, str], Awaitable[Partition]]
"""Opens partition ``index``'s logs and stores on the node at a URL."""


class PartitionedWorker(AsyncResource):
    """Runs a group's derivations on the partitions assigned to this worker.

    Args:
        partitions: every partition of the stream (the worker follows all of their committed
            states for ``/metrics`` and runs the ones assigned to it).
        config: the group, this worker's consumer name and tuning (as for ``Worker``; the
            registry entries live ``lease_ttl_s``).
        registry: the group's registry; ``None`` runs every partition (one worker alone).
        heartbeat_s: time between heartbeats (default: a third of ``lease_ttl_s``).
        router: on a Redis Cluster, where each partition lives now (checked every heartbeat);
            a partition whose slot moved (a reshard, a failover) is drained and reopened on
            its new node with ``opener``.
        opener: opens a partition on a node (with ``router``).
        registry_home: on a Redis Cluster, where the registry key lives now (checked with the
            partitions; the registry is moved there).
    """

    def __init__(
        self,
        partitions: Sequence[Partition],
        config: WorkerConfig,
        *,
        registry: WorkerRegistry | None = None,
        heartbeat_s: float | None = None,
        router: Router | None = None,
        opener: Opener | None = None,
        registry_home: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        if not partitions:
            raise ValueError("a partitioned worker needs at least one partition")
        self.partitions = list(partitions)
        self.config = config
        self.registry = registry
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else config.lease_ttl_s / 3
        if (router is None) != (opener is None):
            raise ValueError("pass both a router and an opener, or neither")
        self.router = router
        self.opener = opener
        # A partition's applier is woken at once by its own worker's batches and by the
        # others' notifications; the idle poll is only a fallback, and N partitions would poll
        # N times as often: it is stretched to at least _PARTITION_APPLY_INTERVAL_S.
        self._partition_config = replace(
            config, apply_interval_s=max(config.apply_interval_s, _PARTITION_APPLY_INTERVAL_S)
        )
        self.registry_home = registry_home
        self.moves = 0
        """Partitions reopened on another node (a slot moved or failed over)."""
        self.live: list[str] = []
        """The live workers of the group at the last heartbeat, sorted."""
        self.owners: list[str] = []
        """The owner of each partition by the last heartbeat."""
        self.connected = False
        """Whether the last registry or group call succeeded."""
        self.registry_errors = 0
        self.ready = anyio.Event()
        """Set once every partition's group exists and the first assignment was made."""
        self.stopped = anyio.Event()
        self._stop = anyio.Event()
        self._backoff = Backoff(0.05, config.retry_max_s)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    def owned(self) -> list[int]:
        """The partitions this process runs now."""
        return [p.index for p in self.partitions if p.worker is not None]

    def stop(self) -> None:
        """Ask every partition's worker to drain and :meth:`run` to return (from the event
        loop); safe to call many times."""
        self._stop.set()
        for partition in self.partitions:
            if partition.worker is not None:
                partition.worker.stop()

    async def aclose(self) -> None:
        """Stop; the partitions' workers release their leases as they drain."""
        self.stop()

    async def _ensure_groups(self) -> None:
        """Create the group on every partition stream (MKSTREAM): a worker may start before
        any producer, and a partition nobody owns yet must keep its entries for the group."""
        attempt = 0
        pending = list(self.partitions)
        while pending and not self.stopping:
            try:
                while pending:
                    await pending[0].log.ensure_group(self.config.group, self.config.start_id)
                    pending.pop(0)
            except _PERMANENT:
                raise
            except LogError as exc:
                self.connected = False
                _log.warning("creating the group on the partitions: %s; retrying", exc)
                await self._backoff.wait(attempt, stop=self._stop)
                attempt += 1

    async def run(self) -> None:
        """Run the assigned partitions until :meth:`stop`; then drain them and return.

        Raises:
            LogPermanentError: the backend refused for good (credentials, database, TLS).
            PermissionDeniedError: an ACL refused a command to the worker's user.
        """
        try:
            await self._ensure_groups()
            async with anyio.create_task_group() as tg:
                try:
                    await self._assign_loop(tg)
                except BaseException:
                    self.stop()
                    raise
        finally:
            if self.registry is not None:
                with anyio.move_on_after(self.config.drain_timeout_s, shield=True):
                    try:
                        await self.registry.leave(self.config.consumer)
                    except (LogError, *_PERMANENT) as exc:
                        _log.debug("leaving the registry: %s", exc)
            self.stopped.set()

    async def _beat(self) -> list[str] | None:
        consumer = self.config.consumer
        if self.registry is None:
            return [consumer]
        try:
            live = await self.registry.heartbeat(consumer, self.config.lease_ttl_s)
        except _PERMANENT:
            raise
        except LogError as exc:
            self.connected = False
            self.registry_errors += 1
            _log.warning("worker registry: %s; keeping the partitions run now", exc)
            return None
        self.connected = True
        return live

    async def _route(self) -> None:
        """Follow the partitions (and the registry) to the nodes that serve their slots now."""
        if self.router is None or self.opener is None:
            return
        try:
            homes = await self.router()
        except _PERMANENT:
            raise
        except LogError as exc:
            _log.warning("cluster slot map: %s; keeping the partitions where they are", exc)
            return
        *partition_homes, registry_home = homes
        if self.registry_home is not None:
            await self.registry_home(registry_home)
        for partition, home in zip(self.partitions, partition_homes, strict=True):
            if home == partition.home:
                continue
            running = partition.worker
            if running is not None:
                if not running.stopping:
                    _log.info("partition %d moved to another node: draining it", partition.index)
                    running.stop()
                continue  # reopened at a beat after its worker stopped
            try:
                fresh = await self.opener(partition.index, home)
            except _PERMANENT:
                raise
            except LogError as exc:
                _log.warning("reopening partition %d: %s; retrying", partition.index, exc)
                continue
            old = (partition.log, partition.dlq, partition.derivations, partition.closers)
            partition.log, partition.dlq, partition.derivations = (
                fresh.log,
                fresh.dlq,
                fresh.derivations,
            )
            partition.closers, partition.home = fresh.closers, home
            partition.generation += 1
            self.moves += 1
            for close in reversed(old[3]):
                try:
                    await close()
                except (LogError, OSError) as exc:
                    _log.debug("closing partition %d: %s", partition.index, exc)

    async def _assign_loop(self, tg: anyio.abc.TaskGroup) -> None:
        consumer = self.config.consumer
        while not self.stopping:
            await self._route()
            live = await self._beat()
            if live is not None and not self.stopping:
                owners = assign_partitions(live, len(self.partitions))
                if owners != self.owners:
                    _log.info(
                        "%s: live workers %s; runs partitions %s",
                        consumer,
                        ", ".join(live),
                        [i for i, owner in enumerate(owners) if owner == consumer],
                    )
                self.live, self.owners = live, owners
                for partition, owner in zip(self.partitions, owners, strict=True):
                    running = partition.worker
                    if owner == consumer and running is None:
                        partition.worker = self._worker(partition)
                        tg.start_soon(self._run_partition, partition, partition.worker)
                    elif owner != consumer and running is not None and not running.stopping:
                        _log.info("%s: hands partition %d over", consumer, partition.index)
                        running.stop()
                self.ready.set()
            with anyio.move_on_after(self.heartbeat_s if live is not None else 1.0):
                await self._stop.wait()

    def _worker(self, partition: Partition) -> Worker:
        partition.runs += 1
        return Worker(
            partition.log,
            partition.derivations,
            self._partition_config,
            dlq=partition.dlq,
            stats=partition.stats,
        )

    async def _run_partition(self, partition: Partition, worker: Worker) -> None:
        try:
            async with worker:
                await worker.run()
        finally:
            for applier in worker.appliers:
                name = applier.derivation.name
                partition.applied[name] = partition.applied.get(name, 0) + applier.applied_events
            partition.worker = None
