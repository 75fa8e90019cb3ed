"""The worker's HTTP endpoints: ``/metrics`` (Prometheus text) and ``/healthz`` (JSON).

``/metrics`` carries the worker's own health (``hvobs_worker_*``) and, for a ring-metrics
worker, the **global** ring metrics: before each scrape the worker brings its view of the
committed state up to date (``_view.SnapshotView``), so every worker of a group serves the same
numbers. When it cannot, the scrape serves the last good view (and says so:
``hvobs_worker_view_stale``), or answers 503 when there is none: never zeros, which Prometheus
would read as a counter reset. A small anyio server (not prometheus_client's thread) lets the
scrape await that refresh.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
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

from hypervisor.observability._backends.log import LogError
from hypervisor.observability._core.ring import RingMetricsState
from hypervisor.observability.errors import WorkerStateError
from hypervisor.observability.exporters.prometheus import (
    LabelGuard,
    RingMetricsPrometheusCollector,
    render_ring_metrics,
)
from hypervisor.observability.workers._derivations import RING_METRICS
from hypervisor.observability.workers._dlq import REASON_MAX_DELIVERIES, REASON_UNDECODABLE
from hypervisor.observability.workers._runtime import BATCH_BUCKETS, Worker
from hypervisor.observability.workers._view import SnapshotView

__all__ = ["SnapshotView", "WorkerHttpServer", "health_document"]

_log = logging.getLogger("hypervisor.observability.workers")
_json = msgspec.json.Encoder()
_TEXT = "text"
_OPENMETRICS = "openmetrics"
_EOF = b"# EOF\n"


class _RingCollector(Collector):
    """The ring metrics of one state through the in-process collector, with a guard kept for
    the life of the worker.

    A bounded state (the ring derivation's) has decided in stream order which labels have series
    of their own, and is exported as it folded them (so its export depends on the committed
    state only, never on what this process scraped before); in the Prometheus text format it is
    rendered directly instead (``render_ring_metrics``, the same bytes, faster). This collector
    serves OpenMetrics (with the counters' exemplars) and states that are not bounded.
    """

    def __init__(self, guard: LabelGuard, session_label: bool) -> None:
        self._guard = guard
        self._session_label = session_label
        self.state: RingMetricsState | None = None
        """The state to export (set just before each export; ``None``: nothing)."""

    def collect(self) -> Iterable[Metric]:
        if self.state is None:  # never an empty state's zeros
            return iter(())
        # A bounded state is exported as it folded it (the guard is not consulted).
        return RingMetricsPrometheusCollector(
            self.state, guard=self._guard, session_label=self._session_label
        ).collect()


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
        stale = GaugeMetricFamily(
            "hvobs_worker_view_stale",
            "1 while the view cannot be brought up to date (the last good view is served)",
            labels=per,
        )
        age = GaugeMetricFamily(
            "hvobs_worker_view_age_seconds",
            "Seconds since the view was last brought up to the committed state",
            labels=per,
        )
        failures = CounterMetricFamily(
            "hvobs_worker_view_refresh_failures",
            "View refreshes that could not reach the committed state",
            labels=per,
        )
        resets = CounterMetricFamily(
            "hvobs_worker_state_resets",
            "Times the state's epoch changed: Redis lost the state, rebuilt from scratch",
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
                stale.add_metric(key, float(view.stale))
                view_age = view.age_s()
                if view_age is not None:  # never up to date: no sample rather than a made-up one
                    age.add_metric(key, view_age)
                failures.add_metric(key, view.refresh_failures)
                resets.add_metric(key, view.state_resets)
            errors = applier.store.errors
            for name, count in sorted(errors.counts.items()):
                state_errors.add_metric((*key, name), count)
            unreadable.add_metric(key, float(bool(errors.current)))
        yield from (applied, duplicates, conflicts, leader, version, state_errors, unreadable)
        if self._views:
            yield from (stale, age, failures, resets)


async def health_document(worker: Worker, views: dict[str, SnapshotView]) -> dict[str, Any]:
    """Return the ``/healthz`` document (refreshing group gauges and state views)."""
    error = ""
    backlog: dict[str, int] = {}
    try:
        await worker.refresh()
        for applier in worker.appliers:
            with suppress(WorkerStateError):  # reported by the store: see state_errors
                backlog[applier.derivation.name] = await applier.store.backlog()
    except LogError as exc:
        error = str(exc)
    for view in views.values():
        with suppress(WorkerStateError, LogError):  # reported in state_errors and views
            await view.refresh()
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
        "applied_id": {name: view.applied_id for name, view in views.items()},
        "views": {name: _view_document(view) for name, view in views.items()},
        "backlog": backlog,
        "server_version": ".".join(map(str, version)) if version else None,
        "error": error,
        "state_errors": state_errors,
        "state_error_counts": {
            applier.derivation.name: sum(applier.store.errors.counts.values())
            for applier in worker.appliers
        },
    }


def _view_document(view: SnapshotView) -> dict[str, Any]:
    """A view's freshness, for ``/healthz``."""
    age = view.age_s()
    return {
        "version": view.meta.version,
        "epoch": view.meta.epoch,
        "stale": view.stale,
        "stale_error": view.stale_error,
        "age_seconds": None if age is None else round(age, 3),
        "refresh_failures": view.refresh_failures,
        "state_resets": view.state_resets,
    }


class RingExposition:
    """The ring metrics of a state in a scrape's format, as both kinds of worker serve them.

    The Prometheus text of a bounded state is rendered directly (``render_ring_metrics``:
    the same bytes, faster); OpenMetrics (with the counters' exemplars), a state that is not
    bounded and ``--no-session-label`` go through prometheus_client.
    """

    def __init__(self, session_label: bool) -> None:
        self._session_label = session_label
        self._collector = _RingCollector(LabelGuard(), session_label)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._collector)

    def render(
        self,
        state: RingMetricsState,
        kind: str,
        encode: Callable[[CollectorRegistry], bytes],
    ) -> bytes:
        """``state``'s ring metrics in format ``kind``, without OpenMetrics' ``# EOF``."""
        if kind == _TEXT and state.bounds is not None and self._session_label:
            return render_ring_metrics(state)
        self._collector.state = state
        try:
            return encode(self._registry).removesuffix(_EOF)
        finally:
            self._collector.state = None


class HttpServerBase:
    """The small anyio HTTP server both worker kinds serve ``/metrics`` and ``/healthz`` with.

    Subclasses set :attr:`views` and implement :meth:`_respond`.

    Args:
        host: address to bind.
        port: port to bind (0: any free port; see :attr:`port` once started).
        view_refresh_s: how often the views follow the committed state in the background.
    """

    def __init__(self, *, host: str, port: int, view_refresh_s: float) -> None:
        self.host = host
        self.port = port
        self.view_refresh_s = view_refresh_s
        self._last_failure = ""
        self.views: dict[str, SnapshotView] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        """The worker's own families (subclasses register their collectors)."""

    async def _respond(self, path: bytes, accept: str = "") -> tuple[str, str, bytes]:
        raise NotImplementedError

    def _metrics_response(
        self,
        ring: bytes | None,
        why: str,
        encode: Callable[[CollectorRegistry], bytes],
        content_type: str,
    ) -> tuple[str, str, bytes]:
        """``/metrics``: the worker's own families (:attr:`registry`) and the ring metrics
        ``ring`` in the scrape's format; 503 with one line (``why``, else "not loaded yet")
        when there is no good ring view to serve, since zeros would read as a counter reset."""
        if ring is None:
            line = f"ring metrics unavailable: {why or 'not loaded yet'}".replace("\n", " ")
            return "503 Service Unavailable", "text/plain; charset=utf-8", line.encode() + b"\n"
        if not content_type.startswith("application/openmetrics-text"):
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry) + ring
        return "200 OK", content_type, encode(self.registry).removesuffix(_EOF) + ring + _EOF

    def _prepare_views(self) -> None:
        """Bring :attr:`views` up to date with the worker before a background refresh."""

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
            self._prepare_views()
            for view in list(self.views.values()):
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


class WorkerHttpServer(HttpServerBase):
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
        super().__init__(host=host, port=port, view_refresh_s=view_refresh_s)
        self.worker = worker
        self.views = {
            applier.derivation.name: SnapshotView(applier.derivation, applier)
            for applier in worker.appliers
        }
        self.registry.register(_WorkerCollector(worker, self.views))
        self._ring_view = self.views.get(RING_METRICS)
        self._backend_down = False
        self._ring = RingExposition(session_label)

    def _ring_body(self, kind: str, encode: Callable[[CollectorRegistry], bytes]) -> bytes | None:
        """The ring metrics' exposition in format ``kind`` (without OpenMetrics' ``# EOF``).

        From the view's state when it may be served, else the last good exposition; ``b""``
        (no series) without a ring view or while the stored state is unreadable (numbers that
        may be wrong); ``None`` when there is no good view to serve at all.
        """
        view = self._ring_view
        if view is None or view.unreadable:
            return b""
        state = view.servable()
        if state is None:
            return view.rendered(kind)
        if not isinstance(state, RingMetricsState):
            return b""
        body = self._ring.render(state, kind, encode)
        view.remember(kind, body)
        return body

    async def _refresh_for_scrape(self) -> None:
        """Bring the group gauges and the views up to date, as far as the backend lets us."""
        try:
            await self.worker.refresh()
        except LogError as exc:
            # Serve what is known; the connected gauge says the backend is away.
            if not self._backend_down:
                _log.warning("metrics refresh failed: %s", exc)
            self._backend_down = True
        else:
            self._backend_down = False
        # The ring view last: nothing awaits between its refresh and the export, so a state it
        # shares with the applier cannot take uncommitted records meanwhile.
        for name in sorted(self.views, key=lambda name: name == RING_METRICS):
            # Unreadable state is reported by the store and not served; a backend failure
            # leaves the view stale (reported by the view), and its last good state is served.
            with suppress(WorkerStateError, LogError):
                await self.views[name].refresh()

    async def _respond(self, path: bytes, accept: str = "") -> tuple[str, str, bytes]:
        if path == b"/metrics":
            await self._refresh_for_scrape()
            encode, content_type = choose_encoder(accept)
            openmetrics = content_type.startswith("application/openmetrics-text")
            ring = self._ring_body(_OPENMETRICS if openmetrics else _TEXT, encode)
            view = self._ring_view
            why = view.stale_error if view is not None and ring is None else ""
            return self._metrics_response(ring, why, encode, content_type)
        if path in (b"/healthz", b"/health"):
            document = await health_document(self.worker, self.views)
            healthy = (
                document["connected"] and document["keeping_up"] and not document["state_errors"]
            )
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
