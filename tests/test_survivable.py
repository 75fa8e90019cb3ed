"""Any single entry is survivable, and sizes are bounded (issue 9, items 3 and 4).

Hostile entries (payloads nested 1000 levels deep, garbage, wrong field types, entries without
their own id or time, oversized ones) among good events: the codec raises only its documented
error, the bus's reader skips only the bad entry, the worker and the applier dead-letter it
with its reason and error and go on, and the results for the other events equal the in-process
collectors'. Valid but extreme events (year 1 and 9999, naive, odd offsets, 64-bit edges) give
the same results in the workers as in process, through snapshots and replays.
"""

from __future__ import annotations

import logging
import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest
import redis.asyncio as aioredis

from hypervisor.observability._backends.log import parse_id
from hypervisor.observability._backends.memory_log import MemoryStreamLog
from hypervisor.observability._core.codec import (
    DEFAULT_MAX_EVENT_BYTES,
    MAX_ERROR_TEXT,
    MAX_PAYLOAD_DEPTH,
    decode_event,
    decode_event_json,
    decode_events,
    encode_event,
    encode_event_json,
    error_text,
)
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RingMetricsState
from hypervisor.observability._core.spans import SagaSpanRecord, SagaSpanState
from hypervisor.observability.errors import (
    EventDecodeError,
    EventEncodeError,
    EventTooLargeError,
    HypervisorObservabilityError,
)
from hypervisor.observability.redis_bus import RedisEventBus
from hypervisor.observability.testing import RecordingSpanSink
from hypervisor.observability.workers import (
    REASON_APPLY_ERROR,
    REASON_OVERSIZED,
    REASON_UNDECODABLE,
    Applier,
    DeadLetter,
    MemoryStateStore,
    RingMetricsDerivation,
    SagaSpansDerivation,
    Worker,
    WorkerConfig,
    decode_dead_letter,
    list_dead_letters,
    replay_dead_letters,
    watermark,
)
from hypervisor.observability.workers._apply import restore_state
from hypervisor.observability.workers._dlq import encode_dead_letter
from hypervisor.observability.workers._snapshot import dump_state, load_state
from redis_server import RedisServer
from workers_support import random_events, reference, span_key

GROUP = "g"
_T0 = datetime(2026, 1, 1, tzinfo=UTC)


# -- hostile entries ---------------------------------------------------------------------------


def nested_entry(depth: int, kind: str = "list") -> bytes:
    """A ring event whose payload holds a value nested ``depth`` containers deep, as raw bytes
    (the encoder refuses to write one): ~1 KB for 1000 levels."""
    head = msgspec.msgpack.encode(
        (
            1,
            {
                "event_id": f"{depth:016x}",
                "event_type": "ring.assigned",
                "timestamp": _T0,
                "agent_did": "did:deep",
                "payload": {"to_ring": 1, "x": 0},
            },
        )
    )
    assert head.endswith(b"\x00")  # the 0 of "x": replaced by the nested value
    # fixarray(1) or fixmap(1) with key "k" per level, then nil.
    level = b"\x91" if kind == "list" else b"\x81\xa1k"
    return head[:-1] + level * (depth - 1) + b"\xc0"


def raw_entry(fields: dict[str, Any], version: int = 1) -> bytes:
    """An entry with exactly ``fields`` (no defaults filled in), as any producer could write."""
    return msgspec.msgpack.encode((version, fields))


def ring_event(n: int, **overrides: Any) -> HypervisorEvent:
    values: dict[str, Any] = {
        "event_type": EventType.RING_ELEVATED if n % 2 else EventType.RING_DEMOTED,
        "timestamp": _T0 + timedelta(seconds=n),
        "agent_did": f"did:agent:{n % 3}",
        "session_id": "s1",
        "payload": {"to_ring": n % 4},
    }
    values.update(overrides)
    return HypervisorEvent(**values)


def hostile_entries(max_event_bytes: int) -> dict[str, tuple[bytes, str]]:
    """Named hostile entries and the reason a worker dead-letters each with."""
    good = msgspec.msgpack.decode(encode_event(ring_event(0)))[1]
    return {
        "deep list": (nested_entry(1000), REASON_UNDECODABLE),
        "deep map": (nested_entry(1000, "map"), REASON_UNDECODABLE),
        "just too deep": (nested_entry(MAX_PAYLOAD_DEPTH + 1), REASON_UNDECODABLE),
        "garbage": (b"\xc1\x00garbage", REASON_UNDECODABLE),
        "empty": (b"", REASON_UNDECODABLE),
        "wrong types": (raw_entry({**good, "session_id": 5, "agent_did": [1]}), REASON_UNDECODABLE),
        "unknown type": (raw_entry({**good, "event_type": "ring.hijacked"}), REASON_UNDECODABLE),
        "no event id": (
            raw_entry({k: v for k, v in good.items() if k != "event_id"}),
            REASON_UNDECODABLE,
        ),
        "no timestamp": (
            raw_entry({k: v for k, v in good.items() if k != "timestamp"}),
            REASON_UNDECODABLE,
        ),
        "version 0": (raw_entry(good, version=0), REASON_UNDECODABLE),
        "oversized": (
            raw_entry({**good, "event_id": "big", "payload": {"blob": "x" * max_event_bytes}}),
            REASON_OVERSIZED,
        ),
    }


# -- the codec ---------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_PAYLOAD_DEPTH + 1, 500, 1000, 3000, 100_000])
@pytest.mark.parametrize("kind", ["list", "map"])
def test_deep_payload_is_one_decode_error(depth: int, kind: str) -> None:
    """A payload nested deeper than MAX_PAYLOAD_DEPTH (even 100k levels, which makes msgspec
    raise RecursionError) is an EventDecodeError from every decoder; decode_events reports it
    and decodes its neighbours."""
    data = nested_entry(depth, kind)
    with pytest.raises(EventDecodeError):
        decode_event(data)
    with pytest.raises(EventDecodeError):
        decode_event(data, strict=True)
    good = [ring_event(1), ring_event(2)]
    events, bad = decode_events([encode_event(good[0]), data, encode_event(good[1])])
    assert events == good
    assert [index for index, _ in bad] == [1]
    assert len(bad[0][1]) <= MAX_ERROR_TEXT


def test_depth_limit_is_the_same_for_encoders_and_decoders() -> None:
    """A payload exactly MAX_PAYLOAD_DEPTH levels deep round trips through both codecs; one
    level more is refused by both encoders (naming the path) and both decoders."""

    def nested(levels: int) -> dict[str, Any]:
        value: Any = 1
        for _ in range(levels - 1):
            value = [value]
        return {"v": value}

    deepest = ring_event(1, payload=nested(MAX_PAYLOAD_DEPTH))
    assert decode_event(encode_event(deepest, exact=True)) == deepest
    assert decode_event_json(encode_event_json(deepest)) == deepest
    too_deep = ring_event(1, payload=nested(MAX_PAYLOAD_DEPTH + 1))
    for encode in (encode_event, encode_event_json):
        with pytest.raises(EventEncodeError, match=f"deeper than {MAX_PAYLOAD_DEPTH}") as info:
            encode(too_deep)
        assert info.value.path is not None
        assert info.value.path.startswith("payload['v'][0][0]")
    with pytest.raises(EventDecodeError):
        decode_event(nested_entry(MAX_PAYLOAD_DEPTH + 1))
    document = msgspec.json.encode({**deepest.to_dict(), "payload": nested(MAX_PAYLOAD_DEPTH + 1)})
    with pytest.raises(EventDecodeError):
        decode_event_json(document)
    # A cycle is refused as too deep, not looped over.
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(EventEncodeError, match="deeper"):
        encode_event(ring_event(1, payload={"c": cycle}))


def test_strict_decode_requires_the_event_s_own_id_and_time() -> None:
    """decode_event fills a missing event_id/timestamp with fresh values (schema evolution);
    strict decoding, which the workers use, refuses such an entry instead."""
    for name in ("no event id", "no timestamp"):
        data = hostile_entries(DEFAULT_MAX_EVENT_BYTES)[name][0]
        assert decode_event(data).agent_did == "did:agent:0"
        with pytest.raises(EventDecodeError):
            decode_event(data, strict=True)
    event = ring_event(3)
    assert decode_event(encode_event(event), strict=True) == event


class _UnprintableError(Exception):
    def __str__(self) -> str:
        raise RecursionError("maximum recursion depth exceeded while getting the repr")


def test_error_text_is_bounded_and_never_fails() -> None:
    """error_text gives at most MAX_ERROR_TEXT characters, and the type name alone for an
    error whose message cannot even be formatted."""
    assert len(error_text(ValueError("x" * 10_000_000))) <= MAX_ERROR_TEXT
    assert error_text(ValueError("x" * 10_000), 50).endswith("[truncated]")
    assert error_text(_UnprintableError()).startswith("_UnprintableError")
    assert error_text(KeyError("k")) == "KeyError: 'k'"


@pytest.mark.parametrize(
    ("payload", "path", "fix"),
    [
        ({"coords": (1, 2)}, "payload['coords']", "list"),
        ({"r": {"tags": {1, 2}}}, "payload['r']['tags']", "list"),
        ({"at": datetime(2026, 1, 1)}, "payload['at']", "string"),
        ({"at": datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=2)))}, "payload['at']", "UTC"),
        ({"kind": EventType.RING_ASSIGNED}, "payload['kind']", "different type"),
        ({"n": [1, {"k": bytearray(b"x")}]}, "payload['n'][1]['k']", "different type"),
    ],
)
def test_exact_encoding_refuses_what_would_read_back_differently(
    payload: dict[str, Any], path: str, fix: str
) -> None:
    """The Redis bus encodes exactly: a value a decoder would give back as another value (a
    tuple as a list, a naive datetime as a string...) is refused, naming its path, because the
    workers' results would differ from the in-process collectors'. The lenient encoder keeps
    accepting it."""
    event = ring_event(1, payload=payload)
    encode_event(event)
    with pytest.raises(EventEncodeError, match=fix) as info:
        encode_event(event, exact=True)
    assert info.value.path == path


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("session_id", 5),
        ("agent_did", b"did"),
        ("event_type", "ring.hijacked"),
        ("timestamp", 1_700_000_000.0),
        ("event_id", 7),
    ],
)
def test_exact_encoding_refuses_fields_of_the_wrong_type(field: str, value: Any) -> None:
    """In-process events are not validated; one with a field of the wrong type would be
    undecodable for every consumer of the bus, so the exact encoder refuses it."""
    with pytest.raises(EventEncodeError, match=field.split("_")[0]):
        encode_event(ring_event(1, **{field: value}), exact=True)


def test_exact_encoding_keeps_valid_extremes() -> None:
    """Extreme but valid values pass exact encoding and decode to equal events: 64-bit edges,
    bytes, nan and infinities, years 1 and 9999, naive timestamps, odd offsets, int and tuple
    map keys below the top, a ring event type given as its string value."""
    payloads: list[dict[str, Any]] = [
        {"to_ring": 2**64 - 1, "from_ring": -(2**63), "b": b"\x00\xff"},
        {"f": [float("inf"), -float("inf"), 1e308], "nested": {1: "a", (1, (2, 3)): None}},
        {"when": datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)},
    ]
    stamps = [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 12, tzinfo=timezone(timedelta(hours=11, minutes=59))),
        datetime(1, 1, 1, 12, tzinfo=timezone(timedelta(hours=-11, minutes=-30))),
        datetime(1, 1, 1),
        datetime(9999, 12, 31, 23, 59, 59, 999999),
    ]
    for payload in payloads:
        event = ring_event(1, payload=payload)
        assert decode_event(encode_event(event, exact=True), strict=True) == event
    for stamp in stamps:
        event = ring_event(1, timestamp=stamp)
        decoded = decode_event(encode_event(event, exact=True), strict=True)
        assert decoded.timestamp == stamp
    as_string = HypervisorEvent(event_type="ring.assigned")  # type: ignore[arg-type]
    assert decode_event(encode_event(as_string, exact=True)).event_type is EventType.RING_ASSIGNED


def test_from_dict_raises_only_decode_errors() -> None:
    """HypervisorEvent.from_dict on a too deep or ill-typed mapping raises EventDecodeError."""
    deep: Any = 1
    for _ in range(5000):
        deep = [deep]
    document = ring_event(1).to_dict()
    for bad in ({**document, "payload": {"d": deep}}, {**document, "timestamp": object()}):
        with pytest.raises(EventDecodeError):
            HypervisorEvent.from_dict(bad)


# -- the Redis bus: emit limits and the reader ----------------------------------------------


@pytest.mark.anyio
@pytest.mark.redis
async def test_emit_refuses_an_event_over_the_size_limit(
    redis_server: RedisServer, stream_name: str
) -> None:
    """emit, emit_nowait and emit_many refuse an event encoded longer than max_event_bytes with
    EventTooLargeError (an EventEncodeError of the project) naming the size, the limit and the
    option; nothing of the refused call is buffered, and everything else is stored."""
    async with RedisEventBus.from_url(redis_server.url, stream_name, max_event_bytes=2000) as bus:
        assert bus.max_event_bytes == 2000
        big = ring_event(1, payload={"blob": "x" * 3000})
        small = [ring_event(n) for n in range(4)]
        bus.emit_nowait(small[0])
        for attempt in (bus.emit(big), bus.emit_many([small[1], big])):
            with pytest.raises(EventTooLargeError) as info:
                await attempt
            assert info.value.limit == 2000
            assert info.value.size > 2000
            message = str(info.value)
            assert str(info.value.size) in message
            assert "2000" in message
            assert "max_event_bytes" in message
            assert isinstance(info.value, EventEncodeError)
            assert isinstance(info.value, HypervisorObservabilityError)
        with pytest.raises(EventTooLargeError):
            bus.emit_nowait(big)
        assert bus.buffered <= 1
        await bus.emit(small[2])
        await bus.emit_many([small[3]])
        await bus.flush()
        await bus.sync()
        stored = await bus.all_events()
        assert stored == [small[0], small[2], small[3]]
    async with RedisEventBus.from_url(redis_server.url, stream_name, reader=False) as default:
        assert default.max_event_bytes == DEFAULT_MAX_EVENT_BYTES == 1 << 20
        with pytest.raises(EventTooLargeError):
            await default.emit(ring_event(1, payload={"blob": "x" * (1 << 20)}))
    with pytest.raises(ValueError, match="max_event_bytes"):
        RedisEventBus.in_memory(max_event_bytes=0)


@pytest.mark.anyio
@pytest.mark.redis
async def test_emit_refuses_values_that_would_read_back_differently(
    redis_server: RedisServer, stream_name: str
) -> None:
    """The bus encodes exactly: a tuple in the payload or a field of the wrong type raises
    EventEncodeError at the call, naming the path, and is not stored."""
    async with RedisEventBus.from_url(redis_server.url, stream_name) as bus:
        with pytest.raises(EventEncodeError, match=r"payload\['coords'\]"):
            await bus.emit(ring_event(1, payload={"coords": (1, 2)}))
        with pytest.raises(EventEncodeError, match="session_id"):
            bus.emit_nowait(ring_event(1, session_id=5))
        good = ring_event(2, payload={"coords": [1, 2]})
        await bus.emit(good)
        await bus.sync()
        assert await bus.all_events() == [good]


@pytest.mark.anyio
@pytest.mark.redis
async def test_reader_skips_only_the_hostile_entries(
    redis_server: RedisServer, stream_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Hostile entries written by a raw client between good events, in one read batch: the
    index holds every good event, each bad entry is counted once under its kind (oversized ones
    are never decoded), and each kind is logged once, not once per entry."""
    hostile = hostile_entries(4096)
    good = [ring_event(n) for n in range(3 * len(hostile))]
    entries: list[bytes] = []
    for index, (data, _) in enumerate(hostile.values()):
        entries.extend([encode_event(good[3 * index]), data, data])
        entries.extend(encode_event(e) for e in good[3 * index + 1 : 3 * index + 3])
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        for data in entries:
            await client.xadd(stream_name, {"e": data})
    finally:
        await client.aclose()
    caplog.set_level(logging.WARNING, logger="hypervisor.observability.redis_bus")
    async with RedisEventBus.from_url(
        redis_server.url, stream_name, max_event_bytes=4096, read_count=10_000
    ) as bus:
        wanted = {event.event_id for event in good}
        assert [e for e in await bus.all_events() if e.event_id in wanted] == good
        # The index decodes leniently, filling a missing id or time as published: both copies
        # of the entry without an id are indexed (fresh ids), one of the one without a time.
        lenient = ("no event id", "no timestamp")
        assert bus.applied == len(good) + 3
        assert bus.duplicates == 1
        oversized = sum(reason == REASON_OVERSIZED for _, reason in hostile.values())
        assert bus.oversized_entries == 2 * oversized
        assert bus.decode_errors == 2 * (len(hostile) - oversized - len(lenient))
        assert bus.reader_errors == 0
    skipped = [r for r in caplog.records if "skipping" in r.getMessage()]
    assert sorted(r.getMessage().split()[2] for r in skipped) == ["oversized", "undecodable"]


# -- the worker and the applier ----------------------------------------------------------------


def worker_config(consumer: str = "w0", **overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {
        "group": GROUP,
        "consumer": consumer,
        "batch_size": 5,
        "block_s": 0.05,
        "claim_interval_s": 0.05,
        "claim_min_idle_s": 0.2,
        "apply_interval_s": 0.002,
        "max_apply_batch": 11,
        "checkpoint_interval_s": 0.0,  # a snapshot at every commit: every state round trips
        "retry_max_s": 0.02,
    }
    values.update(overrides)
    return WorkerConfig(**values)


async def settle(log: MemoryStreamLog, stores: list[MemoryStateStore]) -> None:
    """Wait until every entry of the log is acknowledged and every staged entry applied."""
    head = parse_id(await log.head_id())
    with anyio.fail_after(20):
        while True:
            mark = parse_id(await watermark(log, GROUP))
            if mark > head and not any([await store.backlog() for store in stores]):
                return
            await anyio.sleep(0.005)


async def run_worker(log: MemoryStreamLog, entries: list[bytes], worker: Worker) -> None:
    """Append ``entries`` in small chunks while ``worker`` runs; return once all is applied."""
    stores = [d.store for d in worker.derivations]
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.ready.wait()
        for start in range(0, len(entries), 3):
            await log.append_many(entries[start : start + 3])
            await anyio.lowlevel.checkpoint()
        await settle(log, stores)  # type: ignore[arg-type]
        worker.stop()


def ring_view(state: Any) -> tuple[Any, ...]:
    """Everything the ring metrics export from a state."""
    assert isinstance(state, RingMetricsState)
    return (state.snapshot(), state.open_elevations(), state.bad_events, state.newest_timestamp)


def saga_view(state: Any) -> tuple[Any, ...]:
    """Everything a saga state will still produce: its counters, and the spans of closing each
    open step and saga (on a copy, through a snapshot round trip of its own)."""
    assert isinstance(state, SagaSpanState)
    probe = load_state(dump_state(state))
    assert isinstance(probe, SagaSpanState)
    spans: list[SagaSpanRecord] = []
    closing = datetime(2027, 1, 1, tzinfo=UTC)
    for n, (saga_id, step) in enumerate(list(probe._open_steps)):
        spans.extend(
            probe.apply(
                HypervisorEvent(
                    event_id=f"{n:016x}",
                    event_type=EventType.SAGA_STEP_COMMITTED,
                    timestamp=closing,
                    payload={"saga_id": saga_id, "step_id": step},
                )
            )
        )
    for n, saga_id in enumerate(list(probe._open_sagas)):
        spans.extend(
            probe.apply(
                HypervisorEvent(
                    event_id=f"{n:016x}",
                    event_type=EventType.SAGA_COMPLETED,
                    timestamp=closing,
                    payload={"saga_id": saga_id},
                )
            )
        )
    counters = (
        state.events_processed,
        state.evicted_open_steps,
        state.evicted_open_sagas,
        state.open_step_count,
        state.open_saga_count,
    )
    return counters, [span_key(span) for span in spans]


def extreme_events() -> list[HypervisorEvent]:
    """Valid events the in-process collectors accept, at the edges: years 1 and 9999, naive
    and aware, odd offsets, 64-bit ring values, rings as floats and strings, a 5000-digit ring
    string, odd payload value types; saga events with odd ids and attributes."""
    stamps = [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(1, 1, 1, 23, tzinfo=timezone(timedelta(hours=-23, minutes=-59))),
        datetime(1970, 1, 1),
        datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=5, minutes=45))),
        datetime(9999, 12, 31, 23, 59, 59, 999999),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=23))),
        datetime(1, 1, 1),
    ]
    rings: list[Any] = [2**64 - 1, 2**63, 0, 1.0, 1e300, "  7 ", "9" * 5000, float("nan"), True]
    events: list[HypervisorEvent] = []
    kinds = [EventType.RING_ELEVATED, EventType.RING_DEMOTED, EventType.RING_ASSIGNED]
    for index, stamp in enumerate(stamps):
        for offset, ring in enumerate(rings):
            events.append(
                HypervisorEvent(
                    event_type=kinds[(index + offset) % 3],
                    timestamp=stamp,
                    agent_did=f"did:edge:{offset % 4}",
                    session_id=None if offset % 3 else "s",
                    payload={"to_ring": ring, "from_ring": offset, "blob": b"\xff" * offset},
                )
            )
        saga = f"saga-{index}"
        odd: list[Any] = [7, [1, [2]], {"k": None}, b"\x00", 1.5, None, "x" * 300]
        ends = (EventType.SAGA_STEP_COMMITTED, EventType.SAGA_STEP_FAILED)
        for step, value in enumerate(odd):
            for kind in (EventType.SAGA_CREATED, EventType.SAGA_STEP_STARTED):
                events.append(
                    HypervisorEvent(
                        event_type=kind,
                        timestamp=stamp,
                        agent_did="did:saga",
                        session_id="s",
                        payload={"saga_id": saga, "step_id": value, "action": value},
                    )
                )
            events.append(
                HypervisorEvent(
                    event_type=ends[step % 2],
                    timestamp=stamps[(index + step) % len(stamps)],
                    payload={"saga_id": saga, "step_id": value, "error": value, "result": value},
                )
            )
        events.append(
            HypervisorEvent(
                event_type=EventType.SAGA_COMPENSATING,
                timestamp=stamp,
                payload={"saga_id": saga, "step_id": 3, "reason": [stamp.year]},
            )
        )
        events.append(
            HypervisorEvent(
                event_type=EventType.SAGA_COMPLETED if index % 2 else EventType.SAGA_ESCALATED,
                timestamp=stamps[-1 - index],
                payload={"saga_id": saga, "reason": {"why": [1, 2]}},
            )
        )
    return events


@pytest.mark.anyio
async def test_extreme_valid_events_give_the_in_process_results() -> None:
    """Valid events at every edge, mixed into a random stream, give the workers exactly the
    in-process ring metrics and saga spans, with a snapshot at every commit and a restore from
    the store; the ones the in-process collectors raise on (naive times that local time cannot
    convert, a ring string of 5000 digits is not: it is a bad ring) are dead-lettered as
    apply_error, and their neighbours applied."""
    rng = random.Random(9)
    events = random_events(rng, 300)
    for event in extreme_events():
        events.insert(rng.randrange(len(events) + 1), event)
    log = MemoryStreamLog("events")
    ring_store, saga_store = MemoryStateStore("ring"), MemoryStateStore("saga")
    sink = RecordingSpanSink()
    ring, saga = RingMetricsDerivation(ring_store), SagaSpansDerivation(saga_store, [sink])
    worker = Worker(log, [ring, saga], worker_config())
    entries = [encode_event(e, exact=True) for e in events]
    await run_worker(log, entries, worker)
    expected = reference(events)
    restored = restore_state(ring, await ring_store.restore())
    assert ring_view(restored)[:3] == (expected.ring, expected.open_elevations, expected.bad_events)
    assert ring_view(worker.appliers[0].state) == ring_view(restored)
    assert sorted({span_key(r) for r in sink.records}) == sorted(
        span_key(r) for r in expected.spans
    )
    # Every state had a checkpoint that round trips: none failed to serialise, and the open
    # steps and sagas restored from the store are the applier's.
    assert [a.snapshot_errors for a in worker.appliers] == [0, 0]
    restored_saga = restore_state(saga, await saga_store.restore())
    assert saga_view(restored_saga) == saga_view(worker.appliers[1].state)
    letters = [letter for _, letter in await list_dead_letters(worker.dlq)]
    assert letters, "the naive year-1 and year-9999 events raise in process too"
    assert {letter.reason for letter in letters} == {REASON_APPLY_ERROR}
    assert all("out of range" in letter.error for letter in letters)
    assert worker.stats.dead_lettered == {REASON_APPLY_ERROR: len(letters)}


@pytest.mark.anyio
async def test_hostile_entries_are_dead_lettered_and_the_rest_applied() -> None:
    """Every kind of hostile entry between good events, through a worker: each goes to the
    dead-letter log once, with its reason, bytes and error, is acknowledged, and the results
    for the good events equal the in-process reference; the applied id passes them all."""
    limit = 4096
    hostile = hostile_entries(limit)
    rng = random.Random(4)
    events = random_events(rng, 200)
    entries = [encode_event(e) for e in events]
    positions = sorted(rng.sample(range(len(entries)), len(hostile)), reverse=True)
    for position, (data, _) in zip(positions, hostile.values(), strict=True):
        entries.insert(position, data)
    log = MemoryStreamLog("events")
    store = MemoryStateStore()
    sink = RecordingSpanSink()
    worker = Worker(
        log,
        [RingMetricsDerivation(store), SagaSpansDerivation(MemoryStateStore(), [sink])],
        worker_config(max_event_bytes=limit),
    )
    await run_worker(log, entries, worker)
    letters = [letter for _, letter in await list_dead_letters(worker.dlq)]
    assert sorted((lt.data, lt.reason) for lt in letters) == sorted(hostile.values())
    assert all(lt.error and len(lt.error) <= MAX_ERROR_TEXT + 50 for lt in letters)
    assert all(lt.deliveries == 1 and lt.group == GROUP for lt in letters)
    expected = reference(events)
    assert ring_view(worker.appliers[0].state)[:3] == (
        expected.ring,
        expected.open_elevations,
        expected.bad_events,
    )
    assert sorted({span_key(r) for r in sink.records}) == sorted(
        span_key(r) for r in expected.spans
    )
    assert (await store.meta()).applied_id == await last_ring_id(log)
    assert (await log.pending_summary(GROUP)).count == 0


async def last_ring_id(log: MemoryStreamLog) -> str:
    """The id of the log's last ring event (the last id the ring applier applies)."""
    for entry in reversed(await log.read("0-0", 100_000)):
        try:
            event = decode_event(entry.data or b"", strict=True)
        except EventDecodeError:
            continue
        if event.event_type in RingMetricsDerivation.event_types:
            return entry.id
    raise AssertionError("no ring event")


class FlakyRing(RingMetricsDerivation):
    """Ring metrics whose state machine raises after counting, for chosen events: like a bug
    triggered by one event. Its error messages are huge, or cannot even be formatted."""

    def __init__(self, store: MemoryStateStore, poison: set[str]) -> None:
        super().__init__(store)
        self.poison = poison

    def apply(self, state: Any, event: HypervisorEvent) -> list[SagaSpanRecord]:
        state.apply(event)
        if event.event_id in self.poison:
            if event.agent_did == "did:agent:0":
                raise _UnprintableError()
            raise OverflowError("z" * 1_000_000)
        return []


class _Stop(BaseException):
    """Not an Exception: must never be swallowed or dead-lettered."""


class StoppingRing(RingMetricsDerivation):
    def apply(self, state: Any, event: HypervisorEvent) -> list[SagaSpanRecord]:
        raise _Stop()


async def staged_applier(
    derivation: RingMetricsDerivation, items: list[bytes], **options: Any
) -> tuple[Applier, MemoryStreamLog, list[str]]:
    """An applier whose store holds ``items`` staged directly (as if by any writer), every
    entry acknowledged; returns it, its dead-letter log and the entries' ids."""
    log = MemoryStreamLog("events")
    ids = await log.append_many(items)
    await log.ensure_group(GROUP, "0")
    await log.read_group(GROUP, "c", len(items))
    await log.ack(GROUP, ids)
    await derivation.store.stage(list(zip(ids, items, strict=True)))
    dlq = MemoryStreamLog("events:dlq")
    applier = Applier(log, GROUP, derivation, dlq=dlq, consumer="c", **options)
    return applier, dlq, ids


@pytest.mark.anyio
async def test_applier_dead_letters_what_it_cannot_apply_and_replays_exactly() -> None:
    """Staged records that are oversized or undecodable (written by anything but a worker), and
    events whose state-machine call raises, are dead-lettered by the applier with the
    derivation, reason and a bounded error; the round goes on, and a restore (checkpoint plus
    redo records) folds the same state as the applier, skipping exactly what it skipped."""
    events = [ring_event(n) for n in range(30)]
    poison = {events[3].event_id, events[10].event_id, events[11].event_id}
    hostile = hostile_entries(4096)
    items = [encode_event(e) for e in events]
    for offset, (data, _) in enumerate(hostile.values()):
        items.insert(2 * offset + 1, data)
    store = MemoryStateStore()
    derivation = FlakyRing(store, poison)
    applier, dlq, ids = await staged_applier(
        derivation, items, max_event_bytes=4096, checkpoint_interval_s=3600, max_batch=7
    )
    while await applier.round():
        pass
    assert applier.applied_id == ids[-1]
    letters = [letter for _, letter in await list_dead_letters(dlq)]
    by_reason: dict[str, list[bytes]] = {}
    for letter in letters:
        by_reason.setdefault(letter.reason, []).append(letter.data)
        assert letter.derivation == "ring-metrics"
        assert len(letter.error) <= MAX_ERROR_TEXT + 50
    assert sorted(by_reason[REASON_APPLY_ERROR]) == sorted(
        encode_event(e) for e in events if e.event_id in poison
    )
    assert sorted(by_reason[REASON_OVERSIZED] + by_reason[REASON_UNDECODABLE]) == sorted(
        data for data, _ in hostile.values()
    )
    assert applier.apply_errors == 3
    assert applier.rejected == len(hostile)
    # In process, a handler that raises keeps what it changed before raising: so does the
    # applier, and so does a replay (there was no checkpoint: everything is redo records).
    expected = RingMetricsState()
    for event in events:
        expected.apply(event)
    assert ring_view(applier.state) == ring_view(expected)
    restored = restore_state(derivation, await store.restore())
    assert ring_view(restored) == ring_view(expected)
    assert (await store.restore()).skipped == frozenset(
        i for i, data in zip(ids, items, strict=True) if any(data == h for h, _ in hostile.values())
    )


@pytest.mark.anyio
async def test_applier_lets_non_exceptions_through() -> None:
    """A BaseException that is not an Exception (cancellation, KeyboardInterrupt, SystemExit)
    raised while applying is neither caught nor dead-lettered, and nothing is committed."""
    store = MemoryStateStore()
    applier, dlq, _ = await staged_applier(StoppingRing(store), [encode_event(ring_event(1))])
    with pytest.raises(_Stop):
        await applier.round()
    assert await dlq.length() == 0
    assert (await store.meta()).version == 0


@pytest.mark.anyio
async def test_failed_snapshot_commits_without_a_checkpoint() -> None:
    """A state that cannot be serialised does not wedge the applier: the round commits without
    a checkpoint (counted in snapshot_errors) and the redo records keep the state."""
    store = MemoryStateStore()
    derivation = RingMetricsDerivation(store)
    applier, _, ids = await staged_applier(
        derivation, [encode_event(ring_event(n)) for n in range(5)], checkpoint_interval_s=0.0
    )
    await applier.round()
    # A value no snapshot format can hold, as a bug could leave in the state.
    applier.state.transitions[("x", lambda: None, "y")] = 1
    applier.final = True  # a checkpoint at every commit
    log = applier.log
    assert isinstance(log, MemoryStreamLog)
    data = encode_event(ring_event(9))
    more = await log.append_many([data])
    await log.read_group(GROUP, "c", 1)
    await log.ack(GROUP, more)
    await store.stage([(more[0], data)])
    assert await applier.round() == 1
    assert applier.snapshot_errors == 1
    assert applier.applied_id == more[0]
    restored = await store.restore()
    assert restored.checkpoint_id == ids[-1]
    assert [entry_id for entry_id, _ in restored.records] == more


@pytest.mark.anyio
async def test_dead_letter_log_entries_are_hostile_too() -> None:
    """Listing and replaying dead letters skip entries of the dead-letter log that are not
    letters, even one with an unknown field nested 100k levels deep."""
    good = DeadLetter(
        reason=REASON_UNDECODABLE,
        original_id="1-0",
        group=GROUP,
        consumer="c",
        deliveries=1,
        error="e",
        data=b"\x00",
    )
    head = msgspec.msgpack.encode({"reason": "x", "zz": 0})
    deep = head[:-1] + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(msgspec.DecodeError):
        decode_dead_letter(deep)
    dlq = MemoryStreamLog("events:dlq")
    await dlq.append_many([deep, b"\xc1", encode_dead_letter(good), deep])
    assert [letter for _, letter in await list_dead_letters(dlq)] == [good]
    log = MemoryStreamLog("events")
    assert len(await replay_dead_letters(dlq, log)) == 1
    assert [entry.data for entry in await log.read("0-0", 10)] == [b"\x00"]


@pytest.mark.anyio
@pytest.mark.redis
async def test_staged_fetch_is_bounded_in_bytes_and_loses_nothing(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a fetch budget smaller than one batch, each read of staged records returns a prefix
    of the ids in order (at least one batch's worth, cut where an unread batch starts, even
    among batches that start at the same id), so repeated reads return every id once."""
    from hypervisor.observability._backends import redis_state as _redis_state

    monkeypatch.setattr(_redis_state, "_FETCH_BYTES", 100)
    record = b"r" * 60
    batches = [
        [(f"{n}-0", record) for n in (1, 2, 3, 4)],
        [(f"{n}-0", record) for n in (1, 2)],  # a reclaimed subset: same first id
        [(f"{n}-0", record) for n in (5, 6)],
        [(f"{n}-0", record) for n in (6, 7, 8)],
        [("9-0", record)],
    ]
    prefix = _redis_state.state_prefix(f"t{uuid.uuid4().hex[:8]}", GROUP, "ring")
    async with _redis_state.RedisStateStore(redis_server.url, prefix) as store:
        for batch in batches:
            await store.stage(batch)
        got: list[str] = []
        after, reads = "0-0", 0
        while records := await store.staged(after, "99-0", 1000):
            reads += 1
            assert [parse_id(i) for i, _ in records] == sorted(parse_id(i) for i, _ in records)
            got.extend(entry_id for entry_id, _ in records)
            after = records[-1][0]
        assert got == [f"{n}-0" for n in range(1, 10)]
        assert reads > 1  # the budget did cut
        await store.reset()


@pytest.mark.anyio
async def test_checkpoint_is_due_after_max_bytes_of_records() -> None:
    """However long the checkpoint interval, a checkpoint is taken once the records applied
    since the last one reach checkpoint_max_bytes: the redo log a restore replays is bounded in
    bytes as well as in records."""
    events = [ring_event(n, payload={"to_ring": 1, "pad": "p" * 200}) for n in range(20)]
    store = MemoryStateStore()
    applier, _, _ = await staged_applier(
        RingMetricsDerivation(store),
        [encode_event(e) for e in events],
        checkpoint_interval_s=3600,
        checkpoint_max_bytes=1000,
        max_batch=3,
    )
    while await applier.round():
        pass
    assert applier.checkpoints >= 4
    restored = await store.restore()
    assert sum(len(data) for _, data in restored.records) < 1000 + 3 * 300
    assert ring_view(restore_state(applier.derivation, restored)) == ring_view(applier.state)
