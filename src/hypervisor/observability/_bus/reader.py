"""The reading side of ``RedisEventBus``: the tailing reader task and ``sync()`` waiters.

The reader tails the log after the last id it applied, decodes each batch with the core codec
(an undecodable entry is skipped and counted, an entry longer than ``max_event_bytes`` too,
without being decoded; only that entry: its neighbours are applied), drops a copy of an event it
applied shortly before, appends the rest to the bus's ``EventStore`` and dispatches them to
local subscribers. After every read it completes the ``sync()`` waiters whose target is applied,
or that a read which started after their call found nothing more to read. A read the backend
refuses to the user (an ACL) stops the reader: retrying cannot help, so ``sync()`` raises that
error instead.

Gaps: each read comes with the log's counters of the same instant (``read_with_info``); the
reader keeps the number of entries ever appended up to the last one it applied (its *offset*)
and so tells how many entries after it were trimmed before it read them (counted in
``gap_entries``, logged as a warning with the id range). The offset is exact whenever a read
starts at the oldest retained entry or ends at the head; in between it advances by the entries
read. While the log is empty, the reader waits with a blocking read of one entry and then reads
again with the counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

from hypervisor.observability._backends.log import (
    Entry,
    LogError,
    LogPermissionError,
    StreamInfo,
    StreamLog,
    format_id,
    parse_id,
    trimmed_before_first,
)
from hypervisor.observability._core.codec import decode_events
from hypervisor.observability._core.dispatch import Dispatcher
from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability._core.intern import StringPool
from hypervisor.observability._core.recent import RecentIds
from hypervisor.observability._core.store import EventStore
from hypervisor.observability._core.trace_context import TraceContext, decode_entry_context
from hypervisor.observability._util.retry import Backoff
from hypervisor.observability.errors import (
    BusClosedError,
    BusPermissionError,
    BusUnavailableError,
    LogPermanentError,
)

__all__ = ["BusReader", "IdTuple"]

_log = logging.getLogger("hypervisor.observability.redis_bus")

IdTuple = tuple[int, int]


class _SyncWaiter:
    __slots__ = ("future", "read_no", "target")

    def __init__(self, target: IdTuple, read_no: int, future: asyncio.Future[None]) -> None:
        self.target = target
        self.read_no = read_no
        self.future = future


class BusReader:
    """The tailing reader, its position in the log and the read counters of one bus.

    :meth:`run` is the reader task's body; the bus sets ``last_applied`` before starting it
    (where the reading starts) and reads it for ``applied_id`` and ``index_lag()``.
    """

    def __init__(
        self,
        log: StreamLog,
        store: EventStore,
        dispatcher: Dispatcher,
        *,
        read_count: int,
        block_s: float,
        backoff: Backoff,
        dedup_window: int,
        max_event_bytes: int,
        max_contexts: int = 100_000,
    ) -> None:
        self.log = log
        self.store = store
        self.dispatcher = dispatcher
        self.read_count = read_count
        self.block_s = block_s
        self._backoff = backoff
        self.max_event_bytes = max_event_bytes

        self.last_applied: IdTuple = (0, 0)
        self.read_no = 0
        self.empty_read_no = -1
        self.error: BusUnavailableError | None = None
        """Why the reader stopped for good (the backend refused its reads: an ACL refusal, as
        ``BusPermissionError``, or credentials, database or TLS that retrying cannot fix), else
        ``None``."""
        self.sync_waiters: list[_SyncWaiter] = []
        # The ids of the newest events applied (copies of them are dropped).
        self.dedup_window = dedup_window
        self.recent = RecentIds(dedup_window)
        # The trace contexts of the newest events that carried one, by event id (oldest first).
        self.contexts: OrderedDict[str, TraceContext] = OrderedDict()
        self.max_contexts = max(1, max_contexts)
        # The decoded events are the reader's own until stored: they share short payload
        # values (this pool) and their session and agent strings (the store's index keys).
        self.strings = StringPool()

        # Read through the bus's properties of the same names (documented there).
        self.applied = 0
        self.decode_errors = 0
        self.oversized_entries = 0
        self.deleted_entries = 0
        self.duplicates = 0
        self.reader_errors = 0
        # time.monotonic() of the first failed read of the ongoing outage (None: reading).
        self.failing_since: float | None = None
        self.gap_entries = 0
        self.gaps = 0
        # Entries ever appended up to last_applied (None until a read tells it exactly).
        self.offset: int | None = None
        # The kinds of skipped entry already logged: each is logged once, then only counted.
        self._reported: set[str] = set()

    async def run(self) -> None:
        """The reader: tail the log and apply what it reads, until cancelled."""
        log = self.log
        attempt = 0
        while True:
            self.read_no += 1
            read_no = self.read_no
            after = format_id(*self.last_applied)
            try:
                entries, info = await log.read_with_info(after, self.read_count)
                if attempt:
                    _log.info("%s: tailing reader resumed after %d attempts", log.name, attempt)
                    attempt = 0
                    self.failing_since = None
                if not entries:
                    self._account(entries, info)
                    self.empty_read_no = read_no
                    if self.sync_waiters:
                        self._wake_syncs()
                    # Wait for the next append; that entry is read again with the counters.
                    await log.read(after, 1, self.block_s)
                    continue
            except LogPermissionError as exc:
                self.reader_errors += 1
                self.error = BusPermissionError(
                    f"{log.name}: the tailing reader stopped: {exc}",
                    user=exc.user,
                    command=exc.command,
                )
                self.error.__cause__ = exc
                _log.error("%s", self.error)
                self.fail_syncs(self.error)
                return
            except LogPermanentError as exc:
                # Credentials changed under a running reader, say: retrying cannot fix it.
                self.reader_errors += 1
                self.error = BusUnavailableError(f"{log.name}: the tailing reader stopped: {exc}")
                self.error.__cause__ = exc
                _log.error("%s", self.error)
                self.fail_syncs(self.error)
                return
            except LogError as exc:
                self.reader_errors += 1
                if attempt == 0:
                    self.failing_since = time.monotonic()
                    _log.warning("%s: tailing read failed, reconnecting: %s", log.name, exc)
                await self._backoff.wait(attempt)
                attempt += 1
                continue
            self._account(entries, info)
            try:
                self._apply(entries)
            except Exception:
                # Not reached by a bad entry (each is skipped on its own in _apply): a bug
                # here must still not stop the index, so the batch is skipped.
                self.reader_errors += 1
                _log.exception("%s: applying %d entries failed", log.name, len(entries))
                self.last_applied = parse_id(entries[-1].id)
            if self.sync_waiters:
                self._wake_syncs()

    def _account(self, entries: list[Entry], info: StreamInfo) -> None:
        """Advance the offset over a read after ``last_applied`` and count what it skipped.

        The offset of the read's last entry (or, for an empty read, of the head) is exact when
        the read ended at the head (the head's offset is ``entries_added``) or began at the
        oldest retained entry (whose offset is ``entries_added - length + 1``); otherwise the
        read is taken as contiguous. Whatever exceeds the entries read is a gap.
        """
        read = len(entries)
        end: int | None = None
        added = info.entries_added
        if added is not None:
            if (entries[-1].id if entries else format_id(*self.last_applied)) == info.head_id:
                end = added
            elif not entries and info.length == 0:
                end = added  # everything after the reader was trimmed
            elif entries and entries[0].id == info.first_id:
                before = trimmed_before_first(info)
                if before is not None:
                    end = before + read
        if self.offset is None:
            self.offset = end  # the first exact offset: nothing to compare with yet
            return
        if end is None:
            self.offset += read
            return
        missing = end - read - self.offset
        self.offset = end
        if missing <= 0:
            return
        self.gap_entries += missing
        self.gaps += 1
        upto = f"before {entries[0].id}" if entries else f"up to {info.head_id}"
        _log.warning(
            "%s: %d entries after %s, %s, were trimmed before the reader read them: they are "
            "missing from the local index and its subscribers (gap_entries %d)",
            self.log.name,
            missing,
            format_id(*self.last_applied),
            upto,
            self.gap_entries,
        )

    def pending_gap(self, info: StreamInfo) -> int:
        """Entries after ``last_applied`` already trimmed, that the next read will count."""
        before = trimmed_before_first(info)
        if self.offset is None or before is None:
            return 0
        if info.first_id is not None and parse_id(info.first_id) <= self.last_applied:
            return 0
        return max(0, before - self.offset)

    def _report(self, kind: str, entry_id: str, detail: str) -> None:
        """Log the first skipped entry of each kind; the others are only counted."""
        if kind not in self._reported:
            self._reported.add(kind)
            _log.warning(
                "%s: skipping %s entry %s (%s); further ones are counted, not logged",
                self.log.name,
                kind,
                entry_id,
                detail,
            )

    def _apply(self, entries: list[Any]) -> None:
        datas: list[bytes] = []
        limit = self.max_event_bytes
        for entry in entries:
            data = entry.data
            if data is None:
                self.deleted_entries += 1
            elif len(data) > limit:  # never decoded: its size alone rules it out
                self.oversized_entries += 1
                self._report("oversized", entry.id, f"{len(data)} bytes, limit {limit}")
            else:
                datas.append(data)
        events, bad = decode_events(datas)
        self._keep_contexts(datas)
        if bad:
            index, reason = bad[0]
            decoded = [e for e in entries if e.data is not None and len(e.data) <= limit]
            self._report("undecodable", decoded[index].id, reason)
            self.decode_errors += len(bad)
        if self.dedup_window:
            events = self._drop_copies(events)
        self.strings.share_payloads(events)
        self.store.extend(events, own_events=True)
        self.applied += len(events)
        self.last_applied = parse_id(entries[-1].id)
        if self.dispatcher.has_handlers:
            dispatch = self.dispatcher.dispatch
            for event in events:
                dispatch(event)

    def _keep_contexts(self, datas: list[bytes]) -> None:
        """Remember the trace context of each entry that carries one (a substring search per
        entry; decoding only the context keys of those that have them)."""
        contexts = self.contexts
        for data in datas:
            found = decode_entry_context(data)
            if found is not None:
                event_id, context = found
                contexts[event_id] = context
                contexts.move_to_end(event_id)
                if len(contexts) > self.max_contexts:
                    contexts.popitem(last=False)

    def _drop_copies(self, events: list[HypervisorEvent]) -> list[HypervisorEvent]:
        """``events`` without those whose id is among the newest ids applied."""
        add = self.recent.add
        kept: list[HypervisorEvent] = []
        for event in events:
            if add(event.event_id):
                kept.append(event)
                continue
            if self.duplicates == 0:
                _log.warning(
                    "%s: dropping event %s, already applied (a producer retried a batch"
                    " that had been stored); further copies are counted",
                    self.log.name,
                    event.event_id,
                )
            self.duplicates += 1
        return kept

    async def wait_applied(self, target: IdTuple, read_no: int) -> None:
        """Wait until ``target`` is applied, or a read after read ``read_no`` found nothing.

        Raises:
            BusPermissionError: the reader stopped because its reads are refused.
        """
        if target <= self.last_applied:
            return
        if self.error is not None:
            raise self.error
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sync_waiters.append(_SyncWaiter(target, read_no, future))
        await future

    def _wake_syncs(self) -> None:
        applied = self.last_applied
        empty = self.empty_read_no
        remaining: list[_SyncWaiter] = []
        for waiter in self.sync_waiters:
            if waiter.target <= applied or empty > waiter.read_no:
                if not waiter.future.done():
                    waiter.future.set_result(None)
            else:
                remaining.append(waiter)
        self.sync_waiters = remaining

    def fail_syncs(self, error: BaseException | None = None) -> None:
        """Fail every ``sync()`` still waiting (the bus is closing and the reader has stopped),
        with ``error`` (default: ``BusClosedError``)."""
        for waiter in self.sync_waiters:
            if not waiter.future.done():
                waiter.future.set_exception(error or BusClosedError("the bus was closed"))
        self.sync_waiters.clear()
