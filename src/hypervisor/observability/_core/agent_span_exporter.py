"""The spawn tree as spans from an in-process bus: ``AgentSpanExporter(bus, sink)``.

It subscribes an :class:`~hypervisor.observability._core.agent_spans.AgentSpanState` to every
event of the bus, buffers the completed agent spans (bounded) and forwards each to its sink. A
sink that raises is logged and counted; the bus and its other subscribers never notice.

The in-process bus has no wire: its handlers run inside ``emit``, in the emitter's context, so
the trace context of an event is the emitter's current OpenTelemetry span, read (without
importing OpenTelemetry) as the Redis bus reads it for the wire.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Protocol

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
from hypervisor.observability._core.events import EventHandler, EventType, HypervisorEvent
from hypervisor.observability._core.spans import DEFAULT_MAX_SPANS
from hypervisor.observability._util.otel_context import current_trace_context

__all__ = ["AgentSpanExporter"]

_log = logging.getLogger("hypervisor.observability.spans")


class _EventSource(Protocol):
    def subscribe(
        self, event_type: EventType | None = None, handler: EventHandler | None = None
    ) -> object: ...


class AgentSpanExporter:
    """One span per agent of the causal spawn tree, from a bus's events.

    Completed spans are buffered in :attr:`completed_spans` (the newest ``max_spans``) and
    forwarded to the sink. The rules, ids and bounds are those of :class:`AgentSpanState`
    (:attr:`state`). Spans still open when you stop emitting are closed by :meth:`flush`.

    Args:
        bus: the event bus to subscribe to (every event type).
        sink: receives each completed span (``export_agent_span``), e.g. ``OTelSpanSink``.
        max_spans: completed spans buffered.
        genai_attributes: add the OpenTelemetry GenAI agent names (``gen_ai.*``,
            ``invoke_agent``/``create_agent``) next to the ``agent.*`` ones.
        link_current_span: link each agent span to the OpenTelemetry spans its events were
            emitted in (read at emit; nothing is read while OpenTelemetry is not in use).
        max_open_agents: open agent spans tracked.
        max_closed_agents: closed agent spans remembered.
        idle_timeout_s: event-time seconds without an event after which an agent span closes.
        max_span_events: span events kept per span.
        max_links: links kept per span.
    """

    def __init__(
        self,
        bus: _EventSource,
        sink: AgentSpanSink | None = None,
        *,
        max_spans: int = DEFAULT_MAX_SPANS,
        genai_attributes: bool = False,
        link_current_span: bool = True,
        max_open_agents: int = DEFAULT_MAX_OPEN_AGENTS,
        max_closed_agents: int = DEFAULT_MAX_CLOSED_AGENTS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        max_span_events: int = DEFAULT_MAX_SPAN_EVENTS,
        max_links: int = DEFAULT_MAX_LINKS,
    ) -> None:
        if max_spans < 0:
            raise ValueError(f"max_spans must be >= 0, got {max_spans}")
        self._state = AgentSpanState(
            max_open_agents=max_open_agents,
            max_closed_agents=max_closed_agents,
            idle_timeout_s=idle_timeout_s,
            max_span_events=max_span_events,
            max_links=max_links,
        )
        self._spans: deque[AgentSpanRecord] = deque(maxlen=max_spans)
        self.evicted_spans = 0
        self.sink = sink
        self.genai_attributes = genai_attributes
        self.link_current_span = link_current_span
        self._sink_errors = 0
        self._logged_errors: set[type[BaseException]] = set()
        bus.subscribe(event_type=None, handler=self._on_event)

    @property
    def state(self) -> AgentSpanState:
        """The underlying pure state machine (live; do not mutate)."""
        return self._state

    @property
    def completed_spans(self) -> list[AgentSpanRecord]:
        """A copy of the buffered completed spans, oldest first."""
        return list(self._spans)

    @property
    def sink_errors(self) -> int:
        """Spans the sink raised on."""
        return self._sink_errors

    def flush(self) -> list[AgentSpanRecord]:
        """Close every open agent span now, forward and buffer them, and return them."""
        return self._emit(self._state.close_all())

    def _on_event(self, event: HypervisorEvent) -> None:
        context = None
        if self.link_current_span:
            current = current_trace_context()
            if current is not None:
                context = current.context
        records = self._state.apply(event, context)
        if records:
            self._emit(records)

    def _emit(self, records: list[AgentSpanRecord]) -> list[AgentSpanRecord]:
        if self.genai_attributes:
            records = [with_genai_attributes(record) for record in records]
        spans = self._spans
        for record in records:
            if spans.maxlen:
                if len(spans) == spans.maxlen:
                    self.evicted_spans += 1
                spans.append(record)
            sink = self.sink
            if sink is not None:
                try:
                    sink.export_agent_span(record)
                except Exception as exc:
                    self._sink_failed(record, exc)
        return records

    def _sink_failed(self, record: AgentSpanRecord, exc: Exception) -> None:
        self._sink_errors += 1
        kind = type(exc)
        if kind in self._logged_errors:
            _log.debug("agent span sink failed again on %s: %r", record.name, exc)
            return
        self._logged_errors.add(kind)
        _log.warning(
            "agent span sink %r raised on span %s; further %s errors are only counted",
            self.sink,
            record.name,
            kind.__name__,
            exc_info=exc,
        )
