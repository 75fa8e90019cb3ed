"""Ring metrics as a pure state machine: transitions, breaches, current rings, elevation time.

``RingMetricsState.apply(event)`` folds one event into the state. Every figure it holds is a
function of the sequence of events applied, never of the wall clock, so the in-process collector
and a distributed worker replaying the same stream agree exactly.

Rules (the published ones, with this project's fixes):

* Transitions (``ring.assigned``, ``ring.elevated``, ``ring.demoted``,
  ``ring.elevation_expired``) are counted per ``(event type value, agent, session)``; breaches
  (``ring.breach_detected``) per ``(agent, session)``. A missing agent or session is
  ``"unknown"``.
* The agent's new ring is ``payload["to_ring"]``, else ``payload["ring"]`` (``None`` counts as
  absent; ``0`` is a ring, the root ring).
* A demotion or an elevation expiry that names no new ring returns the agent to the ring it held
  before its open elevation: the elevation's ``from_ring`` when it carried one, else the ring the
  agent was at when it was elevated. Without an open elevation the current ring is left as is
  (the event says which ring was left, not which was entered).
* A ring value must be a non-negative integer: an ``int`` (not a ``bool``), an integral
  ``float`` (JSON decoders produce ``1.0``) or a string of decimal digits (the published module
  accepted ``"2"``). Any present ``to_ring``/``ring``/``from_ring`` that is not is a bad event:
  it is counted in ``bad_events``, logged at debug level and otherwise ignored, so one malformed
  payload never half-updates the state nor raises into ``emit()``.
* Exemplars: for each transition and breach counter key, the causal trace id and timestamp of
  the newest event of that key that had a causal trace id (``transition_exemplars``,
  ``breach_exemplars``); exporters turn them into OpenMetrics exemplars pointing at the agent's
  span (see ``_core/agent_spans.py``).
* Elevation time is event time: ``ring.elevated`` starts the agent's clock (a new elevation
  restarts it, as published), ``ring.demoted``/``ring.elevation_expired`` stop it and record the
  difference of the two timestamps (never negative). An elevation still open is measured up to
  the newest timestamp among all events applied, see :meth:`RingMetricsState.open_elevations`.

Bounded mode (``RingMetricsState(bounds=RingBounds(...))``, what the workers run) keeps the same
rules and adds two, both decided while folding, in stream order, so the result stays a pure
function of the event sequence:

* **Label admission.** An agent gets series of its own if fewer than ``max_agents`` agents have
  them when it starts being tracked; the others are counted under ``agent_did="__overflow__"``,
  ``session_id="__overflow__"``. A session of an admitted agent gets series of its own if it
  already has them or fewer than ``max_sessions`` sessions do; otherwise the agent's counts for
  it go under ``session_id="__overflow__"``. The counters are stored folded, so the overflow
  counters only grow.
* **Retirement.** Agents are kept in order of their last ring event. When a new agent would make
  more than ``max_tracked_agents``, the least recently active one is retired; an agent whose last
  ring event is more than ``agent_idle_s`` behind the stream's clock is retired too. Retiring
  drops everything about the agent (its counters, ring, elevation, its admission, and the
  sessions only it used), so its series disappear and start from zero if it comes back. The
  stream's clock is the median timestamp of the recent ring events (never decreasing): one
  event stamped in the far future cannot retire every agent at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, TypeVar

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring_bounds import (
    _NO_CLOCK as _NO_CLOCK,
    DEFAULT_AGENT_IDLE_S,
    DEFAULT_CLOCK_WINDOW,
    DEFAULT_MAX_TRACKED_AGENTS,
    DEFAULT_RING_MAX_AGENTS,
    DEFAULT_RING_MAX_SESSIONS,
    OVERFLOW_LABEL,
    BoundedRingMixin,
    RingBounds,
)

__all__ = [
    "DEFAULT_AGENT_IDLE_S",
    "DEFAULT_CLOCK_WINDOW",
    "DEFAULT_MAX_TRACKED_AGENTS",
    "DEFAULT_RING_MAX_AGENTS",
    "DEFAULT_RING_MAX_SESSIONS",
    "METRIC_RING_BREACHES_TOTAL",
    "METRIC_RING_CURRENT",
    "METRIC_RING_ELEVATION_DURATION",
    "METRIC_RING_TRANSITIONS_TOTAL",
    "OVERFLOW_LABEL",
    "RING_BREACH_EVENTS",
    "RING_EVENTS",
    "RING_TRANSITION_EVENTS",
    "RingBounds",
    "RingMetricsState",
    "exemplar_seconds",
    "parse_ring",
]

_log = logging.getLogger("hypervisor.observability.ring")

METRIC_RING_TRANSITIONS_TOTAL: Final = "agent_hypervisor_ring_transitions_total"
METRIC_RING_BREACHES_TOTAL: Final = "agent_hypervisor_ring_breaches_total"
METRIC_RING_CURRENT: Final = "agent_hypervisor_ring_current"
METRIC_RING_ELEVATION_DURATION: Final = "agent_hypervisor_ring_elevation_duration_seconds"

RING_TRANSITION_EVENTS: Final = frozenset(
    {
        EventType.RING_ASSIGNED,
        EventType.RING_ELEVATED,
        EventType.RING_DEMOTED,
        EventType.RING_ELEVATION_EXPIRED,
    }
)
RING_BREACH_EVENTS: Final = frozenset({EventType.RING_BREACH_DETECTED})
RING_EVENTS: Final = RING_TRANSITION_EVENTS | RING_BREACH_EVENTS

_ELEVATED: Final = EventType.RING_ELEVATED
_BREACH: Final = EventType.RING_BREACH_DETECTED
_ASSIGNED: Final = EventType.RING_ASSIGNED
_DEMOTED: Final = EventType.RING_DEMOTED
_EXPIRED: Final = EventType.RING_ELEVATION_EXPIRED
# Below every aware timestamp: the newest timestamp before any event is applied.
_NO_TIME: Final = datetime.min.replace(tzinfo=UTC)


def parse_ring(value: object) -> int | None:
    """Return ``value`` as a ring number, or ``None`` when it is not one.

    Accepts a non-negative ``int`` (``bool`` excluded), an integral non-negative ``float`` and a
    string of decimal digits (surrounding blanks allowed).
    """
    if type(value) is int:
        return value if value >= 0 else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):  # int subclasses such as IntEnum members
        return int(value) if value >= 0 else None
    if isinstance(value, float):
        return int(value) if value.is_integer() and value >= 0 else None
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            return None
        try:
            return int(text)
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
            return None
    return None


_RING_FIELDS: Final = ("to_ring", "ring", "from_ring")


def _normalise_rings(
    payload: dict[str, Any], values: tuple[object, object, object]
) -> tuple[int | None, int | None, int | None] | str:
    """The slow path: parse each present ring field; return the name of the first bad one."""
    rings: list[int | None] = []
    for key, value in zip(_RING_FIELDS, values, strict=True):
        if value is None:
            rings.append(None)
            continue
        ring = parse_ring(value)
        if ring is None:
            return key
        rings.append(ring)
    return rings[0], rings[1], rings[2]


class RingMetricsState(BoundedRingMixin):
    """The ring metrics of an event stream; feed it with :meth:`apply`.

    Events of other types are ignored (not counted), so a worker can feed it a whole stream.
    The dictionaries below are the live state: read them, do not mutate them.

    With ``bounds`` the state is bounded (see the module docstring): the counters are keyed by
    the folded labels (``"__overflow__"`` for agents and sessions without series of their own),
    the per-agent dictionaries by the real agent ids of the tracked agents only.

    Args:
        bounds: the limits of bounded mode; ``None`` (the default, the published behaviour)
            keeps every agent and session for good.

    Attributes:
        transitions: ``(event type value, agent, session) -> count``.
        breaches: ``(agent, session) -> count``.
        current_rings: ``agent -> ring``.
        elevation_durations: ``agent -> seconds`` of the agent's last finished elevation.
        elevation_starts: ``agent -> epoch seconds`` at which its open elevation began.
        events_processed: ring events applied, bad ones included.
        bad_events: ring events ignored because a ring field was not a ring.
        newest_timestamp: the newest event timestamp applied (epoch seconds), ``None`` if none.
        retired_idle: agents retired for idleness (bounded mode).
        retired_capacity: agents retired to stay within ``max_tracked_agents`` (bounded mode).
        folded_agent_events: events counted under the overflow agent (bounded mode).
        folded_session_events: events of agents with series of their own counted under the
            overflow session (bounded mode).
        transition_exemplars: ``(event type value, agent, session) -> (causal trace id,
            timestamp)`` of the newest event of that key that had a causal trace id; the
            timestamp is the event's ``datetime``, or epoch seconds in a restored state.
        breach_exemplars: the same for ``(agent, session)``.
    """

    __slots__ = (
        "_admitted",
        "_agents",
        "_clock",
        "_clock_samples",
        "_clock_taken",
        "_clock_window",
        "_elevation_origins",
        "_idle_s",
        "_max_agents",
        "_max_sessions",
        "_max_tracked",
        "_newest",
        "_sessions",
        "bad_events",
        "breach_exemplars",
        "breaches",
        "current_rings",
        "elevation_durations",
        "elevation_starts",
        "events_processed",
        "folded_agent_events",
        "folded_session_events",
        "retired_capacity",
        "retired_idle",
        "transition_exemplars",
        "transitions",
    )

    def __init__(self, bounds: RingBounds | None = None) -> None:
        self.transitions: dict[tuple[str, str, str], int] = {}
        self.breaches: dict[tuple[str, str], int] = {}
        self.current_rings: dict[str, int] = {}
        self.elevation_durations: dict[str, float] = {}
        self.elevation_starts: dict[str, float] = {}
        # The ring an agent returns to when its open elevation ends without naming a ring.
        self._elevation_origins: dict[str, int | None] = {}
        self.transition_exemplars: dict[tuple[str, str, str], tuple[str, datetime | float]] = {}
        self.breach_exemplars: dict[tuple[str, str], tuple[str, datetime | float]] = {}
        self.events_processed = 0
        self.bad_events = 0
        # The newest timestamp applied, as an aware datetime (converting every event's
        # timestamp to epoch seconds would cost more than the rest of a breach's update).
        self._newest = _NO_TIME
        self._init_bounded()
        if bounds is not None:
            self._configure(bounds)

    @property
    def admitted_agents(self) -> Mapping[str, object]:
        """The agents with series of their own in a bounded state (live; do not mutate)."""
        return self._admitted

    @property
    def admitted_sessions(self) -> int:
        """Sessions with series of their own in a bounded state."""
        return len(self._sessions)

    @property
    def newest_timestamp(self) -> float | None:
        """The newest event timestamp applied (epoch seconds), ``None`` if none."""
        newest = self._newest
        return None if newest is _NO_TIME else newest.timestamp()

    def apply(self, event: HypervisorEvent) -> None:
        """Fold one event into the state; never raises for a malformed payload.

        Events of other types are ignored.
        """
        event_type = event.event_type
        if (
            event_type is _ASSIGNED
            or event_type is _ELEVATED
            or event_type is _DEMOTED
            or event_type is _EXPIRED
            or event_type is _BREACH
        ):
            if self._max_tracked:
                self._fold_bounded(event_type, event)
            else:
                self._fold(event_type, event)
        elif type(event_type) is not EventType and event_type in RING_EVENTS:
            # A plain string value (events are not validated at construction).
            self.handler_for(EventType(event_type))(event)

    def handler_for(self, event_type: EventType) -> Callable[[HypervisorEvent], None]:
        """The handler of ``event_type`` events: it folds an event of that type as :meth:`apply`
        does, without resolving the type again. A bus can subscribe it for that type.

        Raises:
            KeyError: ``event_type`` is not one of :data:`RING_EVENTS`.
        """
        if event_type not in RING_EVENTS:
            raise KeyError(event_type)
        # Chosen here, not per event: the unbounded path (the in-process bus) pays nothing for
        # bounded mode.
        fold = self._fold_bounded if self._max_tracked else self._fold
        return partial(fold, EventType(event_type))

    def _see(self, stamp: datetime) -> None:
        """Record ``stamp`` as the newest timestamp if it is (a naive one is local time, as
        ``datetime.timestamp`` reads it)."""
        if stamp.utcoffset() is None:
            stamp = datetime.fromtimestamp(stamp.timestamp(), UTC)
        if stamp > self._newest:
            self._newest = stamp

    def _fold(self, event_type: EventType, event: HypervisorEvent) -> None:
        """Fold ``event``, a ring event of ``event_type``."""
        self.events_processed += 1
        stamp = event.timestamp
        try:
            if stamp > self._newest:
                self._newest = stamp
        except TypeError:  # naive, compared with an aware one
            self._see(stamp)
        agent = event.agent_did or "unknown"
        causal = event.causal_trace_id
        if event_type is _BREACH:
            key2 = (agent, event.session_id or "unknown")
            breaches = self.breaches
            breaches[key2] = breaches.get(key2, 0) + 1
            if causal and type(causal) is str:
                self.breach_exemplars[key2] = (causal, stamp)
            return
        payload = event.payload
        get = payload.get
        to_ring: Any = get("to_ring")
        ring: Any = get("ring")
        from_ring: Any = get("from_ring")
        # The common case, plain non-negative ints or absent, skips parsing altogether.
        if not (
            (to_ring is None or (type(to_ring) is int and to_ring >= 0))
            and (ring is None or (type(ring) is int and ring >= 0))
            and (from_ring is None or (type(from_ring) is int and from_ring >= 0))
        ):
            parsed = _normalise_rings(payload, (to_ring, ring, from_ring))
            if isinstance(parsed, str):
                self.bad_events += 1
                _log.debug(
                    "ignoring %s event %s: %s=%r is not a ring",
                    event_type._value_,
                    event.event_id,
                    parsed,
                    payload[parsed],
                )
                return
            to_ring, ring, from_ring = parsed

        if to_ring is None:
            to_ring = ring
        key3 = (event_type._value_, agent, event.session_id or "unknown")
        transitions = self.transitions
        transitions[key3] = transitions.get(key3, 0) + 1
        if causal and type(causal) is str:
            self.transition_exemplars[key3] = (causal, stamp)

        if event_type is _ELEVATED:
            origin = from_ring if from_ring is not None else self.current_rings.get(agent)
            self._elevation_origins[agent] = origin
            self.elevation_starts[agent] = stamp.timestamp()
        elif event_type is not _ASSIGNED:
            start = self.elevation_starts.pop(agent, None)
            origin = self._elevation_origins.pop(agent, None)
            if start is not None:
                ts = stamp.timestamp()
                self.elevation_durations[agent] = ts - start if ts > start else 0.0
            if to_ring is None:
                to_ring = origin
        if to_ring is not None:
            self.current_rings[agent] = to_ring

    def open_elevations(self) -> dict[str, float]:
        """Return ``agent -> seconds`` for elevations still open, measured in event time.

        The duration is the newest event timestamp applied minus the elevation's start (never
        negative): deterministic for a given event sequence, and consistent with finished
        elevations, which are also differences of event timestamps.
        """
        newest = self.newest_timestamp
        if newest is None:
            return {}
        return {agent: max(0.0, newest - start) for agent, start in self.elevation_starts.items()}

    def snapshot(self) -> dict[str, Any]:
        """Return the published ``collect()`` shape: four metric dicts and ``events_processed``.

        Elevation durations hold finished elevations only, as published; open ones are in
        :meth:`open_elevations` (and are exported as gauges by the collector).
        """
        return {
            METRIC_RING_TRANSITIONS_TOTAL: dict(self.transitions),
            METRIC_RING_BREACHES_TOTAL: dict(self.breaches),
            METRIC_RING_CURRENT: dict(self.current_rings),
            METRIC_RING_ELEVATION_DURATION: dict(self.elevation_durations),
            "events_processed": self.events_processed,
        }

    def forget_agents(self, agents: Collection[str]) -> None:
        """Forget everything about ``agents`` (transitions, breaches, rings, elevations).

        For a long-running view that keeps a bounded number of agents: one pass over each
        table, so forget agents in batches rather than one at a time. The counters
        ``events_processed`` and ``bad_events`` and the newest timestamp are kept.
        """
        if not agents:
            return
        gone = agents if isinstance(agents, set | frozenset) else set(agents)
        # In place: readers may hold the live tables.
        for key3 in [k for k in self.transitions if k[1] in gone]:
            del self.transitions[key3]
            self.transition_exemplars.pop(key3, None)
        for key2 in [k for k in self.breaches if k[0] in gone]:
            del self.breaches[key2]
            self.breach_exemplars.pop(key2, None)
        for table in (
            self.current_rings,
            self.elevation_durations,
            self.elevation_starts,
            self._elevation_origins,
        ):
            for agent in gone:
                table.pop(agent, None)

    def reset(self) -> None:
        """Forget everything, as if no event had been applied."""
        self.transitions.clear()
        self.breaches.clear()
        self.transition_exemplars.clear()
        self.breach_exemplars.clear()
        self.current_rings.clear()
        self.elevation_durations.clear()
        self.elevation_starts.clear()
        self._elevation_origins.clear()
        self.events_processed = 0
        self.bad_events = 0
        self._newest = _NO_TIME
        self._agents.clear()
        self._admitted.clear()
        self._sessions.clear()
        self._clock = _NO_CLOCK
        self._clock_samples = []
        self._clock_taken = 0
        self.retired_idle = 0
        self.retired_capacity = 0
        self.folded_agent_events = 0
        self.folded_session_events = 0


_K = TypeVar("_K")


def exemplar_seconds(stamp: datetime | float) -> float | None:
    """An exemplar's time in epoch seconds (``None`` when a naive datetime at the ends of the
    calendar cannot be converted)."""
    if isinstance(stamp, datetime):
        try:
            return stamp.timestamp()
        except (OverflowError, ValueError, OSError):
            return None
    return stamp


def _epoch_exemplars(
    exemplars: dict[_K, tuple[str, datetime | float]],
) -> dict[_K, tuple[str, float]]:
    out: dict[_K, tuple[str, float]] = {}
    for key, (causal, stamp) in exemplars.items():
        seconds = exemplar_seconds(stamp)
        if seconds is not None:
            out[key] = (causal, seconds)
    return out
