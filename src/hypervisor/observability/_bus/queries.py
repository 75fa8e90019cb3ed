"""The read side of ``RedisEventBus``: queries, positions and pages of its local index, the
trace context an event carried, and the tailing reader's counters.

A mixin so the bus stays one class with one public surface; it holds no state of its own and
reads the ``_store`` and ``_reader`` the bus builds. Nothing here is on the emit path.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import msgspec

from hypervisor.observability._backends.log import format_id
from hypervisor.observability._bus.readers import ReaderGroup
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.store import EventPage, EventSlice, EventStore
from hypervisor.observability._core.trace_context import TraceContext

__all__ = ["BusQueries", "IndexLag"]


class IndexLag(msgspec.Struct, frozen=True):
    """How far the local index is behind the log.

    Attributes:
        entries: entries in the log after the last one applied (capped at the count limit).
        seconds: age difference between the log's head and the last applied entry (from ids).
        head_id: the log's newest id.
        applied_id: the newest id applied to the local index.
        trimmed: entries after ``applied_id`` that retention already removed: the reader will
            never read them (its next read counts them in ``gap_entries``). Exact on Redis 7
            and in memory; 0 on Redis 6.2, which does not count its entries.
        gap_entries: entries the reader has found trimmed before it read them, since start
            (the bus's :attr:`~BusQueries.gap_entries`).
        partitions: on a partitioned bus, each partition's lag (the fields above are then
            summed, or the newest head id and the oldest applied id); empty otherwise.
        partition_ids: the partition number of each of ``partitions``.
    """

    entries: int
    seconds: float
    head_id: str
    applied_id: str
    trimmed: int = 0
    gap_entries: int = 0
    partitions: tuple[IndexLag, ...] = ()
    partition_ids: tuple[int, ...] = ()


class BusQueries:
    """Mixin: the reads ``RedisEventBus`` answers from its local index and its reader."""

    _store: EventStore
    _reader: ReaderGroup

    # -- reading ------------------------------------------------------------------------------

    def trace_context(self, event: HypervisorEvent | str) -> TraceContext | None:
        """The W3C trace context ``event`` (or the event of that id) carried on the wire.

        ``None`` when it carried none (emitted outside an OpenTelemetry span, by a bus with
        ``trace_context=False``, or by an older release), when its context was invalid, or when
        this bus's reader has not read it or has forgotten it (it keeps the contexts of about as
        many events as its index holds). A subscriber may call it for the event it is given.
        """
        event_id = event if isinstance(event, str) else event.event_id
        return self._reader.contexts.get(event_id)

    @property
    def applied_id(self) -> str:
        """The newest log id applied to the local index."""
        return format_id(*self._reader.last_applied)

    # -- reader counters ----------------------------------------------------------------------

    @property
    def applied(self) -> int:
        """Events applied to the local index (decoded entries read from the log)."""
        return self._reader.applied

    @property
    def decode_errors(self) -> int:
        """Log entries that could not be decoded (skipped)."""
        return self._reader.decode_errors

    @property
    def oversized_entries(self) -> int:
        """Log entries longer than ``max_event_bytes`` (skipped without decoding)."""
        return self._reader.oversized_entries

    @property
    def deleted_entries(self) -> int:
        """Entries read without a body (deleted from the log)."""
        return self._reader.deleted_entries

    @property
    def duplicates(self) -> int:
        """Events the reader dropped as copies of one it applied shortly before."""
        return self._reader.duplicates

    @property
    def gap_entries(self) -> int:
        """Entries trimmed from the log before the reader read them (missing from the local
        index and never dispatched to subscribers; each gap is logged as a warning with its id
        range). See ``docs/redis-bus.md``, "Gaps"."""
        return self._reader.gap_entries

    @property
    def gaps(self) -> int:
        """How many times the reader found entries trimmed before it read them."""
        return self._reader.gaps

    @property
    def reader_errors(self) -> int:
        """Tailing reads that failed (the reader reconnected and resumed)."""
        return self._reader.reader_errors

    @property
    def reader_stale_s(self) -> float | None:
        """Seconds the tailing reader has been failing to read (``None`` while it reads): the
        local index is that stale, at least."""
        since = self._reader.failing_since
        return None if since is None else max(0.0, time.monotonic() - since)

    # -- queries (from the local index) -------------------------------------------------------

    @property
    def max_events(self) -> int | None:
        """Capacity of the local index."""
        return self._store.max_events

    @property
    def evicted_count(self) -> int:
        """Events evicted from the local index to respect ``max_events``."""
        return self._store.evicted

    async def query_by_type(self, event_type: EventType) -> list[HypervisorEvent]:
        """Indexed events of ``event_type``, oldest first."""
        return self._store.by_type(event_type)

    async def query_by_session(self, session_id: str) -> list[HypervisorEvent]:
        """Indexed events of ``session_id``, oldest first."""
        return self._store.by_session(session_id)

    async def query_by_agent(self, agent_did: str) -> list[HypervisorEvent]:
        """Indexed events involving ``agent_did``, oldest first."""
        return self._store.by_agent(agent_did)

    async def query_by_time_range(
        self, start: datetime, end: datetime | None = None
    ) -> list[HypervisorEvent]:
        """Indexed events with ``start <= timestamp <= end`` (``end`` defaults to now).

        Raises:
            ValueError: ``start`` or ``end`` is naive.
        """
        return self._store.time_range(start, datetime.now(UTC) if end is None else end)

    async def query(
        self,
        event_type: EventType | None = None,
        session_id: str | None = None,
        agent_did: str | None = None,
        limit: int | None = None,
    ) -> list[HypervisorEvent]:
        """Indexed events matching every given filter, oldest first; the newest ``limit``.

        ``limit`` reads as in the published module: ``None`` or ``0`` keeps every match, a
        negative ``-n`` all but the ``n`` oldest.

        Raises:
            TypeError: ``limit`` is not ``None`` nor an int (bools are refused).
        """
        return self._store.query(event_type, session_id, agent_did, limit)

    async def event_count(self) -> int:
        """Events in the local index."""
        return len(self._store)

    async def all_events(self) -> list[HypervisorEvent]:
        """A copy of the indexed events, oldest first."""
        return self._store.all()

    async def type_counts(self) -> dict[str, int]:
        """Indexed events per type value."""
        return self._store.type_counts()

    # -- positions and pages (from the local index) --------------------------------------------
    # A position numbers the events of this bus's local index in the order they were applied
    # (log order); it is local to this bus object, so it is not shared with other processes.

    @property
    def index_position(self) -> int:
        """The position the next event applied to the local index gets."""
        return self._store.next_position

    @property
    def index_first_position(self) -> int:
        """The position of the oldest event in the local index."""
        return self._store.first_position

    async def query_page(
        self,
        event_type: EventType | None = None,
        session_id: str | None = None,
        agent_did: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> EventPage:
        """The newest ``limit`` indexed events matching every filter, below position ``before``.

        Pass each page's ``next_before`` as ``before`` to page backwards; see
        :meth:`EventStore.page` for the guarantees while events are appended and evicted.

        Raises:
            ValueError: ``limit`` is not an int >= 1, or ``since``/``until`` is naive.
        """
        return self._store.page(event_type, session_id, agent_did, since, until, before, limit)

    def read_from(self, position: int, limit: int) -> EventSlice:
        """The indexed events at ``position`` and after (at most ``limit``), oldest first.

        Synchronous, so a caller can read up to :attr:`index_position` and then register for
        newer events without another event being applied in between.

        Raises:
            ValueError: ``limit`` is not an int >= 1.
        """
        return self._store.read_from(position, limit)
