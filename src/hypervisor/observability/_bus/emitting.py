"""The writing side of ``RedisEventBus``'s surface: ``emit``, ``emit_many``, ``emit_nowait``
and ``flush``.

A mixin so the bus stays one class with one public surface; it holds no state of its own and
uses the ``_writer`` (buffer, flusher) and the limits the bus builds. Each emit encodes at the
call, so an unencodable or too large event raises there and changes nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from hypervisor.observability._bus.writer import BusWriter, Tracker, decode_all
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability._core.trace_context import EVENT_PREFIX, attach_context
from hypervisor.observability._util.otel_context import current_trace_context
from hypervisor.observability.errors import (
    BusFullError,
    BusPermissionError,
    BusUnavailableError,
    EventTooLargeError,
    PermissionDeniedError,
)

__all__ = ["BusEmitting"]


class BusEmitting:
    """Mixin: the emit paths of ``RedisEventBus`` and ``flush()``."""

    _writer: BusWriter
    # The partition of an event (None: one partition, every event goes to partition 0).
    _route: Callable[[HypervisorEvent], int] | None
    _buffer_size: int
    _max_event_bytes: int
    _trace_context: bool

    def _check_running(self) -> None:
        raise NotImplementedError  # the bus's

    # -- emitting -----------------------------------------------------------------------------

    async def _wait_space(self, needed: int = 1) -> None:
        while len(self._writer.buffer) + needed > self._buffer_size:
            space = self._writer.space
            assert space is not None
            space.clear()
            await space.wait()
            self._check_running()

    async def emit(self, event: HypervisorEvent, *, block: bool = True) -> None:
        """Store ``event`` in the log; return once the backend has stored it.

        Args:
            event: the event.
            block: wait while the buffer is full (else raise ``BusFullError``).

        Raises:
            EventEncodeError: the event cannot be encoded, or would not be read back the same
                (raised before buffering; the message names the payload path).
            EventTooLargeError: the encoded event is longer than ``max_event_bytes``.
            BusFullError: the buffer is full and ``block`` is false.
            BusUnavailableError: the backend stayed unreachable past ``retry_deadline_s``; the
                error's ``events`` holds this event and ``stored_unknown`` says whether it may
                have been stored anyway (a reply was lost): re-emitting it is safe, readers and
                workers drop copies.
            BusPermissionError: the backend refused the append to this user (at once).
            BusClosedError: the bus is closed or not started.
        """
        data = self._encoded(event)
        self._check_running()
        if len(self._writer.buffer) >= self._buffer_size:
            if not block:
                raise BusFullError(f"emit buffer full ({self._buffer_size} events)")
            await self._wait_space()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        route = self._route
        self._writer.enqueue(data, future, 0 if route is None else route(event))
        await future

    async def emit_many(self, events: Iterable[HypervisorEvent]) -> None:
        """Store many events in order; return once the backend has stored all of them.

        Every event is encoded first, so an unencodable or too large one raises before any is
        buffered.

        Raises:
            EventEncodeError: an event cannot be encoded (nothing was buffered).
            EventTooLargeError: an event is longer than ``max_event_bytes`` (nothing was
                buffered).
            BusUnavailableError: some of them could not be stored before the retry deadline
                (``BusPermissionError``: refused to this user); its ``events`` are those not
                confirmed stored, ``stored_unknown`` whether some may have been stored anyway
                (re-emitting them is safe: readers and workers drop copies).
            BusClosedError: the bus is closed or not started.
        """
        if self._route is not None:
            events = list(events)  # read twice: encoded, then routed
        limit = self._max_event_bytes
        encoded: list[bytes] = []
        # One context for the call: every event is encoded here, inside the caller's span.
        context = current_trace_context() if self._trace_context else None
        if context is None:
            for event in events:
                data = encode_event(event, exact=True)
                if len(data) > limit:
                    raise self._too_large(event, len(data))
                encoded.append(data)
        else:
            # attach_context's common case inline: a third of its cost is the call.
            prefix, fields = context.prefix, context.fields
            for event in events:
                data = encode_event(event, exact=True)
                if data.startswith(EVENT_PREFIX):
                    data = prefix + data[3:] + fields
                else:
                    data = attach_context(data, context)
                if len(data) > limit:
                    raise self._too_large(event, len(data))
                encoded.append(data)
        self._check_running()
        if not encoded:
            return
        route = self._route
        parts = [0] * len(encoded) if route is None else [route(event) for event in events]
        tracker = Tracker()
        step = max(1, min(self._buffer_size, self._writer.batch_size * 4))
        for offset in range(0, len(encoded), step):
            chunk = encoded[offset : offset + step]
            if len(self._writer.buffer) + len(chunk) > self._buffer_size:
                await self._wait_space(len(chunk))
            for data, part in zip(chunk, parts[offset : offset + step], strict=True):
                self._writer.enqueue(data, tracker, part)
        await self._writer.wait_done(self._writer.enqueued)
        error = tracker.error
        if error is not None:
            failed = tracker.failed
            message = f"{len(failed)} of the {len(encoded)} events were not confirmed stored"
            raise _lost(message, error, failed, tracker.stored_unknown) from error

    def emit_nowait(self, event: HypervisorEvent) -> None:
        """Buffer ``event`` for the flusher and return at once; ``flush()`` confirms storage.

        Raises:
            EventEncodeError: the event cannot be encoded.
            EventTooLargeError: the encoded event is longer than ``max_event_bytes``.
            BusFullError: the buffer holds ``buffer_size`` events already.
            BusClosedError: the bus is closed or not started.
        """
        data = self._encoded(event)
        self._check_running()
        if len(self._writer.buffer) >= self._buffer_size:
            raise BusFullError(
                f"emit buffer full ({self._buffer_size} events); await emit() or flush()"
            )
        route = self._route
        self._writer.enqueue(data, None, 0 if route is None else route(event))

    def _encoded(self, event: HypervisorEvent) -> bytes:
        """``event``'s bytes on the wire, with the active trace context when the bus carries
        it, checked against ``max_event_bytes`` (``emit_many`` inlines the same steps)."""
        data = encode_event(event, exact=True)
        if self._trace_context:
            context = current_trace_context()
            if context is not None:
                data = attach_context(data, context)
        if len(data) > self._max_event_bytes:
            raise self._too_large(event, len(data))
        return data

    def _too_large(self, event: HypervisorEvent, size: int) -> EventTooLargeError:
        limit = self._max_event_bytes
        return EventTooLargeError(
            f"event {event.event_id} is {size} bytes encoded, over the limit of {limit} bytes "
            "(RedisEventBus option max_event_bytes; workers: --max-event-bytes)",
            size=size,
            limit=limit,
        )

    @property
    def max_event_bytes(self) -> int:
        """The longest encoded event the bus writes or reads."""
        return self._max_event_bytes

    async def flush(self) -> None:
        """Wait until everything buffered before the call is stored.

        Raises:
            BusUnavailableError: buffered events were lost to an unreachable backend since the
                previous ``flush()`` (the count is in the message; ``events`` holds them, at
                most ``buffer_size`` of the newest, and ``stored_unknown`` says whether some may
                have been stored after all); ``BusPermissionError`` when the last loss was a
                refusal to this user.
        """
        self._check_running()
        writer = self._writer
        await writer.wait_done(writer.enqueued)
        if writer.unreported_failures:
            lost, writer.unreported_failures = writer.unreported_failures, 0
            datas, unknown = list(writer.unreported), writer.unreported_unknown
            writer.unreported.clear()
            writer.unreported_unknown = False
            kept = "" if len(datas) == lost else f" (error.events holds the newest {len(datas)})"
            message = f"{lost} buffered events were not confirmed stored{kept}"
            raise _lost(message, writer.last_error, datas, unknown) from writer.last_error

    @property
    def buffered(self) -> int:
        """Events waiting in the emit buffer."""
        return len(self._writer.buffer)


def _lost(
    message: str, error: BaseException | None, datas: list[bytes], unknown: bool
) -> BusUnavailableError:
    """The error of a call some of whose events were not confirmed stored: it carries them."""
    events = decode_all(datas)
    if isinstance(error, PermissionDeniedError):
        return BusPermissionError(
            f"{message}: {error}", user=error.user, command=error.command, events=events
        )
    if isinstance(error, BusUnavailableError):
        # The batch's message already says what is known of the events' fate.
        return type(error)(f"{message}: {error}", events=events, stored_unknown=unknown)
    return BusUnavailableError(f"{message}: {error}", events=events, stored_unknown=unknown)
