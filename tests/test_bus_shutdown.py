"""Shutdown without loss: ``run_until_signal`` drains a producer's buffer on SIGTERM, a second
signal aborts, and ``aclose()`` reports the events it could not store."""

from __future__ import annotations

import logging
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
import redis.asyncio as aioredis
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from hypervisor.observability._backends import RedisStreamLog
from hypervisor.observability._core.codec import decode_events
from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability.redis_bus import RedisEventBus
from redis_server import RedisServer

pytestmark = pytest.mark.anyio

# A producer that fills its emit_nowait buffer, says how many events it accepted, and waits.
_PRODUCER = textwrap.dedent(
    """
    import logging
    import sys

    import anyio

    from hypervisor.observability import (
        BusFullError, HypervisorEvent, RedisEventBus, run_until_signal,
    )

    url, stream, tag = sys.argv[1], sys.argv[2], sys.argv[3]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    async def main() -> None:
        async with RedisEventBus.from_url(
            url, stream, reader=False, buffer_size=2000, batch_size=200
        ) as bus:
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.readline)
            count = 0
            while True:
                try:
                    bus.emit_nowait(HypervisorEvent(session_id=tag, payload={"i": count}))
                except BusFullError:
                    break
                count += 1
                if count % 100 == 0:
                    await anyio.sleep(0)  # the flusher takes a batch (Redis holds it)
            print(f"full {count}", flush=True)
            await anyio.sleep_forever()

    run_until_signal(main)
    """
)


async def _payloads(url: str, stream: str, tag: str) -> list[int]:
    """The ``payload["i"]`` of every event of ``tag`` in the stream, read with a fresh client."""
    found: list[int] = []
    async with RedisStreamLog(url, stream) as log:
        after = "0-0"
        while entries := await log.read(after, 5000):
            decoded, _ = decode_events([e.data or b"" for e in entries])
            found.extend(e.payload["i"] for e in decoded if e.session_id == tag)
            after = entries[-1].id
    return found


async def _command(client: aioredis.Redis, *args: object) -> object:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


@asynccontextmanager
async def _writes_paused(url: str) -> AsyncIterator[aioredis.Redis]:
    """Redis holds every write command (``CLIENT PAUSE WRITE``) until the block ends or the
    yielded client sends ``CLIENT UNPAUSE``."""
    control = aioredis.Redis.from_url(url)
    try:
        await _command(control, "CLIENT", "PAUSE", 60_000, "WRITE")
        yield control
    finally:
        with anyio.CancelScope(shield=True):
            await _command(control, "CLIENT", "UNPAUSE")
            await control.aclose()


class _Lines:
    """The lines of a process's stream, awaited one condition at a time, kept for messages."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._text = TextReceiveStream(stream)
        self._pending = ""
        self.seen: list[str] = []

    async def until(self, prefix: str) -> str:
        """The next line that starts with ``prefix`` (the lines before it are kept)."""
        while True:
            while "\n" in self._pending:
                line, self._pending = self._pending.split("\n", 1)
                self.seen.append(line)
                if line.startswith(prefix):
                    return line
            try:
                self._pending += await self._text.receive()
            except anyio.EndOfStream:
                raise AssertionError(f"no line {prefix!r} in {self.seen}") from None

    async def rest(self) -> str:
        """Everything up to the end of the stream."""
        async for chunk in self._text:
            self._pending += chunk
        return "\n".join([*self.seen, self._pending])


async def _start_producer(url: str, stream: str, tag: str) -> Process:
    return await anyio.open_process([sys.executable, "-c", _PRODUCER, url, stream, tag])


async def _fill_buffer(process: Process) -> tuple[_Lines, int]:
    """Tell the producer to fill its buffer (Redis paused by the caller); return its standard
    error and the count of events it accepted."""
    assert process.stdout is not None
    assert process.stderr is not None
    assert process.stdin is not None
    out, err = _Lines(process.stdout), _Lines(process.stderr)
    await out.until("ready")
    await process.stdin.send(b"go\n")
    count = int((await out.until("full ")).split()[1])
    return err, count


@pytest.mark.slow
@pytest.mark.redis
async def test_sigterm_drains_a_full_emit_nowait_buffer(
    redis_server: RedisServer, stream_name: str
) -> None:
    """A producer under ``run_until_signal`` fills its ``emit_nowait`` buffer while Redis holds
    its writes, and gets SIGTERM; once Redis resumes, the process exits 0 and every event it
    accepted is in the stream (once)."""
    tag = "drained"
    with anyio.fail_after(60):
        async with await _start_producer(redis_server.url, stream_name, tag) as process:
            try:
                async with _writes_paused(redis_server.url) as control:
                    err, count = await _fill_buffer(process)
                    assert count >= 2000  # the buffer, and a batch Redis holds
                    process.send_signal(signal.SIGTERM)
                    line = await err.until("INFO SIGTERM: stopping")
                    assert "buffered events" in line
                    await _command(control, "CLIENT", "UNPAUSE")
                    assert await process.wait() == 0, await err.rest()
                    assert "not stored" not in await err.rest()
            finally:
                if process.returncode is None:
                    process.kill()
    payloads = await _payloads(redis_server.url, stream_name, tag)
    assert sorted(payloads) == list(range(count))


@pytest.mark.slow
@pytest.mark.redis
async def test_a_second_sigterm_aborts_the_flush_and_reports_the_count(
    redis_server: RedisServer, stream_name: str
) -> None:
    """Redis holds the writes through both signals: the second SIGTERM aborts the flush, the
    process exits with 128 + 15, and its WARNING line names every accepted event as not
    stored; none of them is in the stream once Redis resumes."""
    tag = "aborted"
    with anyio.fail_after(60):
        async with await _start_producer(redis_server.url, stream_name, tag) as process:
            try:
                async with _writes_paused(redis_server.url):
                    err, count = await _fill_buffer(process)
                    process.send_signal(signal.SIGTERM)
                    await err.until("INFO SIGTERM: stopping")
                    process.send_signal(signal.SIGTERM)
                    assert await process.wait() == 128 + signal.SIGTERM
                    output = await err.rest()
            finally:
                if process.returncode is None:
                    process.kill()
    assert "SIGTERM again: aborting the flush" in output
    assert f"closed with {count} events not stored" in output
    assert await _payloads(redis_server.url, stream_name, tag) == []


@pytest.mark.redis
async def test_aclose_reports_the_events_it_could_not_store(
    redis_server: RedisServer, stream_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis holds the writes past the flush deadline: ``aclose()`` returns the count of
    events not stored (also ``unstored``), logs it as a WARNING, and exactly that many are
    missing from the stream once Redis resumes (a buffered loss that no ``flush()`` reported
    before the close counts too)."""
    async with RedisEventBus.from_url(redis_server.url, stream_name, reader=False) as bus:
        before = [HypervisorEvent(session_id="kept", payload={"i": i}) for i in range(10)]
        for event in before:
            bus.emit_nowait(event)
        await bus.flush()
        async with _writes_paused(redis_server.url):
            for i in range(100):
                bus.emit_nowait(HypervisorEvent(session_id="lost", payload={"i": i}))
            with caplog.at_level(logging.WARNING, logger="hypervisor.observability.redis_bus"):
                lost = await bus.aclose(flush_timeout_s=0.5)
        assert lost == 100
        assert bus.unstored == 100
        assert await bus.aclose() == 100  # idempotent
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "closed with 100 events not stored" in w]
    assert sorted(await _payloads(redis_server.url, stream_name, "kept")) == list(range(10))
    assert await _payloads(redis_server.url, stream_name, "lost") == []
