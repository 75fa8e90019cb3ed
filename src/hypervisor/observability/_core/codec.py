"""Wire codecs for events: msgpack (the bus) and JSON (files, HTTP), both schema-versioned.

The msgpack form is an array ``[schema_version, {event fields}]``; the JSON form is
``to_dict()`` plus ``"v"``. Decoders ignore unknown fields and fill defaults for missing ones, so
producers and consumers of different versions interoperate as long as the schema only grows by
fields with defaults (the msgspec rule). A version newer than ``MAX_SCHEMA_VERSION`` that is not
readable is rejected with ``EventDecodeError``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability.errors import EventDecodeError, EventEncodeError

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

SCHEMA_VERSION = 1
"""The schema version this release writes."""
MAX_SCHEMA_VERSION = 1
"""The newest schema version this release knows it can read."""

_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder(tuple[int, HypervisorEvent])
_json_encoder = msgspec.json.Encoder()


class _JsonEnvelope(msgspec.Struct, frozen=True):
    v: int = SCHEMA_VERSION


_json_version_decoder = msgspec.json.Decoder(_JsonEnvelope)
_json_decoder = msgspec.json.Decoder(HypervisorEvent)


def _describe(value: object) -> str:
    return type(value).__qualname__


def _fails(encode: Callable[[Any], bytes], value: object) -> str | None:
    """The reason ``encode`` rejects ``value``, or ``None`` when it accepts it."""
    try:
        encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        return str(exc)
    return None


def _find_unencodable(
    value: object, path: str, encode: Callable[[Any], bytes], top: bool = False
) -> tuple[str, str] | None:
    """Return ``(path, reason)`` of the first value ``encode`` rejects, depth first.

    Payload keys must be str at the top (the decoders type the payload ``dict[str, Any]``);
    below it, a key is blamed only when the codec itself rejects it, so that a key msgpack
    accepts (an int) is never reported in place of the real culprit.
    """
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) and (top or _fails(encode, {key: None}) is not None):
                return f"{path}[{key!r}]", f"key of type {_describe(key)} (keys must be str)"
            found = _find_unencodable(item, f"{path}[{key!r}]", encode)
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
        return EventEncodeError(f"event {event.event_id} cannot be encoded: {exc}")
    path, reason = found
    return EventEncodeError(
        f"event {event.event_id} cannot be encoded: {path} holds a {reason}", path=path
    )


def _check_keys(event: HypervisorEvent, encode: Callable[[Any], bytes]) -> None:
    # Top-level payload keys must be str: the decoders type the payload as dict[str, Any], so a
    # non-str key would encode fine and then fail on every consumer.
    for key in event.payload:
        if type(key) is not str:
            raise _encode_error(event, TypeError("non-str payload key"), encode)


def encode_event(event: HypervisorEvent) -> bytes:
    """Encode an event to the msgpack wire form.

    Raises:
        EventEncodeError: a payload value (or key) cannot be encoded; the message names its path.
    """
    _check_keys(event, _msgpack_encoder.encode)
    try:
        return _msgpack_encoder.encode((SCHEMA_VERSION, event))
    except (TypeError, ValueError, OverflowError) as exc:
        raise _encode_error(event, exc, _msgpack_encoder.encode) from exc


def _check_version(version: int) -> None:
    if version < 1:
        raise EventDecodeError(f"invalid schema version {version}")


def decode_event(data: bytes | bytearray | memoryview) -> HypervisorEvent:
    """Decode one event from the msgpack wire form.

    Raises:
        EventDecodeError: the bytes are not an event of a readable schema version.
    """
    try:
        version, event = _msgpack_decoder.decode(data)
    except (msgspec.DecodeError, TypeError) as exc:
        raise EventDecodeError(f"undecodable event entry: {exc}") from exc
    _check_version(version)
    return event


def decode_events(entries: list[bytes]) -> tuple[list[HypervisorEvent], list[tuple[int, str]]]:
    """Decode many entries; return the events and ``(index, reason)`` for each bad entry."""
    events: list[HypervisorEvent] = []
    bad: list[tuple[int, str]] = []
    decode = _msgpack_decoder.decode
    for index, data in enumerate(entries):
        try:
            version, event = decode(data)
        except (msgspec.DecodeError, TypeError) as exc:
            bad.append((index, str(exc)))
            continue
        if version < 1:
            bad.append((index, f"invalid schema version {version}"))
            continue
        events.append(event)
    return events, bad


def encode_event_json(event: HypervisorEvent) -> bytes:
    """Encode an event as JSON: the ``to_dict()`` form plus the schema version ``"v"``.

    Raises:
        EventEncodeError: a payload value (or key) cannot be encoded; the message names its path.
    """
    _check_keys(event, _json_encoder.encode)
    document = event.to_dict()
    document["v"] = SCHEMA_VERSION
    try:
        return _json_encoder.encode(document)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _encode_error(event, exc, _json_encoder.encode) from exc


def decode_event_json(data: bytes | str) -> HypervisorEvent:
    """Decode an event from its JSON form (``to_dict()`` shape, optional ``"v"``).

    Raises:
        EventDecodeError: not a JSON event of a readable schema version.
    """
    try:
        _check_version(_json_version_decoder.decode(data).v)
        return _json_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"undecodable JSON event: {exc}") from exc


def event_from_dict(data: Mapping[str, Any]) -> HypervisorEvent:
    """Build an event from a ``to_dict()``-shaped mapping, validating every field.

    Raises:
        EventDecodeError: a field has the wrong type or an invalid value.
    """
    try:
        return msgspec.convert(dict(data), HypervisorEvent, strict=False)
    except msgspec.ValidationError as exc:
        raise EventDecodeError(f"invalid event mapping: {exc}") from exc
