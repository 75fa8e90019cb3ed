"""Saga span records: the immutable ``SagaSpanRecord``, the sink protocols, and how the state
machine builds records.

:class:`~hypervisor.observability._core.spans.SagaSpanState` builds a record at once with
``_build_record``, or, while it defers, buffers an unbuilt span (a tuple) that
``_build_unbuilt`` turns into the very same record when it is read. Both give a bare record its
fields through its ``__dict__``, several times faster than the frozen ``__init__``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol, runtime_checkable

from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability._core.span_ids import (
    _digest,
    _saga_ids,
    _SagaIds,
    _SagaRef,
    span_id_for,
    trace_id_for_saga,
)
from hypervisor.observability._core.trace_context import TraceContext

__all__ = ["SagaSpanRecord", "SpanRecordSink", "SpanSink", "deliverer"]

# A bare record and the setter that gives it its fields (see _record).
_new_record = object.__new__
_set_attribute = object.__setattr__


@dataclass(frozen=True)
class SagaSpanRecord:
    """An immutable, completed saga span.

    The first eight fields are the published ones, in the published order. Times are epoch
    seconds (float). ``status`` is ``"ok"``, ``"error"`` or ``"compensating"``.

    Attributes:
        trace_id: W3C trace id (32 lowercase hex).
        span_id: W3C span id (16 lowercase hex).
        parent_span_id: the parent's W3C span id, ``None`` for a root span.
        links: the trace contexts of the producers' spans the span links to (the workers set
            the context of the event that completed the span, when it carried one).

    A record built by hand without ids gets ids derived from its saga id, step id, name and
    start time, so every record is a valid W3C span. (Not a slotted class: the state machine
    builds records through their ``__dict__``, several times faster than the frozen
    ``__init__``.)
    """

    name: str
    saga_id: str
    step_id: str
    step_action: str
    start_time: float
    end_time: float
    status: str
    attributes: dict[str, Any] = field(default_factory=dict)
    trace_id: str = ""
    span_id: str = ""
    parent_span_id: str | None = None
    links: tuple[TraceContext, ...] = ()

    def __post_init__(self) -> None:
        if not self.trace_id:
            object.__setattr__(self, "trace_id", _digest(32, "saga-trace", self.saga_id))
        if not self.span_id:
            object.__setattr__(
                self,
                "span_id",
                _digest(16, "record", self.saga_id, self.step_id, self.name, repr(self.start_time)),
            )

    @property
    def duration_seconds(self) -> float:
        """``end_time - start_time`` in seconds."""
        return self.end_time - self.start_time


@runtime_checkable
class SpanSink(Protocol):
    """Receives completed spans (the published protocol); called with keyword arguments."""

    def record_span(
        self,
        name: str,
        start_time: float,
        end_time: float,
        attributes: dict[str, Any],
        status: str,
    ) -> None:
        """Receive one completed span."""
        ...


@runtime_checkable
class SpanRecordSink(Protocol):
    """Receives whole :class:`SagaSpanRecord` objects, ids included.

    A sink with ``export_span`` is given records through it instead of ``record_span``.
    """

    def export_span(self, record: SagaSpanRecord) -> None:
        """Receive one completed span record."""
        ...


def deliverer(sink: SpanSink | SpanRecordSink) -> Callable[[SagaSpanRecord], None]:
    """Return how a record reaches ``sink``, the one adapter of the two sink protocols.

    A sink with ``export_span`` gets whole records (ids included); a published ``SpanSink`` gets
    ``record_span(...)`` with the published keywords.
    """
    if isinstance(sink, SpanRecordSink):
        return sink.export_span
    record_span = sink.record_span

    def deliver(record: SagaSpanRecord) -> None:
        record_span(
            name=record.name,
            start_time=record.start_time,
            end_time=record.end_time,
            attributes=record.attributes,
            status=record.status,
        )

    return deliver


_STEP_SPAN: Final = "step"
_COMPENSATE_SPAN: Final = "compensate"
_SAGA_SPAN: Final = "saga"


# An unbuilt span (see spans.SagaSpanState.lazy_records): what its record derives from, as a tuple
# (kind, saga_id, step_id, step_action, start, end, status, saga ref or None, opening event id,
# payload extras or None, agent, session, causal trace id). It holds no reference to the event
# (only strings, times and the saga's id inputs), so a buffered span neither keeps its event
# alive nor, once the collector has seen it hold only atomic values, gets scanned by it again.
_Unbuilt = tuple[
    str,  # kind: _STEP_SPAN, _COMPENSATE_SPAN or _SAGA_SPAN
    str,  # saga_id
    str,  # step_id
    str,  # step_action
    float | datetime,  # start (epoch seconds, or the event's datetime, converted when built)
    float | datetime,  # end (likewise)
    str,  # status
    _SagaRef | None,  # the saga's id inputs; None when the saga was not open
    str | None,  # the id of the event that opened the span
    dict[str, str] | None,  # the payload's optional attributes
    str | None,  # agent
    str | None,  # session
    str | None,  # causal trace id
]


def _build_unbuilt(pending: _Unbuilt, saga_ids: dict[tuple[str, Any], _SagaIds]) -> SagaSpanRecord:
    """The record of an unbuilt span: the values the eager path computes.

    ``saga_ids`` caches a saga's ids across the spans of one build (the eager path keeps them
    on the open saga): ``(saga_id, ref) -> (trace id, span id, parent span id)``.
    """
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
        extras,
        agent,
        session,
        causal,
    ) = pending
    if isinstance(end, datetime):  # deferred (a committed step): the event's timestamp
        end = end.timestamp()
    if isinstance(start, datetime):  # a step start kept as the started event's datetime
        start = start.timestamp()
    parent: str | None
    if kind is _STEP_SPAN or kind is _COMPENSATE_SPAN:
        assert opening_id is not None, "a step or compensation span has its opening event"
        if kind is _STEP_SPAN:
            name = f"saga.step.{step_action or step_id}"
            span = span_id_for("step", saga_id, step_id, opening_id)
        else:  # the payload's step id and action; the record's fall back to fixed names
            name = f"saga.compensate.{step_action or step_id}"
            span = span_id_for("compensate", saga_id, step_id or step_action, opening_id)
            step_id = step_id or "compensation"
            step_action = step_action or "compensate"
        if ref is None:  # the saga was not open
            trace_id = trace_id_for_saga(saga_id, causal)[0]
            parent = None
        else:
            trace_id, parent, _ = _cached_saga_ids(saga_ids, saga_id, ref)
    else:
        assert ref is not None, "a saga span closes an open saga"
        name = ("saga.completed." if status == "ok" else "saga.escalated.") + saga_id
        trace_id, span, parent = _cached_saga_ids(saga_ids, saga_id, ref)
    attributes = _base_attributes(saga_id, step_id, step_action, status, agent, session)
    if extras is not None:
        attributes.update(extras)
    return _record(
        name, saga_id, step_id, step_action, start, end, status, attributes, trace_id, span, parent
    )


def _cached_saga_ids(
    cache: dict[tuple[str, Any], _SagaIds], saga_id: str, ref: _SagaRef
) -> _SagaIds:
    key = (saga_id, ref)
    ids = cache.get(key)
    if ids is None:
        ids = cache[key] = _saga_ids(saga_id, ref)
    return ids


def _extras(payload: dict[str, Any]) -> dict[str, str]:
    """The optional attributes a payload gives, in the published order."""
    extras: dict[str, str] = {}
    if "error" in payload:
        extras["agent.saga.error"] = str(payload["error"])
    if "reason" in payload:
        extras["agent.saga.reason"] = str(payload["reason"])
    if "result" in payload:
        extras["agent.saga.result"] = str(payload["result"])
    return extras


def _base_attributes(
    saga_id: str,
    step_id: str,
    step_action: str,
    status: str,
    agent: str | None,
    session: str | None,
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "agent.saga.id": saga_id,
        "agent.saga.step_id": step_id,
        "agent.saga.step_action": step_action,
        "agent.saga.state": status,
    }
    if agent:
        attributes["agent.did"] = agent
    if session:
        attributes["session.id"] = session
    return attributes


def _build_record(
    event: HypervisorEvent,
    name: str,
    saga_id: str,
    step_id: str,
    step_action: str,
    start: float,
    end: float,
    status: str,
    trace_id: str,
    span_id: str,
    parent: str | None,
) -> SagaSpanRecord:
    """A record with the published attributes, built through its ``__dict__`` (fast)."""
    attributes = _base_attributes(
        saga_id, step_id, step_action, status, event.agent_did, event.session_id
    )
    attributes.update(_extras(event.payload))
    return _record(
        name,
        saga_id,
        step_id,
        step_action,
        start,
        end,
        status,
        attributes,
        trace_id,
        span_id,
        parent,
    )


def _record(
    name: str,
    saga_id: str,
    step_id: str,
    step_action: str,
    start: float,
    end: float,
    status: str,
    attributes: dict[str, Any],
    trace_id: str,
    span_id: str,
    parent: str | None,
) -> SagaSpanRecord:
    """A record with these fields, given through its ``__dict__`` (faster than the frozen
    ``__init__``)."""
    record = _new_record(SagaSpanRecord)
    _set_attribute(
        record,
        "__dict__",
        {
            "name": name,
            "saga_id": saga_id,
            "step_id": step_id,
            "step_action": step_action,
            "start_time": start,
            "end_time": end,
            "status": status,
            "attributes": attributes,
            "trace_id": trace_id,
            "span_id": span_id,
            "parent_span_id": parent,
        },
    )
    return record
