"""The backend seam: ``StreamLog`` and its implementations.

``MemoryStreamLog`` lives in process; ``RedisStreamLog`` (in ``_log.redis``, the only module that
imports redis-py) is loaded on first use so importing this package never imports redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hypervisor.observability._log.base import (
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
    StreamLog,
    TrimPolicy,
    format_id,
    next_id,
    parse_id,
    previous_id,
)

if TYPE_CHECKING:
    from hypervisor.observability._log.memory import MemoryStreamLog
    from hypervisor.observability._log.redis import RedisStreamLog

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
    "StreamLog",
    "TrimPolicy",
    "format_id",
    "next_id",
    "parse_id",
    "previous_id",
]


def __getattr__(name: str) -> Any:
    if name == "MemoryStreamLog":
        from hypervisor.observability._log.memory import MemoryStreamLog

        return MemoryStreamLog
    if name == "RedisStreamLog":
        from hypervisor.observability._log.redis import RedisStreamLog

        return RedisStreamLog
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
