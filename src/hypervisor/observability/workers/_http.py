"""The worker's HTTP endpoints: ``/metrics`` (Prometheus text) and ``/healthz`` (JSON).

``/metrics`` carries the worker's own health (``hvobs_worker_*``) and, for a ring-metrics
worker, the **global** ring metrics: before each scrape the worker brings its copy of the
committed state up to date (one meta read; when the version changed, the records committed
since, or the checkpoint and its redo records), so every worker of a group serves the same
numbers. A small anyio server (not prometheus_client's
thread) lets the scrape await that refresh.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import anyio
import msgspec
from anyio.abc import SocketStream, TaskStatus
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from hypervisor.observability._backends.log import LogError, parse_id
from hypervisor.observability._backends.state import StateMeta
from hypervisor.observability._core.ring import RingMetricsState
from hypervisor.observability.exporters.prometheus import (
    DEFAULT_MAX_AGENTS,
    DEFAULT_MAX_SESSIONS,
    LabelGuard,
    RingMetricsPrometheusCollector,
)
from hypervisor.observability.workers._apply import fold, restore_state
from hypervisor.observability.workers._derivations import RING_METRICS, Derivation
from hypervisor.observability.workers._dlq import REASON_MAX_DELIVERIES, REASON_UNDECODABLE
from hypervisor.observability.workers._runtime import BATCH_BUCKETS, Worker
from hypervisor.observability.workers._snapshot import WorkerStateError

__all__ = ["SnapshotView", "WorkerHttpServer", "health_document"]

_log = logging.getLogger("hypervisor.observability.workers")
_json = msgspec.json.Encoder()


class SnapshotView:
    """A local copy of a derivation's committed state, refreshed on demand.

    A refresh reads the meta; when the version changed it folds in the redo records committed
    since the copy's applied id (the staged entries, as the applier folded them), or rebuilds
    from the checkpoint when a checkpoint dropped some of them meanwhile.

    Args:
        derivation: the derivation whose committed state is shown (its ``store``).
    """

    def __init__(self, derivation: Derivation) -> None:
        self._derivation = derivation
        self._store = derivation.store
        self.meta = StateMeta()
        self.state: Any = derivation.new_state()
        self._loaded_version = -1
        self.rebuilds = 0
        """Rebuilds from the checkpoint (first refresh, or records dropped meanwhile)."""

    async def refresh(self) -> None:
        """Bring the copy up to the committed state if the committed version changed."""
        meta = await self._store.meta()
        if meta.version == self._loaded_version:
            return
        if self._loaded_version >= 0 and parse_id(meta.applied_id) >= parse_id(
            self.meta.applied_id
        ):
            replay = await self._store.replay(self.meta.applied_id, meta.applied_id)
            if replay is not None:
                fold(self._derivation, self.state, *replay)
                self.meta = meta
                self._loaded_version = meta.version
                return
        restored = await self._store.restore()
        self.rebuilds += 1
        self.state = restore_state(self._derivation, restored)
        self.meta = restored.meta
        self._loaded_version = restored.meta.version


class _GlobalRingCollector(Collector):
    """The committed ring metrics, exported like the in-process collector does."""

    def __init__(
        self, view: SnapshotView, max_agents: int, max_sessions: int, session_label: bool = True
    ) -> None:
        self._view = view
        self._max_agents = max_agents
        self._max_sessions = max_sessions
        self._session_label = session_label
        self._guard = LabelGuard(max_agents=max_agents, max_sessions=max_sessions)

    def _collector(self) -> RingMetricsPrometheusCollector:
        state = self._view.state
        if not isinstance(state, RingMetricsState):
            state = RingMetricsState()
        made = RingMetricsPrometheusCollector(
            state,
            max_agents=self._max_agents,
            max_sessions=self._max_sessions,
            session_label=self._session_label,
        )
        made.guard = self._guard  # one guard for the life of the worker: stable folding
        return made

    def describe(self) -> Iterable[Metric]:
        return self._collector().describe()

    def collect(self) -> Iterable[Metric]:
        return self._collector().collect()


class _WorkerCollector(Collector):
    """The worker's own health, read from its stats at scrape time."""

    def __init__(self, worker: Worker, views: dict[str, SnapshotView]) -> None:
        self._worker = worker
        self._views = views

    def collect(self) -> Iterable[Metric]:
        worker = self._worker
        stats = worker.stats
        group = worker.config.group
        labels = ("group",)

        def counter(name: str, text: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"hvobs_worker_{name}", text, labels=labels)
            family.add_metric((group,), value)
            return family

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"hvobs_worker_{name}", text, labels=labels)
            family.add_metric((group,), value)
            return family

        yield counter("events", "Entries this worker processed (read or claimed)", stats.events)
        yield counter(
            "redeliveries", "Entries delivered again (own PEL, claims)", stats.redeliveries
        )
        yield counter("claimed", "Entries claimed from idle consumers", stats.claimed)
        yield counter("decode_errors", "Entries that were not events", stats.decode_errors)
        yield counter(
            "processing_errors", "Entries left pending after an error", stats.processing_errors
        )
        yield counter(
            "group_recreated", "Consumer group recreated after NOGROUP", stats.group_recreated
        )
        yield counter("backend_errors", "Backend calls that failed", stats.backend_errors)
        dead = CounterMetricFamily(
            "hvobs_worker_dead_lettered",
            "Entries sent to the dead-letter log",
            labels=("group", "reason"),
        )
        for reason in sorted({REASON_UNDECODABLE, REASON_MAX_DELIVERIES, *stats.dead_lettered}):
            dead.add_metric((group, reason), stats.dead_lettered.get(reason, 0))
        yield dead
        yield gauge("lag", "Entries of the group not yet delivered", float(stats.lag or 0))
        yield gauge("pending", "Entries of the group delivered and not acknowledged", stats.pending)
        yield gauge(
            "oldest_pending_age_seconds",
            "Seconds since the group's oldest pending entry was delivered",
            stats.oldest_pending_age_s,
        )
        yield gauge("connected", "1 if the last backend call succeeded", float(worker.connected))
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(BATCH_BUCKETS, stats.batch_buckets, strict=False):
            running += count
            buckets.append((repr(bound), float(running)))
        buckets.append(("+Inf", float(stats.batches)))
        histogram = HistogramMetricFamily(
            "hvobs_worker_batch_seconds",
            "Seconds to stage, dead-letter and acknowledge one batch",
            labels=labels,
        )
        histogram.add_metric((group,), buckets, stats.batch_seconds_sum)
        yield histogram
        per = ("group", "derivation")
        applied = CounterMetricFamily(
            "hvobs_worker_applied_events",
            "Staged entries this worker applied as applier",
            labels=per,
        )
        duplicates = CounterMetricFamily(
            "hvobs_worker_duplicates", "Entries skipped as duplicate event ids", labels=per
        )
        conflicts = CounterMetricFamily(
            "hvobs_worker_commit_conflicts", "Commits lost to another applier", labels=per
        )
        leader = GaugeMetricFamily(
            "hvobs_worker_applier", "1 while this worker applies", labels=per
        )
        version = GaugeMetricFamily(
            "hvobs_worker_state_version", "Committed state version last seen", labels=per
        )
        for applier in worker.appliers:
            key = (group, applier.derivation.name)
            applied.add_metric(key, applier.applied_events)
            duplicates.add_metric(key, applier.duplicates)
            conflicts.add_metric(key, applier.conflicts)
            leader.add_metric(key, float(applier.leader))
            view = self._views.get(applier.derivation.name)
            if view is not None:
                version.add_metric(key, view.meta.version)
        yield from (applied, duplicates, conflicts, leader, version)


async def health_document(worker: Worker, views: dict[str, SnapshotView]) -> dict[str, Any]:
    """Return the ``/healthz`` document (refreshing group gauges and state views)."""
    error = ""
    backlog: dict[str, int] = {}
    try:
        await worker.refresh()
        for applier in worker.appliers:
            backlog[applier.derivation.name] = await applier.store.backlog()
        for view in views.values():
            await view.refresh()
    except (LogError, WorkerStateError) as exc:
        error = str(exc)
    stats = worker.stats
    version = worker.server_version
    return {
        "connected": worker.connected and not error,
        "keeping_up": worker.keeping_up,
        "stopping": worker.stopping,
        "group": worker.config.group,
        "consumer": worker.config.consumer,
        "lag": stats.lag,
        "pending": stats.pending,
        "oldest_pending_age_seconds": stats.oldest_pending_age_s,
        "events": stats.events,
        "dead_lettered": dict(stats.dead_lettered),
        "applied_id": {name: view.meta.applied_id for name, view in views.items()},
        "backlog": backlog,
        "server_version": ".".join(map(str, version)) if version else None,
        "error": error,
    }


class WorkerHttpServer:
    """Serves ``/metrics`` and ``/healthz`` for one worker.

    Args:
        worker: the worker.
        host: address to bind.
        port: port to bind (0: any free port; see :attr:`port` once started).
        max_agents: agents with series of their own in the ring metrics.
        max_sessions: sessions with series of their own.
        session_label: label the ring counters with ``session_id`` (``False``: summed over
            sessions).

    ``/metrics`` answers in the format the ``Accept`` header asks for: the Prometheus text
    format by default, OpenMetrics (with the ring counters' exemplars) when asked for it, as
    Prometheus does.
    """

    def __init__(
        self,
        worker: Worker,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_agents: int = DEFAULT_MAX_AGENTS,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        session_label: bool = True,
    ) -> None:
        self.worker = worker
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.views: dict[str, SnapshotView] = {
            applier.derivation.name: SnapshotView(applier.derivation) for applier in worker.appliers
        }
        self.registry.register(_WorkerCollector(worker, self.views))
        ring = self.views.get(RING_METRICS)
        if ring is not None:
            self.registry.register(
                _GlobalRingCollector(ring, max_agents, max_sessions, session_label)
            )

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports the bound port through ``task_status``."""
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
        async with listener:
            self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
            task_status.started(self.port)
            await listener.serve(self._handle)

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(10):
                    request = b""
                    while b"\r\n\r\n" not in request and len(request) < 8192:
                        request += await stream.receive(4096)
                    path = request.split(b" ", 2)[1].split(b"?")[0] if b" " in request else b""
                    status, ctype, body = await self._respond(path, _accept(request))
                    head = (
                        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                    )
                    await stream.send(head.encode() + body)
            except (anyio.EndOfStream, anyio.BrokenResourceError, TimeoutError, IndexError):
                return

    async def _respond(self, path: bytes, accept: str = "") -> tuple[str, str, bytes]:
        if path == b"/metrics":
            try:
                await self.worker.refresh()
                for view in self.views.values():
                    await view.refresh()
            except (LogError, WorkerStateError) as exc:
                # Serve what is known; the connected gauge says the backend is away.
                _log.warning("metrics refresh failed: %s", exc)
            encode, content_type = choose_encoder(accept)
            return "200 OK", content_type, encode(self.registry)
        if path in (b"/healthz", b"/health"):
            document = await health_document(self.worker, self.views)
            healthy = document["connected"] and document["keeping_up"]
            status = "200 OK" if healthy else "503 Service Unavailable"
            return status, "application/json", _json.encode(document)
        return "404 Not Found", "text/plain", b"not found\n"


def _accept(request: bytes) -> str:
    """The ``Accept`` header of a raw request head (empty when absent or not ASCII)."""
    for line in request.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"accept":
            try:
                return value.strip().decode("ascii")
            except UnicodeDecodeError:
                return ""
    return ""
