"""A TCP proxy to a redis-server that loses the replies to ``XADD`` (a reply lost on the network:
Redis applied the command, the client never learns it)."""

from __future__ import annotations

import asyncio

import anyio

__all__ = ["ReplyDroppingProxy"]


class ReplyDroppingProxy:
    """Once armed, closes the connection that next sends an ``XADD`` right after the server's
    reply reaches the proxy, without passing the reply on, and disarms; with ``drop_all`` it
    stays armed, so every append is applied and none is answered.

    Attributes:
        armed: drop the reply to the next request holding an ``XADD``.
        drop_all: keep ``armed`` set after a drop.
        dropped: replies dropped so far.
        port: the proxy's port on 127.0.0.1 (after ``async with``).
    """

    def __init__(self, target_port: int, *, drop_all: bool = False) -> None:
        self.target_port = target_port
        self.armed = False
        self.drop_all = drop_all
        self.dropped = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> ReplyDroppingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        doomed = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self.armed and b"XADD" in data:
                    self.armed = self.drop_all
                    doomed.set()
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if doomed.is_set():
                    self.dropped += 1
                    break
                client_w.write(data)
                await client_w.drain()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(upstream)
                await downstream()
                tg.cancel_scope.cancel()
        except* OSError:
            # The client or server reset or closed its end (a bus closing with a reply still
            # unread resets it): this connection is over. The task group wraps the error in an
            # ExceptionGroup, which a plain ``except OSError`` let through to the test.
            pass
        finally:
            for writer in (client_w, server_w):
                writer.close()
