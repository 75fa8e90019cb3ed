"""JSON encoding of events for responses and the stream: ``to_dict()`` shape, bounded size.

Payloads come from the shared stream and are not trusted: a value JSON cannot hold (a
msgpack extension, for one) is written as a short placeholder string instead of failing the
response, and an event whose JSON is longer than ``max_event_bytes`` is sent with its payload
replaced by ``{"hvobs_truncated": <bytes>}`` (its other fields intact), so one huge event can
neither break nor blow up a response.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC
from typing import Any, Final

import msgspec

from hypervisor.observability._core.events import HypervisorEvent

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "encode_event", "encode_json"]

DEFAULT_MAX_EVENT_BYTES: Final = 64 * 1024
"""The longest JSON of one event sent as it is (larger ones have their payload replaced)."""


_UTC_END: Final = b'Z","session_id":'
_ISO_UTC_END: Final = b'+00:00","session_id":'


def _fallback(value: object) -> Any:
    """How a value JSON cannot hold is written: its type's name, never its content."""
    return f"<{type(value).__name__}>"


_encoder: Final = msgspec.json.Encoder(enc_hook=_fallback)
encode_json: Final = _encoder.encode
"""Encode a JSON-compatible object (values JSON cannot hold become placeholders)."""


def encode_event(event: HypervisorEvent, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> bytes:
    """The event's ``to_dict()`` as JSON, its payload replaced when the whole is too long."""
    if getattr(event.timestamp, "tzinfo", None) is UTC:
        # The common case, several times faster than building to_dict(): the struct encodes
        # its fields in the same order, and its timestamp as isoformat() does but for the
        # "Z" of UTC. A JSON string cannot hold an unescaped quote, so the first 'Z","session_id":'
        # is the end of the timestamp.
        try:
            encoded = _encoder.encode(event).replace(_UTC_END, _ISO_UTC_END, 1)
        except (TypeError, ValueError, OverflowError):
            pass
        else:
            if len(encoded) <= max_bytes:
                return encoded
    data = event.to_dict()
    try:
        encoded = _encoder.encode(data)
    except (TypeError, ValueError, OverflowError):
        # Keys JSON cannot hold (a msgpack map with non-string keys, say).
        encoded = b""
        size = -1
    else:
        size = len(encoded)
        if size <= max_bytes:
            return encoded
    data["payload"] = {"hvobs_truncated": size}
    return _encoder.encode(data)


def encode_events(
    events: Iterable[HypervisorEvent], max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> list[bytes]:
    """Each event's JSON (see :func:`encode_event`)."""
    return [encode_event(event, max_event_bytes) for event in events]


def join_array(parts: list[bytes]) -> bytes:
    """A JSON array of already encoded elements."""
    return b"[" + b",".join(parts) + b"]"
