"""The in-process event bus, published as ``hypervisor.observability.event_bus``.

``HypervisorEventBus`` keeps the published synchronous API on top of the pure core: a bounded,
indexed :class:`~hypervisor.observability._core.store.EventStore` behind a lock, and isolated
handler dispatch outside it.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from hypervisor.observability._core.dispatch import Dispatcher
from hypervisor.observability._core.events import EventHandler, EventType, HypervisorEvent
from hypervisor.observability._core.store import DEFAULT_MAX_EVENTS, EventStore

# Events emit() stages before it moves them into the store in one batch (a read moves them at
# once): it bounds both the memory staged and the indexing a read may have to do first.
_STAGE_LIMIT = 64

_log = logging.getLogger("hypervisor.observability")

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
    emitter nor stops delivery to the other handlers. An event whose type, session or agent is
    not hashable (the published module stored it, half indexed, and raised from ``emit``) is
    delivered to the handlers but not stored: logged and counted in :attr:`rejected_count`.

    Args:
        max_events: how many events to keep (the oldest are evicted first); ``None`` keeps all.

    Raises:
        ValueError: ``max_events`` is neither ``None`` nor an int >= 1.
    """

    def __init__(self, max_events: int | None = DEFAULT_MAX_EVENTS) -> None:
        self._store = EventStore(max_events)
        self._dispatcher = Dispatcher()
        # A plain lock: nothing re-enters it (handlers run after it is released, and the store
        # never calls back into the bus), and it is cheaper than an RLock.
        self._lock = threading.Lock()
        # Emitted events not yet in the store, oldest first (see _stored).
        self._staged: list[HypervisorEvent] = []
        self._rejected = 0
        self._rejections_logged: set[type[BaseException]] = set()

    def emit(self, event: HypervisorEvent) -> None:
        """Store ``event``, then call the handlers of its type and then the wildcard handlers."""
        staged = self._staged
        staged.append(event)
        if len(staged) >= _STAGE_LIMIT:
            self._store_staged()
        self._dispatcher.dispatch(event)

    def _store_staged(self) -> None:
        """Move the staged events into the store, in emit order."""
        with self._lock:
            self._stored()

    def _stored(self) -> EventStore:
        """The store with every event emitted so far; call with the lock held.

        ``emit`` appends to the staging list without the lock (a list append is atomic), and
        the staged events enter the store in one batch: when :data:`_STAGE_LIMIT` are staged,
        and before any read. A batch costs less per event than one locked append each, and a
        read sees every event emitted before it, the one its handler is reacting to included.
        """
        staged = self._staged
        if staged:
            batch = staged[:]
            # Only what was copied: another thread may have staged more since.
            del staged[: len(batch)]
            self._store.extend(batch, self._reject)
        return self._store

    def _reject(self, event: HypervisorEvent, exc: Exception) -> None:
        """Count and log an event the store cannot index (called with the lock held)."""
        self._rejected += 1
        kind = type(exc)
        level = logging.DEBUG if kind in self._rejections_logged else logging.ERROR
        self._rejections_logged.add(kind)
        _log.log(
            level,
            "event %s (%r) not stored: its event_type, session_id and agent_did must be hashable"
            " (strings): %s",
            event.event_id,
            event.event_type,
            exc,
        )

    @property
    def rejected_count(self) -> int:
        """How many emitted events were not stored because they could not be indexed."""
        with self._lock:
            self._stored()
            return self._rejected

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
            return self._stored().evicted

    @property
    def max_events(self) -> int | None:
        """The capacity, ``None`` when unbounded."""
        return self._store.max_events

    def query_by_type(self, event_type: EventType) -> list[HypervisorEvent]:
        """The stored events of ``event_type``, oldest first."""
        with self._lock:
            return self._stored().by_type(event_type)

    def query_by_session(self, session_id: str) -> list[HypervisorEvent]:
        """The stored events of ``session_id``, oldest first."""
        with self._lock:
            return self._stored().by_session(session_id)

    def query_by_agent(self, agent_did: str) -> list[HypervisorEvent]:
        """The stored events involving ``agent_did``, oldest first."""
        with self._lock:
            return self._stored().by_agent(agent_did)

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
            return self._stored().time_range(start, end)

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
            limit: keep only the newest ``limit`` matches; ``None`` or ``0`` keeps all, and a
                negative ``-n`` all but the ``n`` oldest (the published ``matches[-limit:]``).

        Raises:
            TypeError: ``limit`` is not ``None`` nor an int (bools are refused).
        """
        with self._lock:
            return self._stored().query(event_type, session_id, agent_did, limit)

    @property
    def event_count(self) -> int:
        """How many events are stored."""
        with self._lock:
            return len(self._stored())

    @property
    def all_events(self) -> list[HypervisorEvent]:
        """A copy of the stored events, oldest first."""
        with self._lock:
            return self._stored().all()

    def type_counts(self) -> dict[str, int]:
        """Stored events per type, keyed by the type's string value (``"ring.assigned"``)."""
        with self._lock:
            return self._stored().type_counts()

    def _clear(self) -> None:
        """Drop every stored event and keep the subscribers. For tests only."""
        with self._lock:
            self._staged.clear()
            self._store.clear()
