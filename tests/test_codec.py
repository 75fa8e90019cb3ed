"""Event codecs: msgpack and JSON round trips, schema evolution both ways, precise errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from hypervisor.observability.codec import (
    SCHEMA_VERSION,
    decode_event,
    decode_event_json,
    decode_events,
    encode_event,
    encode_event_json,
    event_from_dict,
)
from hypervisor.observability.errors import (
    EventDecodeError,
    EventEncodeError,
    HypervisorObservabilityError,
)
from hypervisor.observability.event_bus import EventType, HypervisorEvent

# JSON-like payload values: what both codecs must carry unchanged.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
optional_ids = st.none() | st.text(min_size=1, max_size=24)
aware_datetimes = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
events = st.builds(
    HypervisorEvent,
    event_id=st.text(alphabet="0123456789abcdef", min_size=16, max_size=16),
    event_type=st.sampled_from(list(EventType)),
    timestamp=aware_datetimes,
    session_id=optional_ids,
    agent_did=optional_ids,
    causal_trace_id=optional_ids,
    parent_event_id=optional_ids,
    payload=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)


@settings(max_examples=300, deadline=None)
@given(event=events)
def test_msgpack_round_trip(event: HypervisorEvent) -> None:
    """decode_event(encode_event(e)) == e for any event with a JSON-like payload."""
    decoded = decode_event(encode_event(event))
    assert decoded == event
    assert decoded.to_dict() == event.to_dict()
    assert type(decoded.event_type) is EventType


@settings(max_examples=300, deadline=None)
@given(event=events)
def test_json_round_trip(event: HypervisorEvent) -> None:
    """decode_event_json(encode_event_json(e)) == e; the document is to_dict() plus "v"."""
    data = encode_event_json(event)
    assert decode_event_json(data) == event
    assert decode_event_json(data.decode()) == event
    document = msgspec.json.decode(data)
    assert document.pop("v") == SCHEMA_VERSION
    assert list(document) == list(event.to_dict())


@settings(max_examples=300, deadline=None)
@given(event=events)
def test_from_dict_round_trip(event: HypervisorEvent) -> None:
    """HypervisorEvent.from_dict(e.to_dict()) == e (the published dict form)."""
    assert HypervisorEvent.from_dict(event.to_dict()) == event
    assert event_from_dict(event.to_dict()) == event


def test_timestamps_in_other_zones_keep_their_instant() -> None:
    """An aware timestamp in another zone decodes to the same instant through both codecs."""
    stamp = datetime(2026, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=-5)))
    event = HypervisorEvent(timestamp=stamp)
    assert decode_event(encode_event(event)).timestamp == stamp
    assert decode_event_json(encode_event_json(event)).timestamp == stamp


def test_decode_events_reports_bad_entries_by_index() -> None:
    """decode_events returns the good events and (index, reason) for each undecodable entry."""
    good = [HypervisorEvent(session_id=f"s{i}") for i in range(3)]
    entries = [
        encode_event(good[0]),
        b"\xc1garbage",
        encode_event(good[1]),
        b"",
        encode_event(good[2]),
    ]
    decoded, bad = decode_events(entries)
    assert decoded == good
    assert [index for index, _ in bad] == [1, 3]
    assert all(reason for _, reason in bad)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"not msgpack at all", msgspec.msgpack.encode([1]), msgspec.msgpack.encode({})],
)
def test_undecodable_msgpack_is_one_project_error(data: bytes) -> None:
    """Garbage on the wire raises EventDecodeError (a ValueError and a project error)."""
    with pytest.raises(EventDecodeError) as info:
        decode_event(data)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, HypervisorObservabilityError)


def test_schema_version_zero_is_rejected() -> None:
    """A version below 1 is not a schema this project ever wrote."""
    event = HypervisorEvent()
    raw = msgspec.msgpack.encode((0, msgspec.msgpack.decode(encode_event(event))[1]))
    with pytest.raises(EventDecodeError, match="version"):
        decode_event(raw)
    with pytest.raises(EventDecodeError, match="version"):
        decode_event_json(msgspec.json.encode({**event.to_dict(), "v": 0}))


def test_invalid_fields_are_decode_errors() -> None:
    """A wrong field type or an unknown event type is an EventDecodeError, not a crash."""
    document = HypervisorEvent().to_dict()
    with pytest.raises(EventDecodeError):
        event_from_dict({**document, "event_type": "ring.nonexistent"})
    with pytest.raises(EventDecodeError):
        event_from_dict({**document, "payload": ["not", "a", "dict"]})
    with pytest.raises(EventDecodeError):
        decode_event_json(msgspec.json.encode({**document, "timestamp": "yesterday"}))


# -- schema evolution ------------------------------------------------------------------------


class _EventV2(msgspec.Struct):
    """What a newer producer might write: the same fields plus one this release does not know."""

    event_id: str
    event_type: str
    timestamp: datetime
    session_id: str | None
    agent_did: str | None
    causal_trace_id: str | None
    parent_event_id: str | None
    payload: dict[str, Any]
    priority: int = 7


class _EventV0(msgspec.Struct):
    """What an older producer might write: only some of the fields."""

    event_id: str
    event_type: str
    timestamp: datetime


STAMP = datetime(2026, 5, 4, 3, 2, 1, tzinfo=UTC)


def test_newer_producer_with_extra_field_decodes() -> None:
    """An entry of schema v2 with an unknown field decodes; the unknown field is ignored."""
    newer = _EventV2(
        "00112233445566ff", "saga.created", STAMP, "s", "a", "t/s", None, {"saga_id": "x"}
    )
    event = decode_event(msgspec.msgpack.encode((2, newer)))
    assert event == HypervisorEvent(
        event_id="00112233445566ff",
        event_type=EventType.SAGA_CREATED,
        timestamp=STAMP,
        session_id="s",
        agent_did="a",
        causal_trace_id="t/s",
        payload={"saga_id": "x"},
    )
    document = {**msgspec.to_builtins(newer), "v": 2}
    assert decode_event_json(msgspec.json.encode(document)) == event


def test_older_producer_missing_fields_gets_defaults() -> None:
    """An entry lacking optional fields decodes with the published defaults."""
    older = _EventV0("aaaaaaaaaaaaaaaa", "ring.elevated", STAMP)
    event = decode_event(msgspec.msgpack.encode((1, older)))
    assert event.event_id == "aaaaaaaaaaaaaaaa"
    assert event.event_type is EventType.RING_ELEVATED
    assert event.timestamp == STAMP
    assert (event.session_id, event.agent_did, event.causal_trace_id) == (None, None, None)
    assert event.parent_event_id is None
    assert event.payload == {}
    from_json = decode_event_json(msgspec.json.encode(msgspec.to_builtins(older)))
    assert from_json == event


# -- encode errors name the path --------------------------------------------------------------


class _Handle:
    """An object no codec can encode."""


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        ({"tool": {"handle": _Handle()}}, "payload['tool']['handle']"),
        ({"items": [1, 2, {"deep": [_Handle()]}]}, "payload['items'][2]['deep'][0]"),
        ({"ok": 1, "bad": _Handle()}, "payload['bad']"),
        ({7: "top-level int key"}, "payload[7]"),
        # msgpack accepts an int key below the top; the real culprit must still be named.
        ({"nested": {3: "int key"}, "later": {"x": _Handle()}}, "payload['later']['x']"),
    ],
)
@pytest.mark.parametrize("encode", [encode_event, encode_event_json])
def test_unencodable_payload_error_names_the_key_path(
    payload: dict[Any, Any], path: str, encode: Any
) -> None:
    """EventEncodeError (a TypeError) names the offending key path in its message and .path."""
    event = HypervisorEvent(payload=payload)
    with pytest.raises(EventEncodeError) as info:
        encode(event)
    assert info.value.path == path
    assert path in str(info.value)
    assert isinstance(info.value, TypeError)


def test_codec_specific_limits_name_the_path() -> None:
    """An int beyond 64 bits fails msgpack only; a tuple key fails JSON only; both name paths."""
    huge = HypervisorEvent(payload={"counts": [1, 2**80]})
    with pytest.raises(EventEncodeError) as info:
        encode_event(huge)
    assert info.value.path == "payload['counts'][1]"
    assert decode_event_json(encode_event_json(huge)).payload == {"counts": [1, 2**80]}

    tuple_key = HypervisorEvent(payload={"grid": {(1, 2): "cell"}})
    with pytest.raises(EventEncodeError) as info:
        encode_event_json(tuple_key)
    assert info.value.path == "payload['grid'][(1, 2)]"
    assert decode_event(encode_event(tuple_key)).payload == {"grid": {(1, 2): "cell"}}
