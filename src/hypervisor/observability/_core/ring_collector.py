"""Ring metrics collected from the event bus (published as ``prometheus_collector``).

``RingMetricsCollector(bus)`` subscribes a pure ``RingMetricsState`` to the bus's ring events.
``collect()`` returns the published snapshot dict; ``export_to_prometheus(exporter)`` writes to
any object with ``set_gauge`` and ``inc_counter`` (see :class:`PrometheusExporterProtocol`),
sending each counter's increase since the previous export to that exporter, so exporting twice
never counts an event twice.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

from hypervisor.observability._core.events import EventHandler, EventType
from hypervisor.observability._core.ring import (
    METRIC_RING_BREACHES_TOTAL,
    METRIC_RING_CURRENT,
    METRIC_RING_ELEVATION_DURATION,
    METRIC_RING_TRANSITIONS_TOTAL,
    RING_EVENTS,
    RingMetricsState,
)

__all__ = [
    "METRIC_RING_BREACHES_TOTAL",
    "METRIC_RING_CURRENT",
    "METRIC_RING_ELEVATION_DURATION",
    "METRIC_RING_TRANSITIONS_TOTAL",
    "PrometheusExporterProtocol",
    "RingMetricsCollector",
    "RingMetricsState",
]

_HELP_TRANSITIONS = "Ring transition events (assigned, elevated, demoted, expired) by type"
_HELP_BREACHES = "Ring boundary breaches detected"
_HELP_CURRENT = "Current execution ring of each agent (0=root, 3=sandbox)"
_HELP_ELEVATION = "Seconds of the agent's current or last ring elevation, in event time"


class PrometheusExporterProtocol(Protocol):
    """What the collector writes to: anything with these two methods.

    ``prometheus_client`` adapters, the ``agent-sre`` exporter and
    :class:`hypervisor.observability.testing.RecordingPrometheusExporter` all fit.
    """

    def set_gauge(
        self,
        name: str,
        value: float,
        labels: dict[str, str] | None = None,
        help_text: str = "",
    ) -> None:
        """Set gauge ``name`` with ``labels`` to ``value``."""
        ...

    def inc_counter(
        self,
        name: str,
        value: float = 1.0,
        labels: dict[str, str] | None = None,
        help_text: str = "",
    ) -> None:
        """Increase counter ``name`` with ``labels`` by ``value``."""
        ...


class _Baseline:
    """Counter values already sent to one exporter."""

    __slots__ = ("breaches", "transitions")

    def __init__(self) -> None:
        self.transitions: dict[tuple[str, str, str], int] = {}
        self.breaches: dict[tuple[str, str], int] = {}


class _EventSource(Protocol):
    def subscribe(
        self, event_type: EventType | None = None, handler: EventHandler | None = None
    ) -> object: ...


class RingMetricsCollector:
    """Ring transition and breach metrics of a bus, for Prometheus.

    Subscribes to ``ring.assigned``, ``ring.elevated``, ``ring.demoted``,
    ``ring.elevation_expired`` and ``ring.breach_detected``. The rules (and the fixes to the
    published collector) are those of :class:`RingMetricsState`, available as :attr:`state`.

    Args:
        bus: the event bus to subscribe to (``HypervisorEventBus`` or anything with the same
            ``subscribe(event_type=..., handler=...)``).
    """

    def __init__(self, bus: _EventSource) -> None:
        self._bus = bus
        self._state = RingMetricsState()
        # Counter values already sent to each exporter, to send it only increases. Weakly keyed
        # so a discarded exporter does not pin its baseline; unhashable or non-weakrefable
        # exporters are kept (strongly) by identity instead.
        self._baselines: weakref.WeakKeyDictionary[object, _Baseline] = weakref.WeakKeyDictionary()
        self._baselines_by_id: dict[int, tuple[object, _Baseline]] = {}
        # The state's per-type handlers are subscribed: nothing between emit() and the update.
        for event_type in sorted(RING_EVENTS, key=lambda member: member.value):
            bus.subscribe(event_type=event_type, handler=self._state.handler_for(event_type))

    @property
    def state(self) -> RingMetricsState:
        """The underlying pure state machine (live; do not mutate)."""
        return self._state

    @property
    def events_processed(self) -> int:
        """Ring events received, bad ones included."""
        return self._state.events_processed

    @property
    def bad_events(self) -> int:
        """Ring events ignored because a ring field was not a non-negative integer."""
        return self._state.bad_events

    def collect(self) -> dict[str, Any]:
        """Return a snapshot of every metric, in the published shape.

        Returns:
            ``{METRIC_RING_TRANSITIONS_TOTAL: {(event_type, agent, session): count},
            METRIC_RING_BREACHES_TOTAL: {(agent, session): count},
            METRIC_RING_CURRENT: {agent: ring},
            METRIC_RING_ELEVATION_DURATION: {agent: seconds}, "events_processed": n}``.
            Elevation durations cover finished elevations only, as published; elevations still
            open are in ``state.open_elevations()`` and in the exported gauge.
        """
        return self._state.snapshot()

    def export_to_prometheus(self, exporter: PrometheusExporterProtocol) -> None:
        """Write the metrics to ``exporter``.

        Counters receive their increase since the previous export to the same exporter (the
        first export to an exporter sends the totals; a counter that did not change is not
        sent), so exporting twice never double-counts, and each exporter, whose counters start
        at zero, ends up with the totals. Gauges are set on every export: the
        current ring of each agent, and the elevation duration of each agent, an open elevation
        measured in event time taking precedence over the agent's last finished one.

        Args:
            exporter: any object implementing :class:`PrometheusExporterProtocol`.
        """
        state = self._state
        baseline = self._baseline_for(exporter)
        sent_transitions = baseline.transitions
        for key, count in list(state.transitions.items()):
            delta = count - sent_transitions.get(key, 0)
            if delta > 0:
                event_type, agent_did, session_id = key
                exporter.inc_counter(
                    METRIC_RING_TRANSITIONS_TOTAL,
                    float(delta),
                    labels={
                        "event_type": event_type,
                        "agent_did": agent_did,
                        "session_id": session_id,
                    },
                    help_text=_HELP_TRANSITIONS,
                )
                sent_transitions[key] = count
        sent_breaches = baseline.breaches
        for key2, count in list(state.breaches.items()):
            delta = count - sent_breaches.get(key2, 0)
            if delta > 0:
                agent_did, session_id = key2
                exporter.inc_counter(
                    METRIC_RING_BREACHES_TOTAL,
                    float(delta),
                    labels={"agent_did": agent_did, "session_id": session_id},
                    help_text=_HELP_BREACHES,
                )
                sent_breaches[key2] = count
        for agent_did, ring in list(state.current_rings.items()):
            exporter.set_gauge(
                METRIC_RING_CURRENT,
                float(ring),
                labels={"agent_did": agent_did},
                help_text=_HELP_CURRENT,
            )
        durations = dict(state.elevation_durations)
        durations.update(state.open_elevations())
        for agent_did, seconds in durations.items():
            exporter.set_gauge(
                METRIC_RING_ELEVATION_DURATION,
                seconds,
                labels={"agent_did": agent_did},
                help_text=_HELP_ELEVATION,
            )

    def reset(self) -> None:
        """Forget every metric and what was sent to each exporter; keep the subscription."""
        self._state.reset()
        self._baselines.clear()
        self._baselines_by_id.clear()

    def _baseline_for(self, exporter: object) -> _Baseline:
        try:
            baseline = self._baselines.get(exporter)
            if baseline is None:
                baseline = self._baselines[exporter] = _Baseline()
            return baseline
        except TypeError:
            pass
        entry = self._baselines_by_id.get(id(exporter))
        if entry is None:
            entry = self._baselines_by_id[id(exporter)] = (exporter, _Baseline())
        return entry[1]
