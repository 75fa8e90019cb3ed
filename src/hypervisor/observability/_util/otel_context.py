"""The current OpenTelemetry span's context, read without importing OpenTelemetry.

Emitters call :func:`current_trace_context` on every emit, so it must cost nothing when
OpenTelemetry is not in use: unless some code of the process has imported
``opentelemetry.trace`` no span can be active, and a ``sys.modules`` lookup says so. Otherwise it
reads the current span's context and caches the wire form of the last span context it saw
(span contexts are immutable, one per span), so emits inside one span format it once.
"""

from __future__ import annotations

import sys
from typing import Any

from hypervisor.observability._core.trace_context import (
    EncodedContext,
    TraceContext,
    encode_context,
)

__all__ = ["current_trace_context"]

_modules = sys.modules
# (span context object, its encoded context or None when it is not a valid one)
_last: tuple[Any, EncodedContext | None] = (None, None)


def current_trace_context() -> EncodedContext | None:
    """The context of the current OpenTelemetry span with its wire form, or ``None``.

    ``None`` when OpenTelemetry was never imported in this process, when no span is current, or
    when the current span's context is not valid (the API's no-op span).
    """
    trace = _modules.get("opentelemetry.trace")
    if trace is None:
        return None
    global _last
    try:
        span_context = trace.get_current_span().get_span_context()
    except AttributeError:  # the module is still being imported by another thread
        return None
    last = _last
    if span_context is last[0]:
        return last[1]
    encoded: EncodedContext | None = None
    if span_context.is_valid:
        state = span_context.trace_state
        context = TraceContext.parse(
            f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
            f"{int(span_context.trace_flags) & 0xFF:02x}",
            state.to_header() if state else "",
        )
        if context is not None:
            encoded = encode_context(context)
    _last = (span_context, encoded)
    return encoded
