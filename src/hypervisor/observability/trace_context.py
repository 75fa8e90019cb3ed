"""W3C trace context carried by events on the bus: the context, its wire keys, reading it."""

from hypervisor.observability._core.trace_context import (
    MAX_TRACESTATE_LENGTH,
    MAX_TRACESTATE_MEMBERS,
    TRACEPARENT_KEY,
    TRACESTATE_KEY,
    TraceContext,
    decode_context,
)

__all__ = [
    "MAX_TRACESTATE_LENGTH",
    "MAX_TRACESTATE_MEMBERS",
    "TRACEPARENT_KEY",
    "TRACESTATE_KEY",
    "TraceContext",
    "decode_context",
]
