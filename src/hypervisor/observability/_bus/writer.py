"""The writing side of ``RedisEventBus``: its emit buffer and the one flusher task.

Emitters put ``(bytes, waiter)`` into the buffer (``enqueue``); the flusher drains it into one
``append_many`` per batch, retrying transient log errors with exponential backoff and full
jitter until the retry deadline, and then tells every waiter of the batch how it went. Two
sequence numbers, of the last event buffered and of the last one whose batch finished, let
``flush()``, ``emit_many`` and ``aclose()`` wait for everything buffered before them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import anyio

from hypervisor.observability._backends.log import (
    LogError,
    LogPermissionError,
    LogUnavailableError,
    StreamLog,
)
from hypervisor.observability._util.retry import Backoff
from hypervisor.observability.errors import (
    BusClosedError,
    BusPermissionError,
    BusUnavailableError,
)

__all__ = ["BusWriter", "Tracker", "Waiter"]

_log = logging.getLogger("hypervisor.observability.redis_bus")

P = ParamSpec("P")
T = TypeVar("T")


class Tracker:
    """Shared by the events of one ``emit_many`` call: records whether any of them failed."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: BaseException | None = None


# Who waits for a buffered event: an awaited emit's future, an emit_many call's tracker, or
# nobody (emit_nowait; its failure is reported by the next flush()).
Waiter = asyncio.Future[None] | Tracker | None


class BusWriter:
    """The emit buffer, the flusher loop and the write counters of one bus.

    The bus checks that it is running and that the buffer has room, then calls
    :meth:`enqueue`; :meth:`run` is the flusher task's body. ``wake`` and ``space`` are created
    by :meth:`open` (from the bus's ``start()``): the flusher waits on ``wake`` for events, and
    emitters wait on ``space`` for room in a full buffer.
    """

    def __init__(
        self,
        log: StreamLog,
        *,
        batch_size: int,
        linger_s: float,
        retry_deadline_s: float,
        backoff: Backoff,
    ) -> None:
        self.log = log
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.retry_deadline_s = retry_deadline_s
        self._backoff = backoff

        self.buffer: deque[tuple[bytes, Waiter]] = deque()
        self.enqueued = 0  # sequence number of the last event put into the buffer
        self.done = 0  # sequence number of the last event whose batch finished (ok or failed)
        self.unreported_failures = 0
        self.last_error: BaseException | None = None
        self.done_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.wake: asyncio.Event | None = None
        self.space: asyncio.Event | None = None

        # Read through the bus's properties of the same names (documented there).
        self.emitted = 0
        self.failed = 0
        self.retries = 0
        self.batches = 0

    def open(self) -> None:
        """Create the events the flusher and the emitters wait on (once, from ``start()``)."""
        self.wake = asyncio.Event()
        self.space = asyncio.Event()

    def enqueue(self, data: bytes, future: Waiter) -> None:
        """Buffer one encoded event and wake the flusher (room was checked by the caller)."""
        self.buffer.append((data, future))
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
            _log.error(
                "%s: closing with %d events not stored (backend unavailable)",
                self.log.name,
                len(self.buffer),
            )
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
            await self._append_batch(batch)

    async def _append_batch(self, batch: list[tuple[bytes, Waiter]]) -> None:
        datas = [data for data, _ in batch]
        try:
            await self.with_retry(self.log.append_many, datas)
        except BusUnavailableError as exc:
            self._fail_batch(batch, exc)
            return
        except Exception as exc:  # a bug below us must not kill the flusher and hang emitters
            _log.exception("%s: append failed unexpectedly", self.log.name)
            error = BusUnavailableError(f"{self.log.name}: append failed: {exc!r}")
            error.__cause__ = exc
            self._fail_batch(batch, error)
            return
        except BaseException:
            # Cancelled mid-append (aclose past its flush timeout): whether Redis stored the
            # batch is unknown, so its emitters must not be told it was.
            self._fail_batch(batch, BusClosedError("the bus was closed while storing the event"))
            raise
        self.emitted += len(batch)
        self.batches += 1
        for _, waiter in batch:
            if isinstance(waiter, asyncio.Future) and not waiter.done():
                waiter.set_result(None)
        self._advance(len(batch))

    def _fail_batch(self, batch: list[tuple[bytes, Waiter]], error: BaseException) -> None:
        if not batch:
            return
        self.failed += len(batch)
        self.last_error = error
        for _, waiter in batch:
            if waiter is None:
                self.unreported_failures += 1
            elif isinstance(waiter, Tracker):
                waiter.error = error
            elif not waiter.done():
                waiter.set_exception(error)
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
        deadline = time.monotonic() + self.retry_deadline_s
        attempt = 0
        while True:
            try:
                return await call(*args, **kwargs)
            except LogUnavailableError as exc:
                now = time.monotonic()
                if now >= deadline:
                    raise BusUnavailableError(
                        f"{self.log.name}: backend unavailable for "
                        f"{self.retry_deadline_s:g} s: {exc}"
                    ) from exc
                self.retries += 1
                if attempt == 0:
                    _log.warning("%s: append failed, retrying: %s", self.log.name, exc)
                await self._backoff.wait(attempt, limit_s=deadline - now)
                attempt += 1
            except LogError as exc:  # not transient: retrying cannot help
                raise BusUnavailableError(f"{self.log.name}: {exc}") from exc
            except LogPermissionError as exc:
                raise BusPermissionError(
                    f"{self.log.name}: {exc}", user=exc.user, command=exc.command
                ) from exc
