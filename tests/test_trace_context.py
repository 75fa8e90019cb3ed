"""W3C trace context across the bus: on the wire only inside an active span, bounded, exposed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from hypervisor.observability._backends.memory_log import MemoryStreamLog
from hypervisor.observability._core.codec import decode_event, encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.trace_context import (
    MAX_TRACESTATE_LENGTH,
    TraceContext,
    attach_context,
    decode_context,
    decode_entry_context,
    encode_context,
)
from hypervisor.observability.redis_bus import RedisEventBus
from redis_server import RedisServer

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.trace import Tracer  # noqa: E402

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _event(**fields: Any) -> HypervisorEvent:
    return HypervisorEvent(
        event_type=EventType.VFS_WRITE,
        session_id="s1",
        agent_did="did:mesh:writer",
        payload={"path": "a.txt", "n": 1},
        **fields,
    )


def _with_raw_keys(data: bytes, extra: dict[str, Any]) -> bytes:
    """``data`` with ``extra`` keys added to its field map, whatever their values (a producer
    that writes anything)."""
    version, fields = msgspec.msgpack.decode(data, type=tuple[int, dict[str, msgspec.Raw]])
    for key, value in extra.items():
        fields[key] = msgspec.Raw(msgspec.msgpack.encode(value))
    return msgspec.msgpack.encode((version, fields))


# -- the wire form ---------------------------------------------------------------------------


def test_context_rides_as_extra_keys_that_decoders_ignore() -> None:
    """An event with a context decodes to the very same event (every decoder ignores the two
    extra keys), and the context reads back whole, tracestate included."""
    event = _event()
    context = TraceContext.parse(TRACEPARENT, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    assert context is not None
    plain = encode_event(event, exact=True)
    data = attach_context(plain, encode_context(context))
    assert decode_event(data, strict=True) == event
    assert decode_context(data) == context
    assert decode_entry_context(data) == (event.event_id, context)
    assert context.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert context.span_id == "b7ad6b7169203331"
    assert context.sampled
    # Without a context nothing is added, and nothing is found.
    assert decode_context(plain) is None
    assert len(data) - len(plain) == len(encode_context(context).fields)


def test_attach_to_an_entry_of_another_layout_decodes_and_re_encodes() -> None:
    """An entry whose map is not the encoder's eight fields still gets the context added."""
    event = _event()
    minimal = msgspec.msgpack.encode(
        (1, {"event_id": event.event_id, "timestamp": event.timestamp, "event_type": "vfs.write"})
    )
    context = TraceContext.parse(TRACEPARENT)
    assert context is not None
    data = attach_context(minimal, encode_context(context))
    assert decode_context(data) == context
    assert decode_event(data).event_id == event.event_id


@pytest.mark.parametrize(
    "traceparent",
    [
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # a version we do not read
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
        "",
        "x" * 55,
        "00-" + "a" * 10_000,
        12345,
        None,
        ["00", "0af7651916cd43dd8448eb211c80319c"],
        {"traceparent": TRACEPARENT},
    ],
)
def test_invalid_traceparent_is_no_context_and_the_event_still_decodes(traceparent: Any) -> None:
    """A traceparent of the wrong type, size or syntax gives no context; the event decodes as
    it would without it."""
    event = _event()
    data = _with_raw_keys(encode_event(event), {"traceparent": traceparent})
    assert decode_context(data) is None
    assert decode_entry_context(data) is None
    assert decode_event(data, strict=True) == event


@pytest.mark.parametrize(
    "tracestate",
    [
        "a" * (MAX_TRACESTATE_LENGTH + 1),  # too long
        ",".join(f"k{i}=v" for i in range(33)),  # too many members
        "rojo=1,rojo=2",  # duplicate key
        "Rojo=1",  # upper-case key
        "rojo=a,b",  # a member without "="
        "rojo=\x00",  # control character
        7,
        ["rojo=1"],
    ],
)
def test_invalid_tracestate_alone_is_dropped(tracestate: Any) -> None:
    """A bad tracestate is dropped (the W3C rule); the traceparent is kept."""
    data = _with_raw_keys(
        encode_event(_event()), {"traceparent": TRACEPARENT, "tracestate": tracestate}
    )
    assert decode_context(data) == TraceContext(TRACEPARENT, "")


def test_valid_tracestate_at_the_limits_is_kept() -> None:
    """32 members and a multi-tenant key are valid; surrounding blanks are trimmed."""
    members = ",".join(f"k{i}=v{i}" for i in range(31)) + ",t@sys=x"
    context = TraceContext.parse(TRACEPARENT, f" {members} ")
    assert context is not None
    assert context.tracestate == members


def test_a_payload_key_named_traceparent_is_not_a_context() -> None:
    """Only the event's own field map is read: a ``traceparent`` inside the payload is data."""
    event = HypervisorEvent(event_type=EventType.VFS_WRITE, payload={"traceparent": TRACEPARENT})
    assert decode_context(encode_event(event)) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_context_reads_never_raise_on_arbitrary_bytes(data: bytes) -> None:
    """Whatever the bytes, reading a context answers a context or None."""
    found = decode_context(data)
    assert found is None or isinstance(found, TraceContext)
    entry = decode_entry_context(data)
    assert entry is None or (isinstance(entry[0], str) and isinstance(entry[1], TraceContext))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), st.binary(max_size=60))
def test_context_reads_never_raise_around_the_key(head: bytes, tail: bytes) -> None:
    """Bytes that contain the key (so are decoded) never make a context read raise."""
    data = head + b"\xabtraceparent" + tail
    context = decode_context(data)
    assert context is None or isinstance(context, TraceContext)
    found = decode_entry_context(data)
    assert found is None or isinstance(found[1], TraceContext)


# -- the bus ----------------------------------------------------------------------------------

BusMaker = Callable[..., AbstractAsyncContextManager[RedisEventBus]]


@pytest.fixture
def tracer() -> Tracer:
    """An SDK tracer (no exporter: only the span contexts matter here)."""
    return TracerProvider().get_tracer("test")


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_bus(request: pytest.FixtureRequest, stream_name: str) -> BusMaker:
    """Buses on one shared log: an in-memory one, or a stream of a real redis-server."""
    shared = MemoryStreamLog(stream_name)

    @asynccontextmanager
    async def make(**options: Any) -> AsyncIterator[RedisEventBus]:
        if request.param == "memory":
            bus = RedisEventBus(shared, owns_log=False, **options)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            bus = RedisEventBus.from_url(server.url, stream_name, **options)
        async with bus:
            yield bus

    return make


def _traceparent(span: Any) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


@pytest.mark.anyio
async def test_emit_inside_a_span_carries_it_and_readers_expose_it(
    make_bus: BusMaker, tracer: Tracer
) -> None:
    """emit, emit_many and emit_nowait inside a span put its traceparent on the wire; another
    bus's reader (and its subscribers) get it with trace_context(); outside a span the entry is
    exactly the plain encoding."""
    inside, many, nowait, outside = _event(), [_event(), _event()], _event(), _event()
    seen: dict[str, TraceContext | None] = {}
    async with make_bus() as reader:
        reader.subscribe(None, lambda e: seen.__setitem__(e.event_id, reader.trace_context(e)))
        async with make_bus(reader=False) as producer:
            with tracer.start_as_current_span("produce") as span:
                await producer.emit(inside)
                with tracer.start_as_current_span("batch") as batch_span:
                    await producer.emit_many(many)
                producer.emit_nowait(nowait)
                await producer.flush()
            await producer.emit(outside)
        await reader.sync()
        parent = _traceparent(span)
        assert reader.trace_context(inside) == TraceContext(parent)
        assert reader.trace_context(nowait.event_id) == TraceContext(parent)
        for event in many:
            assert reader.trace_context(event) == TraceContext(_traceparent(batch_span))
        assert reader.trace_context(outside) is None
        assert seen[inside.event_id] == TraceContext(parent)
        assert seen[outside.event_id] is None
        entries = await reader.log.read("0-0", 100)
    by_id = {decode_event(e.data or b"").event_id: e.data for e in entries}
    assert by_id[outside.event_id] == encode_event(outside, exact=True)
    assert decode_context(by_id[inside.event_id] or b"") == TraceContext(parent)
    # The events themselves are unchanged.
    assert [decode_event(by_id[e.event_id] or b"") for e in (inside, *many, nowait)] == [
        inside,
        *many,
        nowait,
    ]


@pytest.mark.anyio
async def test_trace_context_false_never_adds_the_keys(make_bus: BusMaker, tracer: Tracer) -> None:
    """A bus with trace_context=False writes the plain encoding even inside a span."""
    event = _event()
    async with make_bus(reader=False, trace_context=False) as producer:
        with tracer.start_as_current_span("produce"):
            await producer.emit(event)
            await producer.emit_many([_event()])
        entries = await producer.log.read("0-0", 10)
    assert entries[0].data == encode_event(event, exact=True)
    assert all(decode_context(e.data or b"") is None for e in entries)


@pytest.mark.anyio
async def test_a_non_recording_invalid_span_adds_nothing(make_bus: BusMaker) -> None:
    """With OpenTelemetry imported but no span current (the API's invalid span), nothing is
    added."""
    event = _event()
    async with make_bus(reader=False) as producer:
        await producer.emit(event)
        entries = await producer.log.read("0-0", 10)
    assert entries[0].data == encode_event(event, exact=True)


@pytest.mark.anyio
async def test_the_reader_keeps_a_bounded_number_of_contexts(
    make_bus: BusMaker, tracer: Tracer
) -> None:
    """The reader remembers the contexts of about as many events as its index holds."""
    events = [_event() for _ in range(30)]
    async with make_bus(max_events=10) as bus:
        with tracer.start_as_current_span("produce"):
            await bus.emit_many(events)
        await bus.sync()
        kept = [e for e in events if bus.trace_context(e) is not None]
    assert kept == events[-10:]


def test_without_opentelemetry_imported_nothing_is_imported_and_nothing_added() -> None:
    """In a process that never imports OpenTelemetry, emitting imports none of it and writes
    the plain encoding; no module of the core (the spawn tree's included) imports it."""
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys, anyio
        import hypervisor.observability._core as core
        from hypervisor.observability import HypervisorEvent, EventType, RedisEventBus
        from hypervisor.observability._core.codec import encode_event

        for module in pkgutil.iter_modules(core.__path__):
            importlib.import_module(f"{core.__name__}.{module.name}")
        from hypervisor.observability import AgentSpanExporter, HypervisorEventBus

        AgentSpanExporter(HypervisorEventBus()).flush()

        async def main():
            event = HypervisorEvent(event_type=EventType.VFS_WRITE, payload={"n": 1})
            async with RedisEventBus.in_memory() as bus:
                await bus.emit(event)
                await bus.emit_many([event])
                entries = await bus.log.read("0-0", 10)
                assert entries[0].data == encode_event(event, exact=True), entries[0].data
                assert bus.trace_context(event) is None
            loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
            assert not loaded, loaded
            print("ok")

        anyio.run(main)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_span_reader_falls_back_to_the_public_api(
    monkeypatch: pytest.MonkeyPatch, tracer: Tracer
) -> None:
    """Without the API's default runtime context (another context implementation, or internals
    that changed), the current span is read through get_current_span, with the same result."""
    from opentelemetry import trace

    from hypervisor.observability._util import otel_context

    modules = {"opentelemetry.trace": trace}  # none of the internals the fast path reads
    monkeypatch.setattr(otel_context, "_modules", modules)
    monkeypatch.setattr(otel_context, "_current_span", None)
    assert otel_context._span_reader(trace) is trace.get_current_span
    with tracer.start_as_current_span("outer") as span:
        found = otel_context.current_trace_context()
        assert found is not None
        assert found.context == TraceContext(_traceparent(span))
    assert otel_context.current_trace_context() is None
    assert otel_context._current_span is trace.get_current_span


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=12) | st.just("traceparent"),
        st.text(max_size=30) | st.integers(-(2**63), 2**63 - 1) | st.just(TRACEPARENT),
        max_size=4,
    ),
    st.integers(1, 2**128 - 1),
    st.integers(1, 2**64 - 1),
    st.sampled_from(["", "vendor=abc", "a=1,b@t=2"]),
)
def test_the_in_place_read_agrees_with_the_decode(
    payload: dict[str, Any], trace: int, span: int, tracestate: str
) -> None:
    """Whatever the payload (a key named traceparent included), reading the context of what
    the encoder writes in place gives what decoding the entry gives: the attached context."""
    context = TraceContext.parse(f"00-{trace:032x}-{span:016x}-01", tracestate)
    assert context is not None
    event = HypervisorEvent(event_type=EventType.VFS_WRITE, payload=payload)
    data = attach_context(encode_event(event, exact=True), encode_context(context))
    assert decode_context(data) == context
    assert decode_context(bytearray(data)) == context  # not bytes: always decoded
    assert decode_entry_context(data) == (event.event_id, context)
    nested = HypervisorEvent(event_type=EventType.VFS_WRITE, payload={"traceparent": TRACEPARENT})
    assert decode_context(encode_event(nested)) is None
