"""Ring metrics on ``prometheus_client``: a scrape-time collector, a push exporter, ``/metrics``.

Three pieces, all working on a caller-supplied :class:`~prometheus_client.CollectorRegistry`
(never the process-global one unless the caller passes it):

* :class:`RingMetricsPrometheusCollector` is a ``prometheus_client`` collector computed at scrape
  time from a :class:`~hypervisor.observability.RingMetricsCollector` (or a bare
  :class:`~hypervisor.observability._core.ring.RingMetricsState`, as a worker holds). Nothing is
  copied between scrapes: a scrape reads the live state.
* :class:`PrometheusExporter` implements
  :class:`~hypervisor.observability.PrometheusExporterProtocol` (``set_gauge`` /
  ``inc_counter``), creating ``Counter`` and ``Gauge`` metrics lazily on its registry, so the
  tutorial's ``collector.export_to_prometheus(exporter)`` feeds a real registry.
* :func:`serve_metrics` serves a registry on ``/metrics`` from a background thread.

Both metric paths put a :class:`LabelGuard` in front of the agent and session labels: only the
first ``max_agents`` agent values and ``max_sessions`` session values get series of their own;
later values fold into the single value ``"__overflow__"``, and the folds are counted in
``agent_hypervisor_label_overflow_total{label=...}``. A flood of random agent ids therefore adds
one series, not millions, to the registry and to Prometheus.

A bounded ``RingMetricsState`` (what a worker holds) has already decided which labels have
series of their own, in stream order; it is exported as it is, without a guard, sorted, so equal
states give identical text whatever was scraped before (``_ring_render.py``, also the text).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, Self, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hypervisor.observability._core.ring import (
    DEFAULT_RING_MAX_AGENTS,
    DEFAULT_RING_MAX_SESSIONS,
    METRIC_RING_BREACHES_TOTAL,
    METRIC_RING_CURRENT,
    METRIC_RING_ELEVATION_DURATION,
    METRIC_RING_TRANSITIONS_TOTAL,
    OVERFLOW_LABEL,
    RingBounds,
    RingMetricsState,
)
from hypervisor.observability.errors import MetricsExportError
from hypervisor.observability.exporters._ring_render import (
    _HELP_BAD,
    _HELP_BREACHES,
    _HELP_CURRENT,
    _HELP_ELEVATION,
    _HELP_OVERFLOW,
    _HELP_PROCESSED,
    _HELP_TRANSITIONS,
    METRIC_LABEL_OVERFLOW_TOTAL,
    METRIC_RING_AGENTS_RETIRED_TOTAL,
    METRIC_RING_AGENTS_TRACKED,
    METRIC_RING_BAD_EVENTS_TOTAL,
    METRIC_RING_EVENTS_PROCESSED_TOTAL,
    _bounded_families,
    _newest_exemplar,
    _strip_total,
    render_ring_metrics,
)

__all__ = [
    "AGENT_LABELS",
    "DEFAULT_MAX_AGENTS",
    "DEFAULT_MAX_SESSIONS",
    "METRIC_LABEL_OVERFLOW_TOTAL",
    "METRIC_RING_AGENTS_RETIRED_TOTAL",
    "METRIC_RING_AGENTS_TRACKED",
    "METRIC_RING_BAD_EVENTS_TOTAL",
    "METRIC_RING_EVENTS_PROCESSED_TOTAL",
    "OVERFLOW_VALUE",
    "SESSION_LABELS",
    "LabelGuard",
    "MetricsExportError",
    "MetricsServer",
    "PrometheusExporter",
    "RingMetricsPrometheusCollector",
    "register_ring_metrics",
    "render_ring_metrics",
    "serve_metrics",
]

OVERFLOW_VALUE: Final = OVERFLOW_LABEL
"""The label value that every agent or session beyond the guard's limit is folded into."""
DEFAULT_MAX_AGENTS: Final = DEFAULT_RING_MAX_AGENTS
"""Distinct agent label values given a series of their own by default."""
DEFAULT_MAX_SESSIONS: Final = DEFAULT_RING_MAX_SESSIONS
"""Distinct session label values given a series of their own by default."""
AGENT_LABELS: Final = frozenset({"agent_did", "agent_id"})
"""Label names guarded by the agent limit (they share one set of admitted values)."""
SESSION_LABELS: Final = frozenset({"session_id"})
"""Label names guarded by the session limit."""


class LabelGuard:
    """Caps the distinct values of the agent and session labels.

    The first ``max_agents`` distinct values seen on any of :data:`AGENT_LABELS` (and the first
    ``max_sessions`` on :data:`SESSION_LABELS`) are admitted for good; any other value maps to
    :data:`OVERFLOW_VALUE`. Memory is bounded by the two limits. Thread-safe.

    Args:
        max_agents: distinct agent values admitted (at least 1).
        max_sessions: distinct session values admitted (at least 1).
    """

    __slots__ = ("_admitted", "_folds", "_limits", "_lock")

    def __init__(
        self, *, max_agents: int = DEFAULT_MAX_AGENTS, max_sessions: int = DEFAULT_MAX_SESSIONS
    ) -> None:
        if max_agents < 1 or max_sessions < 1:
            raise ValueError("max_agents and max_sessions must be at least 1")
        self._limits = {"agent": max_agents, "session": max_sessions}
        self._admitted: dict[str, set[str]] = {"agent": set(), "session": set()}
        self._folds: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def max_agents(self) -> int:
        """Distinct agent values admitted."""
        return self._limits["agent"]

    @property
    def max_sessions(self) -> int:
        """Distinct session values admitted."""
        return self._limits["session"]

    @staticmethod
    def _kind(label: str) -> str | None:
        if label in AGENT_LABELS:
            return "agent"
        if label in SESSION_LABELS:
            return "session"
        return None

    def admit(self, label: str, value: str, *, count: bool = True) -> str:
        """Return ``value`` if it may have its own series, else :data:`OVERFLOW_VALUE`.

        Args:
            label: the label name; names that are not guarded pass through unchanged.
            value: the label value.
            count: count a fold in :attr:`overflow_counts` (one per folded update).
        """
        kind = self._kind(label)
        if kind is None:
            return value
        admitted = self._admitted[kind]
        if value in admitted:
            return value
        with self._lock:
            if value in admitted or len(admitted) < self._limits[kind]:
                admitted.add(value)
                return value
            if count:
                self._folds[label] = self._folds.get(label, 0) + 1
        return OVERFLOW_VALUE

    def guard_labels(self, labels: Mapping[str, str]) -> dict[str, str]:
        """Return ``labels`` with every guarded value passed through :meth:`admit`."""
        return {name: self.admit(name, str(value)) for name, value in labels.items()}

    @property
    def overflow_counts(self) -> dict[str, int]:
        """``label name -> folded updates`` so far."""
        with self._lock:
            return dict(self._folds)


class _HasState(Protocol):
    @property
    def state(self) -> RingMetricsState: ...


_K = TypeVar("_K")
_V = TypeVar("_V")


def _items(mapping: Mapping[_K, _V]) -> list[tuple[_K, _V]]:
    """A consistent copy of a dict that another thread may be updating."""
    for _ in range(8):
        try:
            return list(mapping.items())
        except RuntimeError:  # changed size during iteration: try again
            continue
    return list(dict(mapping).items())


class RingMetricsPrometheusCollector(Collector):
    """The ring metrics of a collector or state, computed at scrape time.

    Series: ``agent_hypervisor_ring_transitions_total{event_type,agent_did,session_id}``,
    ``agent_hypervisor_ring_breaches_total{agent_did,session_id}``,
    ``agent_hypervisor_ring_current{agent_did}``,
    ``agent_hypervisor_ring_elevation_duration_seconds{agent_did}`` (an open elevation, measured
    in event time, takes precedence over the agent's last finished one, as in
    ``export_to_prometheus``), ``agent_hypervisor_ring_events_processed_total``,
    ``agent_hypervisor_ring_bad_events_total`` and
    ``agent_hypervisor_label_overflow_total{label}``.

    A bounded state (as a worker holds) is exported as the state folded it, without the guard,
    with two more families: ``agent_hypervisor_ring_agents_retired_total{reason}`` and
    ``agent_hypervisor_ring_agents_tracked``; its overflow counter counts folded events.

    Folding: agents and sessions beyond the guard's limits are reported as ``"__overflow__"``.
    Counters of folded values are summed (so they stay monotonic); the ring gauge reports the
    most privileged (lowest) ring among folded agents and the elevation gauge the longest
    elevation, so an alert on either still fires for a folded agent. Here the overflow counter
    is the number of distinct values currently folded (the state only grows, so it only grows).

    Exemplars: each transition and breach series carries, in the OpenMetrics exposition, an
    exemplar ``{trace_id, span_id}`` of the newest event of the series that had a causal trace
    id (the agent span that event became a span event of), with the event's timestamp; a series
    made of several keys (folded values, sessions summed) takes its newest one.

    Args:
        source: a ``RingMetricsCollector`` (anything with a ``state``) or a ``RingMetricsState``.
        max_agents: agents with series of their own.
        max_sessions: sessions with series of their own.
        guard: a guard to share (for instance across collectors rebuilt over fresh snapshots,
            so folding stays stable); ``max_agents``/``max_sessions`` are then ignored.
        session_label: label the transition and breach counters with ``session_id`` (the
            default, as published); ``False`` sums them over sessions, the first thing to turn
            off in a large fleet (series per agent, not per agent and session).
    """

    def __init__(
        self,
        source: _HasState | RingMetricsState,
        *,
        max_agents: int = DEFAULT_MAX_AGENTS,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        guard: LabelGuard | None = None,
        session_label: bool = True,
    ) -> None:
        self._state = source if isinstance(source, RingMetricsState) else source.state
        if guard is None:
            guard = LabelGuard(max_agents=max_agents, max_sessions=max_sessions)
        self.guard = guard
        self.session_label = session_label

    def _families(
        self,
    ) -> tuple[
        CounterMetricFamily,
        CounterMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
    ]:
        session = ("session_id",) if self.session_label else ()
        return (
            CounterMetricFamily(
                _strip_total(METRIC_RING_TRANSITIONS_TOTAL),
                _HELP_TRANSITIONS,
                labels=("event_type", "agent_did", *session),
            ),
            CounterMetricFamily(
                _strip_total(METRIC_RING_BREACHES_TOTAL),
                _HELP_BREACHES,
                labels=("agent_did", *session),
            ),
            GaugeMetricFamily(METRIC_RING_CURRENT, _HELP_CURRENT, labels=("agent_did",)),
            GaugeMetricFamily(
                METRIC_RING_ELEVATION_DURATION, _HELP_ELEVATION, labels=("agent_did",)
            ),
            CounterMetricFamily(_strip_total(METRIC_RING_EVENTS_PROCESSED_TOTAL), _HELP_PROCESSED),
            CounterMetricFamily(_strip_total(METRIC_RING_BAD_EVENTS_TOTAL), _HELP_BAD),
            CounterMetricFamily(
                _strip_total(METRIC_LABEL_OVERFLOW_TOTAL), _HELP_OVERFLOW, labels=("label",)
            ),
        )

    def describe(self) -> Iterable[Metric]:
        """Return the families without samples, so the registry can detect name clashes."""
        if self._state.bounds is not None:
            return self._collect_bounded(RingMetricsState(RingBounds()))  # the same families
        return self._families()

    def collect(self) -> Iterable[Metric]:
        """Compute every family from the live state."""
        state = self._state
        if state.bounds is not None:
            return self._collect_bounded(state)
        admit = self.guard.admit
        folded: dict[str, set[str]] = {"agent_did": set(), "session_id": set()}

        def fold(label: str, value: str) -> str:
            out = admit(label, value, count=False)
            if out == OVERFLOW_VALUE and value != OVERFLOW_VALUE:
                folded[label].add(value)
            return out

        sessions = self.session_label
        transitions: dict[tuple[str, ...], int] = {}
        transition_keys: dict[tuple[str, ...], list[tuple[str, str, str]]] = {}
        for key3, count in _items(state.transitions):
            event_type, agent, session = key3
            key: tuple[str, ...] = (event_type, fold("agent_did", agent))
            if sessions:
                key = (*key, fold("session_id", session))
            transitions[key] = transitions.get(key, 0) + count
            transition_keys.setdefault(key, []).append(key3)
        breaches: dict[tuple[str, ...], int] = {}
        breach_keys: dict[tuple[str, ...], list[tuple[str, str]]] = {}
        for key2, count in _items(state.breaches):
            agent, session = key2
            key = (fold("agent_did", agent),)
            if sessions:
                key = (*key, fold("session_id", session))
            breaches[key] = breaches.get(key, 0) + count
            breach_keys.setdefault(key, []).append(key2)
        rings: dict[str, int] = {}
        for agent, ring in _items(state.current_rings):
            folded_agent = fold("agent_did", agent)
            held = rings.get(folded_agent)
            rings[folded_agent] = ring if held is None else min(held, ring)
        durations = dict(_items(state.elevation_durations))
        durations.update(state.open_elevations())
        elevations: dict[str, float] = {}
        for agent, seconds in durations.items():
            folded_agent = fold("agent_did", agent)
            elevations[folded_agent] = max(seconds, elevations.get(folded_agent, 0.0))

        fam_tr, fam_br, fam_ring, fam_elev, fam_proc, fam_bad, fam_over = self._families()
        transition_exemplars = state.transition_exemplars
        for key, count in transitions.items():
            fam_tr.add_metric(
                key,
                float(count),
                exemplar=_newest_exemplar(transition_exemplars, transition_keys[key]),
            )
        breach_exemplars = state.breach_exemplars
        for key, count in breaches.items():
            fam_br.add_metric(
                key, float(count), exemplar=_newest_exemplar(breach_exemplars, breach_keys[key])
            )
        for agent, ring in rings.items():
            fam_ring.add_metric((agent,), float(ring))
        for agent, seconds in elevations.items():
            fam_elev.add_metric((agent,), seconds)
        fam_proc.add_metric((), float(state.events_processed))
        fam_bad.add_metric((), float(state.bad_events))
        for label, values in folded.items():
            fam_over.add_metric((label,), float(len(values)))
        return (fam_tr, fam_br, fam_ring, fam_elev, fam_proc, fam_bad, fam_over)

    def _collect_bounded(self, state: RingMetricsState) -> list[Metric]:
        """Export a bounded state (see :func:`_bounded_families`), the counters with their
        exemplars, summed over sessions without the session label."""
        exemplar_maps: dict[str, Mapping[Any, tuple[str, Any]]] = {
            _strip_total(METRIC_RING_TRANSITIONS_TOTAL): dict(state.transition_exemplars),
            _strip_total(METRIC_RING_BREACHES_TOTAL): dict(state.breach_exemplars),
        }
        made: list[Metric] = []
        for name, kind, text, labels, rows in _bounded_families(state):
            exemplars = exemplar_maps.get(name)
            keys_of: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
            if exemplars is not None:
                if self.session_label:
                    keys_of = {values: [values] for values, _ in rows}
                else:
                    summed: dict[tuple[str, ...], float] = {}
                    for values, value in rows:
                        summed[values[:-1]] = summed.get(values[:-1], 0.0) + value
                        keys_of.setdefault(values[:-1], []).append(values)
                    rows = sorted(summed.items())
                    labels = labels[:-1]
            family: CounterMetricFamily | GaugeMetricFamily
            if kind == "counter":
                counter = CounterMetricFamily(name, text, labels=labels)
                for values, value in rows:
                    found = (
                        None if exemplars is None else _newest_exemplar(exemplars, keys_of[values])
                    )
                    counter.add_metric(values, value, exemplar=found)
                family = counter
            else:
                family = GaugeMetricFamily(name, text, labels=labels)
                for values, value in rows:
                    family.add_metric(values, value)
            made.append(family)
        return made


def register_ring_metrics(
    source: _HasState | RingMetricsState,
    registry: CollectorRegistry,
    *,
    max_agents: int = DEFAULT_MAX_AGENTS,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    session_label: bool = True,
) -> RingMetricsPrometheusCollector:
    """Register the ring metrics of ``source`` on ``registry`` and return the collector.

    ``session_label=False`` sums the transition and breach counters over sessions (see
    :class:`RingMetricsPrometheusCollector`).

    Raises:
        MetricsExportError: a metric of the same name is already registered.
    """
    collector = RingMetricsPrometheusCollector(
        source, max_agents=max_agents, max_sessions=max_sessions, session_label=session_label
    )
    try:
        registry.register(collector)
    except ValueError as exc:
        raise MetricsExportError(f"cannot register ring metrics: {exc}") from exc
    return collector


@dataclass(slots=True)
class _Registered:
    kind: str
    labelnames: frozenset[str]
    metric: Counter | Gauge


class PrometheusExporter:
    """A :class:`PrometheusExporterProtocol` implementation on a ``prometheus_client`` registry.

    Each new metric name creates a ``Counter`` (``inc_counter``) or ``Gauge`` (``set_gauge``)
    with the label names of its first update; later updates of that name must carry the same
    label names. Agent and session values pass the :class:`LabelGuard` first; each folded update
    increments ``agent_hypervisor_label_overflow_total{label}``. On a gauge the overflow series
    holds the last value written for any folded agent.

    Args:
        registry: where the metrics are registered; a new private registry when ``None``.
        max_agents: agents with series of their own.
        max_sessions: sessions with series of their own.
        session_label: keep the ``session_id`` label of the updates (the default); ``False``
            drops it, so counters are summed over sessions (the first thing to turn off in a
            large fleet).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_agents: int = DEFAULT_MAX_AGENTS,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        session_label: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.guard = LabelGuard(max_agents=max_agents, max_sessions=max_sessions)
        self.session_label = session_label
        self._metrics: dict[str, _Registered] = {}
        self._lock = threading.Lock()
        self._overflow: Counter | None = None

    def _metric(
        self, kind: str, name: str, labelnames: frozenset[str], help_text: str
    ) -> Counter | Gauge:
        registered = self._metrics.get(name)
        if registered is None:
            with self._lock:
                registered = self._metrics.get(name)
                if registered is None:
                    ordered = sorted(labelnames)
                    doc = help_text or name
                    try:
                        metric: Counter | Gauge
                        if kind == "counter":
                            metric = Counter(name, doc, ordered, registry=self.registry)
                        else:
                            metric = Gauge(name, doc, ordered, registry=self.registry)
                    except ValueError as exc:
                        raise MetricsExportError(f"cannot create {kind} {name!r}: {exc}") from exc
                    registered = _Registered(kind, labelnames, metric)
                    self._metrics[name] = registered
        if registered.kind != kind:
            raise MetricsExportError(f"{name!r} is a {registered.kind}, not a {kind}")
        if registered.labelnames != labelnames:
            raise MetricsExportError(
                f"{name!r} has labels {sorted(registered.labelnames)}, got {sorted(labelnames)}"
            )
        return registered.metric

    def _guarded(self, labels: Mapping[str, str] | None) -> dict[str, str]:
        if not labels:
            return {}
        if not self.session_label and "session_id" in labels:
            labels = {name: value for name, value in labels.items() if name != "session_id"}
        guarded = self.guard.guard_labels(labels)
        for name, value in guarded.items():
            if value == OVERFLOW_VALUE and labels[name] != OVERFLOW_VALUE:
                self._count_overflow(name)
        return guarded

    def _count_overflow(self, label: str) -> None:
        counter = self._overflow
        if counter is None:
            with self._lock:
                counter = self._overflow
                if counter is None:
                    try:
                        counter = Counter(
                            METRIC_LABEL_OVERFLOW_TOTAL,
                            _HELP_OVERFLOW,
                            ["label"],
                            registry=self.registry,
                        )
                    except ValueError as exc:
                        raise MetricsExportError(
                            f"cannot create {METRIC_LABEL_OVERFLOW_TOTAL}: {exc}"
                        ) from exc
                    self._overflow = counter
        counter.labels(label=label).inc()

    def set_gauge(
        self,
        name: str,
        value: float,
        labels: dict[str, str] | None = None,
        help_text: str = "",
    ) -> None:
        """Set gauge ``name`` with ``labels`` to ``value`` (creating the gauge if needed)."""
        guarded = self._guarded(labels)
        gauge = self._metric("gauge", name, frozenset(guarded), help_text)
        (gauge.labels(**guarded) if guarded else gauge).set(value)  # type: ignore[union-attr]

    def inc_counter(
        self,
        name: str,
        value: float = 1.0,
        labels: dict[str, str] | None = None,
        help_text: str = "",
    ) -> None:
        """Increase counter ``name`` with ``labels`` by ``value`` (creating it if needed).

        Raises:
            MetricsExportError: ``value`` is negative or the labels do not fit the metric.
        """
        if value < 0:
            raise MetricsExportError(f"counter {name!r} cannot decrease (got {value})")
        guarded = self._guarded(labels)
        counter = self._metric("counter", name, frozenset(guarded), help_text)
        (counter.labels(**guarded) if guarded else counter).inc(value)


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP server; :meth:`close` stops it.

    Attributes:
        host: the address it is bound to.
        port: the port it listens on (the real one when 0 was asked for).
    """

    host: str
    port: int
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        """The URL of the metrics endpoint."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5.0)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve_metrics(
    registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0
) -> MetricsServer:
    """Serve ``registry`` in the Prometheus text format on ``http://host:port/metrics``.

    Args:
        registry: the registry to expose.
        host: the address to bind (loopback by default; ``0.0.0.0`` in a container).
        port: the port; 0 picks a free one (read it back from :attr:`MetricsServer.port`).

    Returns:
        The running server (also a context manager).
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(host=host, port=int(server.server_port), _server=server, _thread=thread)
