"""Governance metrics in Python with the names, types, units and labels of the .NET package.

The .NET ``AgentGovernance`` package records its decisions through
``System.Diagnostics.Metrics`` (meter ``"AgentGovernance"``). :class:`GovernanceMetrics` records
the same instruments from Python, on a ``prometheus_client`` registry, on an OpenTelemetry meter,
or on both, so one Prometheus and one dashboard show both languages.

Instruments (.NET / OpenTelemetry name, kind, Prometheus series, labels):

* ``agent_governance.policy_decisions``, counter, ``agent_governance_policy_decisions_total``,
  labels agent_id, tool_name, decision;
* ``agent_governance.tool_calls_allowed``, counter,
  ``agent_governance_tool_calls_allowed_total``, same labels;
* ``agent_governance.tool_calls_blocked``, counter,
  ``agent_governance_tool_calls_blocked_total``, same labels;
* ``agent_governance.rate_limit_hits``, counter, ``agent_governance_rate_limit_hits_total``,
  same labels;
* ``agent_governance.evaluation_latency_ms`` (unit ``ms``), histogram,
  ``agent_governance_evaluation_latency_ms_bucket`` / ``_sum`` / ``_count``, same labels;
* ``agent_governance.trust_score``, observable gauge, ``agent_governance_trust_score``,
  label agent_id;
* ``agent_governance.active_agents``, observable gauge, ``agent_governance_active_agents``,
  no labels;
* ``agent_governance.audit_events``, counter, ``agent_governance_audit_events_total``, labels
  event_type, agent_id (the .NET counter carries no fixed tags; these are this module's).

``decision`` is ``"allow"`` or ``"deny"``, as in .NET. The OpenTelemetry-to-Prometheus naming
rules (dots become underscores, monotonic counters gain ``_total``) give the names above, except
that an OpenTelemetry Prometheus exporter also appends the unit: ``unit="ms"`` turns the
histogram into ``agent_governance_evaluation_latency_ms_milliseconds``. The deployed Prometheus
configuration (``deploy/prometheus/prometheus.yml``) renames that series back with
``metric_relabel_configs``, so the .NET exporter, the OpenTelemetry collector and this module's
``prometheus_client`` backend all land on ``agent_governance_evaluation_latency_ms_*``. For
quantiles across languages the two sides must use the same bucket boundaries: configure
:data:`DEFAULT_LATENCY_BUCKETS_MS` in the .NET meter provider with a histogram view.

Agent label values pass a :class:`~hypervisor.observability.exporters.prometheus.LabelGuard`
(the first ``max_agents`` agents get series of their own; the rest fold into
``"__overflow__"``, counted in ``agent_governance_label_overflow_total{label}``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Final, Union

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hypervisor.observability.exporters.prometheus import (
    DEFAULT_MAX_AGENTS,
    OVERFLOW_VALUE,
    LabelGuard,
    MetricsExportError,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation

__all__ = [
    "DEFAULT_LATENCY_BUCKETS_MS",
    "METER_NAME",
    "OTEL_INSTRUMENTS",
    "GovernanceMetrics",
    "TrustScores",
]

_log = logging.getLogger("hypervisor.observability.governance")

METER_NAME: Final = "AgentGovernance"
"""The meter name of the .NET package, used for the OpenTelemetry backend too."""

DEFAULT_LATENCY_BUCKETS_MS: Final[tuple[float, ...]] = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
)
"""Evaluation latency bucket bounds in milliseconds: policy checks take tens of microseconds to
tens of milliseconds, so the buckets start far below OpenTelemetry's defaults (which start at
5 ms and would put every evaluation in the first bucket)."""

OTEL_INSTRUMENTS: Final = {
    "policy_decisions": "agent_governance.policy_decisions",
    "tool_calls_allowed": "agent_governance.tool_calls_allowed",
    "tool_calls_blocked": "agent_governance.tool_calls_blocked",
    "rate_limit_hits": "agent_governance.rate_limit_hits",
    "evaluation_latency": "agent_governance.evaluation_latency_ms",
    "trust_score": "agent_governance.trust_score",
    "active_agents": "agent_governance.active_agents",
    "audit_events": "agent_governance.audit_events",
}
"""OpenTelemetry instrument names, exactly those of the .NET package."""

_DECISION_LABELS: Final = ("agent_id", "tool_name", "decision")
_AUDIT_LABELS: Final = ("event_type", "agent_id")
METRIC_GOVERNANCE_LABEL_OVERFLOW_TOTAL: Final = "agent_governance_label_overflow_total"

TrustScores = Union[Mapping[str, float], Iterable[tuple[float, Mapping[str, str]]]]  # noqa: UP007
"""What a trust-score callback returns: ``{agent_id: score}``, or ``(score, labels)`` pairs
(the Python form of .NET's ``Measurement<double>`` list)."""


def _trust_measurements(scores: TrustScores) -> list[tuple[float, dict[str, str]]]:
    if isinstance(scores, Mapping):
        return [(float(score), {"agent_id": str(agent)}) for agent, score in scores.items()]
    return [(float(score), {str(k): str(v) for k, v in labels.items()}) for score, labels in scores]


class _CallbackGauges(Collector):
    """The two callback gauges on a ``prometheus_client`` registry, computed at scrape time."""

    def __init__(self, owner: GovernanceMetrics) -> None:
        self._owner = owner

    def describe(self) -> Iterable[Metric]:
        return (
            GaugeMetricFamily("agent_governance_trust_score", "", labels=("agent_id",)),
            GaugeMetricFamily("agent_governance_active_agents", ""),
        )

    def collect(self) -> Iterable[Metric]:
        families: list[Metric] = []
        trust = self._owner.observe_trust_scores()
        if trust is not None:
            family = GaugeMetricFamily(
                "agent_governance_trust_score",
                "Current agent trust score (0-1000); the overflow series holds the lowest",
                labels=("agent_id",),
            )
            lowest: dict[str, float] = {}
            for score, labels in trust:
                agent = labels.get("agent_id", "")
                held = lowest.get(agent)
                lowest[agent] = score if held is None else min(held, score)
            for agent, score in lowest.items():
                family.add_metric((agent,), score)
            families.append(family)
        active = self._owner.observe_active_agents()
        if active is not None:
            family = GaugeMetricFamily(
                "agent_governance_active_agents", "Number of active agents being tracked"
            )
            family.add_metric((), float(active))
            families.append(family)
        return families


class GovernanceMetrics:
    """Records governance decisions like the .NET ``GovernanceMetrics``.

    Give a ``registry`` (``prometheus_client``), a ``meter`` (OpenTelemetry), or both; with
    neither, a new private :class:`~prometheus_client.CollectorRegistry` is used (see
    :attr:`registry`). Thread-safe.

    Args:
        registry: the ``prometheus_client`` registry to record on.
        meter: an OpenTelemetry meter to record on (instrument names with dots, as in .NET); get
            one with ``meter_provider.get_meter(METER_NAME)``.
        max_agents: agents with series of their own (the label-cardinality guard).
        latency_buckets_ms: histogram bucket upper bounds in milliseconds.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        meter: Meter | None = None,
        max_agents: int = DEFAULT_MAX_AGENTS,
        latency_buckets_ms: Iterable[float] = DEFAULT_LATENCY_BUCKETS_MS,
    ) -> None:
        if registry is None and meter is None:
            registry = CollectorRegistry()
        self.registry = registry
        self.meter = meter
        self.guard = LabelGuard(max_agents=max_agents)
        self.latency_buckets_ms = tuple(sorted(float(b) for b in latency_buckets_ms))
        self._trust_callback: Callable[[], TrustScores] | None = None
        self._active_callback: Callable[[], int] | None = None
        self._lock = threading.Lock()
        if registry is not None:
            self._init_prometheus(registry)
        if meter is not None:
            self._init_otel(meter)

    # -- backends -------------------------------------------------------------------------------

    def _init_prometheus(self, registry: CollectorRegistry) -> None:
        try:
            self._p_decisions = Counter(
                "agent_governance_policy_decisions_total",
                "Total policy evaluation decisions",
                _DECISION_LABELS,
                registry=registry,
            )
            self._p_allowed = Counter(
                "agent_governance_tool_calls_allowed_total",
                "Tool calls allowed by governance policy",
                _DECISION_LABELS,
                registry=registry,
            )
            self._p_blocked = Counter(
                "agent_governance_tool_calls_blocked_total",
                "Tool calls blocked by governance policy",
                _DECISION_LABELS,
                registry=registry,
            )
            self._p_rate_limited = Counter(
                "agent_governance_rate_limit_hits_total",
                "Requests rejected by rate limiting",
                _DECISION_LABELS,
                registry=registry,
            )
            self._p_latency = Histogram(
                "agent_governance_evaluation_latency_ms",
                "Governance evaluation latency in milliseconds",
                _DECISION_LABELS,
                registry=registry,
                buckets=self.latency_buckets_ms,
            )
            self._p_audit = Counter(
                "agent_governance_audit_events_total",
                "Total audit events emitted",
                _AUDIT_LABELS,
                registry=registry,
            )
            self._p_overflow = Counter(
                METRIC_GOVERNANCE_LABEL_OVERFLOW_TOTAL,
                "Governance label values folded into __overflow__ by the cardinality guard",
                ("label",),
                registry=registry,
            )
            registry.register(_CallbackGauges(self))
        except ValueError as exc:
            raise MetricsExportError(f"cannot register governance metrics: {exc}") from exc

    def _init_otel(self, meter: Meter) -> None:
        self._o_decisions = meter.create_counter(
            OTEL_INSTRUMENTS["policy_decisions"], description="Total policy evaluation decisions"
        )
        self._o_allowed = meter.create_counter(
            OTEL_INSTRUMENTS["tool_calls_allowed"],
            description="Tool calls allowed by governance policy",
        )
        self._o_blocked = meter.create_counter(
            OTEL_INSTRUMENTS["tool_calls_blocked"],
            description="Tool calls blocked by governance policy",
        )
        self._o_rate_limited = meter.create_counter(
            OTEL_INSTRUMENTS["rate_limit_hits"], description="Requests rejected by rate limiting"
        )
        self._o_latency = meter.create_histogram(
            OTEL_INSTRUMENTS["evaluation_latency"],
            unit="ms",
            description="Governance evaluation latency in milliseconds",
            explicit_bucket_boundaries_advisory=list(self.latency_buckets_ms),
        )
        self._o_audit = meter.create_counter(
            OTEL_INSTRUMENTS["audit_events"], description="Total audit events emitted"
        )
        # Observable instruments are created once, here, and read whichever callback is
        # registered at collection time: registering again replaces the callback instead of
        # creating a second instrument of the same name.
        meter.create_observable_gauge(
            OTEL_INSTRUMENTS["trust_score"],
            callbacks=[self._otel_trust],
            description="Current agent trust score (0-1000)",
        )
        meter.create_observable_gauge(
            OTEL_INSTRUMENTS["active_agents"],
            callbacks=[self._otel_active],
            description="Number of active agents being tracked",
        )

    def _otel_trust(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        measurements = self.observe_trust_scores() or []
        return [Observation(score, labels) for score, labels in measurements]

    def _otel_active(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        active = self.observe_active_agents()
        return [] if active is None else [Observation(active)]

    # -- guard ----------------------------------------------------------------------------------

    def _agent(self, agent_id: str) -> str:
        value = self.guard.admit("agent_id", agent_id)
        if value == OVERFLOW_VALUE and agent_id != OVERFLOW_VALUE and self.registry is not None:
            self._p_overflow.labels(label="agent_id").inc()
        return value

    # -- recording ------------------------------------------------------------------------------

    def record_decision(
        self,
        allowed: bool,
        agent_id: str,
        tool_name: str,
        evaluation_ms: float,
        rate_limited: bool = False,
    ) -> None:
        """Record one policy decision (the .NET ``RecordDecision``).

        Counts it in ``policy_decisions`` and in ``tool_calls_allowed`` or
        ``tool_calls_blocked``, in ``rate_limit_hits`` when ``rate_limited``, and observes
        ``evaluation_ms`` in the latency histogram, all with labels ``agent_id``, ``tool_name``
        and ``decision`` (``"allow"``/``"deny"``).

        Args:
            allowed: whether the call was allowed.
            agent_id: the agent's DID.
            tool_name: the tool the agent asked for.
            evaluation_ms: how long the evaluation took, in milliseconds (the .NET unit).
            rate_limited: whether the request was rejected by the rate limiter.
        """
        labels = {
            "agent_id": self._agent(agent_id),
            "tool_name": tool_name,
            "decision": "allow" if allowed else "deny",
        }
        if self.registry is not None:
            self._p_decisions.labels(**labels).inc()
            (self._p_allowed if allowed else self._p_blocked).labels(**labels).inc()
            if rate_limited:
                self._p_rate_limited.labels(**labels).inc()
            self._p_latency.labels(**labels).observe(evaluation_ms)
        if self.meter is not None:
            self._o_decisions.add(1, labels)
            (self._o_allowed if allowed else self._o_blocked).add(1, labels)
            if rate_limited:
                self._o_rate_limited.add(1, labels)
            self._o_latency.record(evaluation_ms, labels)

    def record_audit_event(self, event_type: str, agent_id: str = "") -> None:
        """Count one emitted audit event.

        Args:
            event_type: what was audited (for instance ``"audit.committed"``).
            agent_id: the agent concerned, ``""`` when none.
        """
        labels = {"event_type": event_type, "agent_id": self._agent(agent_id)}
        if self.registry is not None:
            self._p_audit.labels(**labels).inc()
        if self.meter is not None:
            self._o_audit.add(1, labels)

    def register_trust_score_gauge(self, callback: Callable[[], TrustScores]) -> None:
        """Report trust scores from ``callback``, called at each scrape or collection.

        Args:
            callback: returns ``{agent_id: score}`` or ``(score, {"agent_id": ...})`` pairs
                (scores 0-1000). Registering again replaces the previous callback.
        """
        with self._lock:
            self._trust_callback = callback

    def register_active_agents_gauge(self, callback: Callable[[], int]) -> None:
        """Report the number of active agents from ``callback`` at each scrape or collection."""
        with self._lock:
            self._active_callback = callback

    # -- observation (used by both backends) ------------------------------------------------------

    def observe_trust_scores(self) -> list[tuple[float, dict[str, str]]] | None:
        """Call the trust-score callback; ``None`` when none is registered or it failed.

        Agent values pass the guard (without counting: a scrape is not an update).
        """
        callback = self._trust_callback
        if callback is None:
            return None
        try:
            measurements = _trust_measurements(callback())
        except Exception:
            _log.exception("trust score callback failed")
            return None
        admit = self.guard.admit
        for _, labels in measurements:
            if "agent_id" in labels:
                labels["agent_id"] = admit("agent_id", labels["agent_id"], count=False)
        return measurements

    def observe_active_agents(self) -> int | None:
        """Call the active-agents callback; ``None`` when none is registered or it failed."""
        callback = self._active_callback
        if callback is None:
            return None
        try:
            return int(callback())
        except Exception:
            _log.exception("active agents callback failed")
            return None
