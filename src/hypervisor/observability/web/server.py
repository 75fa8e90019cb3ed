"""The uvicorn server of ``hvobs serve``: one that ends the event streams when asked to stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Generator, Iterable
from contextlib import contextmanager

import uvicorn

from hypervisor.observability.web.app import create_app
from hypervisor.observability.web.runtime import ServeRuntime

__all__ = ["StreamingServer", "make_server"]


class StreamingServer(uvicorn.Server):
    """A uvicorn server that ends the event streams when asked to stop.

    Streams never end by themselves, so a plain graceful shutdown would wait for them; here
    :meth:`request_exit` (SIGINT and SIGTERM call it) ends every stream first, and the signal
    is not raised again afterwards (``hvobs serve`` exits 0). A second SIGINT forces the exit.
    """

    def __init__(self, config: uvicorn.Config, runtime: ServeRuntime) -> None:
        super().__init__(config)
        self.runtime = runtime

    def request_exit(self) -> None:
        """Stop serving: end the streams and let the server shut down. Call on its loop."""
        self.should_exit = True
        self.runtime.broadcaster.close_all()

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Handle SIGINT/SIGTERM on the loop while serving (only in the main thread)."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass  # not the main thread: whoever runs the server stops it
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.request_exit()


def make_server(
    runtime: ServeRuntime,
    *,
    token: str | None = None,
    allowed_hosts: Iterable[str] | None = None,
    log_level: str = "warning",
    access_log: bool = False,
) -> StreamingServer:
    """A server of :func:`~hypervisor.observability.web.app.create_app` over ``runtime``;
    run it with ``await server.serve(sockets=[sock])``."""
    app = create_app(runtime, token=token, allowed_hosts=allowed_hosts)
    config = uvicorn.Config(
        app,
        lifespan="off",
        ws="none",
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=3,
    )
    return StreamingServer(config, runtime)
