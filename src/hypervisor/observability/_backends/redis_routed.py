"""Partition logs on Redis, a single server or a cluster: each partition on its slot's node.

Each partition log is a :class:`RoutedStreamLog`: a ``RedisStreamLog`` on the node that serves
the partition's hash slot, made on first use. On a single Redis that node is the URL's; on a
cluster it comes from the :class:`SlotMap` (``CLUSTER SLOTS``, read from any node known), and
every command and pipeline is a plain one to that node (redis-py's cluster pipeline costs about
8 µs more CPU per command, measured by ``scripts/bench_cluster.py``). A reply that says the
slot moved or the cluster is in transition (``MOVED``, ``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``)
or a node that stopped answering marks the slot map stale and raises the retryable
``LogUnavailableError``: the caller's retry (the bus's backoff and deadline) then finds the
slot's owner anew. The bus's appends do not go through these logs but through one pipeline
per node (:mod:`~hypervisor.observability._backends.redis_partitions`), which tells each
partition's log what it appended (:meth:`RoutedStreamLog.appended`) for its retention.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Self, TypeVar
from urllib.parse import urlsplit

import redis.exceptions as rexc

from hypervisor.observability._backends.log import (
    ClaimResult,
    DurabilityOffer,
    DurableWait,
    Entry,
    GroupInfo,
    GroupPosition,
    LogError,
    LogUnavailableError,
    PendingSummary,
    StreamInfo,
    TrimPolicy,
)
from hypervisor.observability._backends.redis_cluster import (
    detect_cluster,
    node_command,
    node_url,
    parse_cluster_slots,
)
from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._util.aio import AsyncResource
from hypervisor.observability._util.cli import redis_location

__all__ = ["RoutedStreamLog", "SlotMap"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

_REFRESH_MIN_S: Final = 0.05
"""The shortest interval between two slot map reads (a failover marks every partition of the
dead master stale at once: one read serves them all)."""


class SlotMap:
    """Which node serves each hash slot: the URL's node on a single Redis, the cluster's slot
    map (``CLUSTER SLOTS``) on a cluster, re-read after :meth:`mark_stale`.

    Args:
        url: the URL of one node (credentials included; never logged).
        connect_timeout_s: the timeout of a detection or slot map request.
        options: more client options (TLS files, ...).
    """

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0, **options: Any) -> None:
        self.url = url
        self.cluster: bool | None = None
        self._timeout_s = connect_timeout_s
        self._options = options
        # Sorted (first, last, host, port) ranges of the masters; None until read.
        self._ranges: list[tuple[int, int, str, int]] | None = None
        self._known: list[tuple[str, int]] = []
        self._stale = False
        self._read_at = 0.0
        self._lock = asyncio.Lock()
        self.refreshes = 0
        """How many times the slot map was read."""

    async def detect(self) -> bool:
        """Ask the URL's node whether it runs in cluster mode (once)."""
        if self.cluster is None:
            self.cluster = await detect_cluster(
                self.url, connect_timeout_s=self._timeout_s, **self._options
            )
        return self.cluster

    def mark_stale(self) -> None:
        """The slot map may be wrong (a redirection, a node down): read it before next use."""
        self._stale = True

    async def node_url(self, slot: int) -> str:
        """The URL of the node that serves ``slot`` now.

        Raises:
            LogUnavailableError: no node answered, or no node serves the slot (retryable).
        """
        if not await self.detect():
            return self.url
        if self._ranges is None or self._stale:
            await self._refresh()
        assert self._ranges is not None
        for first, last, host, port in self._ranges:
            if first <= slot <= last:
                return node_url(self.url, host, port)
        self._stale = True
        raise LogUnavailableError(f"redis cluster: no node serves slot {slot} now")

    async def _refresh(self) -> None:
        async with self._lock:
            if self._ranges is not None and not self._stale:
                return  # another partition read it meanwhile
            wait = self._read_at + _REFRESH_MIN_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._read_at = time.monotonic()
            self._stale = False
            seed = urlsplit(self.url)
            candidates = [*self._known, (seed.hostname or "127.0.0.1", seed.port or 6379)]
            last_error: Exception | None = None
            for host, port in dict.fromkeys(candidates):
                try:
                    raw = await self._slots_of(host, port)
                except LogError as exc:
                    last_error = exc
                    continue
                ranges, known = parse_cluster_slots(raw, host)
                if ranges:
                    self._ranges = ranges
                    self._known = known
                    self.refreshes += 1
                    return
            self._stale = True
            raise LogUnavailableError(
                f"redis cluster: no node answered CLUSTER SLOTS ({last_error})"
            )

    async def _slots_of(self, host: str, port: int) -> Any:
        return await node_command(
            node_url(self.url, host, port),
            "CLUSTER",
            "SLOTS",
            what="cluster slot map",
            command="cluster|slots",
            timeout_s=self._timeout_s,
            **self._options,
        )


# What says "the slot is elsewhere now, or the cluster is changing": retry after re-reading.
_REDIRECTS = (rexc.AskError, rexc.TryAgainError, rexc.ClusterError)
_REDIRECT_WORDS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")


def _redirected(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, _REDIRECTS):
            return True
        if any(word in str(seen) for word in _REDIRECT_WORDS) and isinstance(
            seen, rexc.ResponseError
        ):
            return True
        seen = seen.__cause__
    return False


class RoutedStreamLog(AsyncResource):
    """A ``StreamLog`` on one partition's stream key, on whichever node serves its slot.

    Each call goes to a ``RedisStreamLog`` on the slot's node (made when the node changes). A
    redirection or a node that stopped answering marks the slot map stale and raises the
    retryable ``LogUnavailableError`` (its ``LogOutcomeUnknownError`` form when an append's
    reply was lost): callers retry as for any transient error.

    Args:
        slots: the slot map, shared by the partitions of a stream.
        key: the partition's stream key.
        slot: its hash slot.
        make_log: makes the ``RedisStreamLog`` of a node's URL.
    """

    def __init__(
        self, slots: SlotMap, key: str, slot: int, make_log: Callable[[str], RedisStreamLog]
    ) -> None:
        self._slots = slots
        self._name = key
        self._slot = slot
        self._make_log = make_log
        self._inner: RedisStreamLog | None = None
        self._inner_url = ""
        self._retired: list[RedisStreamLog] = []
        self._closed = False

    @property
    def name(self) -> str:
        """The partition's stream key."""
        return self._name

    @property
    def slot(self) -> int:
        """The partition's hash slot."""
        return self._slot

    @property
    def node(self) -> str:
        """``host:port`` of the node used last (empty before the first call)."""
        return redis_location(self._inner_url) if self._inner_url else ""

    async def _log(self) -> RedisStreamLog:
        if self._closed:
            raise LogError(f"{self._name}: the log is closed")
        url = await self._slots.node_url(self._slot)
        inner = self._inner
        if inner is None or url != self._inner_url:
            if inner is not None:
                # Calls in flight on it (a blocked read) end with an error and are retried;
                # it is closed with the log.
                self._retired.append(inner)
            inner = self._inner = self._make_log(url)
            self._inner_url = url
        return inner

    async def _run(self, call: Callable[[RedisStreamLog], Awaitable[T]]) -> T:
        log = await self._log()
        try:
            return await call(log)
        except LogUnavailableError:
            self._slots.mark_stale()
            raise
        except LogError as exc:
            if not _redirected(exc):
                raise
            self._slots.mark_stale()
            raise LogUnavailableError(
                f"{self._name}: slot {self._slot} moved or the cluster is changing: {exc}"
            ) from exc

    async def append_many(
        self, entries: list[bytes], durable: DurableWait | None = None
    ) -> list[str]:
        """See ``StreamLog.append_many`` (a redirection's reply means nothing was stored)."""
        return await self._run(lambda log: log.append_many(entries, durable))

    async def appended(self, count: int) -> None:
        """Count ``count`` entries another client appended to this partition's stream (the
        node's pipeline): the automatic trim runs when it is due (``RedisStreamLog.appended``);
        the append succeeded, so a failure to reach the node only skips it."""
        try:
            log = await self._log()
        except LogError as exc:
            _log.warning("retention of %r skipped: %s", self._name, exc)
            return
        await log.appended(count)

    async def read(self, after_id: str, count: int, block_s: float | None = None) -> list[Entry]:
        """See ``StreamLog.read``."""
        return await self._run(lambda log: log.read(after_id, count, block_s))

    async def read_with_info(self, after_id: str, count: int) -> tuple[list[Entry], StreamInfo]:
        """See ``StreamLog.read_with_info``."""
        return await self._run(lambda log: log.read_with_info(after_id, count))

    async def stream_info(self) -> StreamInfo:
        """See ``StreamLog.stream_info``."""
        return await self._run(lambda log: log.stream_info())

    async def head_id(self) -> str:
        """See ``StreamLog.head_id``."""
        return await self._run(lambda log: log.head_id())

    async def first_id(self) -> str | None:
        """See ``StreamLog.first_id``."""
        return await self._run(lambda log: log.first_id())

    async def length(self) -> int:
        """See ``StreamLog.length``."""
        return await self._run(lambda log: log.length())

    async def id_from_end(self, n: int) -> str | None:
        """See ``StreamLog.id_from_end``."""
        return await self._run(lambda log: log.id_from_end(n))

    async def count_after(self, after_id: str, limit: int) -> int:
        """See ``StreamLog.count_after``."""
        return await self._run(lambda log: log.count_after(after_id, limit))

    async def ensure_group(self, group: str, start_id: str = "0") -> bool:
        """See ``StreamLog.ensure_group``."""
        return await self._run(lambda log: log.ensure_group(group, start_id))

    async def read_group(
        self,
        group: str,
        consumer: str,
        count: int,
        block_s: float | None = None,
        *,
        pending: bool = False,
    ) -> list[Entry]:
        """See ``StreamLog.read_group``."""
        return await self._run(
            lambda log: log.read_group(group, consumer, count, block_s, pending=pending)
        )

    async def ack(self, group: str, ids: list[str]) -> int:
        """See ``StreamLog.ack``."""
        return await self._run(lambda log: log.ack(group, ids))

    async def claim_idle(
        self,
        group: str,
        consumer: str,
        min_idle_s: float,
        count: int,
        start_id: str = "0-0",
    ) -> ClaimResult:
        """See ``StreamLog.claim_idle``."""
        return await self._run(
            lambda log: log.claim_idle(group, consumer, min_idle_s, count, start_id)
        )

    async def pending_summary(self, group: str) -> PendingSummary:
        """See ``StreamLog.pending_summary``."""
        return await self._run(lambda log: log.pending_summary(group))

    async def group_position(self, group: str) -> GroupPosition:
        """See ``StreamLog.group_position``."""
        return await self._run(lambda log: log.group_position(group))

    async def delivery_counts(self, group: str, ids: list[str]) -> dict[str, int]:
        """See ``StreamLog.delivery_counts``."""
        return await self._run(lambda log: log.delivery_counts(group, ids))

    async def group_info(self) -> list[GroupInfo]:
        """See ``StreamLog.group_info``."""
        return await self._run(lambda log: log.group_info())

    async def delete_consumer(self, group: str, consumer: str) -> int:
        """See ``StreamLog.delete_consumer``."""
        return await self._run(lambda log: log.delete_consumer(group, consumer))

    async def trim(self, policy: TrimPolicy) -> int:
        """See ``StreamLog.trim``."""
        return await self._run(lambda log: log.trim(policy))

    async def server_version(self) -> tuple[int, int, int]:
        """See ``StreamLog.server_version``."""
        return await self._run(lambda log: log.server_version())

    async def durability(self) -> DurabilityOffer:
        """See ``StreamLog.durability`` (of the partition's node)."""
        return await self._run(lambda log: log.durability())

    async def aclose(self) -> None:
        """Close the node logs this partition used. Idempotent."""
        self._closed = True
        logs = [*self._retired, *([self._inner] if self._inner is not None else [])]
        self._retired, self._inner = [], None
        await asyncio.gather(*(log.aclose() for log in logs), return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self
