"""The readers of a bus: one ``BusReader`` per partition it reads, merged into one index.

Each partition's reader tails its own log after its own last applied id, with its own gap
accounting (``gap_entries``); they share the bus's ``EventStore``, its dispatcher, the recent
ids that drop copies (an event id is dropped whichever partition it comes back on) and the
trace contexts. They run concurrently in the bus's one reader task, each applying a read at a
time, so the index receives each partition's events in that partition's order, interleaved
with the others' by arrival. On an unpartitioned bus the group is its one reader.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence

from hypervisor.observability._backends.log import StreamLog
from hypervisor.observability._bus.reader import BusReader, IdTuple
from hypervisor.observability._core.dispatch import Dispatcher
from hypervisor.observability._core.recent import RecentIds
from hypervisor.observability._core.store import EventStore
from hypervisor.observability._core.trace_context import TraceContext
from hypervisor.observability._util.retry import Backoff
from hypervisor.observability.errors import BusUnavailableError

__all__ = ["ReaderGroup"]


class ReaderGroup:
    """The partition readers of one bus, read by its counters as one reader.

    Args:
        logs: the logs to tail, with the partition number of each.
        store: the local index they all append to.
        dispatcher: the local subscribers.
        read_count: entries per read.
        block_s: how long an idle read blocks.
        backoff: the one backoff, between failed reads.
        dedup_window: ids remembered to drop copies (shared by the partitions).
        max_event_bytes: the longest entry decoded.
        max_contexts: trace contexts remembered (shared).
    """

    def __init__(
        self,
        logs: Sequence[tuple[int, StreamLog]],
        store: EventStore,
        dispatcher: Dispatcher,
        *,
        read_count: int,
        block_s: float,
        backoff: Backoff,
        dedup_window: int,
        max_event_bytes: int,
        max_contexts: int,
    ) -> None:
        if not logs:
            raise ValueError("a bus reads at least one partition")
        self.partitions = tuple(part for part, _ in logs)
        self.readers = tuple(
            BusReader(
                log,
                store,
                dispatcher,
                read_count=read_count,
                block_s=block_s,
                backoff=backoff,
                dedup_window=dedup_window,
                max_event_bytes=max_event_bytes,
                max_contexts=max_contexts,
            )
            for _, log in logs
        )
        first = self.readers[0]
        for reader in self.readers[1:]:
            reader.recent = first.recent
            reader.contexts = first.contexts

    async def run(self) -> None:
        """Tail every partition until cancelled (a reader stopped for good leaves the others
        running: its error is :attr:`error`)."""
        if len(self.readers) == 1:
            await self.readers[0].run()
        else:
            await asyncio.gather(*(reader.run() for reader in self.readers))

    def fail_syncs(self, error: BaseException | None = None) -> None:
        """Fail every waiting ``sync()`` (see ``BusReader.fail_syncs``)."""
        for reader in self.readers:
            reader.fail_syncs(error)

    @property
    def contexts(self) -> OrderedDict[str, TraceContext]:
        """The trace contexts of the newest events that carried one, by event id."""
        return self.readers[0].contexts

    @property
    def recent(self) -> RecentIds:
        """The ids of the newest events applied, of every partition (copies are dropped)."""
        return self.readers[0].recent

    @property
    def last_applied(self) -> IdTuple:
        """The newest id applied (of any partition: each has its own ids)."""
        return max(reader.last_applied for reader in self.readers)

    @property
    def error(self) -> BusUnavailableError | None:
        """Why a partition's reader stopped for good, else ``None``."""
        return next((r.error for r in self.readers if r.error is not None), None)

    @property
    def failing_since(self) -> float | None:
        """When the oldest ongoing read outage of any partition began (``None``: reading)."""
        since = [r.failing_since for r in self.readers if r.failing_since is not None]
        return min(since) if since else None

    @property
    def applied(self) -> int:
        """Events applied, over the partitions."""
        return sum(r.applied for r in self.readers)

    @property
    def decode_errors(self) -> int:
        """Undecodable entries skipped, over the partitions."""
        return sum(r.decode_errors for r in self.readers)

    @property
    def oversized_entries(self) -> int:
        """Oversized entries skipped, over the partitions."""
        return sum(r.oversized_entries for r in self.readers)

    @property
    def deleted_entries(self) -> int:
        """Entries read without a body, over the partitions."""
        return sum(r.deleted_entries for r in self.readers)

    @property
    def duplicates(self) -> int:
        """Copies dropped, over the partitions."""
        return sum(r.duplicates for r in self.readers)

    @property
    def gap_entries(self) -> int:
        """Entries trimmed before they were read, over the partitions."""
        return sum(r.gap_entries for r in self.readers)

    @property
    def gaps(self) -> int:
        """Gaps found, over the partitions."""
        return sum(r.gaps for r in self.readers)

    @property
    def reader_errors(self) -> int:
        """Failed reads, over the partitions."""
        return sum(r.reader_errors for r in self.readers)
