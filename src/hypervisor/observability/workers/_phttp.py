"""``/metrics`` and ``/healthz`` of a partitioned worker: the union of every partition's state.

Every worker follows the committed ring state of **every** partition (one ``SnapshotView`` per
partition, whoever applies it) and serves their union (``_core/ring_union.py``): counters add
up exactly, the newest event time is the maximum, the label limits are divided among the
partitions. A partition this worker applies is served from its applier's state; every other
one from that partition's checkpoints (``checkpoints_only``: no worker folds the events
another applies; such a partition is served at most a checkpoint interval behind), so every
worker of a group serves the same numbers once the checkpoints caught up (within about a
checkpoint interval of the last event), and a worker's cost does not grow with the events of
the partitions it does not run. The union is served only when
every partition's view is servable; otherwise the last union rendered is served (the views say
which one is stale), or 503 when there is none: never a partial sum, which Prometheus would
read as a counter reset.

The worker's own metrics carry a ``partition`` label (at most ``MAX_PARTITIONS`` values):
lag, pending, whether this worker runs the partition, its applier.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hypervisor.observability._backends.log import LogError
from hypervisor.observability._core.ring import RingBounds, RingMetricsState
from hypervisor.observability._core.ring_union import union_ring_states
from hypervisor.observability.errors import WorkerStateError
from hypervisor.observability.workers._derivations import RING_METRICS, RingMetricsDerivation
from hypervisor.observability.workers._http import (
    _OPENMETRICS,
    _TEXT,
    HttpServerBase,
    RingExposition,
)
from hypervisor.observability.workers._partitioned import Partition, PartitionedWorker
from hypervisor.observability.workers._view import SnapshotView

__all__ = ["PartitionedHttpServer", "partitioned_health"]

_log = logging.getLogger("hypervisor.observability.workers")
_json = msgspec.json.Encoder()


async def refresh_partition(worker: PartitionedWorker, partition: Partition) -> None:
    """Bring one partition's group gauges (lag, pending, oldest pending age) up to date."""
    running = partition.worker
    if running is not None:
        await running.refresh()  # its gaps too
        return
    stats = partition.stats
    for info in await partition.log.group_info():
        if info.name == worker.config.group:
            stats.lag = info.lag
            break
    summary = await partition.log.pending_summary(worker.config.group)
    stats.pending = summary.count
    stats.oldest_pending_age_s = summary.oldest_idle_s


class _PartitionCollector(Collector):
    """The worker's own metrics, per partition."""

    def __init__(self, worker: PartitionedWorker, views: list[SnapshotView | None]) -> None:
        self._worker = worker
        self._views = views

    def collect(self) -> Iterable[Metric]:
        worker = self._worker
        group = worker.config.group
        labels = ("group", "partition")
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}

        def add(kind: str, name: str, text: str, key: tuple[str, ...], value: float) -> None:
            family = families.get(name)
            if family is None:
                names = labels if len(key) == 2 else (*labels, "derivation")
                make = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = families[name] = make(f"hvobs_worker_{name}", text, labels=names)
            family.add_metric(key, value)

        yield from _group_gauges(worker)
        for partition in worker.partitions:
            key = (group, str(partition.index))
            stats = partition.stats
            running = partition.worker
            add("counter", "events", "Entries this worker processed", key, stats.events)
            add("counter", "redeliveries", "Entries delivered again", key, stats.redeliveries)
            add("counter", "claimed", "Entries claimed from idle consumers", key, stats.claimed)
            add("counter", "gap_entries", "Entries trimmed unread", key, stats.gap_entries)
            add("gauge", "lag", "Entries not yet delivered", key, float(stats.lag or 0))
            add("gauge", "pending", "Entries delivered, not acknowledged", key, stats.pending)
            add(
                "gauge",
                "oldest_pending_age_seconds",
                "Seconds since the oldest pending entry was delivered",
                key,
                stats.oldest_pending_age_s,
            )
            add(
                "gauge",
                "partition_owned",
                "1 while this worker runs it",
                key,
                float(running is not None),
            )
            appliers = {a.derivation.name: a for a in running.appliers} if running else {}
            for derivation in partition.derivations:
                dkey = (*key, derivation.name)
                applier = appliers.get(derivation.name)
                done = partition.applied.get(derivation.name, 0)
                current = applier.applied_events if applier is not None else 0
                add("counter", "applied_events", "Staged entries applied", dkey, done + current)
                leader = applier is not None and applier.leader
                add("gauge", "applier", "1 while this worker applies", dkey, float(leader))
            view = self._views[partition.index]
            if view is not None:
                vkey = (*key, RING_METRICS)
                add("gauge", "state_version", "Committed version seen", vkey, view.meta.version)
                add("gauge", "view_stale", "1 while the view is stale", vkey, float(view.stale))
        yield from families.values()


def _group_gauges(worker: PartitionedWorker) -> Iterable[Metric]:
    group = worker.config.group
    for name, text, value in (
        ("partitions", "Partitions of the stream", len(worker.partitions)),
        ("live_workers", "Live workers of the group at the last heartbeat", len(worker.live)),
        ("connected", "1 if the last registry call succeeded", float(worker.connected)),
    ):
        family = GaugeMetricFamily(f"hvobs_worker_{name}", text, labels=("group",))
        family.add_metric((group,), value)
        yield family


async def partitioned_health(
    worker: PartitionedWorker, views: list[SnapshotView | None]
) -> dict[str, Any]:
    """Return the ``/healthz`` document of a partitioned worker (refreshing what it shows)."""
    error = ""
    for partition in worker.partitions:
        try:
            await refresh_partition(worker, partition)
        except LogError as exc:
            error = str(exc)
    for view in views:
        if view is not None:
            with suppress(WorkerStateError, LogError):
                await view.refresh()
    parts: list[dict[str, Any]] = []
    for partition in worker.partitions:
        stats = partition.stats
        view = views[partition.index]
        parts.append(
            {
                "owner": worker.owners[partition.index] if worker.owners else None,
                "running": partition.worker is not None,
                "lag": stats.lag,
                "pending": stats.pending,
                "oldest_pending_age_seconds": stats.oldest_pending_age_s,
                "events": stats.events,
                "applied_id": None if view is None else view.applied_id,
                "stale": None if view is None else view.stale,
            }
        )
    keeping_up = all(
        p.stats.oldest_pending_age_s <= worker.config.max_pending_age_s for p in worker.partitions
    )
    return {
        "connected": worker.connected and not error,
        "keeping_up": keeping_up,
        "stopping": worker.stopping,
        "group": worker.config.group,
        "consumer": worker.config.consumer,
        "partitions": len(worker.partitions),
        "live": list(worker.live),
        "owned": worker.owned(),
        "partition": parts,
        "error": error,
    }


class PartitionedHttpServer(HttpServerBase):
    """Serves ``/metrics`` (the union of the partitions' ring states) and ``/healthz``.

    Args:
        worker: the partitioned worker.
        bounds: the label limits of the union (the configured ones; each partition folds with
            its share, ``partition_bounds``).
        host: address to bind.
        port: port to bind (0: any free port).
        session_label: label the ring counters with ``session_id``.
        view_refresh_s: how often the views follow the committed states in the background.
    """

    def __init__(
        self,
        worker: PartitionedWorker,
        *,
        bounds: RingBounds | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        session_label: bool = True,
        view_refresh_s: float = 0.5,
    ) -> None:
        super().__init__(host=host, port=port, view_refresh_s=view_refresh_s)
        self.worker = worker
        self._rendered: dict[str, bytes] = {}
        self._resets = 0  # resets of the views replaced by a reopening
        self._seen_resets = 0
        self._ring_views: list[SnapshotView | None] = [None] * len(worker.partitions)
        self._generations = [-1] * len(worker.partitions)
        self._sync_views()
        self._has_ring = any(view is not None for view in self._ring_views)
        self._bounds = bounds if bounds is not None else RingBounds()
        self.registry.register(_PartitionCollector(worker, self._ring_views))
        self._ring = RingExposition(session_label)

    def _sync_views(self) -> None:
        """A new view for each partition reopened on another node (its store replaced): the
        union is served from the last rendered one until the new view is loaded."""
        for partition in self.worker.partitions:
            if self._generations[partition.index] == partition.generation:
                continue
            self._generations[partition.index] = partition.generation
            ring = next(
                (d for d in partition.derivations if isinstance(d, RingMetricsDerivation)), None
            )
            view = None if ring is None else SnapshotView(ring, checkpoints_only=True)
            old = self._ring_views[partition.index]
            if old is not None:
                self._resets += old.state_resets  # keep the sum of resets where it was
            self._ring_views[partition.index] = view
            name = f"{RING_METRICS}/{partition.index}"
            if view is None:
                self.views.pop(name, None)
            else:
                self.views[name] = view

    def _follow_appliers(self) -> None:
        """A partition this worker applies is served from its applier's state (no replay)."""
        for partition, view in zip(self.worker.partitions, self._ring_views, strict=True):
            if view is None:
                continue
            running = partition.worker
            applier = None
            if running is not None:
                applier = next(
                    (a for a in running.appliers if a.derivation.name == RING_METRICS), None
                )
            view.follow(applier)

    def _prepare_views(self) -> None:
        self._sync_views()
        self._follow_appliers()

    async def _refresh_views(self) -> None:
        self._prepare_views()
        for view in self._ring_views:
            if view is not None:
                with suppress(WorkerStateError, LogError):
                    await view.refresh()

    def union(self) -> RingMetricsState | None:
        """The union of the partitions' ring views, if every one may be served."""
        states = []
        for view in self._ring_views:
            if view is None:
                continue
            state = view.servable()
            if not isinstance(state, RingMetricsState):
                return None
            states.append(state)
        return union_ring_states(states, self._bounds) if states else None

    def _ring_body(self, kind: str, encode: Callable[[CollectorRegistry], bytes]) -> bytes | None:
        views = [view for view in self._ring_views if view is not None]
        if not views or any(view.unreadable for view in views):
            return b""
        # A partition's state lost (its epoch changed): what was rendered from it is void.
        resets = self._resets + sum(view.state_resets for view in views)
        if resets != self._seen_resets:
            self._seen_resets = resets
            self._rendered.clear()
        union = self.union()
        if union is None:
            return self._rendered.get(kind)
        body = self._ring.render(union, kind, encode)
        self._rendered[kind] = body
        return body

    async def _respond(self, path: bytes, accept: str = "") -> tuple[str, str, bytes]:
        if path == b"/metrics":
            for partition in self.worker.partitions:
                with suppress(LogError):  # the connected gauge and the views say so
                    await refresh_partition(self.worker, partition)
            await self._refresh_views()
            encode, content_type = choose_encoder(accept)
            openmetrics = content_type.startswith("application/openmetrics-text")
            ring = (
                self._ring_body(_OPENMETRICS if openmetrics else _TEXT, encode)
                if self._has_ring
                else b""
            )
            stale = [v.stale_error for v in self._ring_views if v is not None and v.stale]
            why = stale[0] if stale and ring is None else ""
            return self._metrics_response(ring, why, encode, content_type)
        if path in (b"/healthz", b"/health"):
            self._prepare_views()
            document = await partitioned_health(self.worker, self._ring_views)
            healthy = document["connected"] and document["keeping_up"]
            status = "200 OK" if healthy else "503 Service Unavailable"
            return status, "application/json", _json.encode(document)
        return "404 Not Found", "text/plain", b"not found\n"
