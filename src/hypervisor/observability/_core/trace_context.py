"""The W3C trace context an event may carry on the wire, next to its fields.

An event emitted inside an OpenTelemetry span carries that span's ``traceparent`` (and
``tracestate``) as two extra keys of its field map, ``[schema_version, {fields...,
"traceparent": ..., "tracestate": ...}]``. Decoders ignore unknown keys, so the event reads the
same everywhere and ``HypervisorEvent`` keeps its published fields; an event without a context is
byte for byte what it always was.

The context is hostile input like every other byte of an entry: :func:`decode_context` reads only
the two keys, bounds and validates them (a version-``00`` ``traceparent`` of exactly 55
characters with non-zero ids; a ``tracestate`` of at most ``MAX_TRACESTATE_LENGTH`` characters
and ``MAX_TRACESTATE_MEMBERS`` W3C list members) and answers ``None`` for anything else. An
invalid ``tracestate`` alone is dropped (the W3C rule: do not propagate what failed to parse).
Nothing here imports OpenTelemetry; capturing the current span's context is
``hypervisor.observability._util.otel_context``'s job.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, NamedTuple

import msgspec

__all__ = [
    "EVENT_PREFIX",
    "MAX_TRACESTATE_LENGTH",
    "MAX_TRACESTATE_MEMBERS",
    "TRACEPARENT_KEY",
    "TRACESTATE_KEY",
    "EncodedContext",
    "TraceContext",
    "attach_context",
    "decode_context",
    "decode_entry_context",
    "encode_context",
]

TRACEPARENT_KEY: Final = "traceparent"
"""The wire key of the W3C ``traceparent`` header value."""
TRACESTATE_KEY: Final = "tracestate"
"""The wire key of the W3C ``tracestate`` header value."""
MAX_TRACESTATE_LENGTH: Final = 512
"""The longest ``tracestate`` carried (the length W3C asks every platform to propagate)."""
MAX_TRACESTATE_MEMBERS: Final = 32
"""The most list members a ``tracestate`` may have (the W3C limit)."""

_TRACEPARENT_LENGTH: Final = 55
_TRACEPARENT: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
# A W3C tracestate list member: a simple or multi-tenant key, "=", and a value of printable
# ASCII without "," and "=" that does not end in a space.
_MEMBER: Final = re.compile(
    r"(?:[a-z0-9][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
# The key as msgpack writes it (a fixstr): an entry without these bytes has no context, and the
# search costs far less than a decode.
_NEEDLE: Final = msgspec.msgpack.encode(TRACEPARENT_KEY)


def valid_traceparent(value: str) -> bool:
    """Whether ``value`` is a version-``00`` W3C ``traceparent`` with non-zero ids."""
    if len(value) != _TRACEPARENT_LENGTH:
        return False
    match = _TRACEPARENT.fullmatch(value)
    return match is not None and match[1] != _ZERO_TRACE and match[2] != _ZERO_SPAN


def valid_tracestate(value: str) -> bool:
    """Whether ``value`` is a W3C ``tracestate`` within this module's bounds (empty is valid)."""
    if len(value) > MAX_TRACESTATE_LENGTH:
        return False
    members = 0
    keys: set[str] = set()
    for item in value.split(","):
        member = item.strip(" \t")
        if not member:
            continue
        members += 1
        if members > MAX_TRACESTATE_MEMBERS or _MEMBER.fullmatch(member) is None:
            return False
        key = member.split("=", 1)[0]
        if key in keys:
            return False
        keys.add(key)
    return True


class TraceContext(msgspec.Struct, frozen=True, gc=False):
    """A W3C trace context: the span an event was emitted in.

    Build one with :meth:`parse` (validated); decoded ones are validated too.

    Attributes:
        traceparent: ``00-<32 hex trace id>-<16 hex span id>-<2 hex flags>``.
        tracestate: the ``tracestate`` header value, ``""`` when there is none.
    """

    traceparent: str
    tracestate: str = ""

    @property
    def trace_id(self) -> str:
        """The 32-hex trace id."""
        return self.traceparent[3:35]

    @property
    def span_id(self) -> str:
        """The 16-hex span id."""
        return self.traceparent[36:52]

    @property
    def trace_flags(self) -> int:
        """The trace flags (bit 0: sampled)."""
        return int(self.traceparent[53:55], 16)

    @property
    def sampled(self) -> bool:
        """Whether the producer's span was sampled."""
        return bool(self.trace_flags & 1)

    @classmethod
    def parse(cls, traceparent: object, tracestate: object = "") -> TraceContext | None:
        """A validated context, or ``None`` when ``traceparent`` is not a valid one.

        An invalid ``tracestate`` (wrong type, too long, malformed) is dropped: the context
        keeps its ``traceparent`` alone.
        """
        if type(traceparent) is not str or not valid_traceparent(traceparent):
            return None
        if type(tracestate) is not str or not valid_tracestate(tracestate):
            tracestate = ""
        return cls(traceparent, tracestate.strip(" \t"))


class EncodedContext(NamedTuple):
    """A context with its wire form: the msgpack key/value pairs appended to an event's map.

    Attributes:
        context: the context.
        fields: the encoded keys and values.
        keys: how many keys ``fields`` holds.
        prefix: the entry's first three bytes once they are appended to an event encoded by
            ``encode_event`` (schema version 1, a map of the eight event fields).
    """

    context: TraceContext
    fields: bytes
    keys: int
    prefix: bytes


_encode = msgspec.msgpack.encode
_SCHEMA_PREFIX: Final = b"\x92\x01"  # an array of two, schema version 1
EVENT_PREFIX: Final = _SCHEMA_PREFIX + b"\x88"
"""The first bytes of an event ``encode_event`` wrote: schema version 1, a map of 8 fields."""


def encode_context(context: TraceContext) -> EncodedContext:
    """The wire form of ``context``, to append to many events (:func:`attach_context`)."""
    fields = _encode(TRACEPARENT_KEY) + _encode(context.traceparent)
    keys = 1
    if context.tracestate:
        fields += _encode(TRACESTATE_KEY) + _encode(context.tracestate)
        keys = 2
    return EncodedContext(context, fields, keys, _SCHEMA_PREFIX + bytes((0x88 + keys,)))


def attach_context(data: bytes, encoded: EncodedContext) -> bytes:
    """``data`` (an event encoded by ``encode_event``) with ``encoded`` appended to its fields.

    The field map is the last item of the entry, so its keys are appended at the end and its
    one-byte header grows by their count: a copy of the bytes. An entry of another layout (a
    hand-made one) is decoded and re-encoded instead.
    """
    if data.startswith(EVENT_PREFIX):
        return encoded.prefix + data[3:] + encoded.fields
    version, fields = msgspec.msgpack.decode(data, type=tuple[int, dict[str, msgspec.Raw]])
    fields[TRACEPARENT_KEY] = msgspec.Raw(_encode(encoded.context.traceparent))
    if encoded.context.tracestate:
        fields[TRACESTATE_KEY] = msgspec.Raw(_encode(encoded.context.tracestate))
    return _encode((version, fields))


_ABSENT: Final = msgspec.Raw()  # an empty Raw: the key was not there


class _WireContext(msgspec.Struct):
    """The only keys of an entry's field map that a context read decodes."""

    event_id: msgspec.Raw = _ABSENT
    traceparent: msgspec.Raw = _ABSENT
    tracestate: msgspec.Raw = _ABSENT


_wire_decoder = msgspec.msgpack.Decoder(tuple[int, _WireContext])
_traceparent_decoder = msgspec.msgpack.Decoder(
    Annotated[str, msgspec.Meta(max_length=_TRACEPARENT_LENGTH)]
)
_tracestate_decoder = msgspec.msgpack.Decoder(
    Annotated[str, msgspec.Meta(max_length=MAX_TRACESTATE_LENGTH)]
)
_event_id_decoder = msgspec.msgpack.Decoder(str)


# An entry as encode_event + attach_context write it with a traceparent alone: nine keys, the
# last the traceparent, a 55-character str8 (0xd9, 55).
_NINE_KEYS: Final = 0x89
_TAIL: Final = _NEEDLE + b"\xd9\x37"
_TAIL_START: Final = -(len(_TAIL) + _TRACEPARENT_LENGTH)
_MAX_CACHED: Final = 4096
# Validated contexts by traceparent: the events of one producer span repeat it.
_parsed: dict[str, TraceContext] = {}


def _context(traceparent: str, tracestate: str) -> TraceContext | None:
    if not tracestate:
        found = _parsed.get(traceparent)
        if found is not None:
            return found
    context = TraceContext.parse(traceparent, tracestate)
    if context is not None and not context.tracestate:
        if len(_parsed) >= _MAX_CACHED:
            _parsed.clear()
        _parsed[traceparent] = context
    return context


def _read(data: bytes | bytearray | memoryview) -> tuple[_WireContext | None, TraceContext] | None:
    """The context of an entry, with its decoded keys (``None`` on the fast path)."""
    if (
        type(data) is bytes
        and len(data) > 3
        and data[2] == _NINE_KEYS
        and data[_TAIL_START:-_TRACEPARENT_LENGTH] == _TAIL
        and data.count(_NEEDLE) == 1
    ):
        # The encoder's layout: nine keys, the key once, at the end with its value: read the
        # value in place, without decoding the entry. (Only a map crafted with a ninth key of
        # its own and the payload last, ending in a "traceparent" key, reads differently here
        # than decoded: its own bytes either way.)
        try:
            traceparent = data[-_TRACEPARENT_LENGTH:].decode("ascii")
        except UnicodeDecodeError:
            return None
        context = _context(traceparent, "")
        return None if context is None else (None, context)
    if _NEEDLE not in data:
        return None
    try:
        wire = _wire_decoder.decode(data)[1]
        if not wire.traceparent:
            return None
        traceparent = _traceparent_decoder.decode(wire.traceparent)
    except Exception:  # hostile bytes: no context, whatever the reason
        return None
    tracestate = ""
    if wire.tracestate:
        try:
            tracestate = _tracestate_decoder.decode(wire.tracestate)
        except Exception:  # a bad tracestate alone is dropped
            tracestate = ""
    context = _context(traceparent, tracestate)
    return None if context is None else (wire, context)


def decode_context(data: bytes | bytearray | memoryview) -> TraceContext | None:
    """The trace context an encoded event carries, or ``None`` (absent or invalid).

    Never raises, whatever the bytes. Costs a substring search for an entry without one.
    """
    found = _read(data)
    return None if found is None else found[1]


def decode_entry_context(
    data: bytes | bytearray | memoryview,
) -> tuple[str, TraceContext] | None:
    """``(event id, context)`` of an encoded event that carries a valid context, else ``None``.

    Never raises, whatever the bytes.
    """
    found = _read(data)
    if found is None:
        return None
    wire = found[0]
    if wire is None:  # the fast path: decode the event id alone
        try:
            wire = _wire_decoder.decode(data)[1]
        except Exception:  # hostile bytes
            return None
    if not wire.event_id:
        return None
    try:
        event_id = _event_id_decoder.decode(wire.event_id)
    except Exception:  # not a string: no event this context could belong to
        return None
    return event_id, found[1]
