"""Idempotent reads survive a dead pooled connection: after Redis restarts, the first read on a
connection the server dropped is run once more on a new connection instead of failing; writes
are never retried by the client."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
import redis.exceptions as rexc

from hypervisor.observability._backends.redis_client import make_client, retry_read
from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
from hypervisor.observability._backends.state import Commit, StateMeta
from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability.errors import LogUnavailableError
from hypervisor.observability.redis_bus import RedisEventBus
from redis_server import RedisServer, redis_server_binary

pytestmark = pytest.mark.anyio


class _Calls:
    """A read that fails with the given errors first, then answers ``"ok"``."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


class _Pool:
    def __init__(self) -> None:
        self.disconnects: list[bool] = []

    async def disconnect(self, inuse_connections: bool = True) -> None:
        self.disconnects.append(inuse_connections)


class _Client:
    def __init__(self) -> None:
        self.connection_pool = _Pool()


async def test_a_read_is_retried_once_on_a_connection_the_server_closed() -> None:
    """A read whose connection was closed by the server runs once more, after the pool's idle
    connections were dropped; a second failure is the caller's."""
    client: Any = _Client()
    read = _Calls(rexc.ConnectionError("Connection closed by server."))
    assert await retry_read(client, read) == "ok"
    assert read.calls == 2
    assert client.connection_pool.disconnects == [False]
    twice = _Calls(*[rexc.ConnectionError("Connection closed by server.")] * 2)
    with pytest.raises(rexc.ConnectionError):
        await retry_read(client, twice)
    assert twice.calls == 2


@pytest.mark.parametrize(
    "error",
    [
        rexc.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
        rexc.AuthenticationError("invalid username-password pair"),
        rexc.TimeoutError("Timeout reading from 127.0.0.1:1"),
        rexc.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    ],
)
async def test_other_failures_are_not_retried(error: Exception) -> None:
    """A failure to connect (no pooled connection to blame), refused credentials, a timeout
    and an error reply are raised at the first attempt."""
    client: Any = _Client()
    read = _Calls(error)
    with pytest.raises(type(error)):
        await retry_read(client, read)
    assert read.calls == 1
    assert client.connection_pool.disconnects == []


@pytest.fixture
def aof_server() -> Iterator[RedisServer]:
    """A redis-server of this test alone, persisting every write (it is restarted)."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer("--appendonly", "yes", "--appendfsync", "always") as server:
        yield server


async def _first_after_restart(server: RedisServer, read: Callable[[], Awaitable[Any]]) -> Any:
    await read()  # a pooled connection
    await anyio.to_thread.run_sync(server.restart)
    return await read()


@pytest.mark.redis
async def test_state_reads_answer_at_once_after_a_restart(aof_server: RedisServer) -> None:
    """Every read of the state store answers the committed state on its first call after
    Redis restarted (its pooled connection died with the old server)."""
    prefix = state_prefix(f"t{uuid.uuid4().hex[:8]}", "g", "ring")
    async with RedisStateStore(aof_server.url, prefix) as store:
        await store.stage([("1-0", b"a"), ("2-0", b"b"), ("3-0", b"c")])
        meta = StateMeta(1, "2-0", 0, 1, epoch="00112233aabbccdd")
        assert await store.commit(Commit(0, b"snap", meta, ["e1"]))
        assert await _first_after_restart(aof_server, store.meta) == meta
        assert await _first_after_restart(aof_server, store.load) == (meta, b"snap")
        restored = await _first_after_restart(aof_server, store.restore)
        assert (restored.meta, restored.snapshot) == (meta, b"snap")
        assert await _first_after_restart(aof_server, lambda: store.replay("2-0", "2-0")) == (
            [],
            frozenset(),
        )
        assert await _first_after_restart(aof_server, lambda: store.staged("0-0", "9-0", 10)) == [
            ("3-0", b"c")
        ]
        assert await _first_after_restart(aof_server, store.backlog) == 1
        assert await _first_after_restart(aof_server, lambda: store.seen(meta)) == ([], ["e1"])


@pytest.mark.redis
async def test_log_reads_answer_at_once_and_writes_are_not_retried(
    aof_server: RedisServer,
) -> None:
    """The log's reads (XINFO, XRANGE, XLEN, XPENDING, XREAD) answer on their first call after
    a restart; an append on a dead connection fails instead of being sent twice (its caller
    owns retries, with deduplication), and the next one succeeds."""
    name = f"test:{uuid.uuid4().hex[:8]}"
    async with RedisStreamLog(aof_server.url, name) as log:
        ids = await log.append_many([b"one", b"two"])
        await log.ensure_group("g")
        await log.read_group("g", "c", 1)
        assert await _first_after_restart(aof_server, log.head_id) == ids[-1]
        assert await _first_after_restart(aof_server, log.first_id) == ids[0]
        assert await _first_after_restart(aof_server, log.length) == 2
        assert await _first_after_restart(aof_server, lambda: log.count_after("0-0", 10)) == 2
        summary = await _first_after_restart(aof_server, lambda: log.pending_summary("g"))
        assert (summary.count, summary.oldest_id) == (1, ids[0])
        infos = await _first_after_restart(aof_server, log.group_info)
        assert [(i.name, i.last_delivered_id) for i in infos] == [("g", ids[0])]
        entries = await _first_after_restart(aof_server, lambda: log.read("0-0", 10))
        assert [e.id for e in entries] == ids
        await anyio.to_thread.run_sync(aof_server.restart)
        appended: list[str] = []
        try:
            appended = await log.append_many([b"three"])
        except LogUnavailableError:
            appended = await log.append_many([b"three"])
        assert await log.length() == 3
        assert len(appended) == 1


@pytest.mark.redis
async def test_a_plain_client_read_needs_the_retry(aof_server: RedisServer) -> None:
    """What the retry is for: without it, the first command on a pooled connection fails after
    a restart (if redis-py ever detects the dead connection itself, this test says so)."""
    client = make_client(aof_server.url, socket_timeout_s=5.0, connect_timeout_s=5.0)
    try:
        await client.set("k", b"v")
        await anyio.to_thread.run_sync(aof_server.restart)
        with pytest.raises(rexc.ConnectionError):
            await client.get("k")
        await anyio.to_thread.run_sync(aof_server.restart)
        assert await retry_read(client, lambda: client.get("k")) == b"v"
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_a_bus_says_how_stale_its_index_is_while_it_cannot_read(
    aof_server: RedisServer,
) -> None:
    """While Redis is down the bus keeps serving its last index and reports for how long it
    has failed to read (what ``hvobs serve`` puts in ``/api/status``); back up, it reads
    again and says it is current."""
    bus = RedisEventBus.from_url(aof_server.url, f"test:{uuid.uuid4().hex[:8]}")
    async with bus:
        await bus.emit(HypervisorEvent(payload={"n": 1}))
        with anyio.fail_after(30):
            await bus.sync()
        assert bus.reader_stale_s is None
        await anyio.to_thread.run_sync(aof_server.kill)
        with anyio.fail_after(30):
            while True:  # no event marks the reader's failure: poll
                if bus.reader_stale_s is not None:
                    break
                await anyio.sleep(0.01)
        assert await bus.event_count() == 1
        await anyio.to_thread.run_sync(aof_server.start)
        with anyio.fail_after(30):
            while True:
                if bus.reader_stale_s is None:
                    break
                await anyio.sleep(0.01)
