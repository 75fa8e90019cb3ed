"""``RedisEventBus``: the asynchronous, multi-process event bus on a shared ``StreamLog``.

Writing: ``emit`` encodes the event at the call (so an unencodable payload, one that would not
read back the same, or an event longer than ``max_event_bytes`` raises there), puts
``(bytes, future)`` into a bounded buffer and awaits the future; one flusher task drains the
buffer into one ``append_many`` per batch (one pipelined round trip). While a batch is in flight
new emits pile up, so the next batch carries all of them: concurrency turns into batch size
without any timer, and a lone emitter pays one round trip. Transient failures are retried with
exponential backoff and full jitter until ``retry_deadline_s``; then every waiter of the batch
gets ``BusUnavailableError`` and buffered (``emit_nowait``) events count as failed and make the
next ``flush()`` raise. Nothing is dropped silently.

Reading: one reader task tails the log (backfilling the newest ``max_events`` retained entries,
or all of them when unbounded), decodes with the core codec (an undecodable entry, or one longer
than ``max_event_bytes``, not decoded at all, is skipped and counted: only that entry), drops a
copy of an event it applied shortly before (a producer that retried a batch whose reply was lost
appended it twice), appends to a local core ``EventStore`` (the same indexes as the in-process
bus) and dispatches to local subscribers. Queries are answered from that
store; ``sync()`` waits until it holds everything up to the log's head as of the call.

The bus owns both sides and their tasks: the writing machinery is ``writer.BusWriter``, the
reading machinery ``reader.BusReader``, its read side (queries, pages, trace contexts, reader
counters) the ``queries.BusQueries`` mixin, its emit paths the ``emitting.BusEmitting`` mixin.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Self

import anyio

from hypervisor.observability._backends.log import (
    DurableWait,
    StreamLog,
    TrimPolicy,
    parse_id,
    previous_id,
)
from hypervisor.observability._backends.partition_set import PartitionSet, memory_partitions
from hypervisor.observability._bus.emitting import BusEmitting
from hypervisor.observability._bus.queries import BusQueries, IndexLag
from hypervisor.observability._bus.readers import ReaderGroup
from hypervisor.observability._bus.support import all_of, durable_wait, reader_lag, retention_policy
from hypervisor.observability._bus.writer import BusWriter
from hypervisor.observability._core.codec import DEFAULT_MAX_EVENT_BYTES
from hypervisor.observability._core.dispatch import Dispatcher
from hypervisor.observability._core.events import EventHandler, EventType, HypervisorEvent
from hypervisor.observability._core.partition import (
    PartitionKey,
    PartitionLayout,
    default_partition_key,
    partition_index,
)
from hypervisor.observability._core.store import (
    DEFAULT_MAX_EVENTS,
    EventStore,
)
from hypervisor.observability._util.aio import AsyncResource
from hypervisor.observability._util.retry import Backoff
from hypervisor.observability.errors import (
    BusClosedError,
)

__all__ = ["DEFAULT_STREAM", "IndexLag", "RedisEventBus", "TrimPolicy", "live_buses"]

_log = logging.getLogger("hypervisor.observability.redis_bus")

DEFAULT_STREAM = "hvobs:events"
"""The stream key used when none is given."""

# The buses started and not yet closed in this process, so that run_until_signal can close the
# ones an application left open and abort their flushes on a second signal.
_LIVE: weakref.WeakSet[RedisEventBus] = weakref.WeakSet()


def live_buses(loop: asyncio.AbstractEventLoop | None = None) -> list[RedisEventBus]:
    """The buses started and not closed yet, those closing included (on ``loop`` when
    given)."""
    return [bus for bus in list(_LIVE) if loop is None or bus._loop is loop]


class RedisEventBus(BusEmitting, BusQueries, AsyncResource):
    """An event bus shared by many processes through a ``StreamLog`` (Redis Streams in production).

    Use as an async context manager (or ``await start()`` / ``await aclose()``)::

        async with RedisEventBus.from_url("redis://localhost:6379/0") as bus:
            await bus.emit(HypervisorEvent(event_type=EventType.SESSION_CREATED))
            await bus.sync()
            print(await bus.event_count())

    Args:
        log: the log to write to and tail. ``from_url`` builds a Redis one; ``in_memory`` a
            process-local one.
        max_events: capacity of the local index (oldest evicted first); ``None`` for unbounded.
        buffer_size: events that may wait in the emit buffer; beyond that ``emit`` waits and
            ``emit_nowait`` raises ``BusFullError``.
        batch_size: the most events appended in one round trip.
        linger_s: how long the flusher waits for a batch to fill when it is idle and the buffer
            holds fewer than ``batch_size`` events; 0 sends at once (lowest latency; concurrency
            still forms batches while a round trip is in flight).
        retry_deadline_s: how long a batch is retried on transient errors before its emitters
            get ``BusUnavailableError``.
        retry_base_s: first backoff; doubles per attempt, full jitter, capped at
            ``retry_cap_s``.
        retry_cap_s: the longest single backoff.
        read_count: entries per read of the tailing reader.
        block_s: how long one tailing read blocks waiting for new entries.
        backfill: read the log's retained history on start, its newest ``max_events`` entries
            (else only new entries).
        reader: run the tailing reader and local index at all (producers may not need it).
        owns_log: close the log in ``aclose()``.
        dedup_window: the reader drops an event whose id was among the last ``dedup_window``
            it applied (counted in :attr:`duplicates`). A batch whose append reply was lost is
            retried, and if the first attempt did land the log holds it twice; 0 keeps every
            copy.
        max_event_bytes: the longest encoded event ``emit`` accepts (``EventTooLargeError``
            beyond it); the reader skips a longer entry written by anything else without
            decoding it (counted in :attr:`oversized_entries`). Default 1 MiB; give the workers
            the same limit (``--max-event-bytes``).
        trace_context: an event emitted inside an active OpenTelemetry span carries that
            span's W3C ``traceparent`` and ``tracestate`` on the wire (extra keys every decoder
            ignores); readers expose it (:meth:`trace_context`). ``False`` never adds them.
            Nothing is added, and nothing is imported, while OpenTelemetry is not in use.
        durable: each flush waits, after its append, until the server confirms the events
            beyond its memory: the fsync of its append-only file (``WAITAOF``, Redis 7.2+
            with ``appendonly yes``) and/or ``durable_replicas`` replicas (``WAIT``, when
            replicas are connected at start). ``start()`` says in one INFO line what it waits
            for, and raises ``BusDurabilityError`` when the server offers neither. An emit
            whose events are not confirmed within ``durable_timeout_s`` raises
            ``BusDurabilityError`` (stored on the primary, durability unknown).
        durable_timeout_s: the longest wait of each confirmation.
        durable_replicas: replicas that must confirm (when the server has replicas).
    """

    def __init__(
        self,
        log: StreamLog | PartitionSet,
        *,
        max_events: int | None = DEFAULT_MAX_EVENTS,
        buffer_size: int = 65_536,
        batch_size: int = 1024,
        linger_s: float = 0.0,
        retry_deadline_s: float = 30.0,
        retry_base_s: float = 0.05,
        retry_cap_s: float = 2.0,
        read_count: int = 2048,
        block_s: float = 1.0,
        backfill: bool = True,
        reader: bool = True,
        owns_log: bool = True,
        dedup_window: int = 100_000,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        trace_context: bool = True,
        durable: bool = False,
        durable_timeout_s: float = 1.0,
        durable_replicas: int = 1,
        read_partitions: Sequence[int] | None = None,
    ) -> None:
        if buffer_size < 1 or batch_size < 1:
            raise ValueError("buffer_size and batch_size must be >= 1")
        if max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be >= 1, got {max_event_bytes}")
        self._max_event_bytes = max_event_bytes
        self._trace_context = trace_context
        if dedup_window < 0:
            raise ValueError(f"dedup_window must be >= 0, got {dedup_window}")
        if durable_timeout_s <= 0 or durable_replicas < 1:
            raise ValueError("durable_timeout_s must be > 0 and durable_replicas >= 1")
        self._durable = durable
        self._durable_timeout_s = durable_timeout_s
        self._durable_replicas = durable_replicas
        if isinstance(log, PartitionSet):
            self._parts: PartitionSet | None = log
            logs: tuple[StreamLog, ...] = log.logs
            layout = log.layout
            self._route: Callable[[HypervisorEvent], int] | None = layout.partition
            chosen = range(layout.partitions) if read_partitions is None else read_partitions
            read = sorted(set(chosen))
            if not read or not all(0 <= p < layout.partitions for p in read):
                raise ValueError(
                    f"read_partitions must name some of partitions 0..{layout.partitions - 1}"
                )
        else:
            if read_partitions is not None:
                raise ValueError("read_partitions needs a partitioned bus (partitions > 1)")
            self._parts = None
            logs = (log,)
            self._route = None
            read = [0]
        self._logs = logs
        self._stream_log = logs[0]
        self._store = EventStore(max_events)
        self._dispatcher = Dispatcher()
        self._buffer_size = buffer_size
        self._backfill = backfill
        self._run_reader = reader
        self._owns_log = owns_log

        backoff = Backoff(retry_base_s, retry_cap_s)
        self._writer = BusWriter(
            log,
            batch_size=batch_size,
            linger_s=linger_s,
            retry_deadline_s=retry_deadline_s,
            backoff=backoff,
            keep_failed=buffer_size,
        )
        self._reader = ReaderGroup(
            [(p, logs[p]) for p in read],
            self._store,
            self._dispatcher,
            read_count=read_count,
            block_s=block_s,
            backoff=backoff,
            dedup_window=dedup_window,
            max_event_bytes=max_event_bytes,
            max_contexts=max_events if max_events is not None else max(dedup_window, 1),
        )

        self._tasks: list[tuple[asyncio.Task[None], anyio.CancelScope]] = []
        self._started = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scope: anyio.CancelScope | None = None
        self._abort_flush = False
        self._unstored = 0

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str,
        stream: str = DEFAULT_STREAM,
        *,
        max_len: int | None = None,
        max_age_s: float | None = None,
        retention: TrimPolicy | None = None,
        log_options: dict[str, Any] | None = None,
        partitions: int = 1,
        partition_key: PartitionKey | None = None,
        **options: Any,
    ) -> RedisEventBus:
        """Build a bus on a Redis stream, or on ``partitions`` partition streams (on a single
        Redis or a Redis Cluster, detected at start from the URL's node).

        Args:
            url: ``redis://[user:password@]host:port/db`` or ``rediss://`` for TLS; the ACL
                username and password come from the URL.
            stream: the stream key all processes of the fleet share.
            max_len: keep about this many entries in the stream (trimmed with ``~``, never
                past entries a consumer group has not acknowledged).
            max_age_s: drop entries older than this (same guarantee).
            retention: the full retention policy instead of ``max_len``/``max_age_s``. With
                partitions, ``max_len`` bounds the whole stream: each partition keeps
                ``ceil(max_len / partitions)``; ``max_age_s`` applies to each partition.
            log_options: extra ``RedisStreamLog`` options (timeouts, TLS files, ...).
            partitions: 1 (the default) is one stream key named ``stream`` on a single Redis,
                as before; N > 1 spreads the events over N partition streams
                (``docs/scaling.md``), on a single Redis or a Redis Cluster (the URL names any
                of its nodes). The count is recorded in Redis by the first process; a bus
                started with another count raises ``PartitionLayoutError`` at ``start()``.
            partition_key: the ``(event) -> str`` whose value picks an event's partition
                (default: by event family, see :func:`default_partition_key`); every
                producer of a stream must use the same.
            **options: ``RedisEventBus`` options (``read_partitions`` among them).
        """
        retention = retention_policy(max_len, max_age_s, retention)
        block_s = float(options.get("block_s", 1.0))
        settings: dict[str, Any] = {"max_block_s": max(5.0, block_s)}
        settings.update(log_options or {})
        if partitions == 1 and partition_key is None:
            from hypervisor.observability._backends.redis_log import RedisStreamLog

            log = RedisStreamLog(url, stream, retention=retention, **settings)
            return cls(log, **options)
        from hypervisor.observability._backends.redis_partitions import redis_partitions

        layout = PartitionLayout(stream, partitions, partition_key or default_partition_key)
        return cls(redis_partitions(url, layout, retention=retention, **settings), **options)

    @classmethod
    def in_memory(
        cls,
        stream: str = DEFAULT_STREAM,
        *,
        max_len: int | None = None,
        max_age_s: float | None = None,
        retention: TrimPolicy | None = None,
        partitions: int = 1,
        partition_key: PartitionKey | None = None,
        **options: Any,
    ) -> RedisEventBus:
        """Build a bus on a process-local ``MemoryStreamLog`` (tests, demos, one process), or
        on ``partitions`` of them (one per partition key name, routed as ``from_url`` does).

        Retention and partition arguments as for ``from_url`` (retention applied exactly).
        """
        from hypervisor.observability._backends.memory_log import MemoryStreamLog

        policy = retention_policy(max_len, max_age_s, retention)
        if partitions == 1 and partition_key is None:
            return cls(MemoryStreamLog(stream, retention=policy), **options)
        layout = PartitionLayout(stream, partitions, partition_key or default_partition_key)
        return cls(memory_partitions(layout, policy), **options)

    @property
    def log(self) -> StreamLog:
        """The underlying log (of partition 0 on a partitioned bus: see :attr:`logs`)."""
        return self._stream_log

    @property
    def logs(self) -> tuple[StreamLog, ...]:
        """The log of each partition, in partition order (one log when unpartitioned)."""
        return self._logs

    @property
    def partitions(self) -> int:
        """How many partitions the stream has (1 when unpartitioned)."""
        return len(self._logs)

    @property
    def read_partitions(self) -> tuple[int, ...]:
        """The partitions this bus's reader tails into its local index."""
        return self._reader.partitions

    def partition_of(self, event_or_key: HypervisorEvent | str) -> int:
        """The partition of an event, or of a partition key: with the default key function,
        a session id (session events), an ``agent_did`` (ring and agent events) or a saga id
        (saga events); what to pass as ``read_partitions`` to index only those keys' events."""
        if isinstance(event_or_key, HypervisorEvent):
            return 0 if self._route is None else self._route(event_or_key)
        return partition_index(event_or_key, len(self._logs))

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def start(self, *, wait_backfill: bool = True) -> None:
        """Start the flusher and the tailing reader; by default wait until history is indexed.

        Raises:
            BusPermissionError: the Redis user may not read the stream (a producer's user: pass
                ``reader=False``).
            BusUnavailableError: the backend stayed unreachable past the retry deadline.
            BusDurabilityError: ``durable=True`` and the server offers neither an fsync to
                wait for nor a connected replica.
        """
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        _LIVE.add(self)
        self._writer.open()
        try:
            if self._parts is not None:
                # Detects a cluster and checks (or records) the partition count.
                await self._writer.with_retry(self._parts.prepare)
            starts = await all_of(
                [partial(self._start_after, reader.log) for reader in self._reader.readers]
            )
            if self._durable:
                self._writer.durable = await self._durable_wait()
        except BaseException:
            # A start that fails leaves nothing open (``async with`` never reaches __aexit__).
            await self.aclose(flush_timeout_s=0.0)
            raise
        for reader, start_after in zip(self._reader.readers, starts, strict=True):
            reader.last_applied = parse_id(start_after)
        # Plain asyncio tasks rather than a task group held open across calls, so aclose()
        # works from any scope or task; each runs in an anyio cancel scope because that
        # cancellation is level-triggered: redis-py can swallow a one-shot task.cancel() in
        # the middle of a blocking read.
        self._spawn(self._writer.run, "hvobs-flusher")
        if self._run_reader:
            self._spawn(self._reader.run, "hvobs-reader")
        if self._run_reader and wait_backfill:
            try:
                await self.sync()
            except BaseException:
                await self.aclose(flush_timeout_s=0.0)
                raise

    async def _start_after(self, log: StreamLog) -> str:
        """Where the reader of ``log`` starts (after this id)."""
        if self._run_reader and not self._backfill:
            return await self._writer.with_retry(log.head_id)
        if self._run_reader and self._store.max_events is not None:
            # Older entries would be evicted from the index at once: skip reading them.
            first = await self._writer.with_retry(log.id_from_end, self._store.max_events)
            return "0-0" if first is None else previous_id(first)
        return "0-0"

    async def aclose(self, *, flush_timeout_s: float | None = None) -> int:
        """Flush what is buffered, stop the tasks and close the log. Idempotent.

        Args:
            flush_timeout_s: how long to wait for buffered events to be stored (default: the
                retry deadline plus a second). Events still buffered then fail: their
                emitters get ``BusClosedError`` and they count in ``failed``.

        Returns:
            The events this bus could not store (also :attr:`unstored`, and logged as a
            WARNING when not 0): those that failed while closing (still buffered past the
            flush timeout or :meth:`abort_flush`, or in a round trip it cut short, whose fate
            is unknown) and the buffered (``emit_nowait``) events lost earlier that no
            ``flush()`` reported.
        """
        if self._closed:
            return self._unstored
        self._closed = True
        tasks, self._tasks = self._tasks, []
        writer = self._writer
        failed_before = writer.failed - writer.unreported_failures
        timeout = writer.retry_deadline_s + 1.0 if flush_timeout_s is None else flush_timeout_s
        try:
            if tasks and not self._abort_flush:
                with anyio.CancelScope(shield=True) as self._flush_scope:
                    with anyio.move_on_after(timeout):
                        await writer.wait_done(writer.enqueued)
        finally:
            self._flush_scope = None
            _LIVE.discard(self)  # only now: a second signal aborts the flush through _LIVE
            for _, scope in tasks:
                scope.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*(task for task, _ in tasks), return_exceptions=True)
            writer.fail_buffered()
            self._reader.fail_syncs()
            if writer.space is not None:
                writer.space.set()
            self._unstored = writer.failed - failed_before
            if self._unstored:
                _log.warning(
                    "%s: closed with %d events not stored (last error: %s)",
                    self._stream_log.name,
                    self._unstored,
                    writer.last_error,
                )
            if self._owns_log:
                with anyio.CancelScope(shield=True):
                    if self._parts is not None:
                        await self._parts.aclose()
                    else:
                        await self._stream_log.aclose()
        return self._unstored

    def abort_flush(self) -> None:
        """Make a running or later ``aclose()`` stop waiting for buffered events at once: they
        fail and count in :attr:`unstored` (what a second SIGTERM does under
        :func:`run_until_signal`)."""
        self._abort_flush = True
        if self._flush_scope is not None:
            self._flush_scope.cancel()

    @property
    def unstored(self) -> int:
        """Events ``aclose()`` reported it could not store (0 before it ran)."""
        return self._unstored

    async def _durable_wait(self) -> DurableWait:
        """What each flush of a durable bus waits for (see :func:`durable_wait`)."""
        return await durable_wait(
            self._writer, self._stream_log, self._durable_replicas, self._durable_timeout_s
        )

    def _spawn(self, body: Callable[[], Awaitable[None]], name: str) -> None:
        scope = anyio.CancelScope()

        async def run() -> None:
            with scope:
                await body()

        task = asyncio.get_running_loop().create_task(run(), name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append((task, scope))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            _log.error(
                "%s: background task %s stopped",
                self._stream_log.name,
                task.get_name(),
                exc_info=task.exception(),
            )

    def _check_running(self) -> None:
        if self._closed:
            raise BusClosedError("the bus was closed")
        if not self._started:
            raise BusClosedError("the bus is not started: use `async with bus` or `await start()`")

    # -- reading ------------------------------------------------------------------------------

    async def sync(self) -> None:
        """Wait until the local index holds every entry up to the log's head as of the call.

        Raises:
            BusClosedError: the bus is closed, not started, or runs without a reader.
            BusUnavailableError: the head could not be read before the retry deadline.
            BusPermissionError: the user may not read the stream (the reader stopped).
        """
        self._check_running()
        if not self._run_reader:
            raise BusClosedError("this bus runs without a reader (reader=False)")
        readers = self._reader.readers
        read_nos = [reader.read_no for reader in readers]
        heads = await all_of(
            [partial(self._writer.with_retry, reader.log.head_id) for reader in readers]
        )
        await all_of(
            [
                partial(reader.wait_applied, parse_id(head), read_no)
                for reader, head, read_no in zip(readers, heads, read_nos, strict=True)
            ]
        )

    async def index_lag(self, limit: int = 1_000_000) -> IndexLag:
        """How far the local index is behind the log's head (entries, seconds, and entries
        trimmed before the reader read them)."""
        self._check_running()
        readers = self._reader.readers
        lags = await all_of([partial(reader_lag, reader, limit) for reader in readers])
        if len(lags) == 1:
            return lags[0]
        # Over the partitions: counts add up; the ids are the newest head and the oldest
        # applied id (of different streams: each partition's pair is in ``partitions``).
        return IndexLag(
            entries=min(limit, sum(lag.entries for lag in lags)),
            seconds=max(lag.seconds for lag in lags),
            head_id=max(lags, key=lambda lag: parse_id(lag.head_id)).head_id,
            applied_id=min(lags, key=lambda lag: parse_id(lag.applied_id)).applied_id,
            trimmed=sum(lag.trimmed for lag in lags),
            gap_entries=sum(lag.gap_entries for lag in lags),
            partitions=tuple(lags),
            partition_ids=self._reader.partitions,
        )

    # -- counters -----------------------------------------------------------------------------

    @property
    def emitted(self) -> int:
        """Events stored in the log by this bus."""
        return self._writer.emitted

    @property
    def failed(self) -> int:
        """Events whose batch failed past the retry deadline (their emitters were told)."""
        return self._writer.failed

    @property
    def retries(self) -> int:
        """Append attempts retried after a transient error."""
        return self._writer.retries

    @property
    def batches(self) -> int:
        """Append round trips that succeeded."""
        return self._writer.batches

    # -- subscriptions ------------------------------------------------------------------------

    def subscribe(
        self, event_type: EventType | None = None, handler: EventHandler | None = None
    ) -> None:
        """Call ``handler`` for each event of ``event_type`` (all when ``None``) read from the
        log, whichever process emitted it. A ``None`` handler is ignored."""
        if handler is None:
            return
        self._dispatcher.subscribe(event_type, handler)

    def unsubscribe(self, event_type: EventType | None, handler: EventHandler) -> bool:
        """Remove one registration of ``handler``; return whether it was registered."""
        return self._dispatcher.unsubscribe(event_type, handler)

    @property
    def handler_errors(self) -> int:
        """How many handler calls raised."""
        return self._dispatcher.handler_errors
