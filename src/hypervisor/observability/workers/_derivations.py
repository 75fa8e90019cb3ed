"""The derivations a worker runs: which events they use, their state, what they export."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Final

from hypervisor.observability._backends.state import StateStore
from hypervisor.observability._core.agent_spans import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CLOSED_AGENTS,
    DEFAULT_MAX_LINKS,
    DEFAULT_MAX_OPEN_AGENTS,
    DEFAULT_MAX_SPAN_EVENTS,
    AgentSpanRecord,
    AgentSpanSink,
    AgentSpanState,
    with_genai_attributes,
)
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RING_EVENTS, RingBounds, RingMetricsState
from hypervisor.observability._core.spans import (
    DEFAULT_MAX_OPEN_SAGAS,
    DEFAULT_MAX_OPEN_STEPS,
    SAGA_SPAN_EVENTS,
    SagaSpanRecord,
    SagaSpanState,
    SpanRecordSink,
    SpanSink,
)
from hypervisor.observability._core.trace_context import TraceContext
from hypervisor.observability.errors import WorkerStateError
from hypervisor.observability.workers._sinks import export_agent_records, export_records

__all__ = [
    "AGENT_SPANS",
    "RING_METRICS",
    "SAGA_SPANS",
    "AgentSpansDerivation",
    "Derivation",
    "RingMetricsDerivation",
    "SagaSpansDerivation",
]

RING_METRICS: Final = "ring-metrics"
SAGA_SPANS: Final = "saga-spans"
AGENT_SPANS: Final = "agent-spans"


class Derivation:
    """A fold of the event stream that a worker runs on a consumer group.

    Subclasses set :attr:`name` and :attr:`event_types` and implement :meth:`new_state` and
    :meth:`apply`; the state must be a ``RingMetricsState`` or a ``SagaSpanState`` (the states
    the snapshot schema describes). :meth:`prepare` runs on every worker for every used event
    before it is staged: an exception there leaves the entry pending (retried, dead-lettered
    after ``max_deliveries``).

    Args:
        store: where the shared state lives.
    """

    name: ClassVar[str] = ""
    event_types: ClassVar[frozenset[EventType]] = frozenset()
    uses_trace_context: ClassVar[bool] = False
    """Whether the applier gives :meth:`apply_traced` the trace context each event carried
    (live and in every replay alike), instead of calling :meth:`apply`."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def uses(self, event: HypervisorEvent) -> bool:
        """Whether the event matters to this derivation (only those are staged)."""
        return event.event_type in self.event_types

    def prepare(self, event: HypervisorEvent) -> None:
        """Check an event before staging; raise to refuse it. Default: accept."""

    def new_state(self) -> Any:
        """Return an empty state."""
        raise NotImplementedError

    def restored(self, state: Any) -> Any:
        """Return ``state``, just loaded from a snapshot, ready to fold with this derivation's
        settings (a snapshot carries the settings of the worker that wrote it). Default: as is.

        Raises:
            WorkerStateError: the snapshot holds a state this derivation cannot continue.
        """
        return state

    def apply(self, state: Any, event: HypervisorEvent) -> list[Any]:
        """Fold ``event`` into ``state``; return spans produced (none for metrics)."""
        raise NotImplementedError

    def apply_traced(
        self, state: Any, event: HypervisorEvent, context: TraceContext | None
    ) -> list[Any]:
        """Fold ``event``, which carried ``context`` (``None``: none or an invalid one), into
        ``state``; called instead of :meth:`apply` when :attr:`uses_trace_context` is set."""
        return self.apply(state, event)

    def export(self, records: list[Any]) -> None:
        """Send what a round produced to its destinations; raising aborts the commit."""


class RingMetricsDerivation(Derivation):
    """Ring metrics: a bounded ``RingMetricsState`` over the ring events.

    The state decides, while folding in stream order, which agents and sessions have series of
    their own and which agents to retire (``bounds``), so every worker of a group exports the
    same series. Give every worker of a group the same bounds.

    Args:
        store: where the shared state lives.
        bounds: label and retirement limits (see ``RingBounds``).
    """

    name: ClassVar[str] = RING_METRICS
    event_types: ClassVar[frozenset[EventType]] = RING_EVENTS

    def __init__(self, store: StateStore, *, bounds: RingBounds | None = None) -> None:
        super().__init__(store)
        self.bounds = bounds if bounds is not None else RingBounds()

    def new_state(self) -> RingMetricsState:
        """Return an empty bounded ``RingMetricsState``."""
        return RingMetricsState(self.bounds)

    def restored(self, state: Any) -> RingMetricsState:
        """Apply this derivation's bounds to a loaded state (retiring what they exclude).

        Raises:
            WorkerStateError: the snapshot is not of a bounded ring state.
        """
        if not isinstance(state, RingMetricsState) or state.bounds is None:
            raise WorkerStateError(
                "the ring-metrics snapshot is not a bounded ring state (written by an older "
                "release); start the workers with --reset-state"
            )
        state.set_bounds(self.bounds)
        return state

    def apply(self, state: Any, event: HypervisorEvent) -> list[SagaSpanRecord]:
        """Apply one ring event."""
        state.apply(event)
        return []


class SagaSpansDerivation(Derivation):
    """Saga spans: ``SagaSpanState`` over the saga lifecycle events, spans sent to sinks.

    The state buffers no completed spans (``max_spans=0``): spans leave through the sinks, so
    the snapshot holds only open steps and sagas. A span links to the producer's span of the
    event that completed it, when that event carried a trace context.

    Args:
        store: where the shared state lives.
        sinks: span sinks (``export_span`` or the published ``record_span``).
        max_open_steps: cap on open steps (as ``SagaSpanState``).
        max_open_sagas: cap on open sagas.
    """

    name: ClassVar[str] = SAGA_SPANS
    event_types: ClassVar[frozenset[EventType]] = SAGA_SPAN_EVENTS
    uses_trace_context: ClassVar[bool] = True

    def __init__(
        self,
        store: StateStore,
        sinks: Sequence[SpanRecordSink | SpanSink] = (),
        *,
        max_open_steps: int = DEFAULT_MAX_OPEN_STEPS,
        max_open_sagas: int = DEFAULT_MAX_OPEN_SAGAS,
    ) -> None:
        super().__init__(store)
        self.sinks: list[SpanRecordSink | SpanSink] = list(sinks)
        self._max_open_steps = max_open_steps
        self._max_open_sagas = max_open_sagas
        self.spans_exported = 0
        """Spans handed to the sinks by this process (re-exports included)."""

    def new_state(self) -> SagaSpanState:
        """Return an empty ``SagaSpanState`` that keeps no completed spans."""
        return SagaSpanState(
            max_spans=0,
            max_open_steps=self._max_open_steps,
            max_open_sagas=self._max_open_sagas,
        )

    def apply(self, state: Any, event: HypervisorEvent) -> list[SagaSpanRecord]:
        """Apply one saga event; return the spans it completed."""
        produced: list[SagaSpanRecord] = state.apply(event)
        return produced

    def apply_traced(
        self, state: Any, event: HypervisorEvent, context: TraceContext | None
    ) -> list[SagaSpanRecord]:
        """Apply one saga event; the spans it completed link to ``context``."""
        produced: list[SagaSpanRecord] = state.apply(event)
        if context is not None:
            links = (context,)
            for record in produced:
                # A record fresh from the state machine, not yet seen by anyone.
                object.__setattr__(record, "links", links)
        return produced

    def export(self, records: list[SagaSpanRecord]) -> None:
        """Send spans to every sink (flushing buffered sinks)."""
        if records:
            export_records(records, self.sinks)
            self.spans_exported += len(records)


class AgentSpansDerivation(Derivation):
    """The causal spawn tree as spans: ``AgentSpanState``, spans sent to agent span sinks.

    Uses every event with a causal trace id, and ring events and the closing events
    (``session.terminated``, ``security.agent_killed``) of an agent without one; gives the
    state each event's trace context (the agent span links to its producers).

    Args:
        store: where the shared state lives.
        sinks: agent span sinks (``export_agent_span``).
        genai_attributes: add the OpenTelemetry GenAI agent names at export.
        max_open_agents: open agent spans tracked (as ``AgentSpanState``).
        max_closed_agents: closed agent spans remembered.
        idle_timeout_s: event-time seconds without an event after which an agent span closes.
        max_span_events: span events kept per span.
        max_links: links kept per span.
    """

    name: ClassVar[str] = AGENT_SPANS
    event_types: ClassVar[frozenset[EventType]] = frozenset(EventType)
    uses_trace_context: ClassVar[bool] = True
    _BY_AGENT: ClassVar[frozenset[EventType]] = RING_EVENTS | {
        EventType.SESSION_TERMINATED,
        EventType.AGENT_KILLED,
    }

    def __init__(
        self,
        store: StateStore,
        sinks: Sequence[AgentSpanSink] = (),
        *,
        genai_attributes: bool = False,
        max_open_agents: int = DEFAULT_MAX_OPEN_AGENTS,
        max_closed_agents: int = DEFAULT_MAX_CLOSED_AGENTS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        max_span_events: int = DEFAULT_MAX_SPAN_EVENTS,
        max_links: int = DEFAULT_MAX_LINKS,
    ) -> None:
        super().__init__(store)
        self.sinks: list[AgentSpanSink] = list(sinks)
        self.genai_attributes = genai_attributes
        self._limits = (max_open_agents, max_closed_agents, float(idle_timeout_s), max_span_events)
        self._max_links = max_links
        self.new_state()  # the limits are checked here, not at the first round
        self.spans_exported = 0
        """Agent spans handed to the sinks by this process (re-exports included)."""

    def uses(self, event: HypervisorEvent) -> bool:
        """Events with a causal trace id; ring and closing events of a named agent."""
        return bool(event.causal_trace_id) or (
            bool(event.agent_did) and event.event_type in self._BY_AGENT
        )

    def new_state(self) -> AgentSpanState:
        """Return an empty ``AgentSpanState`` with this derivation's limits."""
        max_open, max_closed, idle_timeout_s, max_span_events = self._limits
        return AgentSpanState(
            max_open_agents=max_open,
            max_closed_agents=max_closed,
            idle_timeout_s=idle_timeout_s,
            max_span_events=max_span_events,
            max_links=self._max_links,
        )

    def apply(self, state: Any, event: HypervisorEvent) -> list[AgentSpanRecord]:
        """Apply one event without a trace context."""
        return self.apply_traced(state, event, None)

    def apply_traced(
        self, state: Any, event: HypervisorEvent, context: TraceContext | None
    ) -> list[AgentSpanRecord]:
        """Apply one event and the context it carried; return the agent spans it completed."""
        produced: list[AgentSpanRecord] = state.apply(event, context)
        return produced

    def export(self, records: list[AgentSpanRecord]) -> None:
        """Send spans to every sink (with the GenAI names when asked for; flushing buffered
        sinks)."""
        if records:
            if self.genai_attributes:
                records = [with_genai_attributes(record) for record in records]
            export_agent_records(records, self.sinks)
            self.spans_exported += len(records)
