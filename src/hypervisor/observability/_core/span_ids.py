"""Saga span ids: W3C trace and span ids derived from stable inputs only.

The rules are those of :mod:`hypervisor.observability._core.spans` (its "Ids" item): a saga's
trace id is that of its causal trace id, mapped as ``CausalTraceId.to_traceparent`` maps it,
else a BLAKE2b hash of the saga id; a span id is a BLAKE2b hash of the span's kind, saga id, key
and opening event id. Nothing here reads the clock or draws randomness, so a replayed stream
gets the very same ids.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from hypervisor.observability._core.trace import CausalTraceId

__all__ = ["causal_span_ids", "span_id_for", "trace_id_for_saga"]

_blake2b = hashlib.blake2b


def _digest(width: int, *parts: str) -> str:
    """``width`` hex characters of BLAKE2b over ``parts`` (NUL-separated), never all zeros."""
    value = _blake2b("\0".join(parts).encode(), digest_size=width // 2).hexdigest()
    if value == "0" * width:
        return value[:-1] + "1"
    return value


# A causal trace id as CausalTraceId.from_string accepts it: two or three segments of at most 64
# letters, digits, '-' or '_' (which also bounds the length as it does).
_CAUSAL: Final = re.compile(r"([A-Za-z0-9_-]{1,64})/([A-Za-z0-9_-]{1,64})(?:/[A-Za-z0-9_-]{1,64})?")
_CAUSAL_PARTS: Final = re.compile(
    r"([A-Za-z0-9_-]{1,64})/([A-Za-z0-9_-]{1,64})(?:/([A-Za-z0-9_-]{1,64}))?"
)
_HEX: Final = re.compile(r"[0-9a-f]+")
_HEX_DIGITS: Final = "0123456789abcdef"
_SEGMENT_CHARS: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


def _w3c_segment(segment: str, width: int) -> str:
    """``CausalTraceId.to_traceparent``'s mapping of one segment to ``width`` hex characters."""
    lowered = segment.lower()
    if len(lowered) <= width and _HEX.fullmatch(lowered):
        value = lowered.rjust(width, "0")
    else:
        value = _blake2b(segment.encode(), digest_size=width // 2).hexdigest()
    if value == "0" * width:
        return value[:-1] + "1"
    return value


def trace_id_for_saga(saga_id: str, causal_trace_id: str | None) -> tuple[str, str | None]:
    """Return ``(W3C trace id, W3C span id of the causal span or None)`` for a saga.

    The causal trace id, when it parses, gives both (as ``CausalTraceId.to_traceparent`` maps
    it), so a saga's spans join the trace of the agents that ran it; otherwise the trace id is a
    hash of the saga id and there is no parent.
    """
    # The parse and the mapping of CausalTraceId.from_string(...).to_traceparent(), without
    # building the object and the header string: several times faster, same result (tested).
    if causal_trace_id:
        if type(causal_trace_id) is str:
            # The common shape first, with C-speed string methods: lowercase hex trace and span
            # segments that fit their W3C width (padded), any valid parent segment.
            parts = causal_trace_id.split("/")
            count = len(parts)
            if count == 2 or count == 3:
                trace, span = parts[0], parts[1]
                if (
                    0 < len(trace) <= 32
                    and 0 < len(span) <= 16
                    and not trace.strip(_HEX_DIGITS)
                    and not span.strip(_HEX_DIGITS)
                    and (
                        count == 2
                        or (0 < len(parts[2]) <= 64 and not parts[2].strip(_SEGMENT_CHARS))
                    )
                ):
                    trace = trace.rjust(32, "0")
                    span = span.rjust(16, "0")
                    if trace == _ZERO_TRACE:
                        trace = _ZERO_TRACE[:-1] + "1"
                    if span == _ZERO_SPAN:
                        span = _ZERO_SPAN[:-1] + "1"
                    return trace, span
        match = _CAUSAL.fullmatch(causal_trace_id) if type(causal_trace_id) is str else None
        if match is not None:
            return _w3c_segment(match[1], 32), _w3c_segment(match[2], 16)
        if type(causal_trace_id) is not str:
            try:
                causal = CausalTraceId.from_string(causal_trace_id)
            except ValueError:
                pass
            else:
                _, trace, span, _ = causal.to_traceparent().split("-")
                return trace, span
    return _digest(32, "saga-trace", saga_id), None


def causal_span_ids(causal_trace_id: str) -> tuple[str, str, str | None] | None:
    """``(W3C trace id, span id, parent span id or None)`` of a causal trace id, else ``None``.

    The same mapping as :func:`trace_id_for_saga` (``CausalTraceId.to_traceparent``'s), applied
    to the parent segment too: the span of an agent's causal id is the parent of the sagas it
    runs, and its parent is the span of the agent that spawned it. ``None`` for a string that
    is not a causal trace id.
    """
    if type(causal_trace_id) is not str:
        return None
    match = _CAUSAL_PARTS.fullmatch(causal_trace_id)
    if match is None:
        return None
    parent = match[3]
    return (
        _w3c_segment(match[1], 32),
        _w3c_segment(match[2], 16),
        None if parent is None else _w3c_segment(parent, 16),
    )


def span_id_for(kind: str, saga_id: str, key: str, opening_event_id: str) -> str:
    """Return the 16-hex span id of a ``kind`` span, derived from stable inputs only.

    ``kind`` is ``"saga"`` (``key`` empty, the ``saga.created`` event id), ``"step"`` (the step
    key, the ``saga.step_started`` event id, or the ending event's when the start is unknown)
    or ``"compensate"`` (step id or action, the ``saga.compensating`` event id).
    """
    value = _blake2b(
        f"{kind}\0{saga_id}\0{key}\0{opening_event_id}".encode(), digest_size=8
    ).hexdigest()
    return value if value != "0000000000000000" else "0000000000000001"


# (created event id, causal trace id) of a saga: what its ids derive from.
_SagaRef = tuple[str, str | None]
_SagaIds = tuple[str, str, str | None]


def _saga_ids(saga_id: str, ref: _SagaRef) -> _SagaIds:
    """``(trace id, span id, parent span id)`` of a saga span."""
    created_id, causal_trace_id = ref
    trace_id, parent = trace_id_for_saga(saga_id, causal_trace_id)
    return trace_id, span_id_for("saga", saga_id, "", created_id), parent
