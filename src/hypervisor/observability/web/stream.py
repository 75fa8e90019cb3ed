"""Server-sent events of new events: one broadcaster per server, a bounded queue per client.

The broadcaster wakes when the bus applies events (a wildcard subscriber sets a flag), reads
what the local index gained since its last tick by position, encodes it **once** into
``events`` messages (``id: <run>:<next position>``, ``data:`` a JSON array of ``to_dict()``
events), hands the same bytes to every client, and then waits ``tick_s`` before the next
round, so a busy stream is sent in batches per tick instead of one message per event while a
quiet one is sent at once.

Each client has a bounded queue (messages and bytes). A client too slow to keep up loses its
queue: the dropped events are counted (per client and in total) and it is sent one ``reset``
message instead (``data: {"reason": ..., "dropped": N}``), after which it gets the live
messages again; the page reloads its views on ``reset``. A client that reconnects with
``Last-Event-ID`` (or ``?last_event_id=``) gets the events after that id replayed first, when
they are still indexed and at most ``max_replay`` of them; otherwise a ``reset``. Comments are
sent as heartbeats while nothing happens, so proxies and clients see a live connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator
from typing import Final

from hypervisor.observability._bus.bus import RedisEventBus
from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability.web.encode import encode_events, encode_json, join_array
from hypervisor.observability.web.params import Position

__all__ = ["Broadcaster", "StreamClient"]

_log = logging.getLogger("hypervisor.observability.web")

_HEARTBEAT: Final = b": keepalive\n\n"
_CLOSE: Final = b""
# Events per ``events`` message (a message is also cut at about max_message_bytes).
_MAX_BATCH: Final = 1000


class StreamClient:
    """One connected ``/api/stream`` client: its bounded queue of encoded messages.

    Args:
        max_messages: messages the queue holds.
        max_bytes: bytes the queue holds.
        start: the first position this client still needs (it may join mid-batch).
    """

    __slots__ = (
        "_bytes",
        "_queue",
        "_wake",
        "closed",
        "dropped",
        "max_bytes",
        "max_messages",
        "needs_reset",
        "start",
    )

    def __init__(self, max_messages: int, max_bytes: int, start: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.start = start
        self._queue: deque[tuple[bytes, int]] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self.dropped = 0
        self.needs_reset = False
        self.closed = False

    def offer(self, message: bytes, events: int) -> int:
        """Queue a message of ``events`` events; return how many events were dropped."""
        if self.closed:
            return 0
        if (
            len(self._queue) >= self.max_messages
            or self._bytes + len(message) > self.max_bytes
            or self.needs_reset
        ):
            lost = events + sum(count for _, count in self._queue)
            self._queue.clear()
            self._bytes = 0
            self.dropped += lost
            self.needs_reset = True
            self._wake.set()
            return lost
        self._queue.append((message, events))
        self._bytes += len(message)
        self._wake.set()
        return 0

    def force_reset(self, lost: int) -> None:
        """Drop the queue and send the client a ``reset`` next (``lost`` events it missed)."""
        self.dropped += lost + sum(count for _, count in self._queue)
        self._queue.clear()
        self._bytes = 0
        self.needs_reset = True
        self._wake.set()

    def close(self) -> None:
        """End this client's stream (the response finishes; the client reconnects)."""
        self.closed = True
        self._wake.set()

    async def next_message(self, wait_s: float) -> bytes | None:
        """The next queued message, ``None`` after ``wait_s`` seconds without one, or
        ``b""`` once closed."""
        while not self._queue:
            if self.closed:
                return _CLOSE
            if self.needs_reset:
                return None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait_s)
            except TimeoutError:
                return None
        message, _ = self._queue.popleft()
        self._bytes -= len(message)
        return message

    def take_reset(self) -> int:
        """If the client lost messages, clear the flag and return the events lost (else -1)."""
        if not self.needs_reset or self._queue:
            return -1
        self.needs_reset = False
        lost, self.dropped = self.dropped, 0
        return lost


class Broadcaster:
    """Reads new events from the bus's index each tick and fans them out to the clients.

    Args:
        bus: the bus whose local index is streamed.
        run: this server run's id (the prefix of every stream id).
        tick_s: the least time between two rounds (the batching window).
        heartbeat_s: a client that got nothing for this long gets a heartbeat comment.
        max_client_messages: messages a client's queue holds.
        max_client_bytes: bytes a client's queue holds.
        max_replay: the most events replayed to a reconnecting client.
        max_event_bytes: the longest JSON of one event sent whole.
        max_clients: the most clients connected at once.
    """

    def __init__(
        self,
        bus: RedisEventBus,
        run: str,
        *,
        tick_s: float = 0.05,
        heartbeat_s: float = 15.0,
        max_client_messages: int = 256,
        max_client_bytes: int = 16 * 1024 * 1024,
        max_replay: int = 10_000,
        max_event_bytes: int = 64 * 1024,
        max_clients: int = 256,
    ) -> None:
        self.bus = bus
        self.run_id = run
        self.tick_s = tick_s
        self.heartbeat_s = heartbeat_s
        self.max_client_messages = max_client_messages
        self.max_client_bytes = max_client_bytes
        self.max_replay = max_replay
        self.max_event_bytes = max_event_bytes
        self.max_clients = max_clients
        self.clients: set[StreamClient] = set()
        # The next position to broadcast: every client is up to date below it.
        self.position = bus.index_position
        self._wake = asyncio.Event()
        self.messages_sent = 0
        self.events_sent = 0
        self.dropped_events = 0
        self.missed_events = 0

    def notify(self, _event: HypervisorEvent) -> None:
        """A bus subscriber: wake the broadcaster (cheap; called for every event)."""
        wake = self._wake
        if not wake.is_set():
            wake.set()

    def stream_id(self, position: int) -> str:
        """The stream id of ``position`` in this run."""
        return str(Position(self.run_id, position))

    async def run(self) -> None:
        """The broadcaster's loop, until cancelled."""
        while True:
            self._wake.clear()
            if self.bus.index_position <= self.position:
                await self._wake.wait()
            self.broadcast()
            await asyncio.sleep(self.tick_s)

    def broadcast(self) -> None:
        """Send every event indexed since the last round to every client."""
        bus = self.bus
        while self.position < bus.index_position:
            chunk = bus.read_from(self.position, _MAX_BATCH)
            if chunk.start > self.position:
                # Evicted from the index before they were sent (a burst beyond max_events
                # within one tick): every client is told to reload.
                missed = chunk.start - self.position
                self.missed_events += missed
                for client in self.clients:
                    client.force_reset(missed)
            if not chunk.events:
                self.position = chunk.stop
                break
            parts = encode_events(chunk.events, self.max_event_bytes)
            self._publish(chunk.start, chunk.stop, parts)
            self.position = chunk.stop

    def _publish(self, start: int, stop: int, parts: list[bytes]) -> None:
        message = self.events_message(stop, parts)
        count = stop - start
        self.messages_sent += 1
        self.events_sent += count
        for client in self.clients:
            if client.start <= start:
                self.dropped_events += client.offer(message, count)
            elif client.start < stop:
                # Joined mid-batch (it had read the index up to its start): its own tail.
                tail = parts[client.start - start :]
                self.dropped_events += client.offer(self.events_message(stop, tail), len(tail))
            client.start = max(client.start, stop)

    def events_message(self, stop: int, parts: list[bytes]) -> bytes:
        """An ``events`` message of encoded events ending before position ``stop``."""
        return b"".join(
            (
                b"id: ",
                self.stream_id(stop).encode(),
                b"\nevent: events\ndata: ",
                join_array(parts),
                b"\n\n",
            )
        )

    def reset_message(self, reason: str, dropped: int) -> bytes:
        """A ``reset`` message: reload the views; its id resumes at the live position."""
        data = encode_json({"reason": reason, "dropped": dropped})
        return b"".join(
            (
                b"id: ",
                self.stream_id(self.position).encode(),
                b"\nevent: reset\ndata: ",
                data,
                b"\n\n",
            )
        )

    def close_all(self) -> None:
        """End every client's stream now (they reconnect with their last id)."""
        for client in list(self.clients):
            client.close()

    def connect(self, resume: Position | None) -> AsyncGenerator[bytes, None]:
        """The messages of one new client: a retry hint, the replay after ``resume`` (or a
        ``reset``), then the live messages and heartbeats until the client leaves or is
        closed.

        Raises:
            OverflowError: ``max_clients`` are connected already.
        """
        if len(self.clients) >= self.max_clients:
            raise OverflowError(f"{self.max_clients} stream clients are connected already")
        live = self.position
        client = StreamClient(self.max_client_messages, self.max_client_bytes, live)
        first: list[bytes] = [b"retry: 2000\n\n"]
        if resume is not None:
            first += self._replay(resume, live, client)
        # Registered in the same step as the replay was read: no event falls in between.
        self.clients.add(client)
        return self._messages(client, first)

    def _replay(self, resume: Position, live: int, client: StreamClient) -> list[bytes]:
        bus = self.bus
        if resume.run != self.run_id:
            return [self.reset_message("the server restarted", 0)]
        wanted = resume.position
        if wanted > bus.index_position:
            return [self.reset_message("unknown stream position", 0)]
        if wanted > live:
            # Read from the index by a query before the broadcaster sent it: join mid-batch.
            client.start = wanted
            return []
        if live - wanted > self.max_replay or wanted < bus.index_first_position:
            dropped = live - wanted
            return [self.reset_message("too far behind to replay", dropped)]
        messages: list[bytes] = []
        position = wanted
        while position < live:
            chunk = bus.read_from(position, min(_MAX_BATCH, live - position))
            if not chunk.events:
                break
            parts = encode_events(chunk.events, self.max_event_bytes)
            messages.append(self.events_message(chunk.stop, parts))
            position = chunk.stop
        return messages

    async def _messages(
        self, client: StreamClient, first: list[bytes]
    ) -> AsyncGenerator[bytes, None]:
        try:
            for message in first:
                yield message
            while True:
                waited = await client.next_message(self.heartbeat_s)
                if waited is None:
                    lost = client.take_reset()
                    if lost >= 0:
                        yield self.reset_message("the client fell behind", lost)
                    else:
                        yield _HEARTBEAT
                    continue
                if client.closed:
                    return
                yield waited
        finally:
            self.clients.discard(client)
