"""``run_until_signal``: run an application's async main so that SIGTERM and SIGINT drain its
buses instead of losing what they buffered.

``asyncio.run(main())`` dies on SIGTERM at once (the default action ends the process, so
``async with bus`` never closes and everything ``emit_nowait`` buffered is lost) and turns
SIGINT into a ``KeyboardInterrupt`` wherever the loop happens to be. Here the first signal
cancels ``main`` like any cancellation, so its ``async with RedisEventBus(...)`` blocks close:
``aclose()`` flushes the buffer (shielded, up to its flush timeout) and reports what it could
not store. Buses ``main`` started and left open are closed after it. A second signal aborts
the flushes (the events still buffered count as not stored) and ends the process with status
128 + the signal's number.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

import anyio

from hypervisor.observability._bus.bus import live_buses

__all__ = ["run_until_signal"]

_log = logging.getLogger("hypervisor.observability.redis_bus")

T = TypeVar("T")

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_until_signal(
    main: Callable[[], Awaitable[T]],
    *,
    signals: Iterable[signal.Signals] = DEFAULT_SIGNALS,
    flush_timeout_s: float | None = None,
) -> T | None:
    """Run ``main()`` on asyncio until it returns or a signal stops it; drain the buses.

    The one-line replacement of ``asyncio.run(main())`` for a process that emits on a
    ``RedisEventBus``::

        run_until_signal(main)

    On the first of ``signals`` ``main`` is cancelled; its ``async with bus`` blocks then flush
    what is buffered (each bus's ``aclose()``, up to its flush timeout) and the buses it left
    open are closed here. A second signal aborts the flushes: what is still buffered fails and
    counts in the bus's ``unstored`` (each bus logs a WARNING with the count).

    Signals are handled by the event loop (POSIX only), so a ``main`` that never awaits (a CPU
    loop) sees one only when it next awaits.

    Args:
        main: the application's async entry point (``functools.partial`` for arguments).
        signals: the signals that stop it (SIGTERM and SIGINT).
        flush_timeout_s: the flush timeout of the buses closed here (default: each bus's
            retry deadline plus a second); ``async with`` blocks use their bus's default.

    Returns:
        What ``main()`` returned, or ``None`` when a signal stopped it.

    Raises:
        SystemExit: a second signal arrived (status 128 + its number).
    """
    return anyio.run(_run, main, tuple(signals), flush_timeout_s, backend="asyncio")


async def _run(
    main: Callable[[], Awaitable[T]],
    signals: tuple[signal.Signals, ...],
    flush_timeout_s: float | None,
) -> T | None:
    loop = asyncio.get_running_loop()
    main_scope = anyio.CancelScope()
    received: list[int] = []
    result: T | None = None
    error: Exception | None = None

    async def watch(signal_stream: AsyncIterator[signal.Signals]) -> None:
        async for signum in signal_stream:
            received.append(signum)
            name = signal.Signals(signum).name
            buses = live_buses(loop)
            if len(received) == 1:
                _log.info(
                    "%s: stopping; closing %d buses flushes their %d buffered events",
                    name,
                    len(buses),
                    sum(bus.buffered for bus in buses),
                )
                main_scope.cancel()
            else:
                _log.warning("%s again: aborting the flush of %d buses", name, len(buses))
                for bus in buses:
                    bus.abort_flush()

    with anyio.open_signal_receiver(*signals) as signal_stream:
        async with anyio.create_task_group() as group:
            group.start_soon(watch, signal_stream)
            try:
                with main_scope:
                    result = await main()
            except Exception as exc:  # raised as it is below, not wrapped by the task group
                error = exc
            # The buses main started and did not close (no ``async with``): close them here.
            for bus in live_buses(loop):
                await bus.aclose(flush_timeout_s=flush_timeout_s)
            group.cancel_scope.cancel()
    if error is not None:
        raise error
    if len(received) > 1:
        raise SystemExit(128 + received[-1])
    return None if received else result
