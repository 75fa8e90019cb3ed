"""Saga spans as a pure state machine: saga lifecycle events in, span records out.

``SagaSpanState.apply(event)`` returns the spans the event completed. Spans, their timing and
their ids are functions of the events alone (never of the wall clock or of randomness), so a
worker that replays a stream after a crash produces the very same spans.

Published rules:

* ``saga_id`` is ``payload["saga_id"]``, else the event's ``causal_trace_id``, else
  ``"unknown"``; ``step_action`` is ``payload["action"]``, else ``payload["step_action"]``, else
  ``""``; a step is keyed by ``(saga_id, step_id or step_action)``.
* ``saga.step_committed`` / ``saga.step_failed`` close the step opened by
  ``saga.step_started`` as ``saga.step.<action or step id>`` with status ``ok`` / ``error``; a
  step that ends without a known start starts where it ends.
* ``saga.compensating`` gives ``saga.compensate.<action or step id>``, status ``compensating``.
* ``saga.completed`` / ``saga.escalated`` close the saga opened by ``saga.created`` as
  ``saga.completed.<saga_id>`` (``ok``) / ``saga.escalated.<saga_id>`` (``error``); without a
  known ``saga.created`` there is no saga span.
* Attributes: ``agent.saga.id``, ``agent.saga.step_id``, ``agent.saga.step_action``,
  ``agent.saga.state``, ``agent.did`` and ``session.id`` when the event has them, and
  ``agent.saga.error`` / ``reason`` / ``result`` (as strings) when the payload has them.

This project's additions:

* Bounded buffers: completed spans, open steps and open sagas each have a cap; the oldest entry
  is evicted first and every eviction is counted (``evicted_spans``, ``evicted_open_steps``,
  ``evicted_open_sagas``).
* Ids. Each span has a W3C ``trace_id`` (32 hex), ``span_id`` (16 hex) and ``parent_span_id``.
  A saga's trace id is that of the ``causal_trace_id`` of its ``saga.created`` event (mapped with
  ``CausalTraceId.to_traceparent``), else a hash of the saga id; the saga span's parent is the
  span of that causal id (``None`` without one). Span ids hash stable inputs with BLAKE2b: the
  saga id and its ``saga.created`` event id for the saga span; the saga id, the step key and the
  id of the event that opened the span for a step or compensation. Step and compensation spans
  are children of their saga's span; for a saga that is not open (never seen created, evicted,
  or already closed) they use the trace id of their own event's causal id (else the saga-id
  hash) and have no parent.
* A compensation span is not instantaneous: it starts where the failure it compensates happened,
  at the end of the saga's most recent failed step, or at the end of the previous compensation
  when compensations follow each other; with neither (or if that point is later than the
  compensating event) it starts and ends at the compensating event, as published.

This module is the state machine; the ids are derived in
:mod:`~hypervisor.observability._core.span_ids`, and the records, the sink protocols and the
building of records are in :mod:`~hypervisor.observability._core.span_records`, an event's saga
keys and an open saga in :mod:`~hypervisor.observability._core.span_sagas`. The public names of
all three are re-exported here.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final, cast

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.span_ids import (
    _SagaIds,
    _SagaRef,
    span_id_for,
    trace_id_for_saga,
)
from hypervisor.observability._core.span_records import (
    _COMPENSATE_SPAN,
    _SAGA_SPAN,
    _STEP_SPAN,
    SagaSpanRecord,
    SpanRecordSink,
    SpanSink,
    _base_attributes,
    _build_record,
    _build_unbuilt,
    _extras,
    _record,
    _Unbuilt,
)
from hypervisor.observability._core.span_sagas import _OpenSaga, _saga_keys

__all__ = [
    "DEFAULT_MAX_OPEN_SAGAS",
    "DEFAULT_MAX_OPEN_STEPS",
    "DEFAULT_MAX_SPANS",
    "SAGA_SPAN_EVENTS",
    "SagaSpanRecord",
    "SagaSpanState",
    "SpanRecordSink",
    "SpanSink",
    "span_id_for",
    "trace_id_for_saga",
]

_log = logging.getLogger("hypervisor.observability.spans")

DEFAULT_MAX_SPANS: Final = 10_000
"""Completed spans kept in memory by default (the oldest are evicted first)."""
DEFAULT_MAX_OPEN_STEPS: Final = 10_000
"""Steps started and not yet ended, tracked by default."""
DEFAULT_MAX_OPEN_SAGAS: Final = 10_000
"""Sagas created and not yet completed or escalated, tracked by default."""

SAGA_SPAN_EVENTS: Final = frozenset(
    {
        EventType.SAGA_CREATED,
        EventType.SAGA_STEP_STARTED,
        EventType.SAGA_STEP_COMMITTED,
        EventType.SAGA_STEP_FAILED,
        EventType.SAGA_COMPENSATING,
        EventType.SAGA_COMPLETED,
        EventType.SAGA_ESCALATED,
    }
)

_CREATED: Final = EventType.SAGA_CREATED
_STARTED: Final = EventType.SAGA_STEP_STARTED
_COMMITTED: Final = EventType.SAGA_STEP_COMMITTED
_FAILED: Final = EventType.SAGA_STEP_FAILED
_COMPENSATING: Final = EventType.SAGA_COMPENSATING
_COMPLETED: Final = EventType.SAGA_COMPLETED
_ESCALATED: Final = EventType.SAGA_ESCALATED


class SagaSpanState:
    """The saga spans of an event stream; feed it with :meth:`apply`.

    Events of other types are ignored (not counted), so a worker can feed it a whole stream.

    Args:
        max_spans: completed spans kept in :attr:`completed_spans`; ``0`` keeps none (a worker
            that only forwards the spans ``apply`` returns).
        max_open_steps: steps started and not yet ended that are tracked.
        max_open_sagas: sagas created and not yet closed that are tracked.

    Raises:
        ValueError: a cap is negative (or zero for the open buffers).
    """

    __slots__ = (
        "_defer",
        "_lazy",
        "_on_span",
        "_open_sagas",
        "_open_steps",
        "_spans",
        "_unbuilt",
        "events_processed",
        "evicted_open_sagas",
        "evicted_open_steps",
        "evicted_spans",
        "max_open_sagas",
        "max_open_steps",
        "max_spans",
    )

    def __init__(
        self,
        *,
        max_spans: int = DEFAULT_MAX_SPANS,
        max_open_steps: int = DEFAULT_MAX_OPEN_STEPS,
        max_open_sagas: int = DEFAULT_MAX_OPEN_SAGAS,
    ) -> None:
        if max_spans < 0:
            raise ValueError(f"max_spans must be >= 0, got {max_spans}")
        if max_open_steps < 1 or max_open_sagas < 1:
            raise ValueError("max_open_steps and max_open_sagas must be >= 1")
        self.max_spans = max_spans
        self.max_open_steps = max_open_steps
        self.max_open_sagas = max_open_sagas
        # Records, and unbuilt spans while deferring (see lazy_records).
        self._spans: deque[SagaSpanRecord | _Unbuilt] = deque(maxlen=max_spans)
        self._unbuilt = False  # whether _spans may hold an unbuilt span
        # Insertion-ordered: the first key is the oldest, evicted first.
        # (start, opening event id); the start is a float or the started event's datetime.
        self._open_steps: dict[tuple[str, str], tuple[float | datetime, str]] = {}
        self._open_sagas: dict[str, _OpenSaga] = {}
        self.events_processed = 0
        self.evicted_spans = 0
        self.evicted_open_steps = 0
        self.evicted_open_sagas = 0
        self._on_span: Callable[[SagaSpanRecord], None] | None = None
        self._lazy = False
        self._defer = False  # lazy_records and no on_span: buffer spans unbuilt

    @property
    def on_span(self) -> Callable[[SagaSpanRecord], None] | None:
        """Called with each span as it completes (after buffering); must not raise.

        The in-process exporter forwards to its sink through it, so the bus can call the
        per-type handlers of :meth:`handler_for` directly. Not part of a snapshot of the state.
        """
        return self._on_span

    @on_span.setter
    def on_span(self, hook: Callable[[SagaSpanRecord], None] | None) -> None:
        self._on_span = hook
        self._defer = self._lazy and hook is None

    @property
    def lazy_records(self) -> bool:
        """Defer building spans nobody reads yet (default ``False``).

        While it is set and no :attr:`on_span` hook is attached, the per-type handlers of
        :meth:`handler_for` buffer each completed span unbuilt (a tuple of what it derives from)
        and return ``None``; its record (name, ids, attributes, epoch times: the bulk of a
        span's cost) is built, with the same values, when :attr:`completed_spans` is next read.
        A saga's own ids are likewise computed when a span first needs them. :meth:`apply`
        still returns built records.

        For spans that are mostly only buffered: the in-process exporter sets it while no sink
        is attached. A record read at once (a sink, a worker) is cheaper built eagerly.
        """
        return self._lazy

    @lazy_records.setter
    def lazy_records(self, lazy: bool) -> None:
        self._lazy = lazy
        self._defer = lazy and self._on_span is None

    def _build_spans(self) -> None:
        """Replace the buffered unbuilt spans by their records."""
        if not self._unbuilt:
            return
        spans = self._spans
        saga_ids: dict[tuple[str, Any], _SagaIds] = {}  # a saga's ids, once per build
        built = [
            span if isinstance(span, SagaSpanRecord) else _build_unbuilt(span, saga_ids)
            for span in spans
        ]
        spans.clear()
        spans.extend(built)
        self._unbuilt = False

    @property
    def completed_spans(self) -> list[SagaSpanRecord]:
        """A copy of the buffered completed spans, oldest first."""
        self._build_spans()
        return cast("list[SagaSpanRecord]", list(self._spans))  # all built now

    @property
    def open_step_count(self) -> int:
        """Steps started and not yet ended."""
        return len(self._open_steps)

    @property
    def open_saga_count(self) -> int:
        """Sagas created and not yet completed or escalated."""
        return len(self._open_sagas)

    def reset(self) -> None:
        """Forget every span, open step, open saga and counter."""
        self._spans.clear()
        self._unbuilt = False
        self._open_steps.clear()
        self._open_sagas.clear()
        self.events_processed = 0
        self.evicted_spans = 0
        self.evicted_open_steps = 0
        self.evicted_open_sagas = 0

    def apply(self, event: HypervisorEvent) -> list[SagaSpanRecord]:
        """Fold one event into the state and return the spans it completed (zero or one)."""
        # The type's handler; a plain string equal to a type's value finds it too (EventType is
        # a str enum hashing as its value).
        handler = _HANDLERS.get(event.event_type)
        if handler is None:
            return []
        defer = self._defer
        if defer:  # the caller wants the record now
            self._defer = False
            try:
                record = handler(self, event)
            finally:
                self._defer = defer
        else:
            record = handler(self, event)
        return [] if record is None else [record]

    def handler_for(
        self, event_type: EventType
    ) -> Callable[[HypervisorEvent], SagaSpanRecord | None]:
        """The handler of ``event_type`` events: it folds an event of that type as :meth:`apply`
        does and returns the span completed, or ``None`` (not a list: nothing to allocate;
        also ``None`` when the span is deferred, see :attr:`lazy_records`).

        A bus can subscribe it for that type and skip :meth:`apply`'s dispatch on every event.

        Raises:
            KeyError: ``event_type`` is not one of :data:`SAGA_SPAN_EVENTS`.
        """
        method = _HANDLERS[event_type]
        handler: Callable[[HypervisorEvent], SagaSpanRecord | None] = method.__get__(self)
        return handler

    # -- one handler per saga event type (``_HANDLERS``) -------------------------------------
    # The payload is read inline in the frequent ones: a helper call and its tuple cost more
    # than the reads themselves.

    def _created(self, event: HypervisorEvent) -> SagaSpanRecord | None:
        self.events_processed += 1
        value: Any = event.payload.get("saga_id")
        if type(value) is not str:
            value = None if value is None else str(value)
        saga_id: str = value or event.causal_trace_id or "unknown"
        ts = event.timestamp.timestamp()
        sagas = self._open_sagas
        sagas.pop(saga_id, None)
        sagas[saga_id] = _OpenSaga(ts, saga_id, event.event_id, event.causal_trace_id)
        if len(sagas) > self.max_open_sagas:
            del sagas[next(iter(sagas))]
            self.evicted_open_sagas += 1
        return None

    def _started(self, event: HypervisorEvent) -> SagaSpanRecord | None:
        self.events_processed += 1
        get = event.payload.get
        value: Any = get("saga_id")
        if type(value) is not str:
            value = None if value is None else str(value)
        saga_id: str = value or event.causal_trace_id or "unknown"
        value = get("step_id")
        if not value or type(value) is not str:
            value = "" if value is None else str(value)
            if not value:
                value = get("action")
                if value is None:
                    value = get("step_action")
                if type(value) is not str:
                    value = "" if value is None else str(value)
        key = (saga_id, value)
        steps = self._open_steps
        if key in steps:
            del steps[key]  # a restart re-opens the step as the newest entry
        # An aware start is converted to epoch seconds when the span is built (a deferred one:
        # when read), which cannot fail. A naive one is converted now: as local time, its
        # conversion can fail (at the ends of the datetime range), and must then fail here, on
        # its own event, not later on whatever event or snapshot happens to convert it.
        stamp = event.timestamp
        steps[key] = (
            stamp if type(stamp) is datetime and stamp.tzinfo is not None else stamp.timestamp(),
            event.event_id,
        )
        if len(steps) > self.max_open_steps:
            del steps[next(iter(steps))]
            self.evicted_open_steps += 1
        return None

    def _committed(self, event: HypervisorEvent) -> SagaSpanRecord | None:
        return self._step_ended(event, "ok")

    def _failed(self, event: HypervisorEvent) -> SagaSpanRecord | None:
        return self._step_ended(event, "error")

    def _step_ended(self, event: HypervisorEvent, status: str) -> SagaSpanRecord | None:
        self.events_processed += 1
        payload = event.payload
        saga_id, step_id, step_action = _saga_keys(event)
        step_key = step_id or step_action
        saga = self._open_sagas.get(saga_id)
        opened = self._open_steps.pop((saga_id, step_key), None)
        ts: float | None
        start: float | datetime
        if opened is None:
            ts = event.timestamp.timestamp()
            start, opening_id = ts, event.event_id
        else:
            start, opening_id = opened
            # A deferred span of a committed step converts its end time when built (the time is
            # not needed now; a failure's is, as the saga's compensation anchor).
            if status == "ok" and self._defer and type(event.timestamp) is datetime:
                ts = None
            else:
                ts = event.timestamp.timestamp()
        if saga is not None and status == "error":
            saga.anchor = ts
        if self._defer:
            self._defer_span(
                event,
                _STEP_SPAN,
                saga_id,
                step_key,
                step_action,
                start,
                event.timestamp if ts is None else ts,
                status,
                None if saga is None else saga.ref,
                opening_id,
            )
            return None
        span_id = span_id_for("step", saga_id, step_key, opening_id)
        if saga is None:
            trace_id: str = trace_id_for_saga(saga_id, event.causal_trace_id)[0]
            parent: str | None = None
        else:
            trace_id, parent, _ = saga.ids()
        if ts is None:  # (not reached: only deferred spans leave it unset)
            ts = event.timestamp.timestamp()
        if isinstance(start, datetime):
            start = start.timestamp()
        agent = event.agent_did
        session = event.session_id
        if agent and session:
            attributes: dict[str, Any] = {
                "agent.saga.id": saga_id,
                "agent.saga.step_id": step_key,
                "agent.saga.step_action": step_action,
                "agent.saga.state": status,
                "agent.did": agent,
                "session.id": session,
            }
        else:
            attributes = _base_attributes(saga_id, step_key, step_action, status, agent, session)
        if "error" in payload or "reason" in payload or "result" in payload:
            attributes.update(_extras(payload))
        return self._completed_span(
            _record(
                f"saga.step.{step_action or step_key}",
                saga_id,
                step_key,
                step_action,
                start,
                ts,
                status,
                attributes,
                trace_id,
                span_id,
                parent,
            )
        )

    def _compensating(self, event: HypervisorEvent) -> SagaSpanRecord | None:
        self.events_processed += 1
        saga_id, step_id, step_action = _saga_keys(event)
        ts = event.timestamp.timestamp()
        saga = self._open_sagas.get(saga_id)
        start = ts
        if saga is not None:
            anchor = saga.anchor
            if anchor is not None and anchor <= ts:
                start = anchor
            saga.anchor = ts
        if self._defer:
            self._defer_span(
                event,
                _COMPENSATE_SPAN,
                saga_id,
                step_id,
                step_action,
                start,
                ts,
                "compensating",
                None if saga is None else saga.ref,
                event.event_id,
            )
            return None
        if saga is None:
            trace_id: str = trace_id_for_saga(saga_id, event.causal_trace_id)[0]
            parent: str | None = None
        else:
            trace_id, parent, _ = saga.ids()
        span_id = span_id_for("compensate", saga_id, step_id or step_action, event.event_id)
        return self._completed_span(
            _build_record(
                event,
                f"saga.compensate.{step_action or step_id}",
                saga_id,
                step_id or "compensation",
                step_action or "compensate",
                start,
                ts,
                "compensating",
                trace_id,
                span_id,
                parent,
            )
        )

    def _completed(self, event: HypervisorEvent) -> SagaSpanRecord | None:
        return self._saga_closed(event, "ok", "saga.completed.", "complete")

    def _escalated(self, event: HypervisorEvent) -> SagaSpanRecord | None:
        return self._saga_closed(event, "error", "saga.escalated.", "escalate")

    def _saga_closed(
        self, event: HypervisorEvent, status: str, prefix: str, step_action: str
    ) -> SagaSpanRecord | None:
        self.events_processed += 1
        value: Any = event.payload.get("saga_id")
        if type(value) is not str:
            value = None if value is None else str(value)
        saga_id: str = value or event.causal_trace_id or "unknown"
        stamp = event.timestamp
        # A deferred span converts its end time when built.
        end: float | datetime = (
            stamp if self._defer and type(stamp) is datetime else stamp.timestamp()
        )
        saga = self._open_sagas.pop(saga_id, None)
        if saga is None:
            return None
        if self._defer:
            self._defer_span(
                event, _SAGA_SPAN, saga_id, "", step_action, saga.start, end, status, saga.ref, None
            )
            return None
        return self._completed_span(
            _build_record(
                event,
                prefix + saga_id,
                saga_id,
                "",
                step_action,
                saga.start,
                end if isinstance(end, float) else end.timestamp(),
                status,
                saga.trace_id,
                saga.span_id,
                saga.parent_span_id,
            )
        )

    def _defer_span(
        self,
        event: HypervisorEvent,
        kind: str,
        saga_id: str,
        step_id: str,
        step_action: str,
        start: float | datetime,
        end: float | datetime,
        status: str,
        ref: _SagaRef | None,
        opening_id: str | None,
    ) -> None:
        """Buffer the unbuilt span ``event`` completed (built when :attr:`completed_spans` is
        next read); the event gives its optional attributes, agent, session and causal id."""
        if self.max_spans:
            payload = event.payload
            spans = self._spans
            if len(spans) == self.max_spans:
                self.evicted_spans += 1
            spans.append(
                (
                    kind,
                    saga_id,
                    step_id,
                    step_action,
                    start,
                    end,
                    status,
                    ref,
                    opening_id,
                    _extras(payload)
                    if "error" in payload or "reason" in payload or "result" in payload
                    else None,
                    event.agent_did,
                    event.session_id,
                    event.causal_trace_id,
                )
            )
            self._unbuilt = True

    def _completed_span(self, record: SagaSpanRecord) -> SagaSpanRecord | None:
        if self.max_spans:
            spans = self._spans
            if len(spans) == self.max_spans:
                self.evicted_spans += 1
            spans.append(record)
        on_span = self._on_span
        if on_span is not None:
            on_span(record)
        return record


_Handler = Callable[[SagaSpanState, HypervisorEvent], SagaSpanRecord | None]
_HANDLERS: Final[dict[EventType, _Handler]] = {
    _CREATED: SagaSpanState._created,
    _STARTED: SagaSpanState._started,
    _COMMITTED: SagaSpanState._committed,
    _FAILED: SagaSpanState._failed,
    _COMPENSATING: SagaSpanState._compensating,
    _COMPLETED: SagaSpanState._completed,
    _ESCALATED: SagaSpanState._escalated,
}
