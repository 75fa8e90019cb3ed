"""Property-based: arbitrary bytes and arbitrary event shapes through decode, apply, snapshot and
restore never raise anything but the project's documented errors, and the good events among
them give exactly the in-process results (issue 9, item 3)."""

from __future__ import annotations

import contextlib
import random
from datetime import UTC, datetime

import anyio
import msgspec
from hypothesis import HealthCheck, given, settings, strategies as st

from hypervisor.observability._backends.memory_log import MemoryStreamLog
from hypervisor.observability._core.codec import (
    MAX_ERROR_TEXT,
    decode_event,
    decode_event_json,
    decode_events,
    encode_event,
)
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RING_EVENTS
from hypervisor.observability._core.spans import SAGA_SPAN_EVENTS
from hypervisor.observability.errors import EventDecodeError
from hypervisor.observability.testing import RecordingSpanSink
from hypervisor.observability.workers import (
    MemoryStateStore,
    RingMetricsDerivation,
    SagaSpansDerivation,
    Worker,
    WorkerStateError,
    list_dead_letters,
)
from hypervisor.observability.workers._apply import restore_state
from hypervisor.observability.workers._snapshot import dump_state, load_state
from test_survivable import nested_entry, ring_view, run_worker, saga_view, worker_config
from workers_support import reference, span_key

_LIMIT = 1 << 16
# Nesting depths of hostile payloads: deeper than any recursion limit (Hypothesis raises it while
# a test runs), beyond it in most processes, just beyond MAX_PAYLOAD_DEPTH.
_DEPTHS = [50_000, 1000, 129]
_FIELDS = (
    "event_id",
    "event_type",
    "timestamp",
    "session_id",
    "agent_did",
    "causal_trace_id",
    "parent_event_id",
    "payload",
)

# Anything msgpack carries, at every edge: 64-bit ints, nan, infinities, bytes, datetimes over
# the whole range (aware ones go as the timestamp extension, naive ones as strings).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.datetimes(timezones=st.none() | st.just(UTC))
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.integers(-5, 5), inner, max_size=3)
    ),
    max_leaves=10,
)
stamps = st.datetimes(timezones=st.none() | st.just(UTC))
event_types = st.sampled_from([t.value for t in RING_EVENTS | SAGA_SPAN_EVENTS]) | st.sampled_from(
    [t.value for t in EventType]
)
ids = st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)
texts = (
    st.none() | st.sampled_from(["did:a", "did:b", "s1", "saga-1", "saga-2"]) | st.text(max_size=8)
)
payload_keys = st.sampled_from(
    ["to_ring", "ring", "from_ring", "saga_id", "step_id", "action", "error", "reason", "result"]
)
payloads = st.dictionaries(
    payload_keys | st.text(max_size=6),
    values
    | st.sampled_from([0, 1, 2, 3, "2", 1.0, "saga-1", "step-1"])
    | st.text(alphabet="0123456789 ", max_size=30),
    max_size=5,
)
# Event shapes: each field well-typed most of the time, anything at all sometimes, or absent.
shapes = st.fixed_dictionaries(
    {},
    optional={
        "event_id": ids | values,
        "event_type": event_types | values,
        "timestamp": stamps | values,
        "session_id": texts | values,
        "agent_did": texts | values,
        "causal_trace_id": texts,
        "parent_event_id": texts,
        "payload": payloads | values,
        "extra": values,
    },
)
shaped_entries = st.builds(
    lambda version, fields: msgspec.msgpack.encode((version, fields)),
    st.integers(-1, 3) | st.just(1),
    shapes,
)
good_events = st.builds(
    HypervisorEvent,
    event_id=ids,
    event_type=st.sampled_from(sorted(RING_EVENTS | SAGA_SPAN_EVENTS, key=lambda t: t.value)),
    timestamp=st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
    ),
    session_id=st.sampled_from([None, "s1", "s2"]),
    agent_did=st.sampled_from([None, "did:a", "did:b"]),
    payload=st.fixed_dictionaries(
        {},
        optional={
            "to_ring": st.integers(0, 3),
            "from_ring": st.integers(0, 3),
            "saga_id": st.sampled_from(["saga-1", "saga-2"]),
            "step_id": st.sampled_from(["a", "b"]),
            "error": st.text(max_size=5),
        },
    ),
)
hostile = (
    st.binary(max_size=64)
    | shaped_entries
    | st.sampled_from(_DEPTHS).map(nested_entry)
    | st.binary(max_size=64).map(lambda data: data + b"\x00" * _LIMIT)
    | good_events.map(lambda e: encode_event(e)).map(lambda d: d + b"\x00" * (_LIMIT + 1 - len(d)))
)
streams = st.lists(st.tuples(hostile, good_events), min_size=1, max_size=12)


def _decodable(data: bytes) -> HypervisorEvent | None:
    """The event a worker applies from ``data``, or ``None`` if it dead-letters it."""
    if len(data) > _LIMIT:
        return None
    try:
        return decode_event(data, strict=True)
    except EventDecodeError:
        return None


@settings(max_examples=400, deadline=None)
@given(data=hostile | good_events.map(encode_event))
def test_any_bytes_decode_or_raise_only_the_decode_error(data: bytes) -> None:
    """Whatever the bytes, every decoder returns an event or raises EventDecodeError (with a
    bounded message); decode_events never raises; an event decoded re-encodes to the same
    bytes."""
    for decode in (decode_event, lambda d: decode_event(d, strict=True), decode_event_json):
        outcome: HypervisorEvent | EventDecodeError
        try:
            outcome = decode(data)
        except EventDecodeError as exc:
            outcome = exc
        if isinstance(outcome, EventDecodeError):
            assert len(str(outcome)) <= MAX_ERROR_TEXT + 50
        else:
            assert isinstance(outcome, HypervisorEvent)
    events, bad = decode_events([data, data])
    assert len(events) + len(bad) == 2
    if events:
        again = encode_event(events[0])
        assert encode_event(decode_event(again)) == again


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), cut=st.integers(0, 400))
def test_any_snapshot_bytes_load_or_raise_only_the_state_error(data: bytes, cut: int) -> None:
    """load_state on arbitrary bytes, alone or after the first bytes of a real snapshot,
    returns a state or raises WorkerStateError, nothing else."""
    real = dump_state(RingMetricsDerivation(MemoryStateStore()).new_state())
    for blob in (data, real[:cut] + data):
        with contextlib.suppress(WorkerStateError):
            load_state(blob)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=streams, seed=st.integers(0, 2**32))
def test_hostile_entries_never_stop_the_pipeline(
    stream: list[tuple[bytes, HypervisorEvent]], seed: int
) -> None:
    """Any mix of arbitrary bytes, arbitrary event shapes, deep nesting and oversized entries,
    each followed by a good event, through a worker (decode, stage, apply, a snapshot at every
    commit) and a restore from the store: nothing raises out of the worker, every entry is
    acknowledged, each dead letter carries its entry whole, and the ring metrics and saga spans
    equal the in-process collectors' over exactly the entries a worker can read, good events
    included; the restored states equal the applier's, and survive another snapshot."""
    entries = [data for pair in stream for data in (pair[0], encode_event(pair[1]))]

    async def main() -> None:
        log = MemoryStreamLog("events")
        ring_store, saga_store = MemoryStateStore("ring"), MemoryStateStore("saga")
        sink = RecordingSpanSink()
        ring, saga = RingMetricsDerivation(ring_store), SagaSpansDerivation(saga_store, [sink])
        worker = Worker(
            log,
            [ring, saga],
            worker_config(batch_size=random.Random(seed).randint(1, 6), max_event_bytes=_LIMIT),
        )
        await run_worker(log, entries, worker)
        assert (await log.pending_summary("g")).count == 0
        readable = [event for event in map(_decodable, entries) if event is not None]
        letters = [letter for _, letter in await list_dead_letters(worker.dlq, 10_000)]
        unreadable = [data for data in entries if _decodable(data) is None]
        stage_letters = sorted(lt.data for lt in letters if not lt.derivation)
        assert stage_letters == sorted(unreadable)
        ring_expected = reference([e for e in readable if e.event_type in RING_EVENTS])
        saga_expected = reference([e for e in readable if e.event_type in SAGA_SPAN_EVENTS])
        ring_state, saga_state = (applier.state for applier in worker.appliers)
        assert ring_view(ring_state)[:3] == (
            ring_expected.ring,
            ring_expected.open_elevations,
            ring_expected.bad_events,
        )
        assert sorted({span_key(r) for r in sink.records}) == sorted(
            span_key(r) for r in saga_expected.spans
        )
        restored_ring = restore_state(ring, await ring_store.restore())
        assert ring_view(restored_ring) == ring_view(ring_state)
        assert ring_view(load_state(dump_state(restored_ring))) == ring_view(ring_state)
        restored_saga = restore_state(saga, await saga_store.restore())
        assert saga_view(restored_saga) == saga_view(saga_state)
        assert [a.snapshot_errors for a in worker.appliers] == [0, 0]

    anyio.run(main, backend="asyncio")
