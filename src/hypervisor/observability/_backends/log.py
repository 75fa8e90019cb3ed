"""The backend seam: ``StreamLog``, an async append-only log of encoded entries.

A ``StreamLog`` holds opaque byte entries in append order, each with a Redis-style id
``"<ms>-<seq>"`` that increases strictly. Readers either tail the log after an id (``read``) or
share it through consumer groups (``read_group`` / ``ack`` / ``claim_idle``), with a pending
entries list (PEL) per group exactly as Redis Streams define it. Two implementations keep the same
contract: ``MemoryStreamLog`` (in process) and ``RedisStreamLog`` (Redis Streams); one contract
test suite runs against both.

Errors: a backend that cannot be reached raises ``LogUnavailableError`` (transient: the caller
may retry); an append whose request was sent but whose reply was lost raises its subclass
``LogOutcomeUnknownError`` (the entries may be stored: a retry may store them twice); every
other failure is a ``LogError``. Operations on a group that does not exist raise
``LogGroupMissingError`` (for Redis: the stream key or group vanished, e.g. after a flush). An
operation the backend refuses to this user (a Redis ACL) raises ``LogPermissionError``, which is
deliberately *not* a ``LogError``: retry loops catch ``LogError``, and a refusal must stop its
caller with its message instead of being retried forever. A connection the backend refuses for
good (credentials, database, TLS verification) raises ``LogPermanentError``: a ``LogError`` for
code that wraps every log failure, which every retry loop re-raises before its ``LogError``
branch.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import msgspec

from hypervisor.observability.errors import (
    LogDurabilityError,
    LogError,
    LogGroupMissingError,
    LogOutcomeUnknownError,
    LogPermissionError,
    LogUnavailableError,
)

__all__ = [
    "MAX_ID",
    "MIN_ID",
    "ClaimResult",
    "ConsumerPending",
    "DurabilityOffer",
    "DurableWait",
    "Entry",
    "GroupInfo",
    "LogDurabilityError",
    "LogError",
    "LogGroupMissingError",
    "LogOutcomeUnknownError",
    "LogPermissionError",
    "LogUnavailableError",
    "PendingSummary",
    "StreamInfo",
    "StreamLog",
    "TrimPolicy",
    "format_id",
    "next_id",
    "parse_id",
    "previous_id",
    "trimmed_before_first",
]

MIN_ID = "0-0"
"""An id lower than every entry id: ``read(MIN_ID)`` reads from the oldest retained entry."""
MAX_ID = f"{2**64 - 1}-{2**64 - 1}"
"""An id higher than every entry id."""


def parse_id(entry_id: str) -> tuple[int, int]:
    """Parse an entry id ``"<ms>-<seq>"`` (or a bare ``"<ms>"``) into a comparable tuple.

    Raises:
        ValueError: not an entry id.
    """
    ms, sep, seq = entry_id.partition("-")
    return int(ms), int(seq) if sep else 0


def format_id(ms: int, seq: int) -> str:
    """Format an id tuple as ``"<ms>-<seq>"``."""
    return f"{ms}-{seq}"


def previous_id(entry_id: str) -> str:
    """Return the largest id strictly smaller than ``entry_id`` (``"0-0"`` stays ``"0-0"``)."""
    ms, seq = parse_id(entry_id)
    if seq > 0:
        return format_id(ms, seq - 1)
    if ms > 0:
        return format_id(ms - 1, 2**64 - 1)
    return MIN_ID


def next_id(entry_id: str) -> str:
    """Return the smallest id strictly greater than ``entry_id``."""
    ms, seq = parse_id(entry_id)
    if seq == 2**64 - 1:
        return format_id(ms + 1, 0)
    return format_id(ms, seq + 1)


class Entry(msgspec.Struct, frozen=True, gc=False):
    """One log entry: its id and its bytes; ``data`` is ``None`` for an entry deleted while it
    was pending in a group (``read_group(pending=True)`` reports such ids with no body)."""

    id: str
    data: bytes | None


class ConsumerPending(msgspec.Struct, frozen=True):
    """Pending entries held by one consumer of a group."""

    name: str
    pending: int


class PendingSummary(msgspec.Struct, frozen=True):
    """A group's pending entries list, summarised.

    Attributes:
        count: entries delivered to some consumer and not yet acknowledged.
        oldest_id: the lowest pending id, or ``None`` when nothing is pending.
        newest_id: the highest pending id, or ``None``.
        oldest_idle_s: seconds since the oldest pending entry was last delivered (0.0 if none).
        consumers: pending count per consumer that holds any.
    """

    count: int
    oldest_id: str | None
    newest_id: str | None
    oldest_idle_s: float
    consumers: tuple[ConsumerPending, ...]


class GroupPosition(msgspec.Struct, frozen=True):
    """Where a consumer group is: what the watermark of an apply round is computed from.

    Attributes:
        last_delivered_id: the id of the last entry delivered to the group (``"0-0"``: none).
        oldest_pending_id: the lowest id delivered and not yet acknowledged (``None``: none),
            read after ``last_delivered_id``.
    """

    last_delivered_id: str
    oldest_pending_id: str | None


class GroupInfo(msgspec.Struct, frozen=True):
    """One consumer group of the log.

    Attributes:
        name: the group name.
        last_delivered_id: the id of the last entry delivered to the group (``"0-0"`` if none).
        pending: entries delivered and not yet acknowledged.
        lag: entries in the log after ``last_delivered_id`` (not yet delivered), or ``None``
            when the backend cannot tell (Redis after deletions inside the range).
        consumers: how many consumers the group has.
        entries_read: how many entries of the log's history (counted from its first append)
            come up to ``last_delivered_id``, or ``None`` when the backend does not know (Redis
            before 7.0; a group created at ``"0"`` that has read nothing yet).
    """

    name: str
    last_delivered_id: str
    pending: int
    lag: int | None
    consumers: int
    entries_read: int | None = None


class StreamInfo(msgspec.Struct, frozen=True):
    """The log's own counters, read at one instant (Redis ``XINFO STREAM``).

    Attributes:
        length: retained entries.
        head_id: the newest id ever appended (``"0-0"`` for a log never appended to).
        first_id: the oldest retained id, or ``None`` when nothing is retained.
        entries_added: entries ever appended, trimmed ones included, or ``None`` when the
            backend does not count them (Redis before 7.0).
        max_deleted_id: the highest id deleted from the middle of the log (``XDEL``); trimming
            from the front does not move it. ``"0-0"`` when nothing was, ``None`` when unknown.
    """

    length: int
    head_id: str
    first_id: str | None
    entries_added: int | None
    max_deleted_id: str | None


def trimmed_before_first(info: StreamInfo) -> int | None:
    """How many entries ever appended are no longer retained, or ``None`` when not exact.

    ``entries_added - length`` counts them exactly while no entry was deleted from the middle
    of the retained range (``max_deleted_id`` below the first retained id): every entry gone
    was then trimmed from the front.
    """
    if info.entries_added is None or info.max_deleted_id is None:
        return None
    if info.first_id is not None and parse_id(info.max_deleted_id) >= parse_id(info.first_id):
        return None
    return info.entries_added - info.length


class ClaimResult(msgspec.Struct, frozen=True):
    """What ``claim_idle`` moved to the claiming consumer.

    Attributes:
        next_start_id: where the next scan should start (``"0-0"`` when the scan wrapped).
        entries: the claimed entries, with their data, now owned by the claimer.
        deleted_ids: ids that were pending but are no longer in the log; they were removed from
            the PEL (Redis 7 does this itself), so the caller only records them.
    """

    next_start_id: str
    entries: list[Entry]
    deleted_ids: list[str]


class TrimPolicy(msgspec.Struct, frozen=True):
    """Retention: keep at most ``max_len`` entries and/or entries younger than ``max_age_s``.

    Trimming never removes an entry that any consumer group has not yet acknowledged (pending,
    or not yet delivered). ``None`` disables that bound. Trimming may be approximate (Redis
    ``~``): a few more entries than the bound can remain, unless ``approximate`` is false.
    """

    max_len: int | None = None
    max_age_s: float | None = None
    approximate: bool = True


class DurabilityOffer(msgspec.Struct, frozen=True):
    """What a log's server can confirm about a stored entry beyond its memory.

    Attributes:
        version: the server's version (``(0, 0, 0)`` for an in-process log).
        waitaof: it has ``WAITAOF`` (Redis 7.2 and later): an append can wait for its fsync.
        aof: its append-only file is on (``appendonly yes``), which ``WAITAOF`` needs.
        replicas: replicas connected to it now (an append can wait for them with ``WAIT``).
    """

    version: tuple[int, int, int]
    waitaof: bool
    aof: bool
    replicas: int

    @property
    def local_fsync(self) -> bool:
        """An append can wait for the fsync of the server's append-only file."""
        return self.waitaof and self.aof


class DurableWait(msgspec.Struct, frozen=True):
    """What ``append_many`` waits for after storing its entries, at most ``timeout_s`` each.

    Attributes:
        local: the fsync of the server's append-only file (``WAITAOF 1 0``).
        replicas: this many replicas received the entries (``WAIT``); 0 waits for none.
        timeout_s: the longest wait of each.
    """

    local: bool
    replicas: int
    timeout_s: float


@runtime_checkable
class StreamLog(Protocol):
    """An async append-only log of byte entries with consumer groups (Redis Streams semantics).

    Implementations are async context managers; ``aclose()`` releases connections and wakes
    blocked readers. Methods may be called concurrently from many tasks.
    """

    @property
    def name(self) -> str:
        """The log's name (the Redis stream key)."""
        ...

    async def append_many(
        self, entries: list[bytes], durable: DurableWait | None = None
    ) -> list[str]:
        """Append entries in order; return their ids once the backend has stored them all (and,
        with ``durable``, once what it names confirmed them).

        Ids are strictly increasing within the call and across calls of this log.

        Raises:
            LogOutcomeUnknownError: the request was sent and its reply lost (a timeout, a
                connection lost after sending): some prefix of the entries may have been
                stored (the call is not atomic); callers that retry accept at-least-once
                appends.
            LogUnavailableError: nothing was sent (the connection could not be made): none
                of the entries was stored.
            LogDurabilityError: the entries are stored, but ``durable``'s fsync or replicas did
                not confirm them within its timeout (or the log has neither).
        """
        ...

    async def read(self, after_id: str, count: int, block_s: float | None = None) -> list[Entry]:
        """Return up to ``count`` entries with ids greater than ``after_id``, oldest first.

        With ``block_s`` set and nothing to return, wait up to that long for new entries;
        ``None`` returns at once. Entries trimmed away are simply absent.
        """
        ...

    async def read_with_info(self, after_id: str, count: int) -> tuple[list[Entry], StreamInfo]:
        """Like ``read`` without blocking, with the log's counters taken right after the read.

        Both come from one instant where the backend allows it (in memory always; on Redis one
        pipelined round trip that the server runs back to back), so a reader can tell whether
        entries it never read were trimmed (``docs/redis-bus.md``, "Gaps"). With read
        permission only: no scripts, no writes.
        """
        ...

    async def stream_info(self) -> StreamInfo:
        """Return the log's counters (length, head, first retained id, entries ever added).

        With read permission only: no scripts, no writes.
        """
        ...

    async def head_id(self) -> str:
        """Return the id of the newest entry ever appended (``"0-0"`` for an empty log)."""
        ...

    async def first_id(self) -> str | None:
        """Return the id of the oldest retained entry, or ``None`` when the log is empty."""
        ...

    async def length(self) -> int:
        """Return the number of retained entries."""
        ...

    async def id_from_end(self, n: int) -> str | None:
        """Return the id of the ``n``-th newest retained entry (1 = the newest), or the oldest
        retained id when fewer are retained; ``None`` for an empty log (where a reader of the
        newest ``n`` entries starts). With read permission only: no scripts, no writes."""
        ...

    async def count_after(self, after_id: str, limit: int) -> int:
        """Return how many retained entries have ids greater than ``after_id``, at most ``limit``.

        How far a tailing reader is behind; with read permission only: no scripts, no writes.
        """
        ...

    async def ensure_group(self, group: str, start_id: str = "0") -> bool:
        """Create the consumer group if missing (and the log if it does not exist yet).

        ``start_id`` is the last-delivered id of a new group: ``"0"`` delivers everything
        retained, ``"$"`` only entries appended after creation. Returns whether it was created.
        """
        ...

    async def read_group(
        self,
        group: str,
        consumer: str,
        count: int,
        block_s: float | None = None,
        *,
        pending: bool = False,
    ) -> list[Entry]:
        """Deliver entries to ``consumer`` of ``group``.

        With ``pending=False``: up to ``count`` never-delivered entries (``>``), added to the
        consumer's PEL; blocks like ``read``. With ``pending=True``: the consumer's own pending
        entries from the start (never blocks), an entry deleted meanwhile having ``data=None``.

        Raises:
            LogGroupMissingError: the group or log does not exist.
        """
        ...

    async def ack(self, group: str, ids: list[str]) -> int:
        """Acknowledge entries of ``group``; return how many were pending."""
        ...

    async def claim_idle(
        self,
        group: str,
        consumer: str,
        min_idle_s: float,
        count: int,
        start_id: str = "0-0",
    ) -> ClaimResult:
        """Move up to ``count`` pending entries idle for ``min_idle_s`` or more to ``consumer``.

        Scans the PEL from ``start_id`` (XAUTOCLAIM); claimed entries count one more delivery.

        Raises:
            LogGroupMissingError: the group or log does not exist.
        """
        ...

    async def pending_summary(self, group: str) -> PendingSummary:
        """Summarise the group's pending entries list.

        Raises:
            LogGroupMissingError: the group or log does not exist.
        """
        ...

    async def group_position(self, group: str) -> GroupPosition:
        """Return the group's last delivered id and its lowest pending id, in one request.

        The last delivered id is read first: an entry delivered between the two reads is then
        above it and cannot be missed by the second.

        Raises:
            LogGroupMissingError: the group or log does not exist.
        """
        ...

    async def delivery_counts(self, group: str, ids: list[str]) -> dict[str, int]:
        """Return how many times each given pending id was delivered (ids not pending omitted)."""
        ...

    async def group_info(self) -> list[GroupInfo]:
        """Return every consumer group of the log (empty if the log does not exist)."""
        ...

    async def delete_consumer(self, group: str, consumer: str) -> int:
        """Remove a consumer from a group; return the pending entries it still held (now lost)."""
        ...

    async def trim(self, policy: TrimPolicy) -> int:
        """Apply retention without discarding entries any group has not acknowledged.

        Returns the number of entries removed.
        """
        ...

    async def server_version(self) -> tuple[int, int, int]:
        """Return the backend's version (Redis ``INFO server``; the emulated one in memory)."""
        ...

    async def durability(self) -> DurabilityOffer:
        """What an append can wait for on this backend (``append_many``'s ``durable``)."""
        ...

    async def aclose(self) -> None:
        """Release resources; blocked reads return or raise. Idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
