"""The running parts of one ``hvobs serve``: the bus, the fleet view, the stream broadcaster.

:class:`ServeRuntime` subscribes the view and the broadcaster to the bus *before* starting
it, so the events the bus backfills from the log on start reach the view too, then starts the
bus, the broadcaster task and, for the demo, the task that keeps the fleet emitting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hypervisor.observability._bus.bus import RedisEventBus
from hypervisor.observability._util.aio import AsyncResource
from hypervisor.observability.web.stream import Broadcaster
from hypervisor.observability.web.views import (
    DEFAULT_MAX_AGENTS,
    DEFAULT_MAX_NODES,
    DEFAULT_MAX_SAGAS,
    DEFAULT_MAX_SPANS_PER_SAGA,
    DEFAULT_MAX_TRACES,
    FleetView,
)

__all__ = ["ServeRuntime", "ServeSettings"]

_log = logging.getLogger("hypervisor.observability.web")

Driver = Callable[[RedisEventBus], Awaitable[None]]
"""A task that feeds the bus for as long as the server runs (the demo fleet)."""


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """The bounds and timings of a server; the defaults suit a fleet of thousands of agents.

    Attributes:
        tick_s: the least time between two stream rounds (the batching window).
        heartbeat_s: a stream client that got nothing for this long gets a heartbeat.
        max_stream_clients: stream clients connected at once (more get 503).
        max_client_messages: messages queued per stream client before it is reset.
        max_client_bytes: bytes queued per stream client before it is reset.
        max_replay: events replayed to a reconnecting stream client at most.
        max_event_bytes: the longest JSON of one event sent whole.
        max_response_bytes: about the largest ``/api/events`` response body.
        max_agents: agents the view keeps.
        max_sagas: sagas the view keeps.
        max_spans_per_saga: spans kept per saga.
        max_traces: spawn trees the view keeps.
        max_nodes: spans kept per spawn tree.
    """

    tick_s: float = 0.05
    heartbeat_s: float = 15.0
    max_stream_clients: int = 256
    max_client_messages: int = 256
    max_client_bytes: int = 16 * 1024 * 1024
    max_replay: int = 10_000
    max_event_bytes: int = 64 * 1024
    max_response_bytes: int = 4 * 1024 * 1024
    max_agents: int = DEFAULT_MAX_AGENTS
    max_sagas: int = DEFAULT_MAX_SAGAS
    max_spans_per_saga: int = DEFAULT_MAX_SPANS_PER_SAGA
    max_traces: int = DEFAULT_MAX_TRACES
    max_nodes: int = DEFAULT_MAX_NODES


class ServeRuntime(AsyncResource):
    """The bus, the view, the broadcaster and the optional driver of one server.

    Args:
        bus: a bus with its reader on (not started yet: the runtime starts and closes it).
        source: how the source is shown to operators (no credentials in it).
        settings: bounds and timings.
        driver: a task fed the bus once it is started (the demo fleet), cancelled on close.
    """

    def __init__(
        self,
        bus: RedisEventBus,
        *,
        source: str,
        settings: ServeSettings | None = None,
        driver: Driver | None = None,
    ) -> None:
        self.bus = bus
        self.source = source
        self.settings = settings = settings or ServeSettings()
        # A new id per run: cursors and stream ids of an earlier run (whose positions started
        # again at 0) are recognised and refused or reset.
        self.run_id = os.urandom(4).hex()
        self.started_at = time.time()
        self.view = FleetView(
            max_agents=settings.max_agents,
            max_sagas=settings.max_sagas,
            max_spans_per_saga=settings.max_spans_per_saga,
            max_traces=settings.max_traces,
            max_nodes=settings.max_nodes,
        )
        self.broadcaster = Broadcaster(
            bus,
            self.run_id,
            tick_s=settings.tick_s,
            heartbeat_s=settings.heartbeat_s,
            max_client_messages=settings.max_client_messages,
            max_client_bytes=settings.max_client_bytes,
            max_replay=settings.max_replay,
            max_event_bytes=settings.max_event_bytes,
            max_clients=settings.max_stream_clients,
        )
        self._driver = driver
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def __aenter__(self) -> ServeRuntime:
        await self.start()
        return self

    async def start(self) -> None:
        """Subscribe the view and the broadcaster, start the bus (its backfill reaches the
        view), then the broadcaster and the driver.

        Raises:
            BusUnavailableError: the bus's backend stayed unreachable.
        """
        self.bus.subscribe(None, self.view.apply)
        self.bus.subscribe(None, self.broadcaster.notify)
        await self.bus.start()
        self.broadcaster.position = self.bus.index_position
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.broadcaster.run(), name="hvobs-serve-stream"))
        if self._driver is not None:
            task = loop.create_task(self._drive(self._driver), name="hvobs-serve-driver")
            self._tasks.append(task)

    async def _drive(self, driver: Driver) -> None:
        try:
            await driver(self.bus)
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("the event source driver stopped")

    async def aclose(self) -> None:
        """End the streams, stop the tasks and close the bus. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.broadcaster.close_all()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.bus.aclose(flush_timeout_s=1.0)
