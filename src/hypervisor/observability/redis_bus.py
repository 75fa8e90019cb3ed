"""The asynchronous event bus on a shared Redis Streams log.

Re-exports only: the bus, its writer and its reader live in ``_bus/``.
"""

from hypervisor.observability._bus.bus import (
    DEFAULT_STREAM,
    IndexLag,
    RedisEventBus,
    TrimPolicy,
)

__all__ = [
    "DEFAULT_STREAM",
    "IndexLag",
    "RedisEventBus",
    "TrimPolicy",
]
