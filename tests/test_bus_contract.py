"""The bus contract: the same async tests on ``HypervisorEventBus`` and ``RedisEventBus``.

The synchronous in-process bus is wrapped in a thin async adapter; ``RedisEventBus`` runs on the
in-memory log and on a real redis-server. After ``emit`` every test calls ``sync()`` (a no-op
in process), then checks queries, subscriptions, eviction and argument validation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

import pytest

from hypervisor.observability._core.events import EventHandler, EventType, HypervisorEvent
from hypervisor.observability.event_bus import HypervisorEventBus
from hypervisor.observability.redis_bus import RedisEventBus
from redis_server import RedisServer

pytestmark = pytest.mark.anyio


class AsyncBus(Protocol):
    """The async face both buses are tested through."""

    async def emit(self, event: HypervisorEvent) -> None: ...
    async def sync(self) -> None: ...
    def subscribe(
        self, event_type: EventType | None = None, handler: EventHandler | None = None
    ) -> None: ...
    def unsubscribe(self, event_type: EventType | None, handler: EventHandler) -> bool: ...
    @property
    def handler_errors(self) -> int: ...
    @property
    def evicted_count(self) -> int: ...
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


@pytest.fixture(params=["in-process", "redis-bus-memory", "redis-bus-redis"])
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
    **payload: object,
) -> HypervisorEvent:
    return HypervisorEvent(
        event_type=event_type, session_id=session, agent_did=agent, payload=dict(payload)
    )


async def _emit_all(bus: AsyncBus, events: list[HypervisorEvent]) -> None:
    for event in events:
        await bus.emit(event)
    await bus.sync()


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
    """Type, session and agent queries return exactly their events, oldest first."""
    events = [
        _event(EventType.SESSION_CREATED, "s1", "did:a", n=0),
        _event(EventType.RING_ASSIGNED, "s2", "did:b", n=1),
        _event(EventType.SESSION_CREATED, "s2", "did:a", n=2),
        _event(EventType.RING_ASSIGNED, "s1", None, n=3),
    ]
    await _emit_all(bus, events)
    assert await bus.query_by_type(EventType.RING_ASSIGNED) == [events[1], events[3]]
    assert await bus.query_by_session("s2") == [events[1], events[2]]
    assert await bus.query_by_agent("did:a") == [events[0], events[2]]
    assert await bus.query_by_type(EventType.VFS_WRITE) == []
    assert await bus.event_count() == 4
    assert await bus.type_counts() == {"session.created": 2, "ring.assigned": 2}


async def test_combined_query_and_limit(bus: AsyncBus) -> None:
    """``query`` ANDs its filters and ``limit`` keeps the newest matches."""
    events = [_event(EventType.VFS_WRITE, "s1", f"did:{i % 2}", i=i) for i in range(10)]
    await _emit_all(bus, events)
    matching = [e for e in events if e.agent_did == "did:1"]
    assert await bus.query(EventType.VFS_WRITE, "s1", "did:1") == matching
    assert await bus.query(agent_did="did:1", limit=2) == matching[-2:]
    assert await bus.query(limit=3) == events[-3:]
    assert await bus.query(session_id="nope") == []


@pytest.mark.parametrize("limit", [0, -1])
async def test_invalid_limit_raises(bus: AsyncBus, limit: int) -> None:
    """A ``limit`` below 1 is rejected with ``ValueError``."""
    await _emit_all(bus, [_event()])
    with pytest.raises(ValueError, match="limit"):
        await bus.query(limit=limit)


async def test_time_range_is_inclusive_and_rejects_naive(bus: AsyncBus) -> None:
    """Time-range queries include both bounds; a naive datetime raises ``ValueError``."""
    base = datetime(2030, 1, 1, tzinfo=UTC)
    events = [
        HypervisorEvent(timestamp=base + timedelta(seconds=i), payload={"i": i}) for i in range(5)
    ]
    await _emit_all(bus, events)
    got = await bus.query_by_time_range(base + timedelta(seconds=1), base + timedelta(seconds=3))
    assert got == events[1:4]
    with pytest.raises(ValueError, match="aware"):
        await bus.query_by_time_range(datetime(2030, 1, 1), base)


async def test_eviction_keeps_newest_and_indexes_agree(make_bus: BusFactory) -> None:
    """With ``max_events`` the oldest events are evicted and every index forgets them."""
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
        assert await bus.type_counts() == {"vfs.write": 5}
        assert await bus.query_by_session("s0") == []


async def test_subscribers_by_type_then_wildcard(bus: AsyncBus) -> None:
    """Type handlers run before wildcard handlers, in registration order, for every event."""
    calls: list[tuple[str, str]] = []
    bus.subscribe(EventType.RING_ASSIGNED, lambda e: calls.append(("typed", e.event_id)))
    bus.subscribe(None, lambda e: calls.append(("any", e.event_id)))
    ring = _event(EventType.RING_ASSIGNED)
    other = _event(EventType.VFS_WRITE)
    await _emit_all(bus, [ring, other])
    assert calls == [("typed", ring.event_id), ("any", ring.event_id), ("any", other.event_id)]


async def test_raising_handler_is_isolated_and_counted(bus: AsyncBus) -> None:
    """A handler that raises is counted; the other handlers still get every event."""
    seen: list[str] = []

    def broken(event: HypervisorEvent) -> None:
        raise RuntimeError("handler bug")

    bus.subscribe(None, broken)
    bus.subscribe(None, lambda e: seen.append(e.event_id))
    events = [_event(), _event()]
    await _emit_all(bus, events)
    assert seen == [e.event_id for e in events]
    assert bus.handler_errors == 2


async def test_unsubscribe_reports_registration(bus: AsyncBus) -> None:
    """``unsubscribe`` returns whether the handler was registered and stops delivery."""
    seen: list[HypervisorEvent] = []
    handler: EventHandler = seen.append
    bus.subscribe(EventType.VFS_WRITE, handler)
    assert bus.unsubscribe(EventType.VFS_WRITE, handler) is True
    assert bus.unsubscribe(EventType.VFS_WRITE, handler) is False
    await _emit_all(bus, [_event(EventType.VFS_WRITE)])
    assert seen == []
