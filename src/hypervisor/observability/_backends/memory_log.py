"""``MemoryStreamLog``: the ``StreamLog`` contract in process, for tests, demos and single hosts.

Entries live in two parallel lists (id tuples and bytes) with a head offset, so appends and
trimming from the head are O(1) amortised and reads after an id are a binary search. Consumer
groups keep their pending entries list as an insertion-ordered dict: a new delivery always has a
larger id than anything already pending, so insertion order is id order.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Callable

import anyio

from hypervisor.observability._backends.log import (
    ClaimResult,
    ConsumerPending,
    DurabilityOffer,
    DurableWait,
    Entry,
    GroupInfo,
    GroupPosition,
    LogDurabilityError,
    LogError,
    LogGroupMissingError,
    PendingSummary,
    StreamInfo,
    TrimPolicy,
    format_id,
    parse_id,
)
from hypervisor.observability._util.aio import AsyncResource

__all__ = ["MemoryStreamLog"]

_IdTuple = tuple[int, int]


class _Pending:
    __slots__ = ("consumer", "delivered_at", "deliveries")

    def __init__(self, consumer: str, delivered_at: float) -> None:
        self.consumer = consumer
        self.delivered_at = delivered_at
        self.deliveries = 1


class _Group:
    __slots__ = ("consumers", "last_delivered", "pel")

    def __init__(self, last_delivered: _IdTuple) -> None:
        self.last_delivered = last_delivered
        self.pel: dict[_IdTuple, _Pending] = {}
        self.consumers: set[str] = set()


class MemoryStreamLog(AsyncResource):
    """An in-process ``StreamLog`` with Redis Streams semantics.

    Args:
        name: the log's name.
        retention: bounds applied after every append (never past unacknowledged entries).
        version: the server version it reports (lets tests exercise version-dependent paths).
        clock: seconds on a monotonic clock, for the idle time of pending entries.
        wall_clock: seconds since the epoch, for entry ids and age-based retention (as a
            Redis server's clock).
    """

    def __init__(
        self,
        name: str = "hvobs:events",
        *,
        retention: TrimPolicy | None = None,
        version: tuple[int, int, int] = (7, 0, 0),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._name = name
        self._retention = retention
        self._version = version
        self._clock = clock
        self._wall_clock = wall_clock
        self._ids: list[_IdTuple] = []
        self._data: list[bytes] = []
        self._start = 0
        self._last: _IdTuple = (0, 0)
        # Entries ever appended, and the newest id trimmed away: the counters a Redis 7 stream
        # keeps (entries-added; its first id moves past the trimmed ones).
        self._added = 0
        self._last_trimmed: _IdTuple = (0, 0)
        self._groups: dict[str, _Group] = {}
        # Created on first wait: an anyio.Event needs a running event loop.
        self._appended: anyio.Event | None = None
        self._closed = False
        self.trimmed = 0
        """Entries removed by retention so far."""

    @property
    def name(self) -> str:
        """The log's name."""
        return self._name

    async def aclose(self) -> None:
        """Close the log and wake blocked readers (they return empty)."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._appended is not None:
            self._appended.set()
            self._appended = None

    def _check_open(self) -> None:
        if self._closed:
            raise LogError(f"log {self._name!r} is closed")

    def _new_id(self) -> _IdTuple:
        ms = int(self._wall_clock() * 1000)
        last_ms, last_seq = self._last
        self._last = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        return self._last

    def _index_after(self, after: _IdTuple) -> int:
        return bisect_right(self._ids, after, lo=self._start)

    def _data_of(self, key: _IdTuple) -> bytes | None:
        index = bisect_right(self._ids, key, lo=self._start) - 1
        if index >= self._start and self._ids[index] == key:
            return self._data[index]
        return None

    async def append_many(
        self, entries: list[bytes], durable: DurableWait | None = None
    ) -> list[str]:
        """Append entries; see ``StreamLog.append_many``. Nothing here outlives the process:
        a ``durable`` wait for an fsync or a replica stores the entries and then raises
        ``LogDurabilityError``."""
        self._check_open()
        ids: list[str] = []
        for data in entries:
            key = self._new_id()
            self._ids.append(key)
            self._data.append(bytes(data))
            ids.append(format_id(*key))
        self._added += len(entries)
        if entries:
            self._wake()
            if self._retention is not None:
                self._apply(self._retention)
        await anyio.lowlevel.checkpoint()
        if durable is not None and (durable.local or durable.replicas):
            raise LogDurabilityError(
                f"append: the {len(entries)} entries are stored in this process only: an "
                "in-process log has no fsync and no replica to wait for"
            )
        return ids

    async def _wait_appended(self, block_s: float) -> None:
        if self._appended is None:
            self._appended = anyio.Event()
        event = self._appended
        with anyio.move_on_after(block_s):
            await event.wait()

    async def read(self, after_id: str, count: int, block_s: float | None = None) -> list[Entry]:
        """Read entries after an id; see ``StreamLog.read``."""
        self._check_open()
        after = parse_id(after_id)
        index = self._index_after(after)
        if index >= len(self._ids) and block_s is not None and block_s > 0:
            await self._wait_appended(block_s)
            if self._closed:
                return []
            index = self._index_after(after)
        else:
            await anyio.lowlevel.checkpoint()
        stop = min(len(self._ids), index + count)
        return [Entry(format_id(*self._ids[i]), self._data[i]) for i in range(index, stop)]

    def _info(self) -> StreamInfo:
        first = format_id(*self._ids[self._start]) if self._start < len(self._ids) else None
        return StreamInfo(
            length=len(self._ids) - self._start,
            head_id=format_id(*self._last),
            first_id=first,
            entries_added=self._added,
            max_deleted_id="0-0",
        )

    async def read_with_info(self, after_id: str, count: int) -> tuple[list[Entry], StreamInfo]:
        """Read without blocking, with the counters of the same instant; see
        ``StreamLog.read_with_info``."""
        entries = await self.read(after_id, count)
        return entries, self._info()

    async def stream_info(self) -> StreamInfo:
        """Return the log's counters; see ``StreamLog.stream_info``."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        return self._info()

    def _entries_read(self, last_delivered: _IdTuple) -> int | None:
        """Entries ever appended up to ``last_delivered`` (``None``: it lies among trimmed ids,
        whose count below it is not kept)."""
        removed = self._added - (len(self._ids) - self._start)
        if removed and last_delivered < self._last_trimmed:
            return 0 if last_delivered == (0, 0) else None
        return removed + self._index_after(last_delivered) - self._start

    async def head_id(self) -> str:
        """Return the newest id ever appended; see ``StreamLog.head_id``."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        return format_id(*self._last)

    async def first_id(self) -> str | None:
        """Return the oldest retained id; see ``StreamLog.first_id``."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        if self._start >= len(self._ids):
            return None
        return format_id(*self._ids[self._start])

    async def length(self) -> int:
        """Return the number of retained entries."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        return len(self._ids) - self._start

    async def id_from_end(self, n: int) -> str | None:
        """Return the ``n``-th newest id; see ``StreamLog.id_from_end``."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        if self._start >= len(self._ids):
            return None
        return format_id(*self._ids[max(self._start, len(self._ids) - max(1, n))])

    async def count_after(self, after_id: str, limit: int) -> int:
        """Count entries after an id; see ``StreamLog.count_after``."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        return min(limit, len(self._ids) - self._index_after(parse_id(after_id)))

    def _group(self, group: str) -> _Group:
        found = self._groups.get(group)
        if found is None:
            raise LogGroupMissingError(f"no group {group!r} on log {self._name!r}")
        return found

    async def ensure_group(self, group: str, start_id: str = "0") -> bool:
        """Create a group if missing; see ``StreamLog.ensure_group``."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        if group in self._groups:
            return False
        start = self._last if start_id == "$" else parse_id(start_id)
        self._groups[group] = _Group(start)
        return True

    async def read_group(
        self,
        group: str,
        consumer: str,
        count: int,
        block_s: float | None = None,
        *,
        pending: bool = False,
    ) -> list[Entry]:
        """Deliver entries to a consumer; see ``StreamLog.read_group``."""
        self._check_open()
        state = self._group(group)
        state.consumers.add(consumer)
        if pending:
            await anyio.lowlevel.checkpoint()
            now = self._clock()
            out: list[Entry] = []
            for key, item in state.pel.items():
                if item.consumer != consumer:
                    continue
                item.deliveries += 1
                item.delivered_at = now
                out.append(Entry(format_id(*key), self._data_of(key)))
                if len(out) >= count:
                    break
            return out
        index = self._index_after(state.last_delivered)
        if index >= len(self._ids) and block_s is not None and block_s > 0:
            await self._wait_appended(block_s)
            if self._closed:
                return []
            state = self._group(group)
            index = self._index_after(state.last_delivered)
        else:
            await anyio.lowlevel.checkpoint()
        stop = min(len(self._ids), index + count)
        now = self._clock()
        entries: list[Entry] = []
        for i in range(index, stop):
            key = self._ids[i]
            state.pel[key] = _Pending(consumer, now)
            entries.append(Entry(format_id(*key), self._data[i]))
        if stop > index:
            state.last_delivered = self._ids[stop - 1]
        return entries

    async def ack(self, group: str, ids: list[str]) -> int:
        """Acknowledge entries; see ``StreamLog.ack``."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        state = self._groups.get(group)
        if state is None:
            return 0
        removed = 0
        for entry_id in ids:
            if state.pel.pop(parse_id(entry_id), None) is not None:
                removed += 1
        return removed

    async def claim_idle(
        self,
        group: str,
        consumer: str,
        min_idle_s: float,
        count: int,
        start_id: str = "0-0",
    ) -> ClaimResult:
        """Claim idle pending entries; see ``StreamLog.claim_idle``."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        state = self._group(group)
        state.consumers.add(consumer)
        start = parse_id(start_id)
        now = self._clock()
        claimed: list[Entry] = []
        deleted: list[str] = []
        # Like XAUTOCLAIM: scan at most count * 10 PEL entries per call.
        scanned = 0
        next_start = (0, 0)
        for key in [k for k in state.pel if k >= start]:
            if len(claimed) + len(deleted) >= count or scanned >= count * 10:
                next_start = key
                break
            scanned += 1
            item = state.pel[key]
            if now - item.delivered_at < min_idle_s:
                continue
            data = self._data_of(key)
            if data is None:
                del state.pel[key]
                deleted.append(format_id(*key))
                continue
            item.consumer = consumer
            item.delivered_at = now
            item.deliveries += 1
            claimed.append(Entry(format_id(*key), data))
        return ClaimResult(format_id(*next_start), claimed, deleted)

    async def pending_summary(self, group: str) -> PendingSummary:
        """Summarise a group's PEL; see ``StreamLog.pending_summary``."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        state = self._group(group)
        if not state.pel:
            return PendingSummary(0, None, None, 0.0, ())
        keys = list(state.pel)
        per: dict[str, int] = {}
        for item in state.pel.values():
            per[item.consumer] = per.get(item.consumer, 0) + 1
        oldest = state.pel[keys[0]]
        return PendingSummary(
            count=len(keys),
            oldest_id=format_id(*keys[0]),
            newest_id=format_id(*keys[-1]),
            oldest_idle_s=max(0.0, self._clock() - oldest.delivered_at),
            consumers=tuple(ConsumerPending(name, n) for name, n in sorted(per.items())),
        )

    async def delivery_counts(self, group: str, ids: list[str]) -> dict[str, int]:
        """Return delivery counts of pending ids; see ``StreamLog.delivery_counts``."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        state = self._group(group)
        counts: dict[str, int] = {}
        for entry_id in ids:
            item = state.pel.get(parse_id(entry_id))
            if item is not None:
                counts[entry_id] = item.deliveries
        return counts

    async def group_position(self, group: str) -> GroupPosition:
        """Return the group's position; see ``StreamLog.group_position``."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        state = self._group(group)
        oldest = format_id(*min(state.pel)) if state.pel else None
        return GroupPosition(format_id(*state.last_delivered), oldest)

    async def group_info(self) -> list[GroupInfo]:
        """Describe every group; see ``StreamLog.group_info``."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        infos: list[GroupInfo] = []
        for name, state in self._groups.items():
            lag = len(self._ids) - self._index_after(state.last_delivered)
            infos.append(
                GroupInfo(
                    name=name,
                    last_delivered_id=format_id(*state.last_delivered),
                    pending=len(state.pel),
                    lag=lag,
                    consumers=len(state.consumers),
                    entries_read=self._entries_read(state.last_delivered),
                )
            )
        return infos

    async def delete_consumer(self, group: str, consumer: str) -> int:
        """Remove a consumer; see ``StreamLog.delete_consumer``."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        state = self._group(group)
        dropped = [k for k, item in state.pel.items() if item.consumer == consumer]
        for key in dropped:
            del state.pel[key]
        state.consumers.discard(consumer)
        return len(dropped)

    def _safe_index(self) -> int:
        """Index of the first entry some group still needs (pending or not yet delivered)."""
        safe = len(self._ids)
        for state in self._groups.values():
            if state.pel:
                safe = min(safe, bisect_right(self._ids, next(iter(state.pel)), self._start) - 1)
            safe = min(safe, self._index_after(state.last_delivered))
        return max(safe, self._start)

    def _apply(self, policy: TrimPolicy) -> int:
        cut = self._start
        if policy.max_len is not None:
            cut = max(cut, len(self._ids) - policy.max_len)
        if policy.max_age_s is not None:
            oldest_ms = int(self._wall_clock() * 1000) - int(policy.max_age_s * 1000)
            cut = max(cut, bisect_right(self._ids, (oldest_ms - 1, 2**64 - 1), lo=self._start))
        cut = min(cut, self._safe_index())
        removed = cut - self._start
        if removed <= 0:
            return 0
        self._last_trimmed = self._ids[cut - 1]
        for i in range(self._start, cut):
            self._data[i] = b""
        self._start = cut
        if self._start > 1024 and self._start * 2 > len(self._ids):
            del self._ids[: self._start]
            del self._data[: self._start]
            self._start = 0
        self.trimmed += removed
        return removed

    async def trim(self, policy: TrimPolicy) -> int:
        """Apply retention now; see ``StreamLog.trim`` (always exact here)."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        return self._apply(policy)

    async def server_version(self) -> tuple[int, int, int]:
        """Return the emulated server version."""
        await anyio.lowlevel.checkpoint()
        return self._version

    async def durability(self) -> DurabilityOffer:
        """Nothing to wait for: no fsync, no replica (version ``(0, 0, 0)``)."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        return DurabilityOffer(version=(0, 0, 0), waitaof=False, aof=False, replicas=0)
