"""Event codecs: msgpack for the bus, JSON for files and HTTP; both carry a schema version."""

from hypervisor.observability._core.codec import (
    MAX_SCHEMA_VERSION,
    SCHEMA_VERSION,
    decode_event,
    decode_event_json,
    decode_events,
    encode_event,
    encode_event_json,
    event_from_dict,
)

__all__ = [
    "MAX_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "decode_event",
    "decode_event_json",
    "decode_events",
    "encode_event",
    "encode_event_json",
    "event_from_dict",
]
