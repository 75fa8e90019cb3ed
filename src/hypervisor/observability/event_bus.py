"""Event types, the event record and the in-process event bus (the published module path).

Re-exports only: the in-process bus lives in the pure core (``_core/event_bus.py``).
"""

from hypervisor.observability._core.event_bus import (
    DEFAULT_MAX_EVENTS,
    EventHandler,
    EventType,
    HypervisorEvent,
    HypervisorEventBus,
)

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "EventHandler",
    "EventType",
    "HypervisorEvent",
    "HypervisorEventBus",
]
