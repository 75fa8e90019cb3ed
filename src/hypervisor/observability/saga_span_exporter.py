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

# `hvobs doctor` tells this file from agent-hypervisor's file of the same path by this line.
__distribution__ = "hypervisor-observability"

__all__ = [
    "SagaSpanExporter",
    "SagaSpanRecord",
    "SagaSpanState",
    "SpanRecordSink",
    "SpanSink",
]
