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

# `hvobs doctor` tells this file from agent-hypervisor's file of the same path by this line.
__distribution__ = "hypervisor-observability"

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "EventHandler",
    "EventType",
    "HypervisorEvent",
    "HypervisorEventBus",
]
