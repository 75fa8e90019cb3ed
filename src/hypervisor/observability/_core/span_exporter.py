"""OpenTelemetry-compatible saga spans (published as ``saga_span_exporter``).

``SagaSpanExporter(bus, sink=None)`` subscribes a
:class:`~hypervisor.observability._core.spans.SagaSpanState` to the bus's saga lifecycle events,
buffers the completed spans (bounded) and forwards each to an attached sink. A sink that raises
is logged and counted; the bus and its other subscribers never notice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, cast

from hypervisor.observability._core.events import EventHandler, EventType
from hypervisor.observability._core.span_records import deliverer
from hypervisor.observability._core.spans import (
    DEFAULT_MAX_OPEN_SAGAS,
    DEFAULT_MAX_OPEN_STEPS,
    DEFAULT_MAX_SPANS,
    SAGA_SPAN_EVENTS,
    SagaSpanRecord,
    SagaSpanState,
    SpanRecordSink,
    SpanSink,
)

__all__ = ["SagaSpanExporter", "SagaSpanRecord", "SagaSpanState", "SpanRecordSink", "SpanSink"]

_log = logging.getLogger("hypervisor.observability.spans")


class _EventSource(Protocol):
    def subscribe(
        self, event_type: EventType | None = None, handler: EventHandler | None = None
    ) -> object: ...


class SagaSpanExporter:
    """Spans for saga steps, compensations and whole sagas, from a bus's saga events.

    Completed spans are buffered in :attr:`completed_spans` (the newest ``max_spans``) whether
    or not a sink is attached, and forwarded to the attached sink. The span rules, ids and
    bounds are those of :class:`SagaSpanState`, available as :attr:`state`. While no sink is
    attached, spans are buffered unbuilt (``SagaSpanState.lazy_records``): their records are
    built when :attr:`completed_spans` is next read, with the same values, so emitting does not
    pay for spans nobody reads.

    Args:
        bus: the event bus to subscribe to.
        sink: a :class:`SpanSink` (``record_span``) or :class:`SpanRecordSink`
            (``export_span``, preferred when present) receiving each completed span.
        max_spans: completed spans buffered.
        max_open_steps: started steps tracked until they end.
        max_open_sagas: created sagas tracked until they close.
    """

    def __init__(
        self,
        bus: _EventSource,
        sink: SpanSink | SpanRecordSink | None = None,
        *,
        max_spans: int = DEFAULT_MAX_SPANS,
        max_open_steps: int = DEFAULT_MAX_OPEN_STEPS,
        max_open_sagas: int = DEFAULT_MAX_OPEN_SAGAS,
    ) -> None:
        self._bus = bus
        self._state = SagaSpanState(
            max_spans=max_spans, max_open_steps=max_open_steps, max_open_sagas=max_open_sagas
        )
        self._sink: SpanSink | SpanRecordSink | None = None
        self._deliver: Callable[[SagaSpanRecord], None] | None = None
        self._sink_errors = 0
        self._logged_errors: set[type[BaseException]] = set()
        # Without a sink, spans are only buffered (and often never read): build them lazily.
        self._state.lazy_records = True
        if sink is not None:
            self.attach_sink(sink)
        # The state's per-type handlers are subscribed directly (no wrapper call on each event);
        # spans reach the sink through the state's on_span hook.
        state = self._state
        for event_type in sorted(SAGA_SPAN_EVENTS, key=lambda member: member.value):
            # (A handler's return value is ignored by the bus.)
            handler = cast(EventHandler, state.handler_for(event_type))
            bus.subscribe(event_type=event_type, handler=handler)

    def _forward(self, record: SagaSpanRecord) -> None:
        deliver = self._deliver
        if deliver is not None:
            try:
                deliver(record)
            except Exception as exc:
                self._sink_failed(record, exc)

    def _sink_failed(self, record: SagaSpanRecord, exc: Exception) -> None:
        self._sink_errors += 1
        kind = type(exc)
        if kind in self._logged_errors:
            _log.debug("span sink failed again on %s: %r", record.name, exc)
            return
        self._logged_errors.add(kind)
        _log.warning(
            "span sink %r raised on span %s; further %s errors are only counted",
            self._sink,
            record.name,
            kind.__name__,
            exc_info=exc,
        )

    def attach_sink(self, sink: SpanSink | SpanRecordSink) -> None:
        """Forward every span completed from now on to ``sink`` (replacing any other sink)."""
        self._deliver = deliverer(sink)
        self._sink = sink
        self._state.on_span = self._forward
        self._state.lazy_records = False  # the sink reads every record at once

    def detach_sink(self) -> None:
        """Stop forwarding spans; they are still buffered."""
        self._state.on_span = None
        self._state.lazy_records = True
        self._deliver = None
        self._sink = None

    @property
    def sink(self) -> SpanSink | SpanRecordSink | None:
        """The attached sink, if any."""
        return self._sink

    @property
    def state(self) -> SagaSpanState:
        """The underlying pure state machine (live; do not mutate)."""
        return self._state

    @property
    def completed_spans(self) -> list[SagaSpanRecord]:
        """A copy of the buffered completed spans, oldest first."""
        return self._state.completed_spans

    @property
    def events_processed(self) -> int:
        """Saga lifecycle events received."""
        return self._state.events_processed

    @property
    def sink_errors(self) -> int:
        """Spans the attached sink raised on."""
        return self._sink_errors

    @property
    def evictions(self) -> dict[str, int]:
        """Entries dropped from each bounded buffer: ``spans``, ``open_steps``, ``open_sagas``."""
        state = self._state
        return {
            "spans": state.evicted_spans,
            "open_steps": state.evicted_open_steps,
            "open_sagas": state.evicted_open_sagas,
        }

    def reset(self) -> None:
        """Forget every span, open step and saga, and the counters; keep the subscription."""
        self._state.reset()
        self._sink_errors = 0
        self._logged_errors.clear()
