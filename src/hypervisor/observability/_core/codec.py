"""Wire codecs for events: msgpack (the bus) and JSON (files, HTTP), both schema-versioned.

The msgpack form is an array ``[schema_version, {event fields}]``; the JSON form is
``to_dict()`` plus ``"v"``. Decoders ignore unknown fields and fill defaults for missing ones, so
producers and consumers of different versions interoperate as long as the schema only grows by
fields with defaults (the msgspec rule). A version newer than ``MAX_SCHEMA_VERSION`` that is not
readable is rejected with ``EventDecodeError``.

Limits, the same for every producer and consumer: a payload is nested at most
``MAX_PAYLOAD_DEPTH`` containers deep (decoders reject deeper ones, encoders refuse them), so
no code that walks a payload (the codecs themselves, ``str()`` of a value, a JSON sink) can run
out of stack on one; and the Redis bus refuses to write, and its readers and the workers refuse
to decode, an entry longer than its ``max_event_bytes`` (``DEFAULT_MAX_EVENT_BYTES``, 1 MiB).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any, Final
from uuid import UUID

import msgspec

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.errors import EventDecodeError, EventEncodeError

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "MAX_ERROR_TEXT",
    "MAX_PAYLOAD_DEPTH",
    "MAX_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "decode_event",
    "decode_event_json",
    "decode_events",
    "encode_event",
    "encode_event_json",
    "error_text",
    "event_from_dict",
]

SCHEMA_VERSION = 1
"""The schema version this release writes."""
MAX_SCHEMA_VERSION = 1
"""The newest schema version this release knows it can read."""
MAX_PAYLOAD_DEPTH: Final = 128
"""The deepest nesting of containers in a payload: the payload is level 1, a list or map in it
level 2, and so on. Far below Python's recursion limit, so a payload the codecs accept can be
walked recursively (``str()``, JSON) from any reasonable stack depth, and whether one is accepted
never depends on the stack depth of the caller."""
DEFAULT_MAX_EVENT_BYTES: Final = 1 << 20
"""The default limit on one encoded event (1 MiB): the Redis bus refuses to write a longer one,
its reader and the workers skip a longer entry without decoding it."""
MAX_ERROR_TEXT: Final = 1000
"""The longest error text :func:`error_text` returns."""

_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder(tuple[int, HypervisorEvent])
_json_encoder = msgspec.json.Encoder()


class _JsonEnvelope(msgspec.Struct, frozen=True):
    v: int = SCHEMA_VERSION


class _Identity(msgspec.Struct):
    """The two fields a strict decode requires on the wire (their values are checked by the
    full decode; here only their presence)."""

    event_id: msgspec.Raw
    timestamp: msgspec.Raw


_json_version_decoder = msgspec.json.Decoder(_JsonEnvelope)
_json_decoder = msgspec.json.Decoder(HypervisorEvent)
_identity_decoder = msgspec.msgpack.Decoder(tuple[int, _Identity])

# Values whose type the msgpack round trip keeps (ints within 64 bits; msgpack refuses others).
_SCALARS: Final = frozenset({str, int, float, bool, type(None), bytes, msgspec.msgpack.Ext})
_CONTAINERS: Final = (dict, list, tuple, set, frozenset)
_NESTED: Final = frozenset({dict, list})  # the containers a decoded payload holds
# Other values msgspec encodes that cannot hold a container (so cannot nest).
_LEAVES: Final = (date, time, timedelta, UUID, Decimal, Enum, bytearray, memoryview)
# Map key types a decoder gives back as themselves (an array key comes back as a tuple).
_KEY_TYPES: Final = frozenset({str, int, float, bool, type(None), bytes, tuple})
_EVENT_TYPE_VALUES: Final = frozenset(member.value for member in EventType)
_ZERO: Final = timedelta(0)
_KEY_TEXT: Final = 60
_TRUNCATED: Final = " ...[truncated]"


def error_text(exc: BaseException, limit: int = MAX_ERROR_TEXT) -> str:
    """Return ``"<type>: <message>"`` of ``exc``, at most ``limit`` characters.

    Safe on any error: formatting one can itself fail (the repr of a deeply nested value raises
    ``RecursionError``, a huge one ``MemoryError``); the type name stands alone then.
    """
    name = type(exc).__name__
    try:
        text = f"{name}: {exc}"
    except Exception:  # the message itself cannot be formatted
        text = f"{name} (its message could not be formatted)"
    if len(text) > limit:
        text = text[: max(0, limit - len(_TRUNCATED))] + _TRUNCATED
    return text


def _short(key: object) -> str:
    """``repr(key)`` for an error path, bounded (a key can be any size)."""
    try:
        text = repr(key)
    except Exception:
        text = f"<{type(key).__name__}>"
    return text if len(text) <= _KEY_TEXT else text[: _KEY_TEXT - 3] + "..."


def _describe(value: object) -> str:
    return type(value).__qualname__


def _fails(encode: Callable[[Any], bytes], value: object) -> str | None:
    """The reason ``encode`` rejects ``value``, or ``None`` when it accepts it."""
    try:
        encode(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        return error_text(exc, 200)
    return None


def _find_unencodable(
    value: object, path: str, encode: Callable[[Any], bytes], top: bool = False
) -> tuple[str, str] | None:
    """Return ``(path, reason)`` of the first value ``encode`` rejects, depth first.

    Payload keys must be str at the top (the decoders type the payload ``dict[str, Any]``);
    below it, a key is blamed only when the codec itself rejects it, so that a key msgpack
    accepts (an int) is never reported in place of the real culprit. Called only on a payload
    that passed :func:`_check_payload`, so its recursion is bounded by ``MAX_PAYLOAD_DEPTH``.
    """
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) and (top or _fails(encode, {key: None}) is not None):
                return f"{path}[{_short(key)}]", f"key of type {_describe(key)} (keys must be str)"
            found = _find_unencodable(item, f"{path}[{_short(key)}]", encode)
            if found is not None:
                return found
        return None
    if isinstance(value, list | tuple | set | frozenset):
        for index, item in enumerate(value):
            found = _find_unencodable(item, f"{path}[{index}]", encode)
            if found is not None:
                return found
        return None
    reason = _fails(encode, value)
    if reason is not None:
        return path, f"value of type {_describe(value)} ({reason})"
    return None


def _encode_error(
    event: HypervisorEvent, exc: Exception, encode: Callable[[Any], bytes]
) -> EventEncodeError:
    found = _find_unencodable(event.payload, "payload", encode, top=True)
    if found is None:
        return EventEncodeError(f"event {event.event_id} cannot be encoded: {error_text(exc)}")
    path, reason = found
    return EventEncodeError(
        f"event {event.event_id} cannot be encoded: {path} holds a {reason}", path=path
    )


def _changed(value: object) -> str:
    """Why an exact encode refuses ``value``: what a decoder would give back instead."""
    kind = _describe(value)
    if isinstance(value, tuple | set | frozenset):
        return f"{kind}, which is read back as a list (pass a list)"
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            return "naive datetime, which is read back as a string (pass an aware one in UTC)"
        return "datetime outside UTC, which is read back in UTC (convert it to UTC)"
    return (
        f"{kind}, which is read back as a different type (the bus carries None, bool, int, "
        "float, str, bytes, list, dict and UTC datetimes)"
    )


def _check_key(key: object, depth: int) -> str | None:
    """Why an exact encode refuses a map key below the top, or ``None``."""
    kind = type(key)
    if kind not in _KEY_TYPES:
        return f"key of type {_describe(key)}, which is read back as a different type"
    if kind is tuple:
        if depth > MAX_PAYLOAD_DEPTH:
            return f"key nested deeper than {MAX_PAYLOAD_DEPTH} levels"
        for item in key:  # type: ignore[attr-defined]
            reason = _check_key(item, depth + 1)
            if reason is not None:
                return reason
    return None


def _check_value(
    value: object, depth: int, exact: bool, opaque: list[bool]
) -> tuple[str, str] | None:
    """``(path below value, reason)`` of the first value an encode must refuse, or ``None``.

    ``depth`` is the level ``value`` would be at if it is a container. Recursion is bounded by
    ``MAX_PAYLOAD_DEPTH``: a container deeper than that is refused without looking inside
    (which also ends a reference cycle). Sets ``opaque[0]`` on a value that is neither a scalar
    nor a plain container (a struct, a dataclass): msgspec encodes it as a map or refuses it,
    and the encoded form is checked instead.
    """
    kind = type(value)
    if kind in _SCALARS:
        return None
    if isinstance(value, _CONTAINERS):
        if depth > MAX_PAYLOAD_DEPTH:
            return "", f"container nested deeper than {MAX_PAYLOAD_DEPTH} levels"
        if exact and kind is not dict and kind is not list:
            return "", _changed(value)
        if isinstance(value, dict):
            for key, item in value.items():
                if exact and type(key) is not str:
                    reason = _check_key(key, depth + 1)
                    if reason is not None:
                        return f"[{_short(key)}]", reason
                if type(item) in _SCALARS:
                    continue
                found = _check_value(item, depth + 1, exact, opaque)
                if found is not None:
                    return f"[{_short(key)}]{found[0]}", found[1]
        else:
            for index, item in enumerate(value):
                if type(item) in _SCALARS:
                    continue
                found = _check_value(item, depth + 1, exact, opaque)
                if found is not None:
                    return f"[{index}]{found[0]}", found[1]
        return None
    if exact:
        if kind is datetime and value.utcoffset() == _ZERO:  # type: ignore[attr-defined]
            return None
        return "", _changed(value)
    if not isinstance(value, _LEAVES):
        opaque[0] = True
    return None


def _check_payload(event: HypervisorEvent, exact: bool) -> bool:
    """Refuse a payload the decoders would reject or (``exact``) read back differently.

    Returns whether it holds opaque values (see :func:`_check_value`).

    Raises:
        EventEncodeError: naming the path of the first offending key or value.
    """
    payload = event.payload
    if type(payload) is not dict and (exact or not isinstance(payload, Mapping)):
        raise EventEncodeError(
            f"event {_short(event.event_id)} cannot be encoded: its payload is a "
            f"{_describe(payload)}, not a dict",
            path="payload",
        )
    # The common payload, str keys and scalar values, in one loop.
    for key, value in payload.items():
        if type(key) is not str or type(value) not in _SCALARS:
            break
    else:
        return False
    opaque = [False]
    for key, value in payload.items():
        if type(key) is not str:
            path = f"payload[{_short(key)}]"
            raise EventEncodeError(
                f"event {event.event_id} cannot be encoded: {path} holds a key of type "
                f"{_describe(key)} (keys must be str)",
                path=path,
            )
        if type(value) in _SCALARS:
            continue
        found = _check_value(value, 2, exact, opaque)
        if found is not None:
            path = f"payload[{_short(key)}]{found[0]}"
            raise EventEncodeError(
                f"event {event.event_id} cannot be encoded: {path} holds a {found[1]}", path=path
            )
    return opaque[0]


def _check_fields(event: HypervisorEvent) -> None:
    """Refuse event fields a decoder would reject or read back differently (exact encode)."""
    session, agent = event.session_id, event.agent_did
    causal, parent = event.causal_trace_id, event.parent_event_id
    if (
        type(event.event_type) is EventType
        and type(event.event_id) is str
        and type(event.timestamp) is datetime
        and (session is None or type(session) is str)
        and (agent is None or type(agent) is str)
        and (causal is None or type(causal) is str)
        and (parent is None or type(parent) is str)
    ):
        return
    problem: str | None = None
    event_type: object = event.event_type
    if type(event.event_id) is not str:
        problem = f"event_id is a {_describe(event.event_id)}, not a str"
    elif type(event_type) is not EventType and not (
        type(event_type) is str and event_type in _EVENT_TYPE_VALUES
    ):
        problem = f"event_type {_short(event_type)} is not an EventType"
    elif not isinstance(event.timestamp, datetime):
        problem = f"timestamp is a {_describe(event.timestamp)}, not a datetime"
    else:
        for name in ("session_id", "agent_did", "causal_trace_id", "parent_event_id"):
            value = getattr(event, name)
            if value is not None and type(value) is not str:
                problem = f"{name} is a {_describe(value)}, not a str or None"
                break
    if problem is not None:
        raise EventEncodeError(
            f"event {_short(event.event_id)} cannot be encoded exactly: {problem}", path=None
        )


def encode_event(event: HypervisorEvent, *, exact: bool = False) -> bytes:
    """Encode an event to the msgpack wire form.

    Args:
        event: the event.
        exact: also refuse what a decoder would read back as a different value (a tuple comes
            back as a list, a naive datetime in the payload as a string, an ``Enum`` member as
            its value, a field of the wrong type fails to decode), so that every consumer sees
            the event the producer emitted. The Redis bus encodes exactly.

    Raises:
        EventEncodeError: a payload value (or key) cannot be encoded, is nested deeper than
            ``MAX_PAYLOAD_DEPTH``, or (``exact``) would not read back the same; the message
            names its path.
    """
    if exact:
        _check_fields(event)
    opaque = _check_payload(event, exact)
    try:
        data = _msgpack_encoder.encode((SCHEMA_VERSION, event))
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise _encode_error(event, exc, _msgpack_encoder.encode) from exc
    if opaque and _too_deep_encoded(data):
        raise EventEncodeError(
            f"event {event.event_id} cannot be encoded: its payload is nested deeper than "
            f"{MAX_PAYLOAD_DEPTH} levels once encoded",
            path="payload",
        )
    return data


def _too_deep_encoded(data: bytes) -> bool:
    try:
        return _too_deep(_msgpack_decoder.decode(data)[1].payload)
    except Exception:  # not even decodable: certainly not acceptable
        return True


def _too_deep(payload: dict[str, Any]) -> bool:
    """Whether a decoded payload nests containers deeper than ``MAX_PAYLOAD_DEPTH``.

    Level by level rather than recursive, so that the check itself cannot exhaust the stack.
    Decoded payloads hold only lists, dicts and (as map keys) tuples.
    """
    for value in payload.values():
        if type(value) in _NESTED:
            break
    else:  # the common payload: no container at all
        return False
    level = [value for value in payload.values() if type(value) in _NESTED]
    depth = 1
    while level:
        depth += 1
        if depth > MAX_PAYLOAD_DEPTH:
            return True
        deeper: list[Any] = []
        for container in level:
            if type(container) is dict:
                for key, value in container.items():
                    if type(key) is tuple:
                        deeper.append(key)
                    kind = type(value)
                    if kind is dict or kind is list:
                        deeper.append(value)
            else:
                for value in container:
                    kind = type(value)
                    if kind is dict or kind is list or kind is tuple:
                        deeper.append(value)
        level = deeper
    return False


def _check_version(version: int) -> None:
    if version < 1:
        raise EventDecodeError(f"invalid schema version {version}")


def _depth_error() -> EventDecodeError:
    return EventDecodeError(f"event payload nested deeper than {MAX_PAYLOAD_DEPTH} levels")


def decode_event(data: bytes | bytearray | memoryview, *, strict: bool = False) -> HypervisorEvent:
    """Decode one event from the msgpack wire form.

    Args:
        data: the entry.
        strict: also refuse an entry without its own ``event_id`` or ``timestamp``. Decoding
            fills a missing one with a fresh id or the current time, different at every
            decode; a consumer that must fold the same bytes the same way every time (the
            workers) cannot take such an entry.

    Raises:
        EventDecodeError: the bytes are not an event of a readable schema version, or its
            payload is nested deeper than ``MAX_PAYLOAD_DEPTH``. Never anything else, whatever
            the bytes (the message is at most ``MAX_ERROR_TEXT`` long).
    """
    try:
        version, event = _msgpack_decoder.decode(data)
        if strict:
            _identity_decoder.decode(data)
    except Exception as exc:  # hostile bytes: any failure (even RecursionError) is this one
        raise EventDecodeError(f"undecodable event entry: {error_text(exc)}") from None
    _check_version(version)
    if _too_deep(event.payload):
        raise _depth_error()
    return event


def decode_events(entries: list[bytes]) -> tuple[list[HypervisorEvent], list[tuple[int, str]]]:
    """Decode many entries; return the events and ``(index, reason)`` for each bad entry.

    Never raises because of an entry: each bad one is reported and the others are decoded.
    """
    events: list[HypervisorEvent] = []
    bad: list[tuple[int, str]] = []
    decode = _msgpack_decoder.decode
    for index, data in enumerate(entries):
        try:
            version, event = decode(data)
        except Exception as exc:  # hostile bytes: see decode_event
            bad.append((index, error_text(exc)))
            continue
        if version < 1:
            bad.append((index, f"invalid schema version {version}"))
            continue
        if _too_deep(event.payload):
            bad.append((index, f"payload nested deeper than {MAX_PAYLOAD_DEPTH} levels"))
            continue
        events.append(event)
    return events, bad


def encode_event_json(event: HypervisorEvent) -> bytes:
    """Encode an event as JSON: the ``to_dict()`` form plus the schema version ``"v"``.

    Raises:
        EventEncodeError: a payload value (or key) cannot be encoded; the message names its path.
    """
    opaque = _check_payload(event, False)
    document = event.to_dict()
    document["v"] = SCHEMA_VERSION
    try:
        data = _json_encoder.encode(document)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise _encode_error(event, exc, _json_encoder.encode) from exc
    if opaque and _too_deep_json(data):
        raise EventEncodeError(
            f"event {event.event_id} cannot be encoded: its payload is nested deeper than "
            f"{MAX_PAYLOAD_DEPTH} levels once encoded",
            path="payload",
        )
    return data


def decode_event_json(data: bytes | str) -> HypervisorEvent:
    """Decode an event from its JSON form (``to_dict()`` shape, optional ``"v"``).

    Raises:
        EventDecodeError: not a JSON event of a readable schema version, or nested deeper
            than ``MAX_PAYLOAD_DEPTH``; never anything else.
    """
    try:
        version = _json_version_decoder.decode(data).v
        event = _json_decoder.decode(data)
    except Exception as exc:  # hostile bytes: see decode_event
        raise EventDecodeError(f"undecodable JSON event: {error_text(exc)}") from None
    _check_version(version)
    if _too_deep(event.payload):
        raise _depth_error()
    return event


def event_from_dict(data: Mapping[str, Any]) -> HypervisorEvent:
    """Build an event from a ``to_dict()``-shaped mapping, validating every field.

    Raises:
        EventDecodeError: a field has the wrong type or an invalid value, or the payload is
            nested deeper than ``MAX_PAYLOAD_DEPTH``.
    """
    try:
        event = msgspec.convert(dict(data), HypervisorEvent, strict=False)
    except Exception as exc:  # any failure (even RecursionError) is this one
        raise EventDecodeError(f"invalid event mapping: {error_text(exc)}") from None
    if _too_deep(event.payload):
        raise _depth_error()
    return event


def _too_deep_json(data: bytes) -> bool:
    try:
        return _too_deep(_json_decoder.decode(data).payload)
    except Exception:  # not even decodable: certainly not acceptable
        return True
