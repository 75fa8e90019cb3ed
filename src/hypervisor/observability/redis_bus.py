"""The asynchronous event bus on a shared Redis Streams log.

Re-exports only: the bus, its writer and its reader live in ``_bus/``; ``run_until_signal``
(drain the buses on SIGTERM/SIGINT) in ``_bus/shutdown.py``.
"""

from hypervisor.observability._bus.bus import (
    DEFAULT_STREAM,
    IndexLag,
    RedisEventBus,
    TrimPolicy,
)
from hypervisor.observability._bus.shutdown import run_until_signal

__all__ = [
    "DEFAULT_STREAM",
    "IndexLag",
    "RedisEventBus",
    "TrimPolicy",
    "run_until_signal",
]
