"""The partition logs of a partitioned stream and their one-time preparation (no Redis here).

A :class:`PartitionSet` holds one ``StreamLog`` per partition of a
:class:`~hypervisor.observability._core.partition.PartitionLayout` and what must run once
before they are used (:meth:`PartitionSet.prepare`: on Redis, detecting a cluster and
ensuring the layout record, see :mod:`~hypervisor.observability._backends.redis_partitions`).
The bus writes each flush's partition groups to their logs concurrently and tails every log it
reads. :func:`memory_partitions` makes in-process ones for tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from hypervisor.observability._backends.log import StreamLog, TrimPolicy
from hypervisor.observability._core.partition import PartitionLayout

__all__ = ["PartitionSet", "memory_partitions", "partition_retention"]


def partition_retention(policy: TrimPolicy | None, partitions: int) -> TrimPolicy | None:
    """Each partition's retention: ``max_len`` bounds the whole stream, so each partition keeps
    ``ceil(max_len / partitions)``; ``max_age_s`` applies to each as it is."""
    if policy is None or policy.max_len is None or partitions == 1:
        return policy
    share = -(-policy.max_len // partitions)
    return TrimPolicy(max_len=share, max_age_s=policy.max_age_s, approximate=policy.approximate)


class PartitionSet:
    """The partition logs of one stream and their one-time preparation.

    Args:
        layout: the partition layout (routing and key names).
        logs: one log per partition, in partition order.
        prepare: run once before the logs are used (may raise ``LogUnavailableError``,
            retried by the caller, or ``PartitionLayoutError``); ``None`` for nothing.
    """

    def __init__(
        self,
        layout: PartitionLayout,
        logs: Sequence[StreamLog],
        prepare: Callable[[], Awaitable[None]] | None = None,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if len(logs) != layout.partitions:
            raise ValueError(f"{len(logs)} logs for {layout.partitions} partitions")
        self.layout = layout
        self.logs: tuple[StreamLog, ...] = tuple(logs)
        self._prepare = prepare
        self._close = close
        self.cluster = False
        """Whether the logs are on a Redis Cluster (known after :meth:`prepare`)."""

    async def prepare(self) -> None:
        """Detect the deployment and ensure the layout record (idempotent once it succeeded).

        Raises:
            PartitionLayoutError: another partition count is recorded for the stream.
            LogUnavailableError: Redis is unreachable for now (retryable).
        """
        if self._prepare is not None:
            await self._prepare()
            self._prepare = None

    async def aclose(self) -> None:
        """Close every partition log."""
        await asyncio.gather(*(log.aclose() for log in self.logs), return_exceptions=True)
        if self._close is not None:
            await self._close()


def memory_partitions(layout: PartitionLayout, retention: TrimPolicy | None = None) -> PartitionSet:
    """In-process partition logs (tests, demos), one ``MemoryStreamLog`` per partition key."""
    from hypervisor.observability._backends.memory_log import MemoryStreamLog

    share = partition_retention(retention, layout.partitions)
    logs = [
        MemoryStreamLog(layout.stream_key(i), retention=share) for i in range(layout.partitions)
    ]
    return PartitionSet(layout, logs)
