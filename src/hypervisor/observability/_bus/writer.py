"""The writing side of ``RedisEventBus``: its emit buffer and the one flusher task.

Emitters put ``(bytes, waiter)`` into the buffer (``enqueue``); the flusher drains it into one
``append_many`` per batch, retrying transient log errors with exponential backoff and full
jitter until the retry deadline, and then tells every waiter of the batch how it went. On
partitions a batch is split into one group per partition, all sent with one
``PartitionSet.append_groups`` per attempt (on Redis one pipeline per node); each group is
stored, retried (the next attempt sends only the groups that failed) or fails on its own. Two
sequence numbers, of the last event buffered and of the last one whose batch finished, let
``flush()``, ``emit_many`` and ``aclose()`` wait for everything buffered before them.

A failed batch's error carries its events (decoded back from the bytes, only on failure) and
whether any attempt may have stored them (``stored_unknown``: an attempt's request was sent
and its reply lost), so the emitter can re-emit them; readers and workers drop the copies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import ParamSpec, TypeVar

import anyio

from hypervisor.observability._backends.log import (
    DurableWait,
    LogDurabilityError,
    LogError,
    LogOutcomeUnknownError,
    LogPermissionError,
    LogUnavailableError,
    StreamLog,
)
from hypervisor.observability._backends.partition_set import GroupOutcome, PartitionSet
from hypervisor.observability._core.codec import decode_event
from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability._util.retry import Backoff
from hypervisor.observability.errors import (
    BusClosedError,
    BusDurabilityError,
    BusPermissionError,
    BusUnavailableError,
    EventDecodeError,
)

__all__ = ["BusWriter", "Tracker", "Waiter", "decode_all", "with_events"]

_log = logging.getLogger("hypervisor.observability.redis_bus")

P = ParamSpec("P")
T = TypeVar("T")


class Tracker:
    """Shared by the events of one ``emit_many`` call: records which of them failed and how."""

    __slots__ = ("error", "failed", "stored_unknown")

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.failed: list[bytes] = []
        self.stored_unknown = False


def decode_all(datas: Iterable[bytes]) -> tuple[HypervisorEvent, ...]:
    """The events of encoded entries this bus wrote (exact encodings: they decode back the
    same); called only to report a failure."""
    events: list[HypervisorEvent] = []
    for data in datas:
        try:
            events.append(decode_event(data))
        except EventDecodeError:  # cannot happen for the bus's own encodings
            _log.debug("an event that was not stored does not decode back")
    return tuple(events)


def with_events(error: BaseException, datas: Iterable[bytes]) -> BaseException:
    """A copy of a batch's ``BusUnavailableError`` that carries the events of ``datas`` (other
    errors, ``BusClosedError``, are returned as they are)."""
    if not isinstance(error, BusUnavailableError):
        return error
    copy: BusUnavailableError
    if isinstance(error, BusPermissionError):
        copy = BusPermissionError(
            str(error), user=error.user, command=error.command, events=decode_all(datas)
        )
    else:
        copy = type(error)(
            str(error), events=decode_all(datas), stored_unknown=error.stored_unknown
        )
    copy.__cause__ = error.__cause__
    return copy


# Who waits for a buffered event: an awaited emit's future, an emit_many call's tracker, or
# nobody (emit_nowait; its failure is reported by the next flush()).
Waiter = asyncio.Future[None] | Tracker | None
# A buffered event: its bytes, its waiter and its partition (0 on an unpartitioned bus).
Item = tuple[bytes, Waiter, int]


class BusWriter:
    """The emit buffer, the flusher loop and the write counters of one bus.

    The bus checks that it is running and that the buffer has room, then calls
    :meth:`enqueue`; :meth:`run` is the flusher task's body. ``wake`` and ``space`` are created
    by :meth:`open` (from the bus's ``start()``): the flusher waits on ``wake`` for events, and
    emitters wait on ``space`` for room in a full buffer.
    """

    def __init__(
        self,
        log: StreamLog | PartitionSet,
        *,
        batch_size: int,
        linger_s: float,
        retry_deadline_s: float,
        backoff: Backoff,
        keep_failed: int = 65_536,
    ) -> None:
        # One log per partition; a flush's partition groups are appended with one call.
        self.parts = log if isinstance(log, PartitionSet) else None
        self.logs: tuple[StreamLog, ...] = (log,) if isinstance(log, StreamLog) else log.logs
        self.log = self.logs[0]
        # What errors of the bus's own calls name: the stream (not a partition's key).
        self.name = log.layout.stream if isinstance(log, PartitionSet) else log.name
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.retry_deadline_s = retry_deadline_s
        self._backoff = backoff

        self.buffer: deque[Item] = deque()
        self.enqueued = 0  # sequence number of the last event put into the buffer
        self.done = 0  # sequence number of the last event whose batch finished (ok or failed)
        self.unreported_failures = 0
        # The newest buffered (emit_nowait) events lost since the last flush(), for its error.
        self.unreported: deque[bytes] = deque(maxlen=keep_failed)
        self.unreported_unknown = False
        self.last_error: BaseException | None = None
        self.done_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.wake: asyncio.Event | None = None
        self.space: asyncio.Event | None = None
        self.durable: DurableWait | None = None  # set by a durable bus's start()

        # Read through the bus's properties of the same names (documented there).
        self.emitted = 0
        self.failed = 0
        self.retries = 0
        self.batches = 0

    def open(self) -> None:
        """Create the events the flusher and the emitters wait on (once, from ``start()``)."""
        self.wake = asyncio.Event()
        self.space = asyncio.Event()

    def enqueue(self, data: bytes, future: Waiter, part: int = 0) -> None:
        """Buffer one encoded event of partition ``part`` and wake the flusher (room was
        checked by the caller)."""
        self.buffer.append((data, future, part))
        self.enqueued += 1
        wake = self.wake
        if wake is not None and not wake.is_set():
            wake.set()

    async def wait_done(self, target: int) -> None:
        """Wait until the batches holding events up to sequence number ``target`` finished."""
        if self.done >= target:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done_waiters.append((target, future))
        await future

    def fail_buffered(self) -> None:
        """Fail what is still buffered (the bus is closing and the flusher has stopped)."""
        if self.buffer:
            closed = BusClosedError("the bus was closed before the event was stored")
            self._fail_batch(list(self.buffer), closed)
            self.buffer.clear()

    async def run(self) -> None:
        """The flusher: drain the buffer, one ``append_many`` per batch, until cancelled."""
        wake = self.wake
        space = self.space
        assert wake is not None
        assert space is not None
        buffer = self.buffer
        while True:
            if not buffer:
                wake.clear()
                await wake.wait()
                continue
            if self.linger_s > 0 and len(buffer) < self.batch_size:
                await anyio.sleep(self.linger_s)
            count = min(len(buffer), self.batch_size)
            batch = [buffer.popleft() for _ in range(count)]
            space.set()
            if self.parts is None or len(self.logs) == 1:
                await self._append_batch(self.log, batch)
            else:
                await self._append_partitions(batch)

    async def _append_partitions(self, batch: list[Item]) -> None:
        """Append a flush's events, grouped by partition (each group in emit order), with one
        ``append_groups`` per attempt; each group is stored, retried (only the groups that
        failed, with the one backoff and deadline) or fails on its own (its emitters are told
        which)."""
        parts = self.parts
        assert parts is not None
        groups: dict[int, list[Item]] = {}
        for item in batch:
            groups.setdefault(item[2], []).append(item)
        pending = {part: [data for data, _, _ in items] for part, items in groups.items()}
        sent = {part: [False] for part in groups}  # as _retrying's, per group
        warned: set[int] = set()
        deadline = time.monotonic() + self.retry_deadline_s
        attempt = 0
        try:
            while True:
                try:
                    outcomes = await parts.append_groups(pending, self.durable)
                except Exception as exc:  # a bug below us: it fails the attempt's groups
                    outcomes = dict.fromkeys(pending, exc)
                retry = time.monotonic() < deadline
                again: dict[int, list[bytes]] = {}
                for part in list(pending):
                    outcome: GroupOutcome | None = outcomes.get(part)
                    if outcome is None:  # a bug below us
                        outcome = RuntimeError(f"append_groups gave no outcome for {part}")
                    name = self.logs[part].name
                    if isinstance(outcome, list):
                        del pending[part]
                        self._stored(groups[part])
                        continue
                    error = self._judge(outcome, name, sent[part], retry=retry)
                    if error is None:
                        again[part] = pending[part]
                        if part not in warned:
                            warned.add(part)
                            _log.warning("%s: append failed, retrying: %s", name, outcome)
                        continue
                    del pending[part]
                    self._fail_group(groups[part], error, sent[part][0], name)
                pending = again
                if not pending:
                    return
                self.retries += len(pending)
                await self._backoff.wait(attempt, limit_s=deadline - time.monotonic())
                attempt += 1
        except BaseException:
            # Cancelled mid-append (see _append_batch): the groups not yet settled fail.
            closed = BusClosedError("the bus was closed while storing the event")
            for part in pending:
                self._fail_batch(groups[part], closed, unknown=True)
            raise

    async def _append_batch(self, log: StreamLog, batch: list[Item]) -> None:
        datas = [data for data, _, _ in batch]
        sent = [False]  # set when an attempt's request may have reached the backend
        durable = self.durable
        try:
            if durable is None:
                await self._retrying(lambda: log.append_many(datas), sent, log.name)
            else:
                await self._retrying(lambda: log.append_many(datas, durable), sent, log.name)
        except Exception as exc:
            self._fail_group(batch, exc, sent[0], log.name)
            return
        except BaseException:
            # Cancelled mid-append (aclose past its flush timeout): whether Redis stored the
            # batch is unknown, so its emitters must not be told it was.
            closed = BusClosedError("the bus was closed while storing the event")
            self._fail_batch(batch, closed, unknown=True)
            raise
        self._stored(batch)

    def _stored(self, batch: list[Item]) -> None:
        """A batch (or partition group) is stored: count it and tell its emitters."""
        self.emitted += len(batch)
        self.batches += 1
        for _, waiter, _ in batch:
            if isinstance(waiter, asyncio.Future) and not waiter.done():
                waiter.set_result(None)
        self._advance(len(batch))

    def _fail_group(self, batch: list[Item], error: Exception, sent: bool, name: str) -> None:
        """A batch (or partition group) failed with ``error``: a bus error from the retries
        (``sent``: an attempt's request may have reached the backend), or a bug below us, which
        must not kill the flusher and hang emitters."""
        if isinstance(error, BusPermissionError | BusDurabilityError):
            self._fail_batch(batch, error)
        elif isinstance(error, BusUnavailableError):
            self._fail_batch(batch, self._fate(error, sent))
        else:
            _log.error("%s: append failed unexpectedly", name, exc_info=error)
            fated = self._fate(BusUnavailableError(f"{name}: append failed: {error!r}"), True)
            fated.__cause__ = error
            self._fail_batch(batch, fated)

    @staticmethod
    def _fate(error: BusUnavailableError, sent: bool) -> BusUnavailableError:
        """The batch's error with what is known of its events' fate in the message."""
        if sent:
            message = (
                f"{error}; the events' fate is unknown: a request reached redis and its reply "
                "was lost, so they may be stored. Re-emitting them (error.events) is safe: "
                "readers and workers drop an event id they already applied"
            )
        else:
            message = (
                f"{error}; the events were not stored (no request reached redis): re-emit "
                "them (error.events) when it is back"
            )
        fated = BusUnavailableError(message, stored_unknown=sent)
        fated.__cause__ = error.__cause__
        return fated

    def _fail_batch(
        self, batch: list[Item], error: BaseException, *, unknown: bool = False
    ) -> None:
        if not batch:
            return
        self.failed += len(batch)
        self.last_error = error
        unknown = unknown or (isinstance(error, BusUnavailableError) and error.stored_unknown)
        for data, waiter, _ in batch:
            if waiter is None:
                self.unreported_failures += 1
                self.unreported.append(data)
                self.unreported_unknown |= unknown
            elif isinstance(waiter, Tracker):
                waiter.error = error
                waiter.failed.append(data)
                waiter.stored_unknown |= unknown
            elif not waiter.done():
                waiter.set_exception(with_events(error, (data,)))
        self._advance(len(batch))

    def _advance(self, count: int) -> None:
        self.done += count
        last = self.done
        if self.done_waiters:
            remaining: list[tuple[int, asyncio.Future[None]]] = []
            for target, future in self.done_waiters:
                if target <= last:
                    if not future.done():
                        future.set_result(None)
                else:
                    remaining.append((target, future))
            self.done_waiters = remaining

    async def with_retry(
        self, call: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``call(*args)``, retrying transient log errors with backoff and full jitter until
        the deadline; then (or at once for a permanent error) raise ``BusUnavailableError``
        (``BusPermissionError`` at once when the backend refused the operation to the user).

        The bus runs its own log calls of ``start()`` and ``sync()`` through here as well; their
        retries count in ``retries`` too.
        """
        return await self._retrying(lambda: call(*args, **kwargs), None, what="request")

    async def _retrying(
        self,
        call: Callable[[], Awaitable[T]],
        sent: list[bool] | None,
        name: str = "",
        *,
        what: str = "append",
    ) -> T:
        # ``sent[0]`` becomes true when an attempt may have reached the backend (see _judge).
        name = name or self.name
        deadline = time.monotonic() + self.retry_deadline_s
        attempt = 0
        while True:
            try:
                return await call()
            except (LogError, LogPermissionError) as exc:
                now = time.monotonic()
                error = self._judge(exc, name, sent, retry=now < deadline)
                if error is not None:
                    raise error from exc
                self.retries += 1
                if attempt == 0:
                    _log.warning("%s: %s failed, retrying: %s", name, what, exc)
                await self._backoff.wait(attempt, limit_s=deadline - now)
                attempt += 1

    def _judge(
        self, exc: Exception, name: str, sent: list[bool] | None, *, retry: bool
    ) -> Exception | None:
        """``None`` to retry a call that failed with ``exc`` (a transient log error while
        ``retry``), else the bus error that ends it, raised from ``exc``; anything but a log
        error comes back as it is. ``sent[0]`` becomes true when the attempt may have reached
        the backend: its reply was lost (``LogOutcomeUnknownError``) or it failed in a way that
        does not say (a ``LogError``)."""
        error: Exception
        if isinstance(exc, LogUnavailableError):
            if sent is not None and isinstance(exc, LogOutcomeUnknownError):
                sent[0] = True
            if retry:
                return None
            error = BusUnavailableError(
                f"{name}: backend unavailable for {self.retry_deadline_s:g} s: {exc}"
            )
        elif isinstance(exc, LogDurabilityError):  # stored: retrying would store it again
            error = BusDurabilityError(
                f"{name}: {exc}; re-emitting the events (error.events) is safe: "
                "readers and workers drop an event id they already applied",
                stored_unknown=True,
            )
        elif isinstance(exc, LogError):  # not transient: retrying cannot help
            if sent is not None:
                sent[0] = True  # e.g. an error reply to one command of a pipeline
            error = BusUnavailableError(f"{name}: {exc}")
        elif isinstance(exc, LogPermissionError):
            error = BusPermissionError(f"{name}: {exc}", user=exc.user, command=exc.command)
        else:
            return exc
        error.__cause__ = exc
        return error
