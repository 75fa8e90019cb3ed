"""Saga span exporter (the published module path).

Re-exports only: the exporter lives in the pure core (``_core/span_exporter.py``).
"""

from hypervisor.observability._core.span_exporter import (
    SagaSpanExporter,
    SagaSpanRecord,
    SagaSpanState,
    SpanRecordSink,
    SpanSink,
)

__all__ = [
    "SagaSpanExporter",
    "SagaSpanRecord",
    "SagaSpanState",
    "SpanRecordSink",
    "SpanSink",
]
