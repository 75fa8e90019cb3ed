"""Bounded mode of the ring metrics state: its limits and the fold steps only it runs.

:class:`RingBounds` holds the limits; :class:`BoundedRingMixin` is the part of
:class:`~hypervisor.observability._core.ring.RingMetricsState` that admits labels and retires
agents (the rules are in the docstring of ``_core/ring.py``). Split from ``ring.py`` so the
unbounded fold, the in-process bus's hot path, stays on its own; the state's slots are all
declared by ``RingMetricsState``, so an attribute costs the same wherever its method lives.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

from hypervisor.observability._core.events import EventType, HypervisorEvent

__all__ = [
    "DEFAULT_AGENT_IDLE_S",
    "DEFAULT_CLOCK_WINDOW",
    "DEFAULT_MAX_TRACKED_AGENTS",
    "DEFAULT_RING_MAX_AGENTS",
    "DEFAULT_RING_MAX_SESSIONS",
    "OVERFLOW_LABEL",
    "BoundedRingMixin",
    "RingBounds",
]

_BREACH: Final = EventType.RING_BREACH_DETECTED
# The transition event type values (the ring module's RING_TRANSITION_EVENTS), sorted.
_TRANSITION_VALUES: Final = tuple(
    sorted(
        member.value
        for member in (
            EventType.RING_ASSIGNED,
            EventType.RING_ELEVATED,
            EventType.RING_DEMOTED,
            EventType.RING_ELEVATION_EXPIRED,
        )
    )
)


OVERFLOW_LABEL: Final = "__overflow__"
"""The label value that agents and sessions without series of their own are counted under."""
DEFAULT_RING_MAX_AGENTS: Final = 1000
"""Agents with series of their own in bounded mode, by default."""
DEFAULT_RING_MAX_SESSIONS: Final = 1000
"""Sessions with series of their own in bounded mode, by default."""
DEFAULT_MAX_TRACKED_AGENTS: Final = 100_000
"""Agents whose ring state bounded mode keeps, by default (least recently active retired)."""
DEFAULT_AGENT_IDLE_S: Final = 86_400.0
"""Seconds of event time without a ring event after which bounded mode retires an agent."""
DEFAULT_CLOCK_WINDOW: Final = 1024
"""Recent ring events whose median timestamp is bounded mode's clock, by default."""
# The clock keeps at most this many timestamps (a larger window samples every n-th event).
_CLOCK_SAMPLES: Final = 256
_NO_CLOCK: Final = -math.inf


@dataclass(frozen=True, slots=True)
class RingBounds:
    """The limits of a bounded :class:`RingMetricsState` (see the module docstring).

    Attributes:
        max_agents: agents with series of their own (the rest count under ``__overflow__``).
        max_sessions: sessions with series of their own.
        max_tracked_agents: agents whose ring state is kept; beyond it the least recently
            active agent is retired.
        agent_idle_s: seconds of event time after an agent's last ring event at which it is
            retired; ``0`` retires by count only.
        clock_window: ring events whose median timestamp makes the clock idleness is measured
            against. ``1`` makes it the newest timestamp seen; a larger window means more
            events stamped in the future are needed to move it.

    Raises:
        ValueError: a limit is out of range.
    """

    max_agents: int = DEFAULT_RING_MAX_AGENTS
    max_sessions: int = DEFAULT_RING_MAX_SESSIONS
    max_tracked_agents: int = DEFAULT_MAX_TRACKED_AGENTS
    agent_idle_s: float = DEFAULT_AGENT_IDLE_S
    clock_window: int = DEFAULT_CLOCK_WINDOW

    def __post_init__(self) -> None:
        if min(self.max_agents, self.max_sessions, self.max_tracked_agents) < 1:
            raise ValueError("max_agents, max_sessions and max_tracked_agents must be at least 1")
        if not self.agent_idle_s >= 0.0 or math.isinf(self.agent_idle_s):
            raise ValueError(f"agent_idle_s must be a finite number >= 0, got {self.agent_idle_s}")
        if self.clock_window < 1:
            raise ValueError(f"clock_window must be at least 1, got {self.clock_window}")


class BoundedRingMixin:
    """The bounded-mode methods of ``RingMetricsState`` (its only base; not used on its own).

    It declares no slots: ``RingMetricsState.__slots__`` lists every attribute of the state.
    """

    # Hidden from mypy, whose slots check would reject this class assigning attributes that
    # only the subclass's slots hold; at run time the class adds no slot and no __dict__.
    if not TYPE_CHECKING:
        __slots__ = ()

    if TYPE_CHECKING:
        # The attributes and the fold of RingMetricsState these methods use.
        transitions: dict[tuple[str, str, str], int]
        breaches: dict[tuple[str, str], int]
        current_rings: dict[str, int]
        elevation_durations: dict[str, float]
        elevation_starts: dict[str, float]
        _elevation_origins: dict[str, int | None]
        transition_exemplars: dict[tuple[str, str, str], tuple[str, datetime | float]]
        breach_exemplars: dict[tuple[str, str], tuple[str, datetime | float]]
        events_processed: int
        bad_events: int

        def _fold(self, event_type: EventType, event: HypervisorEvent) -> None: ...

    def _init_bounded(self) -> None:
        """Unbounded mode and an empty bounded-mode state (limits 0: off)."""
        self._max_agents = 0
        self._max_sessions = 0
        self._max_tracked = 0
        self._idle_s = 0.0
        self._clock_window = 0
        # Tracked agent -> the clock at its last ring event, least recently active first.
        self._agents: OrderedDict[str, float] = OrderedDict()
        # Agent with series of its own -> the sessions it has series in (values unused).
        self._admitted: dict[str, dict[str, int]] = {}
        # Session with series of its own -> how many admitted agents have series in it.
        self._sessions: dict[str, int] = {}
        self._clock = _NO_CLOCK
        self._clock_samples: list[float] = []
        self._clock_taken = 0
        self.retired_idle = 0
        self.retired_capacity = 0
        self.folded_agent_events = 0
        self.folded_session_events = 0

    def _configure(self, bounds: RingBounds) -> None:
        if bounds.clock_window != self._clock_window:
            # The samples were taken at another stride: start the window again (the clock
            # keeps its value, it never goes back).
            self._clock_samples = []
            self._clock_taken = 0
        self._max_agents = bounds.max_agents
        self._max_sessions = bounds.max_sessions
        self._max_tracked = bounds.max_tracked_agents
        self._idle_s = float(bounds.agent_idle_s)
        self._clock_window = bounds.clock_window

    @property
    def bounds(self) -> RingBounds | None:
        """The limits of bounded mode, ``None`` for an unbounded state."""
        if not self._max_tracked:
            return None
        return RingBounds(
            max_agents=self._max_agents,
            max_sessions=self._max_sessions,
            max_tracked_agents=self._max_tracked,
            agent_idle_s=self._idle_s,
            clock_window=self._clock_window,
        )

    def set_bounds(self, bounds: RingBounds) -> None:
        """Change the limits of a bounded state (a worker started with other settings).

        Agents beyond a lowered ``max_tracked_agents`` and agents idle beyond a lowered
        ``agent_idle_s`` are retired at once; agents and sessions already admitted keep their
        series under a lowered ``max_agents``/``max_sessions`` until they are retired.

        Raises:
            ValueError: the state is not bounded (an unbounded state keeps unfolded labels that
                bounded mode cannot take over).
        """
        if not self._max_tracked:
            raise ValueError("set_bounds needs a bounded state (RingMetricsState(bounds=...))")
        if bounds == self.bounds:
            return
        self._configure(bounds)
        agents = self._agents
        while len(agents) > self._max_tracked:
            self._retire(agents.popitem(last=False)[0])
            self.retired_capacity += 1
        self._retire_idle()

    @property
    def tracked_agents(self) -> int:
        """Agents whose ring state a bounded state keeps (0 for an unbounded state)."""
        return len(self._agents)

    # -- bounded mode --------------------------------------------------------------------------
    #
    # The published fold (``_fold``) runs unchanged, keyed by the real labels; ``_account`` then
    # tracks the agent and moves the count it just made to the folded labels. So both modes
    # share every ring rule, and the unbounded path (the in-process bus) pays nothing.

    def _fold_bounded(self, event_type: EventType, event: HypervisorEvent) -> None:
        """Fold ``event`` in bounded mode."""
        window = self._clock_window
        if window == 1 or (self.events_processed + 1) % (window // _CLOCK_SAMPLES or 1) == 0:
            self._sample(event.timestamp)
        bad = self.bad_events
        try:
            self._fold(event_type, event)
        finally:
            # Also after a raise part-way (the count may already be made): the real labels of a
            # folded agent must never stay in the counters.
            if self.bad_events == bad:
                self._account(event_type, event)

    def _account(self, event_type: EventType, event: HypervisorEvent) -> None:
        """Track the event's agent and move its count to the folded labels."""
        agent = event.agent_did or "unknown"
        session = event.session_id or "unknown"
        agents = self._agents
        sessions_of: dict[str, int] | None
        if agent in agents:
            agents.move_to_end(agent)
            sessions_of = self._admitted.get(agent)
        else:
            while len(agents) >= self._max_tracked:
                self._retire(agents.popitem(last=False)[0])
                self.retired_capacity += 1
            if agent != OVERFLOW_LABEL and len(self._admitted) < self._max_agents:
                sessions_of = self._admitted[agent] = {}
            else:
                sessions_of = None
        agents[agent] = self._clock
        if sessions_of is None:
            if agent != OVERFLOW_LABEL:
                self.folded_agent_events += 1
            label_agent = label_session = OVERFLOW_LABEL
        else:
            label_agent = agent
            if session in sessions_of:
                label_session = session
            else:
                sessions = self._sessions
                if session in sessions:
                    sessions[session] += 1
                    label_session = session
                elif session != OVERFLOW_LABEL and len(sessions) < self._max_sessions:
                    sessions[session] = 1
                    label_session = session
                else:
                    if session != OVERFLOW_LABEL:
                        self.folded_session_events += 1
                    label_session = OVERFLOW_LABEL
                sessions_of[label_session] = 1
            if label_session is session:
                return
        # The exemplar moves with the count (the event is the newest of the folded key), so
        # the exemplar maps never hold a key the counters do not.
        if event_type is _BREACH:
            breaches = self.breaches
            count = breaches.pop((agent, session), 0)
            if count:
                key2 = (label_agent, label_session)
                breaches[key2] = breaches.get(key2, 0) + count
                exemplar2 = self.breach_exemplars.pop((agent, session), None)
                if exemplar2 is not None:
                    self.breach_exemplars[key2] = exemplar2
        else:
            value = event_type._value_
            transitions = self.transitions
            count = transitions.pop((value, agent, session), 0)
            if count:
                key3 = (value, label_agent, label_session)
                transitions[key3] = transitions.get(key3, 0) + count
                exemplar3 = self.transition_exemplars.pop((value, agent, session), None)
                if exemplar3 is not None:
                    self.transition_exemplars[key3] = exemplar3

    def _retire(self, agent: str) -> None:
        """Drop everything about ``agent`` (already removed from the tracked agents)."""
        sessions_of = self._admitted.pop(agent, None)
        if sessions_of is not None:
            transitions, breaches, sessions = self.transitions, self.breaches, self._sessions
            transition_exemplars, breach_exemplars = (
                self.transition_exemplars,
                self.breach_exemplars,
            )
            for session in sessions_of:
                for value in _TRANSITION_VALUES:
                    transitions.pop((value, agent, session), None)
                    transition_exemplars.pop((value, agent, session), None)
                breaches.pop((agent, session), None)
                breach_exemplars.pop((agent, session), None)
                if session != OVERFLOW_LABEL:
                    left = sessions[session] - 1
                    if left:
                        sessions[session] = left
                    else:
                        del sessions[session]
        self.current_rings.pop(agent, None)
        self.elevation_durations.pop(agent, None)
        self.elevation_starts.pop(agent, None)
        self._elevation_origins.pop(agent, None)

    def _sample(self, stamp: datetime) -> None:
        """Take ``stamp`` into the clock's window; move the clock when a quarter is new."""
        try:
            seconds = stamp.timestamp()
        except (OverflowError, ValueError, OSError):  # a naive time local time cannot express
            return
        size = min(self._clock_window, _CLOCK_SAMPLES)
        samples = self._clock_samples
        taken = self._clock_taken
        if len(samples) < size:
            samples.append(seconds)
        else:
            samples[taken % size] = seconds
        taken += 1
        self._clock_taken = taken
        if taken < size or taken % (size // 4 or 1):
            return
        median = sorted(samples)[(size - 1) // 2]
        if median > self._clock:
            if self._clock == _NO_CLOCK:
                # The clock starts: the agents seen so far were last active now.
                agents = self._agents
                for agent in agents:
                    agents[agent] = median
            self._clock = median
            self._retire_idle()

    def _retire_idle(self) -> None:
        """Retire the agents whose last ring event is more than ``agent_idle_s`` behind the
        clock (they are at the front: the clock at an agent's event never decreases)."""
        idle = self._idle_s
        if not idle or self._clock == _NO_CLOCK:
            return
        limit = self._clock - idle
        agents = self._agents
        idle_agents = []
        for agent, seen in agents.items():
            if seen >= limit:
                break
            idle_agents.append(agent)
        for agent in idle_agents:
            del agents[agent]
            self._retire(agent)
        self.retired_idle += len(idle_agents)
