"""Helpers of ``RedisEventBus`` kept out of its module: retention arguments, the durable
wait a flush makes, and one partition reader's lag."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio

from hypervisor.observability._backends.log import (
    DurableWait,
    StreamLog,
    TrimPolicy,
    format_id,
    parse_id,
)
from hypervisor.observability._bus.queries import IndexLag
from hypervisor.observability._bus.reader import BusReader
from hypervisor.observability._bus.writer import BusWriter
from hypervisor.observability.errors import BusDurabilityError

__all__ = ["all_of", "durable_wait", "reader_lag", "retention_policy"]

T = TypeVar("T")


async def all_of(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``calls`` concurrently and return their results in order; the first to raise
    cancels the others (unlike ``asyncio.gather``, which leaves them running against logs a
    failed start is about to close), and its exception is raised as it is."""
    if len(calls) == 1:
        return [await calls[0]()]
    results: list[T | None] = [None] * len(calls)

    async def run(index: int) -> None:
        results[index] = await calls[index]()

    try:
        async with anyio.create_task_group() as group:
            for index in range(len(calls)):
                group.start_soon(run, index)
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    return results  # type: ignore[return-value]


_log = logging.getLogger("hypervisor.observability.redis_bus")


def retention_policy(
    max_len: int | None, max_age_s: float | None, retention: TrimPolicy | None
) -> TrimPolicy | None:
    """The retention of ``from_url``'s and ``in_memory``'s arguments (``None``: keep all).

    Raises:
        ValueError: both forms given, or a bound out of range.
    """
    if retention is not None:
        if max_len is not None or max_age_s is not None:
            raise ValueError("pass either retention or max_len/max_age_s, not both")
        return retention
    if max_len is None and max_age_s is None:
        return None
    if (max_len is not None and max_len < 1) or (max_age_s is not None and max_age_s <= 0):
        raise ValueError("max_len must be >= 1 and max_age_s > 0")
    return TrimPolicy(max_len=max_len, max_age_s=max_age_s)


async def reader_lag(reader: BusReader, limit: int) -> IndexLag:
    """How far one partition's reader is behind its log's head."""
    applied = format_id(*reader.last_applied)
    info = await reader.log.stream_info()
    head = info.head_id
    entries = await reader.log.count_after(applied, limit)
    trimmed = reader.pending_gap(info)
    behind = entries or trimmed
    seconds = max(0.0, (parse_id(head)[0] - reader.last_applied[0]) / 1000) if behind else 0.0
    return IndexLag(entries, seconds, head, applied, trimmed, reader.gap_entries)


async def durable_wait(
    writer: BusWriter, log: StreamLog, replicas: int, timeout_s: float
) -> DurableWait:
    """What each flush of a durable bus waits for, from what ``log``'s server offers (logged).

    Raises:
        BusDurabilityError: the server offers neither an fsync nor a connected replica.
    """
    offer = await writer.with_retry(log.durability)
    name = log.name
    server = f"redis {'.'.join(map(str, offer.version))}"
    if offer.version == (0, 0, 0):
        no_fsync = "an in-process log has no append-only file"
    elif not offer.waitaof:
        no_fsync = f"{server} has no WAITAOF (Redis 7.2 and later)"
    else:
        no_fsync = f"{server} has appendonly off"
    wait = DurableWait(
        local=offer.local_fsync,
        replicas=replicas if offer.replicas else 0,
        timeout_s=timeout_s,
    )
    if not wait.local and not wait.replicas:
        raise BusDurabilityError(
            f"{name}: durable=True, but there is nothing to wait for: {no_fsync}, and no "
            "replica is connected (WAIT). Turn appendonly on (Redis 7.2+), connect a "
            "replica, or drop durable=True"
        )
    waits = []
    if wait.local:
        waits.append(f"the append-only file's fsync ({server}, WAITAOF)")
    if wait.replicas:
        plural = "" if wait.replicas == 1 else "s"
        waits.append(f"{wait.replicas} replica{plural} (WAIT; {offer.replicas} connected now)")
    unawaited = "" if wait.local else f"; the fsync is not awaited: {no_fsync}"
    _log.info(
        "%s: durable: each flush waits for %s, at most %g s each%s",
        name,
        " and ".join(waits),
        wait.timeout_s,
        unawaited,
    )
    return wait
