"""The in-process bus: the published behaviour, and each published flaw fixed."""

from __future__ import annotations

import logging
import threading
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from hypervisor.observability import (
    DEFAULT_MAX_EVENTS as PACKAGE_DEFAULT,
    HypervisorEventBus as PackageBus,
)
from hypervisor.observability._core.store import EventStore
from hypervisor.observability.event_bus import (
    DEFAULT_MAX_EVENTS,
    EventHandler,
    EventType,
    HypervisorEvent,
    HypervisorEventBus,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ev(
    event_type: EventType = EventType.SESSION_CREATED,
    session: str | None = "s1",
    agent: str | None = "a1",
    seconds: float = 0.0,
    **payload: Any,
) -> HypervisorEvent:
    return HypervisorEvent(
        event_type=event_type,
        session_id=session,
        agent_did=agent,
        timestamp=T0 + timedelta(seconds=seconds),
        payload=payload,
    )


# -- published behaviour ---------------------------------------------------------------------


def test_public_names_are_importable_from_both_paths() -> None:
    """The bus is the same class from the package and the published submodule; the cap is 100k."""
    assert PackageBus is HypervisorEventBus
    assert PACKAGE_DEFAULT == DEFAULT_MAX_EVENTS
    assert DEFAULT_MAX_EVENTS == 100_000
    assert HypervisorEventBus().max_events == DEFAULT_MAX_EVENTS
    handler: EventHandler = print
    assert callable(handler)


def test_emit_then_query_by_session_type_and_agent_oldest_first() -> None:
    """Each index returns exactly its events, in emit order."""
    bus = HypervisorEventBus()
    first = ev(EventType.SESSION_CREATED, "s1", "a1", n=1)
    second = ev(EventType.RING_ASSIGNED, "s1", "a2", n=2)
    third = ev(EventType.RING_ASSIGNED, "s2", "a1", n=3)
    for event in (first, second, third):
        bus.emit(event)
    assert bus.query_by_session("s1") == [first, second]
    assert bus.query_by_session("s2") == [third]
    assert bus.query_by_type(EventType.RING_ASSIGNED) == [second, third]
    assert bus.query_by_agent("a1") == [first, third]
    assert bus.query_by_agent("nobody") == []
    assert bus.event_count == 3
    assert bus.all_events == [first, second, third]


def test_events_without_session_or_agent_are_not_indexed_under_none() -> None:
    """An event with no session or agent is stored and typed, but in no session/agent list."""
    bus = HypervisorEventBus()
    bare = ev(session=None, agent=None)
    bus.emit(bare)
    assert bus.all_events == [bare]
    assert bus.query_by_type(EventType.SESSION_CREATED) == [bare]
    assert bus.query(session_id="s1") == []
    assert bus.query(agent_did="a1") == []


def test_query_results_are_new_lists() -> None:
    """Mutating a returned list never changes the store."""
    bus = HypervisorEventBus()
    bus.emit(ev())
    bus.all_events.clear()
    bus.query_by_session("s1").clear()
    bus.query().clear()
    assert bus.event_count == 1
    assert len(bus.query_by_session("s1")) == 1


def test_query_combines_filters_and_limit_keeps_the_newest() -> None:
    """query() ANDs its filters; limit keeps the newest matches, returned oldest first."""
    bus = HypervisorEventBus()
    events = [
        ev(EventType.RING_ASSIGNED if i % 2 else EventType.VFS_WRITE, f"s{i % 3}", f"a{i % 5}", i)
        for i in range(60)
    ]
    for event in events:
        bus.emit(event)
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
                assert bus.query(event_type, session, agent) == expected
                for limit in (1, 2, 7, 100):
                    got = bus.query(event_type, session, agent, limit=limit)
                    assert got == expected[-limit:]


def test_type_counts_are_keyed_by_value() -> None:
    """type_counts() maps each stored type's string value to its count."""
    bus = HypervisorEventBus()
    for event_type in (EventType.RING_ASSIGNED, EventType.RING_ASSIGNED, EventType.VFS_WRITE):
        bus.emit(ev(event_type))
    assert bus.type_counts() == {"ring.assigned": 2, "vfs.write": 1}


def test_subscribers_type_first_then_wildcard_in_registration_order() -> None:
    """Type handlers run in registration order, then wildcard handlers; others are not called."""
    bus = HypervisorEventBus()
    calls: list[str] = []
    bus.subscribe(None, lambda e: calls.append("wild1"))
    bus.subscribe(EventType.RING_BREACH_DETECTED, lambda e: calls.append("breach1"))
    bus.subscribe(EventType.RING_ASSIGNED, lambda e: calls.append("assigned"))
    bus.subscribe(EventType.RING_BREACH_DETECTED, lambda e: calls.append("breach2"))
    bus.subscribe(handler=lambda e: calls.append("wild2"))
    bus.emit(ev(EventType.RING_BREACH_DETECTED))
    assert calls == ["breach1", "breach2", "wild1", "wild2"]
    calls.clear()
    bus.emit(ev(EventType.VFS_WRITE))
    assert calls == ["wild1", "wild2"]


def test_subscribe_with_no_handler_is_ignored() -> None:
    """subscribe() without a handler does nothing, as published (no error, nothing called)."""
    bus = HypervisorEventBus()
    bus.subscribe(EventType.RING_ASSIGNED)
    bus.subscribe()
    bus.emit(ev(EventType.RING_ASSIGNED))
    assert bus.handler_errors == 0
    assert bus.event_count == 1


def test_handler_sees_the_event_already_stored() -> None:
    """A handler can query the bus and find the event it is called with."""
    bus = HypervisorEventBus()
    seen: list[bool] = []
    bus.subscribe(None, lambda e: seen.append(e in bus.query_by_session("s1")))
    bus.emit(ev())
    assert seen == [True]


def test_clear_empties_the_store_and_keeps_subscribers() -> None:
    """_clear() drops every event and index but the subscribers still receive new events."""
    bus = HypervisorEventBus(max_events=3)
    received: list[HypervisorEvent] = []
    bus.subscribe(None, received.append)
    for i in range(5):
        bus.emit(ev(seconds=i))
    bus._clear()
    assert bus.event_count == 0
    assert bus.all_events == []
    assert bus.type_counts() == {}
    assert bus.query_by_session("s1") == []
    assert bus.query_by_time_range(T0 - timedelta(days=1)) == []
    again = ev(seconds=99)
    bus.emit(again)
    assert bus.all_events == [again]
    assert bus.query_by_time_range(T0) == [again]
    assert received[-1] is again


def test_unbounded_bus_keeps_everything() -> None:
    """max_events=None never evicts."""
    bus = HypervisorEventBus(max_events=None)
    for i in range(1000):
        bus.emit(ev(seconds=i))
    assert bus.event_count == 1000
    assert bus.evicted_count == 0
    assert bus.max_events is None


# -- time range --------------------------------------------------------------------------------


def test_time_range_is_inclusive_and_end_defaults_to_now() -> None:
    """Both bounds are inclusive; without end, events up to now are returned."""
    bus = HypervisorEventBus()
    events = [ev(seconds=i) for i in range(10)]
    for event in events:
        bus.emit(event)
    assert (
        bus.query_by_time_range(T0 + timedelta(seconds=2), T0 + timedelta(seconds=5))
        == (events[2:6])
    )
    assert bus.query_by_time_range(T0 + timedelta(seconds=7)) == events[7:]
    future = HypervisorEvent(timestamp=datetime.now(UTC) + timedelta(hours=1))
    bus.emit(future)
    assert future not in bus.query_by_time_range(T0)
    assert bus.query_by_time_range(T0 + timedelta(seconds=5), T0 + timedelta(seconds=4)) == []


def test_time_range_handles_out_of_order_timestamps_in_emit_order() -> None:
    """Late timestamps are found exactly and results keep emit order, not timestamp order."""
    bus = HypervisorEventBus()
    order = [0, 1, 5, 2, 6, 7, 3, 8, 9, 4, 10]
    events = [ev(seconds=s, n=i) for i, s in enumerate(order)]
    for event in events:
        bus.emit(event)
    for lo in range(-1, 12):
        for hi in range(lo, 12):
            start, end = T0 + timedelta(seconds=lo), T0 + timedelta(seconds=hi)
            expected = [e for e in events if start <= e.timestamp <= end]
            assert bus.query_by_time_range(start, end) == expected, (lo, hi)


def test_time_range_accepts_other_timezones() -> None:
    """Bounds and timestamps in other zones compare by instant."""
    bus = HypervisorEventBus()
    plus2 = timezone(timedelta(hours=2))
    event = HypervisorEvent(timestamp=datetime(2026, 1, 1, 12, tzinfo=plus2))
    bus.emit(event)
    assert bus.query_by_time_range(datetime(2026, 1, 1, 10, tzinfo=UTC)) == [event]
    assert bus.query_by_time_range(datetime(2026, 1, 1, 10, 0, 1, tzinfo=UTC)) == []


def test_time_range_rejects_naive_bounds() -> None:
    """A naive start or end is a ValueError that says the bound must be timezone-aware."""
    bus = HypervisorEventBus()
    bus.emit(ev())
    with pytest.raises(ValueError, match="timezone-aware"):
        bus.query_by_time_range(datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="end must be timezone-aware"):
        bus.query_by_time_range(T0, datetime(2026, 1, 2))


def test_naive_event_timestamp_is_stored_and_read_as_utc() -> None:
    """An event built with a naive timestamp does not break emit; range queries read it as UTC."""
    bus = HypervisorEventBus()
    before = ev(seconds=0)
    naive = HypervisorEvent(timestamp=datetime(2026, 1, 1, 0, 0, 5))
    after = ev(seconds=10)
    for event in (before, naive, after):
        bus.emit(event)
    assert bus.query_by_time_range(T0 + timedelta(seconds=4), T0 + timedelta(seconds=6)) == [naive]
    assert bus.query_by_time_range(T0) == [before, naive, after]


# -- flaw 1: handler isolation and unsubscribe -----------------------------------------------


def test_raising_handler_does_not_reach_emit_nor_stop_other_handlers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failing handler is logged and counted; later handlers and the emitter carry on."""
    bus = HypervisorEventBus()
    received: list[str] = []

    def broken(event: HypervisorEvent) -> None:
        raise RuntimeError("boom")

    bus.subscribe(EventType.RING_ASSIGNED, broken)
    bus.subscribe(EventType.RING_ASSIGNED, lambda e: received.append("typed"))
    bus.subscribe(None, broken)
    bus.subscribe(None, lambda e: received.append("wild"))
    with caplog.at_level(logging.DEBUG, logger="hypervisor.observability"):
        bus.emit(ev(EventType.RING_ASSIGNED))
        bus.emit(ev(EventType.RING_ASSIGNED))
    assert received == ["typed", "wild", "typed", "wild"]
    assert bus.handler_errors == 4
    assert bus.event_count == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    debugs = [r for r in caplog.records if r.levelno == logging.DEBUG]
    # The same handler object raising the same error type: one traceback, then debug lines.
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert "RuntimeError" in errors[0].getMessage()
    assert len(debugs) == 3


def test_each_failing_handler_and_error_type_gets_one_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A different handler, or a different exception type, is reported with a traceback again."""
    bus = HypervisorEventBus()
    errors: list[type[Exception]] = [ValueError, ValueError, KeyError]

    def flaky(event: HypervisorEvent) -> None:
        raise errors.pop(0)("x")

    def other(event: HypervisorEvent) -> None:
        raise ValueError("y")

    bus.subscribe(None, flaky)
    with caplog.at_level(logging.ERROR, logger="hypervisor.observability"):
        for _ in range(3):
            bus.emit(ev())
        bus.unsubscribe(None, flaky)
        bus.subscribe(None, other)
        bus.emit(ev())
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [
        ValueError,
        KeyError,
        ValueError,
    ]
    assert bus.handler_errors == 4


def test_base_exceptions_are_not_swallowed() -> None:
    """KeyboardInterrupt and friends still propagate: only Exception is isolated."""
    bus = HypervisorEventBus()

    def interrupt(event: HypervisorEvent) -> None:
        raise KeyboardInterrupt

    bus.subscribe(None, interrupt)
    with pytest.raises(KeyboardInterrupt):
        bus.emit(ev())
    assert bus.event_count == 1


def test_unsubscribe_removes_one_registration_and_reports_it() -> None:
    """unsubscribe() returns whether the handler was registered for that type."""
    bus = HypervisorEventBus()
    calls: list[int] = []

    def handler(event: HypervisorEvent) -> None:
        calls.append(1)

    bus.subscribe(EventType.RING_ASSIGNED, handler)
    bus.subscribe(EventType.RING_ASSIGNED, handler)
    bus.subscribe(None, handler)
    bus.emit(ev(EventType.RING_ASSIGNED))
    assert len(calls) == 3
    assert bus.unsubscribe(EventType.VFS_WRITE, handler) is False
    assert bus.unsubscribe(EventType.RING_ASSIGNED, handler) is True
    calls.clear()
    bus.emit(ev(EventType.RING_ASSIGNED))
    assert len(calls) == 2
    assert bus.unsubscribe(EventType.RING_ASSIGNED, handler) is True
    assert bus.unsubscribe(EventType.RING_ASSIGNED, handler) is False
    assert bus.unsubscribe(None, handler) is True
    assert bus.unsubscribe(None, handler) is False
    calls.clear()
    bus.emit(ev(EventType.RING_ASSIGNED))
    assert calls == []


def test_unsubscribe_bound_method_by_equality() -> None:
    """A bound method can be unsubscribed with a fresh reference to the same method."""

    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def on_event(self, event: HypervisorEvent) -> None:
            self.n += 1

    bus = HypervisorEventBus()
    counter = Counter()
    bus.subscribe(EventType.VFS_WRITE, counter.on_event)
    bus.emit(ev(EventType.VFS_WRITE))
    assert bus.unsubscribe(EventType.VFS_WRITE, counter.on_event) is True
    bus.emit(ev(EventType.VFS_WRITE))
    assert counter.n == 1


def test_handler_may_unsubscribe_itself_during_dispatch() -> None:
    """Changing subscriptions inside a handler affects later emits, not the one in progress."""
    bus = HypervisorEventBus()
    calls: list[str] = []

    def once(event: HypervisorEvent) -> None:
        calls.append("once")
        bus.unsubscribe(None, once)

    bus.subscribe(None, once)
    bus.subscribe(None, lambda e: calls.append("always"))
    bus.emit(ev())
    bus.emit(ev())
    assert calls == ["once", "always", "always"]


# -- re-entrancy and threads -------------------------------------------------------------------


def test_handler_may_emit_and_nested_event_is_stored_after_outer() -> None:
    """A re-entrant emit does not deadlock; the nested event follows the outer one."""
    bus = HypervisorEventBus()
    delivered: list[EventType] = []

    def escalate(event: HypervisorEvent) -> None:
        bus.emit(ev(EventType.RING_DEMOTED, agent=event.agent_did))

    bus.subscribe(EventType.RING_BREACH_DETECTED, escalate)
    bus.subscribe(None, lambda e: delivered.append(e.event_type))
    bus.emit(ev(EventType.RING_BREACH_DETECTED))
    assert [e.event_type for e in bus.all_events] == [
        EventType.RING_BREACH_DETECTED,
        EventType.RING_DEMOTED,
    ]
    # The nested event is delivered while the outer one's handlers are running.
    assert delivered == [EventType.RING_DEMOTED, EventType.RING_BREACH_DETECTED]


def test_concurrent_emit_from_threads_loses_nothing() -> None:
    """Threads emitting at once: each event stored once, indexes agree, per-thread order kept."""
    threads_n, per_thread = 4, 5000
    bus = HypervisorEventBus(max_events=None)
    counted: list[int] = [0]
    counted_lock = threading.Lock()

    def count(event: HypervisorEvent) -> None:
        with counted_lock:
            counted[0] += 1

    bus.subscribe(None, count)
    barrier = threading.Barrier(threads_n)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            bus.emit(ev(EventType.VFS_WRITE, f"thread{n}", f"agent{i % 7}", seq=i))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert bus.event_count == threads_n * per_thread
    assert counted[0] == threads_n * per_thread
    assert bus.type_counts() == {"vfs.write": threads_n * per_thread}
    for n in range(threads_n):
        mine = bus.query_by_session(f"thread{n}")
        assert [e.payload["seq"] for e in mine] == list(range(per_thread))
    assert sum(len(bus.query_by_agent(f"agent{k}")) for k in range(7)) == bus.event_count


def test_concurrent_queries_during_emits_are_consistent() -> None:
    """Readers running while writers evict always see indexes that agree with each other."""
    bus = HypervisorEventBus(max_events=500)
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            counts = bus.type_counts()
            if sum(counts.values()) > 500:
                problems.append(f"type_counts sum {sum(counts.values())}")
            for event in bus.query(session_id="s1", limit=20):
                if event.session_id != "s1":
                    problems.append("wrong session")

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in readers:
        thread.start()
    try:
        for i in range(20_000):
            bus.emit(ev(EventType.VFS_WRITE if i % 3 else EventType.RING_ASSIGNED, f"s{i % 4}"))
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert problems == []
    assert bus.event_count == 500


# -- flaw 2: eviction keeps indexes consistent; memory is bounded ------------------------------


def test_eviction_keeps_every_index_consistent_with_the_store() -> None:
    """After eviction, query_by_*, type_counts() and event_count describe the same events."""
    cap = 50
    bus = HypervisorEventBus(max_events=cap)
    types = [EventType.RING_ASSIGNED, EventType.VFS_WRITE, EventType.SAGA_CREATED]
    emitted = [ev(types[i % 3], f"s{i % 7}", f"a{i % 11}", i) for i in range(500)]
    for n, event in enumerate(emitted, start=1):
        bus.emit(event)
        kept = emitted[max(0, n - cap) : n]
        if n % 37 and n != len(emitted):
            continue
        assert bus.all_events == kept
        assert bus.event_count == len(kept) == sum(bus.type_counts().values())
        for t in types:
            assert bus.query_by_type(t) == [e for e in kept if e.event_type == t]
        for k in range(7):
            assert bus.query_by_session(f"s{k}") == [e for e in kept if e.session_id == f"s{k}"]
        for k in range(11):
            assert bus.query_by_agent(f"a{k}") == [e for e in kept if e.agent_did == f"a{k}"]
    assert bus.evicted_count == 500 - cap


def test_type_whose_events_are_all_evicted_disappears_from_type_counts() -> None:
    """type_counts() forgets a type once its last event is evicted (it agrees with the store)."""
    bus = HypervisorEventBus(max_events=2)
    bus.emit(ev(EventType.AGENT_KILLED))
    bus.emit(ev(EventType.VFS_WRITE))
    bus.emit(ev(EventType.VFS_WRITE))
    assert bus.type_counts() == {"vfs.write": 2}
    assert bus.query_by_type(EventType.AGENT_KILLED) == []
    assert bus.query(event_type=EventType.AGENT_KILLED) == []


def test_memory_stays_bounded_under_endless_unique_keys() -> None:
    """Emitting 10x the cap with fresh sessions and agents does not grow memory past the cap."""
    cap = 2000
    bus = HypervisorEventBus(max_events=cap)

    def fill(start: int, n: int) -> None:
        for i in range(start, start + n):
            bus.emit(ev(EventType.VFS_WRITE, f"session-{i}", f"agent-{i}", i))

    tracemalloc.start()
    try:
        fill(0, 2 * cap)
        steady = tracemalloc.get_traced_memory()[0]
        fill(2 * cap, 10 * cap)
        later = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert bus.event_count == cap
    assert len(bus.query_by_session("session-0")) == 0
    assert later < steady * 1.2


# -- flaw 3: limit validation, max_events validation --------------------------------------------


@pytest.mark.parametrize("limit", [0, -1, -100, True, False, 1.5, "3"])
def test_invalid_limit_is_rejected(limit: object) -> None:
    """limit must be None or an int >= 1: 0 no longer means everything, negatives are errors."""
    bus = HypervisorEventBus()
    bus.emit(ev())
    with pytest.raises(ValueError, match="limit"):
        bus.query(limit=limit)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        bus.query(session_id="s1", limit=limit)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_events", [0, -5, True, 2.5, "10"])
def test_invalid_max_events_is_rejected(max_events: object) -> None:
    """max_events must be None or an int >= 1."""
    with pytest.raises(ValueError, match="max_events"):
        HypervisorEventBus(max_events=max_events)  # type: ignore[arg-type]


def test_query_without_filters_and_limit_returns_newest_of_store() -> None:
    """query(limit=n) with no filter is the newest n events, oldest first, across wrap-around."""
    bus = HypervisorEventBus(max_events=10)
    events = [ev(seconds=i) for i in range(25)]
    for event in events:
        bus.emit(event)
    assert bus.query(limit=3) == events[-3:]
    assert bus.query(limit=50) == events[-10:]
    assert bus.query() == events[-10:]


# -- the store on its own --------------------------------------------------------------------


def test_store_extend_and_time_range_across_ring_wrap() -> None:
    """extend() appends in order; a time range spanning the ring's wrap point is contiguous."""
    store = EventStore(max_events=8)
    events = [ev(seconds=i) for i in range(13)]
    store.extend(events)
    assert len(store) == 8
    assert store.evicted == 5
    assert store.time_range(T0, T0 + timedelta(seconds=100)) == events[5:]
    assert store.time_range(T0 + timedelta(seconds=6), T0 + timedelta(seconds=9)) == events[6:10]
    store.clear()
    assert len(store) == 0
    assert store.all() == []


def test_store_late_events_are_evicted_from_the_side_index() -> None:
    """Late events that leave the ring no longer appear in time-range results."""
    store = EventStore(max_events=4)
    late = ev(seconds=-50)
    store.extend([ev(seconds=0), late, ev(seconds=1)])
    window = (T0 - timedelta(seconds=60), T0 - timedelta(seconds=40))
    assert store.time_range(*window) == [late]
    store.extend([ev(seconds=i) for i in range(2, 6)])
    assert store.time_range(*window) == []
    assert len(store.time_range(T0 - timedelta(days=1), T0 + timedelta(days=1))) == 4


def test_store_accepts_enum_values_as_plain_strings() -> None:
    """Filtering by a type's string value finds the same events as by the member."""
    store = EventStore()
    event = ev(EventType.RING_ELEVATED)
    store.append(event)
    assert store.query(event_type="ring.elevated") == [event]  # type: ignore[arg-type]
    assert store.by_type("ring.elevated") == [event]  # type: ignore[arg-type]


def _noop(event: HypervisorEvent) -> None:
    """A handler that ignores its event."""


@pytest.mark.parametrize("subscribe_first", [True, False])
def test_handlers_registered_for_str_value_receive_member_events(subscribe_first: bool) -> None:
    """Subscribing with a type's string value is the same as with the member."""
    bus = HypervisorEventBus()
    got: list[HypervisorEvent] = []
    handler: Callable[[HypervisorEvent], None] = got.append
    if subscribe_first:
        bus.subscribe("ring.assigned", handler)  # type: ignore[arg-type]
    else:
        bus.subscribe(EventType.RING_ASSIGNED, handler)
    bus.subscribe(EventType.VFS_WRITE, _noop)
    event = ev(EventType.RING_ASSIGNED)
    bus.emit(event)
    assert got == [event]


def test_emit_works_unbound_and_a_subclass_can_override_it() -> None:
    """emit stores and dispatches, also called unbound; a subclass's own emit is used."""
    seen: list[HypervisorEvent] = []

    class Counting(HypervisorEventBus):
        def emit(self, event: HypervisorEvent) -> None:
            seen.append(event)
            super().emit(event)

    plain = HypervisorEventBus()
    got: list[HypervisorEvent] = []
    plain.subscribe(EventType.VFS_WRITE, got.append)
    event = HypervisorEvent(event_type=EventType.VFS_WRITE)
    plain.emit(event)
    HypervisorEventBus.emit(plain, event)  # the documented method, unbound
    assert got == [event, event]
    assert plain.query_by_type(EventType.VFS_WRITE) == [event, event]
    counting = Counting()
    counting.emit(event)
    assert seen == [event]
    assert counting.event_count == 1


# -- staged emits --------------------------------------------------------------------------------


def test_every_read_sees_every_event_emitted_before_it() -> None:
    """emit() stages events and stores them in batches, invisibly: each read (counts, queries,
    from a handler too) sees every event emitted before it, the handler's own included."""
    bus = HypervisorEventBus(max_events=None)
    seen_by_handler: list[int] = []

    def check(event: HypervisorEvent) -> None:
        mine = bus.query_by_session(event.session_id or "")
        seen_by_handler.append(len(mine))
        assert mine[-1] is event

    bus.subscribe(EventType.RING_BREACH_DETECTED, check)
    for i in range(200):
        bus.emit(ev(EventType.VFS_WRITE, "s1", seconds=i))
        assert bus.event_count == i + 1
        assert bus.query(limit=1)[0].timestamp == T0 + timedelta(seconds=i)
        assert len(bus.all_events) == i + 1
    bus.emit(ev(EventType.RING_BREACH_DETECTED, "s1", seconds=300))
    assert seen_by_handler == [201]
    assert bus.type_counts() == {"vfs.write": 200, "ring.breach_detected": 1}


def test_bounded_bus_evicts_exactly_with_staged_emits() -> None:
    """The cap and the eviction count are exact whenever they are read."""
    bus = HypervisorEventBus(max_events=10)
    for i in range(1000):
        bus.emit(ev(EventType.VFS_WRITE, f"s{i % 3}", seconds=i))
        if i % 97 == 0:
            assert bus.event_count == min(i + 1, 10)
            assert bus.evicted_count == max(0, i + 1 - 10)
    assert [e.timestamp for e in bus.all_events] == [
        T0 + timedelta(seconds=i) for i in range(990, 1000)
    ]
    assert bus.evicted_count == 990
    assert sum(len(bus.query_by_session(f"s{k}")) for k in range(3)) == 10


def test_threads_staging_and_reading_at_once_lose_nothing() -> None:
    """With the interpreter switching threads as often as it can, writers staging events and
    readers moving them into the store at the same time keep every event, once, in each
    writer's order."""
    import sys

    threads_n, per_thread = 3, 4000
    bus = HypervisorEventBus(max_events=None)
    done = threading.Event()
    counts: list[int] = []

    def writer(n: int) -> None:
        for i in range(per_thread):
            bus.emit(ev(EventType.VFS_WRITE, f"w{n}", f"agent{i % 5}", seq=i))

    def reader() -> None:
        while not done.is_set():
            counts.append(bus.event_count)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        watcher = threading.Thread(target=reader)
        watcher.start()
        writers = [threading.Thread(target=writer, args=(n,)) for n in range(threads_n)]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        done.set()
        watcher.join()
    finally:
        sys.setswitchinterval(interval)
    assert bus.event_count == threads_n * per_thread
    assert counts == sorted(counts)  # the store only grows
    for n in range(threads_n):
        assert [e.payload["seq"] for e in bus.query_by_session(f"w{n}")] == list(range(per_thread))
    assert sum(len(bus.query_by_agent(f"agent{k}")) for k in range(5)) == bus.event_count


def test_an_unindexable_event_is_delivered_not_stored_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An event whose session is unhashable reaches the handlers but not the store: logged once
    (then at debug level), counted in rejected_count; the events around it are stored."""
    bus = HypervisorEventBus(max_events=3)
    delivered: list[HypervisorEvent] = []
    bus.subscribe(None, delivered.append)
    bad = HypervisorEvent(session_id=["not", "hashable"])  # type: ignore[arg-type]
    good = [ev(seconds=i) for i in range(4)]
    with caplog.at_level(logging.DEBUG, logger="hypervisor.observability"):
        bus.emit(good[0])
        bus.emit(bad)
        bus.emit(good[1])
        bus.emit(bad)
        for event in good[2:]:
            bus.emit(event)
        assert bus.all_events == good[1:]
    assert delivered == [good[0], bad, good[1], bad, *good[2:]]
    assert bus.rejected_count == 2
    assert bus.evicted_count == 1
    assert bus.query_by_session("s1") == good[1:]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert bad.event_id in errors[0].getMessage()
    assert "must be hashable" in errors[0].getMessage()
