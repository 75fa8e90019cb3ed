"""The in-process event bus (the published module path ``hypervisor.observability.event_bus``).

``HypervisorEventBus`` keeps the published synchronous API on top of the pure core: a bounded,
indexed :class:`~hypervisor.observability._core.store.EventStore` behind a lock, and isolated
handler dispatch outside it.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from hypervisor.observability._core.dispatch import Dispatcher
from hypervisor.observability._core.events import EventHandler, EventType, HypervisorEvent
from hypervisor.observability._core.store import DEFAULT_MAX_EVENTS, EventStore

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "EventHandler",
    "EventType",
    "HypervisorEvent",
    "HypervisorEventBus",
]


class HypervisorEventBus:
    """Append-only, bounded, indexed event store with publish/subscribe, in one process.

    Thread-safe: the store is guarded by a lock and handlers run outside it, so a handler may
    emit (its event is stored after the one it reacts to) or query the bus. A
    handler that raises is logged and counted in :attr:`handler_errors`; it never reaches the
    emitter nor stops delivery to the other handlers.

    Args:
        max_events: how many events to keep (the oldest are evicted first); ``None`` keeps all.

    Raises:
        ValueError: ``max_events`` is neither ``None`` nor an int >= 1.
    """

    def __init__(self, max_events: int | None = DEFAULT_MAX_EVENTS) -> None:
        self._store = EventStore(max_events)
        self._dispatcher = Dispatcher()
        # A plain lock: nothing re-enters it (handlers run after it is released, and the store
        # never calls back into the bus), and it is cheaper than an RLock on every emit.
        self._lock = threading.Lock()
        if type(self).emit is HypervisorEventBus.emit:
            # emit is the hot path: this instance's emit is the same code as a closure over
            # the lock's bound calls, the store's append and the dispatcher (tens of ns less per
            # event than reading them from self). A subclass overriding emit keeps its own.
            setattr(self, "emit", _fast_emit(self._lock, self._store, self._dispatcher))  # noqa: B010

    def emit(self, event: HypervisorEvent) -> None:
        """Store ``event``, then call the handlers of its type and then the wildcard handlers."""
        # (Instances use the equivalent closure from _fast_emit.)
        lock = self._lock
        lock.acquire()
        try:
            self._store.append(event)
        finally:
            lock.release()
        self._dispatcher.dispatch(event)

    def subscribe(
        self,
        event_type: EventType | None = None,
        handler: EventHandler | None = None,
    ) -> None:
        """Call ``handler`` for each event of ``event_type`` (every event when ``None``).

        A ``None`` handler is ignored, as published.
        """
        if handler is None:
            return
        self._dispatcher.subscribe(event_type, handler)

    def unsubscribe(self, event_type: EventType | None, handler: EventHandler) -> bool:
        """Remove one registration of ``handler`` for ``event_type``.

        Returns:
            Whether it was registered.
        """
        return self._dispatcher.unsubscribe(event_type, handler)

    @property
    def handler_errors(self) -> int:
        """How many handler calls raised since the bus was created."""
        return self._dispatcher.handler_errors

    @property
    def evicted_count(self) -> int:
        """How many events were evicted to respect ``max_events``."""
        with self._lock:
            return self._store.evicted

    @property
    def max_events(self) -> int | None:
        """The capacity, ``None`` when unbounded."""
        return self._store.max_events

    def query_by_type(self, event_type: EventType) -> list[HypervisorEvent]:
        """The stored events of ``event_type``, oldest first."""
        with self._lock:
            return self._store.by_type(event_type)

    def query_by_session(self, session_id: str) -> list[HypervisorEvent]:
        """The stored events of ``session_id``, oldest first."""
        with self._lock:
            return self._store.by_session(session_id)

    def query_by_agent(self, agent_did: str) -> list[HypervisorEvent]:
        """The stored events involving ``agent_did``, oldest first."""
        with self._lock:
            return self._store.by_agent(agent_did)

    def query_by_time_range(
        self,
        start: datetime,
        end: datetime | None = None,
    ) -> list[HypervisorEvent]:
        """The stored events with ``start <= timestamp <= end``, in emit order.

        Args:
            start: aware datetime, inclusive.
            end: aware datetime, inclusive; defaults to now.

        Raises:
            ValueError: ``start`` or ``end`` is naive.
        """
        if end is None:
            end = datetime.now(UTC)
        with self._lock:
            return self._store.time_range(start, end)

    def query(
        self,
        event_type: EventType | None = None,
        session_id: str | None = None,
        agent_did: str | None = None,
        limit: int | None = None,
    ) -> list[HypervisorEvent]:
        """The stored events matching all given filters, oldest first.

        Args:
            event_type: keep only this type.
            session_id: keep only this session.
            agent_did: keep only this agent.
            limit: keep only the newest ``limit`` matches (an int >= 1, or ``None`` for all).

        Raises:
            ValueError: ``limit`` is not ``None`` nor an int >= 1 (the published module returned
                everything for ``limit=0``).
        """
        with self._lock:
            return self._store.query(event_type, session_id, agent_did, limit)

    @property
    def event_count(self) -> int:
        """How many events are stored."""
        with self._lock:
            return len(self._store)

    @property
    def all_events(self) -> list[HypervisorEvent]:
        """A copy of the stored events, oldest first."""
        with self._lock:
            return self._store.all()

    def type_counts(self) -> dict[str, int]:
        """Stored events per type, keyed by the type's string value (``"ring.assigned"``)."""
        with self._lock:
            return self._store.type_counts()

    def _clear(self) -> None:
        """Drop every stored event and keep the subscribers. For tests only."""
        with self._lock:
            self._store.clear()


def _fast_emit(lock: threading.Lock, store: EventStore, dispatcher: Dispatcher) -> EventHandler:
    """``HypervisorEventBus.emit`` for one bus, with everything it uses bound once."""
    acquire = lock.acquire
    release = lock.release
    append = store.append
    handler_failed = dispatcher.handler_failed

    def emit(event: HypervisorEvent) -> None:
        """Store ``event``, then call the handlers of its type and then the wildcard handlers."""
        acquire()
        try:
            append(event)
        finally:
            release()
        # Dispatcher.dispatch inlined: routes is read on every call (it is replaced, not
        # mutated, when subscriptions change).
        for handler in dispatcher.routes.get(event.event_type, dispatcher.wildcard):
            try:
                handler(event)
            except Exception as exc:
                handler_failed(handler, event, exc)

    return emit
