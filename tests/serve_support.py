"""A real ``hvobs serve`` server for tests: uvicorn on a free loopback port, in a thread.

``ServerThread`` runs a :class:`ServeRuntime` and its uvicorn server on an event loop of its
own thread, so a test talks to it over real HTTP (httpx, a browser) and can still reach into
it: ``call(coroutine_function)`` runs a coroutine on the server's loop (to emit events on its
bus) and ``run(function)`` a plain function (to end every stream server-side).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from hypervisor.observability._bus.bus import RedisEventBus
from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability.demo.fleet import Fleet
from hypervisor.observability.web.app import LOOPBACK_NAMES
from hypervisor.observability.web.cli import bind_socket
from hypervisor.observability.web.runtime import ServeRuntime
from hypervisor.observability.web.server import StreamingServer, make_server

__all__ = ["ServerThread", "recent", "sse_messages"]

T = TypeVar("T")


def recent(fleet: Fleet, now: datetime | None = None) -> list[HypervisorEvent]:
    """The fleet's events moved to end a second before now (as the live demo does)."""
    from hypervisor.observability.demo.live import LiveFleet

    return LiveFleet(fleet).history(now or datetime.now(UTC) - timedelta(seconds=1))


class ServerThread:
    """Serve a runtime built by ``make_runtime`` (on the server's loop) until exit.

    Args:
        make_runtime: builds the runtime (called on the server thread's loop).
        token: the bearer token the server requires, if any.
        allowed_hosts: ``Host`` names accepted (default: the loopback names).
        access_log: log every request (to check what the logs hold).
    """

    def __init__(
        self,
        make_runtime: Callable[[], ServeRuntime],
        *,
        token: str | None = None,
        allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES,
        access_log: bool = False,
    ) -> None:
        self._make_runtime = make_runtime
        self._token = token
        self._allowed_hosts = allowed_hosts
        self._access_log = access_log
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="hvobs-serve-test", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.runtime: ServeRuntime | None = None
        self.server: StreamingServer | None = None
        self.url = ""

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the server did not start within 30 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.loop is not None and self.server is not None:
            self.loop.call_soon_threadsafe(self.server.request_exit)
        self._thread.join(15)
        assert not self._thread.is_alive(), "the server thread did not stop"

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test through __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        runtime = self.runtime = self._make_runtime()
        await runtime.start()
        try:
            sock = bind_socket("127.0.0.1", 0)
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            self.server = make_server(
                runtime,
                token=self._token,
                allowed_hosts=self._allowed_hosts,
                access_log=self._access_log,
                log_level="info" if self._access_log else "warning",
            )
            self.loop.call_later(0.05, self._ready.set)
            await self.server.serve(sockets=[sock])
        finally:
            await runtime.aclose()

    @property
    def bus(self) -> RedisEventBus:
        """The served bus."""
        assert self.runtime is not None
        return self.runtime.bus

    def call(self, body: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
        """Run ``body()`` on the server's loop and return its result."""
        assert self.loop is not None

        async def run() -> T:
            return await body()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def run(self, body: Callable[[], T], timeout: float = 30.0) -> T:
        """Run the plain function ``body`` on the server's loop and return its result."""
        return self.call(lambda: _wrap(body), timeout)

    def emit(self, events: list[HypervisorEvent]) -> None:
        """Emit ``events`` on the served bus and wait until its index and view hold them."""

        async def emit() -> None:
            await self.bus.emit_many(events)
            await self.bus.sync()

        self.call(emit)

    def client(self, **options: Any) -> httpx.Client:
        """An HTTP client of this server."""
        return httpx.Client(base_url=self.url, timeout=10.0, **options)


async def _wrap(body: Callable[[], T]) -> T:
    return body()


def sse_messages(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Parse server-sent events from a line iterator: ``{"event", "id", "data"}`` per message
    (comments skipped)."""
    message: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if not line:
            if data or message:
                message["data"] = "\n".join(data)
                message.setdefault("event", "message")
                yield message
            message, data = {}, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field in ("event", "id", "retry"):
            message[field] = value


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``condition`` until it returns something true; return it (fail after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.05)
