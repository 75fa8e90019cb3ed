"""Span sinks for workers: the JSON-lines file sink and the export helper."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import msgspec

from hypervisor.observability._core.agent_spans import AgentSpanRecord, AgentSpanSink
from hypervisor.observability._core.span_records import deliverer
from hypervisor.observability._core.spans import SagaSpanRecord, SpanRecordSink, SpanSink

__all__ = [
    "JsonLinesSpanSink",
    "agent_span_to_dict",
    "export_agent_records",
    "export_records",
    "span_to_dict",
]

_encoder = msgspec.json.Encoder()


def span_to_dict(record: SagaSpanRecord) -> dict[str, Any]:
    """Return the JSON-lines form of a span: ids, name, epoch-second times, status, attributes
    (and ``links``, the producers' ``traceparent`` and ``tracestate``, when it has any)."""
    document: dict[str, Any] = {
        "name": record.name,
        "trace_id": record.trace_id,
        "span_id": record.span_id,
        "parent_span_id": record.parent_span_id,
        "start_time": record.start_time,
        "end_time": record.end_time,
        "status": record.status,
        "saga_id": record.saga_id,
        "step_id": record.step_id,
        "step_action": record.step_action,
        "attributes": record.attributes,
    }
    if record.links:
        document["links"] = [_link(link) for link in record.links]
    return document


def _link(context: Any) -> dict[str, str]:
    return {"traceparent": context.traceparent, "tracestate": context.tracestate}


def agent_span_to_dict(record: AgentSpanRecord) -> dict[str, Any]:
    """Return the JSON-lines form of an agent span (``"kind": "agent"``): ids, name, agent,
    session, causal id, epoch-second times, status, attributes, span events and links."""
    return {
        "kind": "agent",
        "name": record.name,
        "trace_id": record.trace_id,
        "span_id": record.span_id,
        "parent_span_id": record.parent_span_id,
        "start_time": record.start_time,
        "end_time": record.end_time,
        "status": record.status,
        "agent_did": record.agent_did,
        "session_id": record.session_id,
        "causal_trace_id": record.causal_trace_id,
        "attributes": record.attributes,
        "events": [
            {"name": event.name, "time": event.time, "attributes": event.attributes}
            for event in record.events
        ],
        "links": [_link(link) for link in record.links],
    }


class JsonLinesSpanSink:
    """Appends one JSON object per span to a file (see :func:`span_to_dict` for the keys).

    Lines are written through a buffer and flushed by :meth:`flush`, which the saga worker calls
    before it commits the state that produced them, so a committed span is always on disk
    (``fsync=True`` also survives a machine crash). A span may appear twice after a worker crash;
    both lines are identical.

    Args:
        path: the file; created if missing, appended to otherwise.
        fsync: ``os.fsync`` on every flush.
    """

    def __init__(self, path: str | Path, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self._file: IO[bytes] | None = self.path.open("ab")
        self.spans_written = 0
        """Spans written so far."""

    def export_span(self, record: SagaSpanRecord) -> None:
        """Write one span (buffered until :meth:`flush`)."""
        if self._file is None:
            raise ValueError(f"span sink {self.path} is closed")
        self._file.write(_encoder.encode(span_to_dict(record)) + b"\n")
        self.spans_written += 1

    def export_agent_span(self, record: AgentSpanRecord) -> None:
        """Write one agent span (buffered until :meth:`flush`)."""
        if self._file is None:
            raise ValueError(f"span sink {self.path} is closed")
        self._file.write(_encoder.encode(agent_span_to_dict(record)) + b"\n")
        self.spans_written += 1

    def flush(self) -> None:
        """Push buffered lines to the file (and to the disk with ``fsync``)."""
        if self._file is None:
            return
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Flush and close. Idempotent."""
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def export_records(records: list[SagaSpanRecord], sinks: list[SpanRecordSink | SpanSink]) -> None:
    """Hand ``records`` to every sink, then flush sinks that buffer.

    Each sink gets them through :func:`~hypervisor.observability._core.span_records.deliverer`.
    Errors propagate: the caller must not commit state whose spans
    a sink did not take.
    """
    for sink in sinks:
        deliver = deliverer(sink)
        for record in records:
            deliver(record)
        flush = getattr(sink, "flush", None)
        if callable(flush):
            flush()


def export_agent_records(records: list[AgentSpanRecord], sinks: list[AgentSpanSink]) -> None:
    """Hand agent span ``records`` to every sink, then flush sinks that buffer (errors
    propagate, as in :func:`export_records`)."""
    for sink in sinks:
        export = sink.export_agent_span
        for record in records:
            export(record)
        flush = getattr(sink, "flush", None)
        if callable(flush):
            flush()
