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
from contextlib import suppress
from typing import Any

import anyio
import msgspec
from anyio.abc import SocketStream, TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
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
from hypervisor.observability.errors import WorkerStateError
from hypervisor.observability.exporters.prometheus import (
    LabelGuard,
    RingMetricsPrometheusCollector,
    render_ring_metrics,
)
from hypervisor.observability.workers._apply import Applier, fold, restore_state
from hypervisor.observability.workers._derivations import RING_METRICS, Derivation
from hypervisor.observability.workers._dlq import REASON_MAX_DELIVERIES, REASON_UNDECODABLE
from hypervisor.observability.workers._runtime import BATCH_BUCKETS, Worker

__all__ = ["SnapshotView", "WorkerHttpServer", "health_document"]

_log = logging.getLogger("hypervisor.observability.workers")
_json = msgspec.json.Encoder()
# Milliseconds a refresh waits for the applier's commit in flight before building its own copy.
_SHARE_WAITS = 50


class SnapshotView:
    """A local copy of a derivation's committed state, refreshed on demand.

    A refresh reads the meta; when the version changed it folds in the redo records committed
    since the copy's applied id (the staged entries, as the applier folded them), or rebuilds
    from the checkpoint when a checkpoint dropped some of them meanwhile.

    While this worker's own applier holds the lease and its state is the committed state (no
    round in flight), the view uses that state instead of a copy of its own: one copy of the
    state per worker, and a scrape has nothing to fold.

    Refreshes are serialised (a scrape and a health check at once must not fold the same
    records twice). :attr:`state` is ``None`` until the first refresh and while a rebuild is
    under way or failed: the old copy is released first, so a rebuild never holds two.

    Args:
        derivation: the derivation whose committed state is shown (its ``store``).
        applier: this worker's applier of that derivation, whose state the view may share.
    """

    def __init__(self, derivation: Derivation, applier: Applier | None = None) -> None:
        self._derivation = derivation
        self._store = derivation.store
        self._applier = applier
        self.meta = StateMeta()
        self.state: Any = None
        self._loaded_version = -1
        self._shared = False
        self._lock = anyio.Lock()
        self.rebuilds = 0
        """Rebuilds from the checkpoint (first refresh, or records dropped meanwhile)."""
        self.shared_refreshes = 0
        """Refreshes that took the applier's state."""
        self.error: WorkerStateError | None = None
        """Why the last refresh could not read the committed state (``None``: it could)."""

    async def refresh(self) -> None:
        """Bring the copy up to the committed state if the committed version changed.

        Raises:
            WorkerStateError: the committed state is unreadable (also kept in :attr:`error`
                until a refresh succeeds: the copy is not served meanwhile).
        """
        async with self._lock:
            try:
                await self._refresh()
            except WorkerStateError as error:
                self.error = error
                raise
            self.error = None

    @property
    def unreadable(self) -> bool:
        """Whether the derivation's stored state is unreadable now (then it is not served)."""
        return self.error is not None or bool(self._store.errors.current)

    async def _refresh(self) -> None:
        meta = await self._store.meta()
        if await self._share(meta):
            return
        if self._shared:
            # The state was the applier's, which moves on without us: build a copy of our own.
            self._shared = False
            self._loaded_version = -1
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
        self.state = None
        self._loaded_version = -1
        restored = await self._store.restore()
        self.rebuilds += 1
        self.state = restore_state(self._derivation, restored)
        self.meta = restored.meta
        self._loaded_version = restored.meta.version

    async def _share(self, meta: StateMeta) -> bool:
        """Take the applier's state if it is the committed state of ``meta``'s version or a
        later one (waiting a little for a commit in flight)."""
        applier = self._applier
        if applier is None or not applier.leader:
            return False
        found = applier.committed_state()
        for _ in range(_SHARE_WAITS):
            if found is not None:
                break
            await anyio.sleep(0.001)
            found = applier.committed_state()
        if found is None or found[0].version < meta.version:
            return False
        # Nothing awaits between here and the export, so the applier cannot change it meanwhile.
        self.meta, self.state = found
        self._loaded_version = found[0].version
        self._shared = True
        self.shared_refreshes += 1
        return True


class _GlobalRingCollector(Collector):
    """The committed ring metrics of a state that is not bounded (a custom derivation), through
    the in-process collector and a guard kept for the life of the worker.

    A bounded state (the ring derivation's) has decided in stream order which labels have series
    of their own, and is exported as it folded them (so its export depends on the committed
    state only, never on what this process scraped before); in the Prometheus text format it is
    rendered directly instead (``render_ring_metrics``, the same bytes, faster). This collector
    serves OpenMetrics (with the counters' exemplars) and states that are not bounded.
    """

    def __init__(self, view: SnapshotView, session_label: bool = True) -> None:
        self._view = view
        self._session_label = session_label
        self._guard = LabelGuard()

    def _collector(self) -> RingMetricsPrometheusCollector:
        state = self._view.state
        if not isinstance(state, RingMetricsState):
            state = RingMetricsState()
        # A bounded state is exported as it folded it (the guard is not consulted).
        return RingMetricsPrometheusCollector(
            state, guard=self._guard, session_label=self._session_label
        )

    def describe(self) -> Iterable[Metric]:
        return self._collector().describe()

    def collect(self) -> Iterable[Metric]:
        if self._view.unreadable:  # serve none of a state that may be wrong
            return iter(())
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
        yield counter(
            "gap_entries",
            "Entries trimmed from the stream before the group read them (never processed)",
            stats.gap_entries,
        )
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
        state_errors = CounterMetricFamily(
            "hvobs_worker_state_errors",
            "Distinct unreadable items or keys met in the stored state (skipped, repaired or "
            "blocking)",
            labels=(*per, "key"),
        )
        unreadable = GaugeMetricFamily(
            "hvobs_worker_state_unreadable",
            "1 while the derivation's stored state is unreadable (nothing applied or served)",
            labels=per,
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
            errors = applier.store.errors
            for name, count in sorted(errors.counts.items()):
                state_errors.add_metric((*key, name), count)
            unreadable.add_metric(key, float(bool(errors.current)))
        yield from (applied, duplicates, conflicts, leader, version, state_errors, unreadable)


async def health_document(worker: Worker, views: dict[str, SnapshotView]) -> dict[str, Any]:
    """Return the ``/healthz`` document (refreshing group gauges and state views)."""
    error = ""
    backlog: dict[str, int] = {}
    try:
        await worker.refresh()
        for applier in worker.appliers:
            with suppress(WorkerStateError):  # reported by the store: see state_errors
                backlog[applier.derivation.name] = await applier.store.backlog()
        for view in views.values():
            with suppress(WorkerStateError):
                await view.refresh()
    except LogError as exc:
        error = str(exc)
    state_errors = {
        applier.derivation.name: " | ".join(applier.store.errors.blocking)
        for applier in worker.appliers
        if applier.store.errors.current
    }
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
        "gap_entries": stats.gap_entries,
        "dead_lettered": dict(stats.dead_lettered),
        "applied_id": {name: view.meta.applied_id for name, view in views.items()},
        "backlog": backlog,
        "server_version": ".".join(map(str, version)) if version else None,
        "error": error,
        "state_errors": state_errors,
        "state_error_counts": {
            applier.derivation.name: sum(applier.store.errors.counts.values())
            for applier in worker.appliers
        },
    }


class WorkerHttpServer:
    """Serves ``/metrics`` and ``/healthz`` for one worker.

    Args:
        worker: the worker.
        host: address to bind.
        port: port to bind (0: any free port; see :attr:`port` once started).
        session_label: label the ring counters with ``session_id`` (``False``: summed over
            sessions).
        view_refresh_s: how often the views follow the committed state in the background.

    The ring metrics' label limits are the ring derivation's bounds. ``/metrics`` answers in
    the format the ``Accept`` header asks for: the Prometheus text format by default,
    OpenMetrics (with the ring counters' exemplars) when asked for it, as Prometheus does.
    """

    def __init__(
        self,
        worker: Worker,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        session_label: bool = True,
        view_refresh_s: float = 0.5,
    ) -> None:
        self.worker = worker
        self.view_refresh_s = view_refresh_s
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self._last_failure = ""
        self.views: dict[str, SnapshotView] = {
            applier.derivation.name: SnapshotView(applier.derivation, applier)
            for applier in worker.appliers
        }
        self.registry.register(_WorkerCollector(worker, self.views))
        self._session_label = session_label
        self._ring_view = self.views.get(RING_METRICS)
        # OpenMetrics, and the ring metrics of a state that is not bounded (a custom
        # derivation), go through prometheus_client.
        self._ring_fallback = CollectorRegistry(auto_describe=False)
        if self._ring_view is not None:
            self._ring_fallback.register(_GlobalRingCollector(self._ring_view, session_label))

    def _ring_text(self) -> bytes:
        """The ring metrics' exposition of the view's state (nothing without a ring view)."""
        view = self._ring_view
        if view is None or view.state is None or view.unreadable:
            # Not loaded (yet), or the stored state is unreadable: no series rather than zeros
            # that look like resets or numbers that may be wrong.
            return b""
        state = view.state
        if isinstance(state, RingMetricsState) and state.bounds is not None and self._session_label:
            return render_ring_metrics(state)
        return generate_latest(self._ring_fallback)

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports the bound port through ``task_status``.

        Meanwhile the views follow the committed state every ``view_refresh_s``, so a scrape
        folds at most that much of the group's traffic instead of rebuilding a view that fell
        more than a checkpoint behind (on a worker that is not the applier, after a burst).
        """
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
        async with listener, anyio.create_task_group() as tg:
            self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
            task_status.started(self.port)
            tg.start_soon(self._follow_views)
            await listener.serve(self._handle)

    async def _follow_views(self) -> None:
        while True:
            await anyio.sleep(self.view_refresh_s)
            for view in self.views.values():
                try:
                    await view.refresh()
                except (LogError, WorkerStateError):
                    pass  # counted and reported where they happen; a scrape retries
                except Exception as exc:  # a bad state must never take the worker down
                    self._failed(b"(view refresh)", exc)

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(10):
                    request = b""
                    while b"\r\n\r\n" not in request and len(request) < 8192:
                        request += await stream.receive(4096)
                    path = request.split(b" ", 2)[1].split(b"?")[0] if b" " in request else b""
                    try:
                        status, ctype, body = await self._respond(path, _accept(request))
                    except Exception as exc:  # a bad state must never take the worker down
                        self._failed(path, exc)
                        status, ctype, body = "500 Internal Server Error", "text/plain", b"error\n"
                    head = (
                        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                    )
                    await stream.send(head.encode() + body)
            except (anyio.EndOfStream, anyio.BrokenResourceError, TimeoutError, IndexError):
                return

    def _failed(self, path: bytes, exc: Exception) -> None:
        """Log a failed request: with its traceback the first time, briefly while it repeats
        (every scrape meets the same bad state until it changes)."""
        failure = f"serving {path.decode(errors='replace')} failed: {exc!r}"
        if failure == self._last_failure:
            _log.debug("%s", failure)
            return
        self._last_failure = failure
        _log.error("%s", failure, exc_info=exc)

    async def _respond(self, path: bytes, accept: str = "") -> tuple[str, str, bytes]:
        if path == b"/metrics":
            try:
                await self.worker.refresh()
                # The ring view last: nothing awaits between its refresh and the export, so a
                # state it shares with the applier cannot take uncommitted records meanwhile.
                for name in sorted(self.views, key=lambda name: name == RING_METRICS):
                    with suppress(WorkerStateError):  # reported by the store; not served
                        await self.views[name].refresh()
            except LogError as exc:
                # Serve what is known; the connected gauge says the backend is away.
                _log.warning("metrics refresh failed: %s", exc)
            encode, content_type = choose_encoder(accept)
            if not content_type.startswith("application/openmetrics-text"):
                body = generate_latest(self.registry) + self._ring_text()
                return "200 OK", CONTENT_TYPE_LATEST, body
            view = self._ring_view
            if view is None or view.state is None or view.unreadable:
                # As in the text format: no ring series from a state not loaded or unreadable.
                return "200 OK", content_type, encode(self.registry)
            return "200 OK", content_type, encode(_Joined(self.registry, self._ring_fallback))
        if path in (b"/healthz", b"/health"):
            document = await health_document(self.worker, self.views)
            healthy = (
                document["connected"] and document["keeping_up"] and not document["state_errors"]
            )
            status = "200 OK" if healthy else "503 Service Unavailable"
            return status, "application/json", _json.encode(document)
        return "404 Not Found", "text/plain", b"not found\n"


class _Joined(Collector):
    """The metrics of several registries as one (what an encoder is given)."""

    def __init__(self, *registries: CollectorRegistry) -> None:
        self._registries = registries

    def collect(self) -> Iterable[Metric]:
        for registry in self._registries:
            yield from registry.collect()


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
