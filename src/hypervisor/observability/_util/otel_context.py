"""The current OpenTelemetry span's context, read without importing OpenTelemetry.

Emitters call :func:`current_trace_context` on every emit, so it must cost next to nothing when
no span is active:

* unless some code of the process has imported ``opentelemetry.trace``, no span can be active,
  and a ``sys.modules`` lookup says so (nothing is imported here, ever);
* otherwise the current span is read straight from the OpenTelemetry API's context variable
  (two C calls) when the API runs its default context (``contextvars``), through
  ``get_current_span`` otherwise; no span, no further cost;
* with a span, the wire form of the last span context seen is cached (span contexts are
  immutable, one per span), so emits inside one span format it once.

(redis-py 8 imports OpenTelemetry itself when it is installed, for its own instrumentation, so
in a process of the Redis bus with the ``otel`` extra the second case is the usual one.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextvars import ContextVar
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
_current_span: Callable[[], Any] | None = None


def _span_reader(trace: Any) -> Callable[[], Any]:
    """How to read the current span: the fast path on the API's default runtime context, the
    public ``get_current_span`` on any other (or any surprise in the API's internals)."""
    try:
        context = _modules["opentelemetry.context"]
        runtime = context._RUNTIME_CONTEXT
        variable = runtime._current_context
        key = _modules["opentelemetry.trace.propagation"]._SPAN_KEY
        contextvars_runtime = _modules[
            "opentelemetry.context.contextvars_context"
        ].ContextVarsRuntimeContext
        if type(runtime) is contextvars_runtime and isinstance(variable, ContextVar):
            get = variable.get

            def current_span() -> Any:
                return get().get(key)

            return current_span
    except (KeyError, AttributeError):
        pass
    reader: Callable[[], Any] = trace.get_current_span
    return reader


def current_trace_context() -> EncodedContext | None:
    """The context of the current OpenTelemetry span with its wire form, or ``None``.

    ``None`` when OpenTelemetry was never imported in this process, when no span is current, or
    when the current span's context is not valid (the API's no-op span).
    """
    global _current_span, _last
    reader = _current_span
    if reader is None:
        trace = _modules.get("opentelemetry.trace")
        if trace is None or not hasattr(trace, "get_current_span"):
            return None  # not imported (or still being imported by another thread)
        reader = _current_span = _span_reader(trace)
    span = reader()
    if span is None:
        return None
    span_context = span.get_span_context()
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
