"""Handler registry and isolated dispatch, shared by the in-process and the async buses.

Handlers are kept as immutable tuples (copy on write), one per event type plus the wildcard
tuple, and each type's tuple is stored pre-joined with the wildcard handlers, so dispatching an
event is one dict lookup and a loop, with no lock and no snapshot. A handler that raises is
logged and counted; the emitter and the other handlers never notice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable

from hypervisor.observability._core.events import EventHandler, EventType, HypervisorEvent

__all__ = ["Dispatcher", "logger"]

logger = logging.getLogger("hypervisor.observability")
"""The package logger; handler failures are reported here."""

_Handlers = tuple[EventHandler, ...]


class Dispatcher:
    """Subscribers by event type (``None`` = every event) and the loop that calls them.

    Registration is serialised by an internal lock and replaces tuples instead of mutating them,
    so :meth:`dispatch` may run concurrently from any number of threads without locking.
    """

    __slots__ = ("_errors", "_lock", "_reported", "_typed", "routes", "wildcard")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._typed: dict[Hashable, _Handlers] = {}
        self.wildcard: _Handlers = ()
        """The handlers of every event (read-only; replaced, never mutated)."""
        self.routes: dict[Hashable, _Handlers] = {}
        """Per subscribed type, its handlers followed by the wildcard ones, in call order.

        Read-only and replaced as a whole on every change, so a reader needs no lock; a type
        absent from it gets :attr:`wildcard`.
        """
        self._errors = 0
        self._reported: set[tuple[int, type[BaseException]]] = set()

    @property
    def handler_errors(self) -> int:
        """How many handler calls raised since creation."""
        return self._errors

    def _rebuild(self) -> None:
        wildcard = self.wildcard
        self.routes = {key: handlers + wildcard for key, handlers in self._typed.items()}

    def subscribe(self, event_type: EventType | None, handler: EventHandler) -> None:
        """Call ``handler`` for every event of ``event_type`` (every event when ``None``).

        A handler subscribed twice is called twice.
        """
        with self._lock:
            if event_type is None:
                self.wildcard = (*self.wildcard, handler)
            else:
                self._typed[event_type] = (*self._typed.get(event_type, ()), handler)
            self._rebuild()

    def unsubscribe(self, event_type: EventType | None, handler: EventHandler) -> bool:
        """Remove one registration of ``handler`` for ``event_type``.

        Returns:
            Whether ``handler`` was registered for ``event_type`` (and is now removed once).
        """
        with self._lock:
            current = self.wildcard if event_type is None else self._typed.get(event_type, ())
            position = next((i for i, h in enumerate(current) if h == handler), -1)
            if position < 0:
                return False
            remaining = current[:position] + current[position + 1 :]
            if event_type is None:
                self.wildcard = remaining
            elif remaining:
                self._typed[event_type] = remaining
            else:
                del self._typed[event_type]
            self._rebuild()
            return True

    def handlers_for(self, event_type: EventType) -> _Handlers:
        """The handlers an event of ``event_type`` is delivered to, in call order."""
        return self.routes.get(event_type, self.wildcard)

    @property
    def has_handlers(self) -> bool:
        """Whether any handler is registered."""
        return bool(self.routes or self.wildcard)

    def dispatch(self, event: HypervisorEvent) -> None:
        """Call the type's handlers in registration order, then the wildcard handlers.

        Never raises because of a handler (``Exception`` subclasses are caught, logged and
        counted in :attr:`handler_errors`).
        """
        for handler in self.routes.get(event.event_type, self.wildcard):
            try:
                handler(event)
            except Exception as exc:
                self.handler_failed(handler, event, exc)

    def handler_failed(self, handler: EventHandler, event: HypervisorEvent, exc: Exception) -> None:
        """Count and log a handler failure (with a traceback once per handler and error type)."""
        with self._lock:
            self._errors += 1
            # By id, not by the handler itself, so the log memory keeps no handler alive (the
            # registered object is the one called, so its id is stable while it is subscribed).
            report_key = (id(handler), type(exc))
            first = report_key not in self._reported
            if first:
                self._reported.add(report_key)
        if first:
            logger.error(
                "event handler %r raised %s on %s event %s; further %s from it are logged at "
                "debug level",
                handler,
                type(exc).__name__,
                _type_name(event),
                event.event_id,
                type(exc).__name__,
                exc_info=exc,
            )
        else:
            logger.debug(
                "event handler %r raised %s on %s event %s: %s",
                handler,
                type(exc).__name__,
                _type_name(event),
                event.event_id,
                exc,
            )


def _type_name(event: HypervisorEvent) -> str:
    event_type = event.event_type
    return event_type.value if isinstance(event_type, EventType) else str(event_type)
