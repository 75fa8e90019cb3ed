"""The bounded ring state's Prometheus families, rendered as families or directly as text.

Split from ``exporters/prometheus.py`` (which re-exports the public names): the family rows of a
bounded :class:`~hypervisor.observability._core.ring.RingMetricsState` in a fixed (sorted) order,
the direct text exposition a worker's scrape uses (:func:`render_ring_metrics`), the help texts
and metric names the exporters share, and the exemplar of a series.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar, cast

from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from hypervisor.observability._core.ring import (
    METRIC_RING_BREACHES_TOTAL,
    METRIC_RING_CURRENT,
    METRIC_RING_ELEVATION_DURATION,
    METRIC_RING_TRANSITIONS_TOTAL,
    OVERFLOW_LABEL,
    RingMetricsState,
    exemplar_seconds,
)
from hypervisor.observability._core.span_ids import causal_span_ids

__all__ = [
    "METRIC_LABEL_OVERFLOW_TOTAL",
    "METRIC_RING_AGENTS_RETIRED_TOTAL",
    "METRIC_RING_AGENTS_TRACKED",
    "METRIC_RING_BAD_EVENTS_TOTAL",
    "METRIC_RING_EVENTS_PROCESSED_TOTAL",
    "render_ring_metrics",
]

_K = TypeVar("_K")


METRIC_LABEL_OVERFLOW_TOTAL: Final = "agent_hypervisor_label_overflow_total"
METRIC_RING_EVENTS_PROCESSED_TOTAL: Final = "agent_hypervisor_ring_events_processed_total"
METRIC_RING_BAD_EVENTS_TOTAL: Final = "agent_hypervisor_ring_bad_events_total"
METRIC_RING_AGENTS_RETIRED_TOTAL: Final = "agent_hypervisor_ring_agents_retired_total"
"""Agents whose ring state a bounded state retired, by ``reason`` (``idle``, ``capacity``)."""
METRIC_RING_AGENTS_TRACKED: Final = "agent_hypervisor_ring_agents_tracked"
"""Agents whose ring state a bounded state keeps."""

_HELP_TRANSITIONS: Final = "Ring transition events (assigned, elevated, demoted, expired) by type"
_HELP_BREACHES: Final = "Ring boundary breaches detected"
_HELP_CURRENT: Final = (
    "Current execution ring of each agent (0=root, 3=sandbox); the overflow series holds the "
    "most privileged ring among folded agents"
)
_HELP_ELEVATION: Final = (
    "Seconds of the agent's current or last ring elevation, in event time; the overflow series "
    "holds the longest among folded agents"
)
_HELP_PROCESSED: Final = "Ring events applied to the ring metrics, bad ones included"
_HELP_BAD: Final = "Ring events ignored because a ring field was not a non-negative integer"
_HELP_OVERFLOW: Final = "Label values folded into __overflow__ by the cardinality guard"
_HELP_OVERFLOW_BOUNDED: Final = (
    "Ring events counted under __overflow__: agent_did, events of agents without series of "
    "their own; session_id, events of other agents in sessions without series of their own"
)
_HELP_RETIRED: Final = (
    "Agents whose ring state was dropped: idle, no ring event for the idle time (event time); "
    "capacity, least recently active beyond the tracked-agent limit"
)
_HELP_TRACKED: Final = "Agents whose ring state is kept (each with or without series of its own)"


def _strip_total(name: str) -> str:
    return name[: -len("_total")] if name.endswith("_total") else name


_Rows = list[tuple[tuple[str, ...], float]]


def _bounded_families(
    state: RingMetricsState,
) -> list[tuple[str, str, str, tuple[str, ...], _Rows]]:
    """The families of a bounded state: ``(name, kind, help, label names, rows)``, rows
    sorted by label values, so equal states give equal text.

    The counters are exported as the state folded them. The gauges of the agents without
    series of their own fold here: the overflow ring is the lowest among them, the overflow
    elevation the longest (an agent's open elevation replacing its last finished one).
    """
    # Copies (each made by one C call): an in-process state may be folding in another thread.
    admitted = tuple(state.admitted_agents)
    # The folded agents are most of the tracked ones: their aggregates come from copies
    # without the admitted agents, with min/max in C, not from a Python loop over them.
    folded_rings = dict(state.current_rings)
    folded_durations = dict(state.elevation_durations)
    folded_starts = dict(state.elevation_starts)
    newest = state.newest_timestamp
    rings: dict[str, int] = {}
    elevations: dict[str, float] = {}
    for agent in admitted:
        ring = folded_rings.pop(agent, None)
        if ring is not None:
            rings[agent] = ring
        finished = folded_durations.pop(agent, None)
        start = folded_starts.pop(agent, None)
        if start is not None and newest is not None:
            elevations[agent] = max(0.0, newest - start)
        elif finished is not None:
            elevations[agent] = finished
    if folded_rings:
        rings[OVERFLOW_LABEL] = min(folded_rings.values())
    for agent in folded_starts.keys() & folded_durations.keys():
        del folded_durations[agent]
    longest = max(folded_durations.values(), default=None)
    if folded_starts and newest is not None:
        longest_open = max(0.0, newest - min(folded_starts.values()))
        longest = longest_open if longest is None else max(longest, longest_open)
    if longest is not None:
        elevations[OVERFLOW_LABEL] = longest
    return [
        (
            _strip_total(METRIC_RING_TRANSITIONS_TOTAL),
            "counter",
            _HELP_TRANSITIONS,
            ("event_type", "agent_did", "session_id"),
            [(key3, float(count)) for key3, count in sorted(dict(state.transitions).items())],
        ),
        (
            _strip_total(METRIC_RING_BREACHES_TOTAL),
            "counter",
            _HELP_BREACHES,
            ("agent_did", "session_id"),
            [(key2, float(count)) for key2, count in sorted(dict(state.breaches).items())],
        ),
        (
            METRIC_RING_CURRENT,
            "gauge",
            _HELP_CURRENT,
            ("agent_did",),
            [((agent,), float(ring)) for agent, ring in sorted(rings.items())],
        ),
        (
            METRIC_RING_ELEVATION_DURATION,
            "gauge",
            _HELP_ELEVATION,
            ("agent_did",),
            [((agent,), seconds) for agent, seconds in sorted(elevations.items())],
        ),
        (
            _strip_total(METRIC_RING_EVENTS_PROCESSED_TOTAL),
            "counter",
            _HELP_PROCESSED,
            (),
            [((), float(state.events_processed))],
        ),
        (
            _strip_total(METRIC_RING_BAD_EVENTS_TOTAL),
            "counter",
            _HELP_BAD,
            (),
            [((), float(state.bad_events))],
        ),
        (
            _strip_total(METRIC_LABEL_OVERFLOW_TOTAL),
            "counter",
            _HELP_OVERFLOW_BOUNDED,
            ("label",),
            [
                (("agent_did",), float(state.folded_agent_events)),
                (("session_id",), float(state.folded_session_events)),
            ],
        ),
        (
            _strip_total(METRIC_RING_AGENTS_RETIRED_TOTAL),
            "counter",
            _HELP_RETIRED,
            ("reason",),
            [
                (("capacity",), float(state.retired_capacity)),
                (("idle",), float(state.retired_idle)),
            ],
        ),
        (
            METRIC_RING_AGENTS_TRACKED,
            "gauge",
            _HELP_TRACKED,
            (),
            [((), float(state.tracked_agents))],
        ),
    ]


# prometheus_client's own float formatting (Go style), so the text equals generate_latest's.
_float_text = cast(Callable[[float], str], floatToGoString)


def _escape_value(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def render_ring_metrics(state: RingMetricsState) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of a bounded state's ring metrics.

    Byte for byte what ``generate_latest`` writes for a registry holding only a
    :class:`RingMetricsPrometheusCollector` of ``state``, written directly: several times
    faster, which matters for a worker's scrape with a thousand agents' series.

    Raises:
        ValueError: ``state`` is not bounded.
    """
    if state.bounds is None:
        raise ValueError("render_ring_metrics needs a bounded state")
    out: list[str] = []
    for name, kind, text, labels, rows in _bounded_families(state):
        full = f"{name}_total" if kind == "counter" else name
        doc = text.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {full} {doc}\n# TYPE {full} {kind}\n")
        order = sorted(range(len(labels)), key=labels.__getitem__)
        if not labels:
            out.extend(f"{full} {_float_text(value)}\n" for _, value in rows)
            continue
        template = full + "{" + ",".join(f'{labels[i]}="%s"' for i in order) + "} %s\n"
        for values, value in rows:
            out.append(template % (*[_escape_value(values[i]) for i in order], _float_text(value)))
    return "".join(out).encode("utf-8")


def _newest_exemplar(exemplars: Mapping[_K, tuple[str, Any]], keys: list[_K]) -> Exemplar | None:
    """The exemplar of the newest of ``keys``' events that had a causal trace id, if any."""
    best: tuple[float, str] | None = None
    for key in keys:
        found = exemplars.get(key)
        if found is None:
            continue
        seconds = exemplar_seconds(found[1])
        if seconds is not None and (best is None or seconds > best[0]):
            best = (seconds, found[0])
    if best is None:
        return None
    ids = causal_span_ids(best[1])
    if ids is None:
        return None
    return Exemplar({"trace_id": ids[0], "span_id": ids[1]}, 1.0, best[0])
