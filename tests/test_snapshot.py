"""Worker state snapshots: the msgspec schema round-trips every state the state machines can
reach (extreme timestamps and odd payloads included), and anything else (pickles of an earlier
release or of any shape, random or truncated bytes, valid msgpack of the wrong shape, huge
declared lengths) is refused with ``WorkerStateError`` without running code."""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RING_EVENTS, RingMetricsState
from hypervisor.observability._core.snapshot import SNAPSHOT_SCHEMA_VERSION
from hypervisor.observability._core.spans import SAGA_SPAN_EVENTS, SagaSpanState
from hypervisor.observability.workers._snapshot import (
    LEGACY_PICKLE_PREFIX,
    WorkerStateError,
    dump_state,
    load_state,
)

_MAX_OFFSET = timedelta(hours=23, minutes=59, seconds=59, microseconds=999999)
_EXTREME_TIMES = [
    datetime.min,
    datetime.max,
    datetime.min.replace(tzinfo=UTC),
    datetime.max.replace(tzinfo=UTC),
    # Instants before year 1 and after year 9999 in UTC, which a UTC datetime cannot hold.
    datetime.min.replace(tzinfo=timezone(_MAX_OFFSET)),
    datetime.max.replace(tzinfo=timezone(-_MAX_OFFSET)),
    datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))),
    datetime(9999, 12, 31, 12, tzinfo=ZoneInfo("America/New_York")),
    datetime(1, 1, 1, 12, tzinfo=ZoneInfo("Asia/Tokyo")),
    datetime(2026, 11, 1, 1, 30, fold=1),
    datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=ZoneInfo("America/New_York")),
]
_ZONES = st.one_of(
    st.none(),
    st.just(UTC),
    st.builds(
        lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-24 * 60 + 1, 24 * 60 - 1)
    ),
    st.sampled_from([ZoneInfo("America/New_York"), ZoneInfo("Asia/Kolkata")]),
)
timestamps = st.one_of(
    st.sampled_from(_EXTREME_TIMES),
    st.datetimes(timezones=_ZONES),
    # Mostly ordinary, close together, so elevations and steps pair up.
    st.builds(
        lambda seconds: datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds),
        st.floats(0, 600, allow_nan=False),
    ),
)
_ODD = st.sampled_from(
    [None, 0, 1, 3, -1, 2.0, 2.5, 1e300, float("inf"), float("nan"), "2", " 3 ", "9" * 40, "x"]
)
odd_values = st.one_of(
    _ODD, st.integers(), st.booleans(), st.text(max_size=4), st.lists(st.integers(), max_size=2)
)
names = st.one_of(st.sampled_from(["a", "b", "did:mesh:ü"]), st.text(max_size=6))
_TYPES = [
    *sorted(RING_EVENTS | SAGA_SPAN_EVENTS, key=lambda t: t.value),
    EventType.SESSION_CREATED,
    EventType.VFS_WRITE,
]


@st.composite
def events(draw: st.DrawFn) -> HypervisorEvent:
    """An event a producer could emit: any type, any timestamp, odd payload values."""
    kind: Any = draw(st.sampled_from(_TYPES))
    if draw(st.integers(0, 9)) == 0:
        kind = kind.value  # a plain string, as events are not validated at construction
    payload: dict[str, Any] = {}
    for key in ("to_ring", "ring", "from_ring", "saga_id", "step_id", "action", "step_action"):
        if draw(st.booleans()):
            payload[key] = draw(
                names if key in ("saga_id", "step_id") and draw(st.booleans()) else odd_values
            )
    for key in ("error", "reason", "result"):
        if draw(st.integers(0, 4)) == 0:
            payload[key] = draw(odd_values)
    return HypervisorEvent(
        event_id=draw(st.sampled_from(["e1", "e2", "e3"])) if draw(st.booleans()) else "e0",
        event_type=kind,
        timestamp=draw(timestamps),
        agent_did=draw(st.none() | names),
        session_id=draw(st.none() | names),
        causal_trace_id=draw(st.sampled_from([None, "a1b2c3d4e5f6/01234567", "xyz/abc", "bad"])),
        payload=payload,
    )


@contextmanager
def local_zone(name: str) -> Iterator[None]:
    """Run with the process's local time zone set to ``name`` (naive timestamps read it)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def outcome(state: Any, event: HypervisorEvent, deferred: bool = False) -> Any:
    """What applying ``event`` gives: the spans produced, or the type of the error raised."""
    try:
        if deferred and event.event_type in SAGA_SPAN_EVENTS:
            return state.handler_for(EventType(event.event_type))(event)
        return state.apply(event)
    except Exception as exc:  # the in-process bus isolates a raising handler the same way
        return type(exc)


def same_ring(a: RingMetricsState, b: RingMetricsState) -> None:
    assert a.snapshot() == b.snapshot()
    assert a.open_elevations() == b.open_elevations()
    assert a.newest_timestamp == b.newest_timestamp
    assert a.bad_events == b.bad_events
    assert dump_state(a) == dump_state(b)


def same_saga(a: SagaSpanState, b: SagaSpanState) -> None:
    assert a.completed_spans == b.completed_spans
    assert (a.open_step_count, a.open_saga_count) == (b.open_step_count, b.open_saga_count)
    assert a.events_processed == b.events_processed
    assert (a.evicted_spans, a.evicted_open_steps, a.evicted_open_sagas) == (
        b.evicted_spans,
        b.evicted_open_steps,
        b.evicted_open_sagas,
    )
    assert a.lazy_records == b.lazy_records
    assert dump_state(a) == dump_state(b)


@settings(max_examples=200, deadline=None)
@given(st.lists(events(), max_size=30), st.sets(st.integers(0, 30)))
def test_ring_snapshots_round_trip_every_reachable_state(
    stream: list[HypervisorEvent], cuts: set[int]
) -> None:
    """A ring state snapshotted and loaded at any points of any stream (year 1 and 9999, naive
    and aware at any offset, odd and huge rings) goes on exactly as the original."""
    with local_zone("America/New_York"):  # naive times then depend on the fold, too
        original = RingMetricsState()
        copy = RingMetricsState()
        for index, event in enumerate(stream):
            if index in cuts:
                loaded = load_state(dump_state(copy))
                assert isinstance(loaded, RingMetricsState)
                same_ring(loaded, copy)
                copy = loaded
            assert outcome(copy, event) == outcome(original, event)
        same_ring(load_state(dump_state(copy)), original)  # type: ignore[arg-type]
        same_ring(copy, original)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(events(), max_size=30),
    st.sets(st.integers(0, 30)),
    st.integers(0, 4),
    st.integers(1, 4),
    st.integers(1, 4),
    st.booleans(),
)
def test_saga_snapshots_round_trip_every_reachable_state(
    stream: list[HypervisorEvent],
    cuts: set[int],
    max_spans: int,
    max_open_steps: int,
    max_open_sagas: int,
    lazy: bool,
) -> None:
    """A saga state (caps, lazy buffers with unbuilt spans, open steps with naive or aware
    starts at any offset) snapshotted and loaded at any points goes on exactly as the
    original: the same spans, ids and times included, the same open counts and counters."""
    caps = {
        "max_spans": max_spans,
        "max_open_steps": max_open_steps,
        "max_open_sagas": max_open_sagas,
    }
    original = SagaSpanState(**caps)
    copy = SagaSpanState(**caps)
    original.lazy_records = copy.lazy_records = lazy
    with local_zone("America/New_York"):
        for index, event in enumerate(stream):
            if index in cuts:
                loaded = load_state(dump_state(copy))
                assert isinstance(loaded, SagaSpanState)
                same_saga(loaded, copy)
                copy = loaded
            assert outcome(copy, event, lazy) == outcome(original, event, lazy)
        same_saga(load_state(dump_state(copy)), original)  # type: ignore[arg-type]
        same_saga(copy, original)


def test_a_year_9999_elevation_round_trips() -> None:
    """The event that wedged the applier: a ring.elevated at the last microsecond of year 9999
    (and at an offset that puts it in year 10000 UTC) snapshots and loads."""
    for zone in (UTC, timezone(timedelta(hours=-5))):
        state = RingMetricsState()
        state.apply(
            HypervisorEvent(
                event_type=EventType.RING_ELEVATED,
                timestamp=datetime.max.replace(tzinfo=zone),
                agent_did="a",
                payload={"to_ring": 1},
            )
        )
        loaded = load_state(dump_state(state))
        assert isinstance(loaded, RingMetricsState)
        same_ring(loaded, state)


def test_rings_beyond_64_bits_round_trip() -> None:
    """Rings msgpack cannot carry (beyond 64 bits: a payload of 1e300 or of 40 digits is a
    ring if the state machine accepts it) round-trip exactly, open elevations' origins too."""
    state = RingMetricsState()
    for agent, ring in (("a", 1e300), ("b", "9" * 40), ("c", 2)):
        state.apply(
            HypervisorEvent(
                event_type=EventType.RING_ELEVATED, agent_did=agent, payload={"to_ring": ring}
            )
        )
    loaded = load_state(dump_state(state))
    assert isinstance(loaded, RingMetricsState)
    same_ring(loaded, state)
    wide = {"a": int(1e300), "b": int("9" * 40), "c": 2**64, "d": 3}
    state.current_rings.update(wide)
    state._elevation_origins.update({"a": 2**70, "b": None})
    loaded = load_state(dump_state(state))
    assert isinstance(loaded, RingMetricsState)
    assert {agent: loaded.current_rings[agent] for agent in wide} == wide
    assert loaded._elevation_origins == state._elevation_origins
    same_ring(loaded, state)


def test_naive_step_starts_keep_their_wall_time_and_fold() -> None:
    """A step opened at a naive timestamp keeps it as it is (its epoch seconds depend on the
    local zone, and on the fold in an ambiguous hour): the span after a round trip is the one
    the original gives."""
    for fold in (0, 1):
        start = datetime(2026, 11, 1, 1, 30, fold=fold)  # an hour New York lives twice
        with local_zone("America/New_York"):
            state = SagaSpanState()
            state.apply(
                HypervisorEvent(
                    event_type=EventType.SAGA_STEP_STARTED,
                    timestamp=start,
                    payload={"saga_id": "g", "step_id": "s"},
                )
            )
            loaded = load_state(dump_state(state))
            assert isinstance(loaded, SagaSpanState)
            end = HypervisorEvent(
                event_type=EventType.SAGA_STEP_COMMITTED,
                timestamp=datetime(2026, 11, 1, 7, tzinfo=UTC),
                payload={"saga_id": "g", "step_id": "s"},
            )
            (span,) = loaded.apply(end)
            assert span == state.apply(end)[0]
            assert span.start_time == start.timestamp()


# -- refusals ------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this creates ``path``: the proof that a loader ran code from the data."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _pickles(marker: Path) -> list[bytes]:
    ring = RingMetricsState()
    ring.apply(HypervisorEvent(event_type=EventType.RING_ASSIGNED, agent_did="a"))
    shapes: list[object] = [
        _RunsCode(marker),
        {"transitions": _RunsCode(marker)},
        ring,
        SagaSpanState(),
        [1, {"type": "ring"}],
        None,
    ]
    return [
        pickle.dumps(shape, protocol=protocol)
        for shape in shapes
        for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1)
    ] + [pickle.dumps(_RunsCode(marker), protocol=0), pickle.dumps([1, "x"], protocol=1)]


def test_pickles_are_refused_and_never_run(tmp_path: Path) -> None:
    """Snapshots of an earlier release (pickles behind the old prefix) are refused with a
    message naming --reset-state; pickles of any shape, a code-running ``__reduce__`` among
    them, are refused with or without that prefix, and no code runs."""
    marker = tmp_path / "ran"
    payloads = _pickles(marker)
    # The payload would create the marker if anything unpickled it.
    pickle.loads(payloads[0]).close()  # the file it opened
    assert marker.exists()
    marker.unlink()
    for data in payloads:
        with pytest.raises(WorkerStateError, match="--reset-state") as refused:
            load_state(LEGACY_PICKLE_PREFIX + data)
        assert "earlier release" in str(refused.value)
        with pytest.raises(WorkerStateError):
            load_state(data)
    assert not marker.exists()


def _snapshots() -> list[bytes]:
    ring = RingMetricsState()
    saga = SagaSpanState()
    at = datetime(2026, 1, 1, tzinfo=UTC)
    for kind, payload in (
        (EventType.RING_ELEVATED, {"to_ring": 1}),
        (EventType.SAGA_CREATED, {"saga_id": "g"}),
        (EventType.SAGA_STEP_STARTED, {"saga_id": "g", "step_id": "s"}),
    ):
        event = HypervisorEvent(event_type=kind, timestamp=at, agent_did="a", payload=payload)
        ring.apply(event)
        saga.apply(event)
    return [dump_state(ring), dump_state(saga)]


def test_truncated_snapshots_are_refused() -> None:
    """Every proper prefix of a valid snapshot, and one with bytes appended, is refused."""
    for data in _snapshots():
        assert load_state(data) is not None
        for end in range(len(data)):
            with pytest.raises(WorkerStateError):
                load_state(data[:end])
        with pytest.raises(WorkerStateError):
            load_state(data + b"\x00")


_ARRAY32_HUGE = b"\xdd\xff\xff\xff\xff"
_MAP32_HUGE = b"\xdf\xff\xff\xff\xff"
_STR32_HUGE = b"\xdb\xff\xff\xff\xff"
_BIN32_HUGE = b"\xc6\xff\xff\xff\xff"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(msgspec.msgpack.encode({"type": "ring"}), id="no-envelope"),
        pytest.param(msgspec.msgpack.encode([1]), id="short-envelope"),
        pytest.param(msgspec.msgpack.encode([0, {"type": "ring"}]), id="version-0"),
        pytest.param(msgspec.msgpack.encode([-3, {"type": "ring"}]), id="negative-version"),
        pytest.param(msgspec.msgpack.encode(["1", {"type": "ring"}]), id="version-text"),
        pytest.param(msgspec.msgpack.encode([1, {"type": "other"}]), id="unknown-kind"),
        pytest.param(msgspec.msgpack.encode([1, {"transitions": {}}]), id="no-kind"),
        pytest.param(msgspec.msgpack.encode([1, [1, 2, 3]]), id="array-state"),
        pytest.param(
            msgspec.msgpack.encode([1, {"type": "ring", "transitions": {"x": 1}}]),
            id="ring-key-not-a-triple",
        ),
        pytest.param(
            msgspec.msgpack.encode([1, {"type": "ring", "current_rings": {"a": -1}}]),
            id="negative-ring",
        ),
        pytest.param(
            msgspec.msgpack.encode([1, {"type": "ring", "events_processed": -1}]),
            id="negative-counter",
        ),
        pytest.param(
            msgspec.msgpack.encode([1, {"type": "ring", "newest": [2**62, 0, 0]}]),
            id="time-past-9999",
        ),
        pytest.param(
            msgspec.msgpack.encode([1, {"type": "ring", "newest": [0, 86_400_000_000]}]),
            id="offset-of-a-day",
        ),
        pytest.param(
            msgspec.msgpack.encode([1, {"type": "ring", "wide_ints": [["bad_events", "a", "1"]]}]),
            id="wide-int-of-a-counter",
        ),
        pytest.param(
            msgspec.msgpack.encode(
                [1, {"type": "ring", "wide_ints": [["current_rings", "a", "zz"]]}]
            ),
            id="wide-int-not-hex",
        ),
        pytest.param(
            msgspec.msgpack.encode(
                [1, {"type": "ring", "wide_ints": [["current_rings", "a", "f" * 5000]]}]
            ),
            id="wide-int-too-long",
        ),
        pytest.param(
            msgspec.msgpack.encode([1, {"type": "saga", "max_open_steps": 0}]),
            id="cap-zero",
        ),
        pytest.param(
            msgspec.msgpack.encode(
                [
                    1,
                    {
                        "type": "saga",
                        "max_open_sagas": 1,
                        "open_sagas": [["a", 1.0, "e", None]] * 2,
                    },
                ]
            ),
            id="more-open-sagas-than-the-cap",
        ),
        pytest.param(
            msgspec.msgpack.encode([1, {"type": "saga", "open_steps": [["a", "s", "x", "e"]]}]),
            id="step-start-text",
        ),
        pytest.param(b"\x92\x01" + b"\x91" * 200_000 + b"\xc0", id="deep-nesting"),
        pytest.param(
            b"\x92\x01\x82\xa4type\xa4ring\xabtransitions" + b"\x81\x91" * 100_000,
            id="deep-nesting-in-a-field",
        ),
        pytest.param(_ARRAY32_HUGE, id="huge-array"),
        pytest.param(b"\x92\x01" + _MAP32_HUGE, id="huge-map"),
        pytest.param(b"\x92\x01\x82\xa4type\xa4ring\xabtransitions" + _MAP32_HUGE, id="huge-dict"),
        pytest.param(b"\x92\x01\x82\xa4type\xa4saga\xaaopen_steps" + _ARRAY32_HUGE, id="huge-list"),
        pytest.param(b"\x92\x01\x82\xa4type" + _STR32_HUGE, id="huge-str"),
        pytest.param(b"\x92\x01" + _BIN32_HUGE, id="huge-bin"),
        pytest.param(b"", id="empty"),
        pytest.param(b"hvobs-state-2\n", id="other-prefix"),
    ],
)
def test_other_shapes_are_refused(data: bytes) -> None:
    """Msgpack of the wrong shape, values outside the schema's bounds, deep nesting and huge
    declared lengths are refused with WorkerStateError (and nothing huge is allocated)."""
    with pytest.raises(WorkerStateError):
        load_state(data)


def test_a_newer_schema_is_refused_by_name() -> None:
    """A snapshot of a newer schema version says so, and how to get past it."""
    data = msgspec.msgpack.encode([SNAPSHOT_SCHEMA_VERSION + 1, {"type": "ring", "new": [1]}])
    with pytest.raises(WorkerStateError, match="newer") as refused:
        load_state(data)
    assert "--reset-state" in str(refused.value)


def test_fields_a_release_does_not_know_are_ignored() -> None:
    """The schema grows by fields with defaults: unknown fields are ignored and missing ones
    take their defaults, in the snapshot and in its array-like parts."""
    data = msgspec.msgpack.encode(
        [
            1,
            {
                "type": "saga",
                "added_later": {"x": [1, 2]},
                "open_sagas": [["g", 1.5, "e1", None, 2.5, "an added field"]],
                "open_steps": [["g", "s", 1.0, "e2"]],
            },
        ]
    )
    state = load_state(data)
    assert isinstance(state, SagaSpanState)
    assert (state.open_saga_count, state.open_step_count) == (1, 1)
    ring = load_state(msgspec.msgpack.encode([1, {"type": "ring"}]))
    assert isinstance(ring, RingMetricsState)
    assert ring.snapshot() == RingMetricsState().snapshot()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_refused(data: bytes) -> None:
    """Random bytes load as a state or raise WorkerStateError, nothing else; a state loaded
    from them snapshots again."""
    try:
        state = load_state(data)
    except WorkerStateError:
        return
    dump_state(state)


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = [
    "transitions",
    "breaches",
    "current_rings",
    "elevation_starts",
    "elevation_origins",
    "newest",
    "wide_ints",
    "spans",
    "open_steps",
    "open_sagas",
    "max_spans",
    "lazy_records",
]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["ring", "saga"]), st.dictionaries(st.sampled_from(_FIELDS), _msgpack_values)
)
def test_msgpack_of_any_shape_is_refused_or_loads(kind: str, fields: dict[str, Any]) -> None:
    """A snapshot-shaped msgpack document with arbitrary field values loads as a state (that
    snapshots again) or raises WorkerStateError, nothing else."""
    data = msgspec.msgpack.encode([1, {"type": kind, **fields}])
    try:
        state = load_state(data)
    except WorkerStateError:
        return
    assert isinstance(state, RingMetricsState | SagaSpanState)
    dump_state(state)
