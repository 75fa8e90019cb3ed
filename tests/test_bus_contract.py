"""The bus contract: the same async tests on ``HypervisorEventBus`` and ``RedisEventBus``.

The synchronous in-process bus is wrapped in a thin async adapter; ``RedisEventBus`` runs on the
in-memory log and on a real redis-server (that parameter carries the ``redis`` marker). After
``emit`` every test calls ``sync()`` (a no-op in process), then checks queries, subscriptions,
eviction and argument validation. What only the in-process bus has (threads, staged emits,
rejected events, re-entrant emits, its constructor) is tested in ``test_event_bus.py``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Protocol, TypeVar

import pytest

from hypervisor.observability._core.events import EventHandler, EventType, HypervisorEvent
from hypervisor.observability.event_bus import HypervisorEventBus
from hypervisor.observability.redis_bus import RedisEventBus
from redis_server import RedisServer

pytestmark = pytest.mark.anyio


class AsyncBus(Protocol):
    """The async face both buses are tested through."""

    async def emit(self, event: HypervisorEvent) -> None: ...
    async def emit_many(self, events: Iterable[HypervisorEvent]) -> None: ...
    async def sync(self) -> None: ...
    def subscribe(
        self, event_type: EventType | None = None, handler: EventHandler | None = None
    ) -> None: ...
    def unsubscribe(self, event_type: EventType | None, handler: EventHandler) -> bool: ...
    @property
    def handler_errors(self) -> int: ...
    @property
    def evicted_count(self) -> int: ...
    @property
    def max_events(self) -> int | None: ...
    async def query_by_type(self, event_type: EventType) -> list[HypervisorEvent]: ...
    async def query_by_session(self, session_id: str) -> list[HypervisorEvent]: ...
    async def query_by_agent(self, agent_did: str) -> list[HypervisorEvent]: ...
    async def query_by_time_range(
        self, start: datetime, end: datetime | None = None
    ) -> list[HypervisorEvent]: ...
    async def query(
        self,
        event_type: EventType | None = None,
        session_id: str | None = None,
        agent_did: str | None = None,
        limit: int | None = None,
    ) -> list[HypervisorEvent]: ...
    async def event_count(self) -> int: ...
    async def all_events(self) -> list[HypervisorEvent]: ...
    async def type_counts(self) -> dict[str, int]: ...


class InProcessAdapter:
    """``HypervisorEventBus`` behind the async face (every call is synchronous underneath)."""

    def __init__(self, bus: HypervisorEventBus) -> None:
        self.bus = bus

    async def emit(self, event: HypervisorEvent) -> None:
        self.bus.emit(event)

    async def emit_many(self, events: Iterable[HypervisorEvent]) -> None:
        for event in events:
            self.bus.emit(event)

    async def sync(self) -> None:
        return None

    def subscribe(
        self, event_type: EventType | None = None, handler: EventHandler | None = None
    ) -> None:
        self.bus.subscribe(event_type, handler)

    def unsubscribe(self, event_type: EventType | None, handler: EventHandler) -> bool:
        return self.bus.unsubscribe(event_type, handler)

    @property
    def handler_errors(self) -> int:
        return self.bus.handler_errors

    @property
    def evicted_count(self) -> int:
        return self.bus.evicted_count

    @property
    def max_events(self) -> int | None:
        return self.bus.max_events

    async def query_by_type(self, event_type: EventType) -> list[HypervisorEvent]:
        return self.bus.query_by_type(event_type)

    async def query_by_session(self, session_id: str) -> list[HypervisorEvent]:
        return self.bus.query_by_session(session_id)

    async def query_by_agent(self, agent_did: str) -> list[HypervisorEvent]:
        return self.bus.query_by_agent(agent_did)

    async def query_by_time_range(
        self, start: datetime, end: datetime | None = None
    ) -> list[HypervisorEvent]:
        return self.bus.query_by_time_range(start, end)

    async def query(
        self,
        event_type: EventType | None = None,
        session_id: str | None = None,
        agent_did: str | None = None,
        limit: int | None = None,
    ) -> list[HypervisorEvent]:
        return self.bus.query(event_type, session_id, agent_did, limit)

    async def event_count(self) -> int:
        return self.bus.event_count

    async def all_events(self) -> list[HypervisorEvent]:
        return self.bus.all_events

    async def type_counts(self) -> dict[str, int]:
        return self.bus.type_counts()


BusFactory = Callable[[int | None], AsyncIterator[AsyncBus]]
T = TypeVar("T")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(
    params=[
        "in-process",
        "redis-bus-memory",
        pytest.param("redis-bus-redis", marks=pytest.mark.redis),
    ]
)
def make_bus(request: pytest.FixtureRequest, stream_name: str) -> BusFactory:
    """A factory of started buses of each kind, given ``max_events``."""

    async def factory(max_events: int | None) -> AsyncIterator[AsyncBus]:
        if request.param == "in-process":
            yield InProcessAdapter(HypervisorEventBus(max_events))
            return
        if request.param == "redis-bus-memory":
            bus = RedisEventBus.in_memory(stream_name, max_events=max_events)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            bus = RedisEventBus.from_url(server.url, stream_name, max_events=max_events)
        async with bus:
            yield bus

    return factory


@pytest.fixture
async def bus(make_bus: BusFactory) -> AsyncIterator[AsyncBus]:
    """A started bus of each kind with the default capacity."""
    async for made in make_bus(1000):
        yield made


def _event(
    event_type: EventType = EventType.SESSION_CREATED,
    session: str | None = "s1",
    agent: str | None = "did:a",
    seconds: float | None = None,
    **payload: object,
) -> HypervisorEvent:
    """An event; at ``T0 + seconds`` when ``seconds`` is given, else now."""
    if seconds is None:
        return HypervisorEvent(
            event_type=event_type, session_id=session, agent_did=agent, payload=dict(payload)
        )
    return HypervisorEvent(
        event_type=event_type,
        session_id=session,
        agent_did=agent,
        timestamp=T0 + timedelta(seconds=seconds),
        payload=dict(payload),
    )


async def _emit_all(bus: AsyncBus, events: list[HypervisorEvent]) -> None:
    for event in events:
        await bus.emit(event)
    await bus.sync()


def _now(query: Coroutine[Any, Any, T]) -> T:
    """Run a bus query to completion from synchronous code (a handler).

    Both buses answer queries from their local store without suspending, so the coroutine ends
    at its first step; one that suspended fails here.
    """
    try:
        query.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    query.close()
    raise AssertionError("the query suspended")


# -- storing and querying -------------------------------------------------------------------


async def test_events_round_trip_unchanged(bus: AsyncBus) -> None:
    """An emitted event comes back from queries equal in every field, nested payload included."""
    event = HypervisorEvent(
        event_type=EventType.SAGA_STEP_FAILED,
        session_id="s9",
        agent_did="did:x",
        causal_trace_id="trace-1",
        parent_event_id="p1",
        payload={"step": 3, "detail": {"why": ["a", 1.5, None]}},
    )
    await _emit_all(bus, [event])
    assert await bus.all_events() == [event]


async def test_queries_by_index_keep_emit_order(bus: AsyncBus) -> None:
    """Type, session and agent queries return exactly their events, oldest first; the count,
    the events and the per-type counts (keyed by the type's string value) agree."""
    events = [
        _event(EventType.SESSION_CREATED, "s1", "did:a", n=0),
        _event(EventType.RING_ASSIGNED, "s2", "did:b", n=1),
        _event(EventType.SESSION_CREATED, "s2", "did:a", n=2),
        _event(EventType.RING_ASSIGNED, "s1", None, n=3),
        _event(EventType.VFS_WRITE, "s3", "did:c", n=4),
    ]
    await _emit_all(bus, events)
    assert await bus.query_by_type(EventType.RING_ASSIGNED) == [events[1], events[3]]
    assert await bus.query_by_session("s2") == [events[1], events[2]]
    assert await bus.query_by_session("s3") == [events[4]]
    assert await bus.query_by_agent("did:a") == [events[0], events[2]]
    assert await bus.query_by_agent("nobody") == []
    assert await bus.query_by_type(EventType.AGENT_KILLED) == []
    assert await bus.event_count() == 5
    assert await bus.all_events() == events
    assert await bus.type_counts() == {"session.created": 2, "ring.assigned": 2, "vfs.write": 1}


async def test_events_without_session_or_agent_are_not_indexed_under_none(bus: AsyncBus) -> None:
    """An event with no session or agent is stored and typed, but in no session/agent list."""
    bare = _event(session=None, agent=None)
    await _emit_all(bus, [bare])
    assert await bus.all_events() == [bare]
    assert await bus.query_by_type(EventType.SESSION_CREATED) == [bare]
    assert await bus.query(session_id="s1") == []
    assert await bus.query(agent_did="did:a") == []


async def test_query_results_are_new_lists(bus: AsyncBus) -> None:
    """Mutating a returned list never changes the store."""
    await _emit_all(bus, [_event()])
    (await bus.all_events()).clear()
    (await bus.query_by_session("s1")).clear()
    (await bus.query()).clear()
    assert await bus.event_count() == 1
    assert len(await bus.query_by_session("s1")) == 1


async def test_query_combines_filters_and_limit_keeps_the_newest(bus: AsyncBus) -> None:
    """``query`` ANDs its filters (a missing key matches nothing); ``limit`` keeps the newest
    matches, returned oldest first."""
    events = [
        _event(
            EventType.RING_ASSIGNED if i % 2 else EventType.VFS_WRITE, f"s{i % 3}", f"a{i % 5}", i
        )
        for i in range(60)
    ]
    await _emit_all(bus, events)
    for event_type in (None, EventType.RING_ASSIGNED, EventType.VFS_WRITE):
        for session in (None, "s0", "s2", "missing"):
            for agent in (None, "a1", "a4", "missing"):
                expected = [
                    e
                    for e in events
                    if (event_type is None or e.event_type == event_type)
                    and (session is None or e.session_id == session)
                    and (agent is None or e.agent_did == agent)
                ]
                assert await bus.query(event_type, session, agent) == expected
                for limit in (1, 2, 7, 100):
                    got = await bus.query(event_type, session, agent, limit=limit)
                    assert got == expected[-limit:]


async def test_query_without_filters_and_limit_returns_newest_of_store(
    make_bus: BusFactory,
) -> None:
    """``query(limit=n)`` with no filter is the newest n events, oldest first, across the
    store's wrap-around."""
    async for bus in make_bus(10):
        events = [_event(seconds=i) for i in range(25)]
        await _emit_all(bus, events)
        assert await bus.query(limit=3) == events[-3:]
        assert await bus.query(limit=50) == events[-10:]
        assert await bus.query() == events[-10:]


async def test_limit_zero_and_negative_limits_read_as_published(bus: AsyncBus) -> None:
    """A requested behaviour change (issue 14): ``limit`` reads as the published module's
    ``matches[-limit:]``, since agent-hypervisor's REST API passes a client's limit straight
    through. ``limit=0`` returns every match; ``-n`` every match but the ``n`` oldest (``-n``
    beyond the match count returns nothing)."""
    kinds = [EventType.RING_ASSIGNED, EventType.SESSION_CREATED]
    events = [
        _event(kinds[i % 3 == 0], session="s1" if i % 2 else "s2", seconds=i) for i in range(12)
    ]
    await _emit_all(bus, events)
    s1 = [e for e in events if e.session_id == "s1"]
    assert await bus.query(limit=0) == events
    assert await bus.query(session_id="s1", limit=0) == s1
    assert await bus.query(limit=-1) == events[1:]
    assert await bus.query(limit=-7) == events[7:]
    assert await bus.query(session_id="s1", limit=-1) == s1[1:]
    assert (
        await bus.query(session_id="s1", event_type=EventType.RING_ASSIGNED, limit=-2)
        == ([e for e in s1 if e.event_type is EventType.RING_ASSIGNED][2:])
    )
    assert await bus.query(limit=-100) == []
    assert await bus.query(session_id="nobody", limit=0) == []


@pytest.mark.parametrize("limit", [True, False, 1.5, "3"])
async def test_limit_of_another_type_is_a_type_error(bus: AsyncBus, limit: object) -> None:
    """A limit that is not an int is a ``TypeError``, as the published slice raises for a
    float or a string; bools, which the published module would read as 1 and 0, are refused
    too (a flag passed by mistake)."""
    await _emit_all(bus, [_event()])
    with pytest.raises(TypeError, match="limit"):
        await bus.query(limit=limit)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="limit"):
        await bus.query(session_id="s1", limit=limit)  # type: ignore[arg-type]


# -- time ranges --------------------------------------------------------------------------------


async def test_time_range_is_inclusive_and_end_defaults_to_now(bus: AsyncBus) -> None:
    """Both bounds are inclusive; without ``end``, events up to now are returned; an ``end``
    before ``start`` matches nothing."""
    events = [_event(seconds=i) for i in range(10)]
    await _emit_all(bus, events)
    got = await bus.query_by_time_range(T0 + timedelta(seconds=2), T0 + timedelta(seconds=5))
    assert got == events[2:6]
    assert await bus.query_by_time_range(T0 + timedelta(seconds=7)) == events[7:]
    future = HypervisorEvent(timestamp=datetime.now(UTC) + timedelta(hours=1))
    await _emit_all(bus, [future])
    assert future not in await bus.query_by_time_range(T0)
    backwards = (T0 + timedelta(seconds=5), T0 + timedelta(seconds=4))
    assert await bus.query_by_time_range(*backwards) == []


async def test_time_range_handles_out_of_order_timestamps_in_emit_order(bus: AsyncBus) -> None:
    """Late timestamps are found exactly and results keep emit order, not timestamp order."""
    order = [0, 1, 5, 2, 6, 7, 3, 8, 9, 4, 10]
    events = [_event(seconds=s, n=i) for i, s in enumerate(order)]
    await _emit_all(bus, events)
    for lo in range(-1, 12):
        for hi in range(lo, 12):
            start, end = T0 + timedelta(seconds=lo), T0 + timedelta(seconds=hi)
            expected = [e for e in events if start <= e.timestamp <= end]
            assert await bus.query_by_time_range(start, end) == expected, (lo, hi)


async def test_time_range_accepts_other_timezones(bus: AsyncBus) -> None:
    """Bounds and timestamps in other zones compare by instant."""
    plus2 = timezone(timedelta(hours=2))
    event = HypervisorEvent(timestamp=datetime(2026, 1, 1, 12, tzinfo=plus2))
    await _emit_all(bus, [event])
    assert await bus.query_by_time_range(datetime(2026, 1, 1, 10, tzinfo=UTC)) == [event]
    assert await bus.query_by_time_range(datetime(2026, 1, 1, 10, 0, 1, tzinfo=UTC)) == []


async def test_time_range_rejects_naive_bounds(bus: AsyncBus) -> None:
    """A naive start or end is a ``ValueError`` that says the bound must be timezone-aware."""
    await _emit_all(bus, [_event()])
    with pytest.raises(ValueError, match="timezone-aware"):
        await bus.query_by_time_range(datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="end must be timezone-aware"):
        await bus.query_by_time_range(T0, datetime(2026, 1, 2))


async def test_naive_event_timestamp_is_stored_and_read_as_utc(bus: AsyncBus) -> None:
    """An event built with a naive timestamp does not break emit; range queries read it as UTC
    (after the Redis bus's round trip through the wire codec too)."""
    before = _event(seconds=0)
    naive = HypervisorEvent(timestamp=datetime(2026, 1, 1, 0, 0, 5))
    after = _event(seconds=10)
    await _emit_all(bus, [before, naive, after])
    window = (T0 + timedelta(seconds=4), T0 + timedelta(seconds=6))
    assert await bus.query_by_time_range(*window) == [naive]
    assert await bus.query_by_time_range(T0) == [before, naive, after]


# -- eviction -----------------------------------------------------------------------------------


async def test_eviction_keeps_every_index_consistent_with_the_store(
    make_bus: BusFactory,
) -> None:
    """After eviction, the queries by type, session and agent, ``type_counts()`` and the count
    describe the same events: the newest ``max_events``."""
    cap = 50
    types = [EventType.RING_ASSIGNED, EventType.VFS_WRITE, EventType.SAGA_CREATED]
    emitted = [_event(types[i % 3], f"s{i % 7}", f"a{i % 11}", i) for i in range(500)]
    async for bus in make_bus(cap):
        for n, event in enumerate(emitted, start=1):
            await bus.emit(event)
            if n % 37 and n != len(emitted):
                continue
            await bus.sync()
            kept = emitted[max(0, n - cap) : n]
            assert await bus.all_events() == kept
            counts = await bus.type_counts()
            assert await bus.event_count() == len(kept) == sum(counts.values())
            for t in types:
                assert await bus.query_by_type(t) == [e for e in kept if e.event_type == t]
            for k in range(7):
                got = await bus.query_by_session(f"s{k}")
                assert got == [e for e in kept if e.session_id == f"s{k}"]
            for k in range(11):
                got = await bus.query_by_agent(f"a{k}")
                assert got == [e for e in kept if e.agent_did == f"a{k}"]
        assert bus.evicted_count == 500 - cap


async def test_evicted_keys_leave_every_index_and_type_counts(make_bus: BusFactory) -> None:
    """With ``max_events`` the oldest events are evicted; a type, session or agent whose last
    event is evicted is forgotten by its index, by ``query`` and by ``type_counts()``."""
    async for bus in make_bus(5):
        events = [
            _event(EventType.RING_ASSIGNED if i < 3 else EventType.VFS_WRITE, f"s{i}", None, i=i)
            for i in range(8)
        ]
        await _emit_all(bus, events)
        assert await bus.event_count() == 5
        assert await bus.all_events() == events[3:]
        assert bus.evicted_count == 3
        assert await bus.query_by_type(EventType.RING_ASSIGNED) == []
        assert await bus.query(event_type=EventType.RING_ASSIGNED) == []
        assert await bus.type_counts() == {"vfs.write": 5}
        assert await bus.query_by_session("s0") == []


async def test_unbounded_bus_keeps_everything(make_bus: BusFactory) -> None:
    """``max_events=None`` never evicts."""
    async for bus in make_bus(None):
        # In batches: a thousand lone round trips would only make the test slow.
        await bus.emit_many([_event(seconds=i) for i in range(1000)])
        await bus.sync()
        assert await bus.event_count() == 1000
        assert bus.evicted_count == 0
        assert bus.max_events is None


# -- subscriptions ------------------------------------------------------------------------------


async def test_subscribers_type_first_then_wildcard_in_registration_order(bus: AsyncBus) -> None:
    """Each event goes to its type's handlers in registration order, then to the wildcard
    handlers; handlers of other types are not called."""
    calls: list[tuple[str, str]] = []
    bus.subscribe(None, lambda e: calls.append(("wild1", e.event_id)))
    bus.subscribe(EventType.RING_BREACH_DETECTED, lambda e: calls.append(("breach1", e.event_id)))
    bus.subscribe(EventType.RING_ASSIGNED, lambda e: calls.append(("assigned", e.event_id)))
    bus.subscribe(EventType.RING_BREACH_DETECTED, lambda e: calls.append(("breach2", e.event_id)))
    bus.subscribe(handler=lambda e: calls.append(("wild2", e.event_id)))
    breach = _event(EventType.RING_BREACH_DETECTED)
    await _emit_all(bus, [breach])
    assert calls == [(name, breach.event_id) for name in ("breach1", "breach2", "wild1", "wild2")]
    calls.clear()
    other = _event(EventType.VFS_WRITE)
    await _emit_all(bus, [other])
    assert calls == [("wild1", other.event_id), ("wild2", other.event_id)]


async def test_subscribe_with_no_handler_is_ignored(bus: AsyncBus) -> None:
    """``subscribe()`` without a handler does nothing, as published (no error, nothing
    called)."""
    bus.subscribe(EventType.RING_ASSIGNED)
    bus.subscribe()
    await _emit_all(bus, [_event(EventType.RING_ASSIGNED)])
    assert bus.handler_errors == 0
    assert await bus.event_count() == 1


async def test_handler_sees_the_event_already_stored(bus: AsyncBus) -> None:
    """A handler can query the bus and find the event it is called with."""
    seen: list[bool] = []
    bus.subscribe(None, lambda e: seen.append(e in _now(bus.query_by_session("s1"))))
    await _emit_all(bus, [_event()])
    assert seen == [True]


async def test_raising_handler_does_not_reach_emit_nor_stop_other_handlers(
    bus: AsyncBus, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing handler is logged and counted; later handlers and the emitter carry on. The
    same handler raising the same error type is logged with one traceback, then at debug
    level."""
    received: list[str] = []

    def broken(event: HypervisorEvent) -> None:
        raise RuntimeError("boom")

    bus.subscribe(EventType.RING_ASSIGNED, broken)
    bus.subscribe(EventType.RING_ASSIGNED, lambda e: received.append("typed"))
    bus.subscribe(None, broken)
    bus.subscribe(None, lambda e: received.append("wild"))
    with caplog.at_level(logging.DEBUG, logger="hypervisor.observability"):
        await _emit_all(bus, [_event(EventType.RING_ASSIGNED), _event(EventType.RING_ASSIGNED)])
    assert received == ["typed", "wild", "typed", "wild"]
    assert bus.handler_errors == 4
    assert await bus.event_count() == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    debugs = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert "RuntimeError" in errors[0].getMessage()
    assert len(debugs) == 3


async def test_each_failing_handler_and_error_type_gets_one_traceback(
    bus: AsyncBus, caplog: pytest.LogCaptureFixture
) -> None:
    """A different handler, or a different exception type, is reported with a traceback
    again."""
    errors: list[type[Exception]] = [ValueError, ValueError, KeyError]

    def flaky(event: HypervisorEvent) -> None:
        raise errors.pop(0)("x")

    def other(event: HypervisorEvent) -> None:
        raise ValueError("y")

    bus.subscribe(None, flaky)
    with caplog.at_level(logging.ERROR, logger="hypervisor.observability"):
        await _emit_all(bus, [_event() for _ in range(3)])
        bus.unsubscribe(None, flaky)
        bus.subscribe(None, other)
        await _emit_all(bus, [_event()])
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [
        ValueError,
        KeyError,
        ValueError,
    ]
    assert bus.handler_errors == 4


async def test_unsubscribe_removes_one_registration_and_reports_it(bus: AsyncBus) -> None:
    """``unsubscribe()`` removes one registration of the handler for that type and returns
    whether there was one; a removed handler gets nothing more."""
    calls: list[int] = []

    def handler(event: HypervisorEvent) -> None:
        calls.append(1)

    bus.subscribe(EventType.RING_ASSIGNED, handler)
    bus.subscribe(EventType.RING_ASSIGNED, handler)
    bus.subscribe(None, handler)
    await _emit_all(bus, [_event(EventType.RING_ASSIGNED)])
    assert len(calls) == 3
    assert bus.unsubscribe(EventType.VFS_WRITE, handler) is False
    assert bus.unsubscribe(EventType.RING_ASSIGNED, handler) is True
    calls.clear()
    await _emit_all(bus, [_event(EventType.RING_ASSIGNED)])
    assert len(calls) == 2
    assert bus.unsubscribe(EventType.RING_ASSIGNED, handler) is True
    assert bus.unsubscribe(EventType.RING_ASSIGNED, handler) is False
    assert bus.unsubscribe(None, handler) is True
    assert bus.unsubscribe(None, handler) is False
    calls.clear()
    await _emit_all(bus, [_event(EventType.RING_ASSIGNED)])
    assert calls == []


async def test_unsubscribe_bound_method_by_equality(bus: AsyncBus) -> None:
    """A bound method can be unsubscribed with a fresh reference to the same method."""

    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def on_event(self, event: HypervisorEvent) -> None:
            self.n += 1

    counter = Counter()
    bus.subscribe(EventType.VFS_WRITE, counter.on_event)
    await _emit_all(bus, [_event(EventType.VFS_WRITE)])
    assert bus.unsubscribe(EventType.VFS_WRITE, counter.on_event) is True
    await _emit_all(bus, [_event(EventType.VFS_WRITE)])
    assert counter.n == 1


async def test_handler_may_unsubscribe_itself_during_dispatch(bus: AsyncBus) -> None:
    """Changing subscriptions inside a handler affects later events, not the one being
    delivered."""
    calls: list[str] = []

    def once(event: HypervisorEvent) -> None:
        calls.append("once")
        bus.unsubscribe(None, once)

    bus.subscribe(None, once)
    bus.subscribe(None, lambda e: calls.append("always"))
    await _emit_all(bus, [_event(), _event()])
    assert calls == ["once", "always", "always"]


# -- string-valued event types ------------------------------------------------------------------


def _noop(event: HypervisorEvent) -> None:
    """A handler that ignores its event."""


@pytest.mark.parametrize("subscribe_first", [True, False])
async def test_handlers_registered_for_str_value_receive_member_events(
    bus: AsyncBus, subscribe_first: bool
) -> None:
    """Subscribing with a type's string value is the same as with the member."""
    got: list[HypervisorEvent] = []
    handler: Callable[[HypervisorEvent], None] = got.append
    if subscribe_first:
        bus.subscribe("ring.assigned", handler)  # type: ignore[arg-type]
    else:
        bus.subscribe(EventType.RING_ASSIGNED, handler)
    bus.subscribe(EventType.VFS_WRITE, _noop)
    event = _event(EventType.RING_ASSIGNED)
    await _emit_all(bus, [event])
    assert got == [event]


async def test_str_values_and_members_are_one_type_everywhere(bus: AsyncBus) -> None:
    """A type's string value finds, counts and routes the same events as the member, whether
    the query, the subscription or the event itself holds the string."""
    by_member: list[HypervisorEvent] = []
    bus.subscribe(EventType.RING_ELEVATED, by_member.append)
    member = _event(EventType.RING_ELEVATED)
    as_str = _event("ring.elevated")  # type: ignore[arg-type]
    await _emit_all(bus, [member, as_str])
    assert await bus.query_by_type("ring.elevated") == [member, as_str]  # type: ignore[arg-type]
    assert await bus.query_by_type(EventType.RING_ELEVATED) == [member, as_str]
    assert await bus.query(event_type="ring.elevated") == [member, as_str]  # type: ignore[arg-type]
    assert await bus.query(event_type=EventType.RING_ELEVATED, limit=1) == [as_str]
    assert await bus.type_counts() == {"ring.elevated": 2}
    assert by_member == [member, as_str]
