"""What only the in-process bus has: its published names and constructor, ``_clear()``, handlers
that raise ``BaseException`` or emit re-entrantly, threads, staged emits, rejected events and
the store underneath it. What both buses promise (queries, time ranges, eviction, subscriptions,
handler isolation, limits, string-valued types) is tested on both in ``test_bus_contract.py``."""

from __future__ import annotations

import logging
import threading
import tracemalloc
from datetime import UTC, datetime, timedelta
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


# -- flaw 1: handler isolation -------------------------------------------------------------------


def test_base_exceptions_are_not_swallowed() -> None:
    """KeyboardInterrupt and friends still propagate: only Exception is isolated."""
    bus = HypervisorEventBus()

    def interrupt(event: HypervisorEvent) -> None:
        raise KeyboardInterrupt

    bus.subscribe(None, interrupt)
    with pytest.raises(KeyboardInterrupt):
        bus.emit(ev())
    assert bus.event_count == 1


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


# -- flaw 2: memory is bounded ------------------------------------------------------------------


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


# -- flaw 3: max_events validation --------------------------------------------------------------


@pytest.mark.parametrize("max_events", [0, -5, True, 2.5, "10"])
def test_invalid_max_events_is_rejected(max_events: object) -> None:
    """max_events must be None or an int >= 1."""
    with pytest.raises(ValueError, match="max_events"):
        HypervisorEventBus(max_events=max_events)  # type: ignore[arg-type]


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
