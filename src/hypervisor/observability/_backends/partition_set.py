"""The partition logs of a partitioned stream and their one-time preparation (no Redis here).

A :class:`PartitionSet` holds one ``StreamLog`` per partition of a
:class:`~hypervisor.observability._core.partition.PartitionLayout` and what must run once
before they are used (:meth:`PartitionSet.prepare`: on Redis, detecting a cluster and
ensuring the layout record, see :mod:`~hypervisor.observability._backends.redis_partitions`).
The bus writes each flush's partition groups with one :meth:`PartitionSet.append_groups` (by
default each group on its log, concurrently; on Redis one pipeline per node) and tails every
log it reads. :func:`memory_partitions` makes in-process ones for tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

from hypervisor.observability._backends.log import DurableWait, StreamLog, TrimPolicy
from hypervisor.observability._core.partition import PartitionLayout

__all__ = [
    "AppendGroups",
    "GroupOutcome",
    "PartitionSet",
    "memory_partitions",
    "partition_retention",
]

GroupOutcome = list[str] | Exception
"""A partition group's append: its ids, or the error its ``append_many`` would have raised."""

AppendGroups = Callable[
    [Mapping[int, list[bytes]], DurableWait | None], Awaitable[dict[int, GroupOutcome]]
]
"""``append(groups, durable)``: a partition set's own way to append groups (one call)."""


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
        close: run by :meth:`aclose` after the logs are closed; ``None`` for nothing.
        append: how :meth:`append_groups` appends (Redis: one pipeline per node); ``None``
            appends each group on its log.
    """

    def __init__(
        self,
        layout: PartitionLayout,
        logs: Sequence[StreamLog],
        prepare: Callable[[], Awaitable[None]] | None = None,
        close: Callable[[], Awaitable[None]] | None = None,
        append: AppendGroups | None = None,
    ) -> None:
        if len(logs) != layout.partitions:
            raise ValueError(f"{len(logs)} logs for {layout.partitions} partitions")
        self.layout = layout
        self.logs: tuple[StreamLog, ...] = tuple(logs)
        self._prepare = prepare
        self._close = close
        self._append = append
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

    async def append_groups(
        self, groups: Mapping[int, list[bytes]], durable: DurableWait | None = None
    ) -> dict[int, GroupOutcome]:
        """Append each partition's group of entries (``{partition: entries}``, each in order)
        in one call; each group is stored or fails on its own.

        Returns:
            For every partition of ``groups``: the ids of its entries, or the error its log's
            ``append_many(entries, durable)`` would have raised (``LogOutcomeUnknownError``,
            ``LogUnavailableError``, ``LogDurabilityError``, another ``LogError`` or a
            ``LogPermissionError``), for the caller to retry or report per group.
        """
        if self._append is not None:
            return await self._append(groups, durable)

        async def one(part: int) -> tuple[int, GroupOutcome]:
            try:
                return part, await self.logs[part].append_many(groups[part], durable)
            except Exception as exc:
                return part, exc

        return dict(await asyncio.gather(*(one(part) for part in groups)))

    async def aclose(self) -> None:
        """Close every partition log (and what ``close`` closes)."""
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
