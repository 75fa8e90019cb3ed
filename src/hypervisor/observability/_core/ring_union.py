"""The union of the ring states of a stream's partitions (pure), and the bounds each one gets.

A ring event goes to the partition of its agent, so the partitions' ring states hold disjoint
agents: their counters add up exactly, the per-agent tables are disjoint unions, and what is
global in the in-process collector (the newest event time open elevations are measured
against) is the maximum over the partitions. The folded labels (``__overflow__``) occur in
several partitions and add up as the other counters do.

The label limits are divided among the partitions (:func:`partition_bounds`), so the union
stays within the configured ones and every worker computes the same union from the same
committed states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from hypervisor.observability._core.ring import RingBounds, RingMetricsState, exemplar_seconds

__all__ = ["partition_bounds", "union_ring_states"]


def partition_bounds(bounds: RingBounds, partitions: int) -> RingBounds:
    """The bounds of one of ``partitions`` partitions: each agent and session limit divided
    (rounded up, at least 1); the idleness settings unchanged."""
    if partitions <= 1:
        return bounds

    def part(limit: int) -> int:
        return max(1, math.ceil(limit / partitions))

    return RingBounds(
        max_agents=part(bounds.max_agents),
        max_sessions=part(bounds.max_sessions),
        max_tracked_agents=part(bounds.max_tracked_agents),
        agent_idle_s=bounds.agent_idle_s,
        clock_window=bounds.clock_window,
    )


def _newer(
    found: tuple[str, datetime | float] | None, other: tuple[str, datetime | float]
) -> tuple[str, datetime | float]:
    if found is None:
        return other
    a, b = exemplar_seconds(found[1]), exemplar_seconds(other[1])
    if b is not None and (a is None or b > a):
        return other
    return found


def union_ring_states(states: Sequence[RingMetricsState], bounds: RingBounds) -> RingMetricsState:
    """One bounded state holding the union of ``states`` (the partitions' committed states).

    The result is a new state for export only (it is not folded into afterwards); ``states``
    are read, never changed.
    """
    union = RingMetricsState(bounds)
    for state in states:
        for key3, count in state.transitions.items():
            union.transitions[key3] = union.transitions.get(key3, 0) + count
        for key2, count in state.breaches.items():
            union.breaches[key2] = union.breaches.get(key2, 0) + count
        for key3, exemplar in state.transition_exemplars.items():
            union.transition_exemplars[key3] = _newer(
                union.transition_exemplars.get(key3), exemplar
            )
        for key2, exemplar in state.breach_exemplars.items():
            union.breach_exemplars[key2] = _newer(union.breach_exemplars.get(key2), exemplar)
        union.current_rings.update(state.current_rings)
        union.elevation_durations.update(state.elevation_durations)
        union.elevation_starts.update(state.elevation_starts)
        union._elevation_origins.update(state._elevation_origins)
        union.events_processed += state.events_processed
        union.bad_events += state.bad_events
        union.retired_idle += state.retired_idle
        union.retired_capacity += state.retired_capacity
        union.folded_agent_events += state.folded_agent_events
        union.folded_session_events += state.folded_session_events
        # The newest event time is global in the in-process collector: the maximum.
        if state._newest > union._newest:
            union._newest = state._newest
        union._agents.update(state._agents)
        union._admitted.update(state._admitted)
        for session, count in state._sessions.items():
            union._sessions[session] = union._sessions.get(session, 0) + count
    return union
