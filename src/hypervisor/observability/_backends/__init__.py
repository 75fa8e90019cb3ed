"""The backend seam: the event log (``StreamLog``) and the workers' state store (``StateStore``).

``log`` and ``state`` define the protocols; ``memory_log`` and ``state`` hold the in-process
implementations; ``redis_log`` and ``redis_state`` the Redis ones, the only modules of the package
that import redis-py. ``RedisStreamLog`` is loaded on first use, so importing this package never
imports redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hypervisor.observability._backends.log import (
    MAX_ID,
    MIN_ID,
    ClaimResult,
    ConsumerPending,
    Entry,
    GroupInfo,
    LogError,
    LogGroupMissingError,
    LogUnavailableError,
    PendingSummary,
    StreamInfo,
    StreamLog,
    TrimPolicy,
    format_id,
    next_id,
    parse_id,
    previous_id,
    trimmed_before_first,
)

if TYPE_CHECKING:
    from hypervisor.observability._backends.memory_log import MemoryStreamLog
    from hypervisor.observability._backends.redis_log import RedisStreamLog

__all__ = [
    "MAX_ID",
    "MIN_ID",
    "ClaimResult",
    "ConsumerPending",
    "Entry",
    "GroupInfo",
    "LogError",
    "LogGroupMissingError",
    "LogUnavailableError",
    "MemoryStreamLog",
    "PendingSummary",
    "RedisStreamLog",
    "StreamInfo",
    "StreamLog",
    "TrimPolicy",
    "format_id",
    "next_id",
    "parse_id",
    "previous_id",
    "trimmed_before_first",
]


def __getattr__(name: str) -> Any:
    if name == "MemoryStreamLog":
        from hypervisor.observability._backends.memory_log import MemoryStreamLog

        return MemoryStreamLog
    if name == "RedisStreamLog":
        from hypervisor.observability._backends.redis_log import RedisStreamLog

        return RedisStreamLog
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
