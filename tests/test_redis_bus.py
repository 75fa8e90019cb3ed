"""``RedisEventBus`` on real redis-server processes: many producers, crashes, garbage, limits."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from hypervisor.observability._backends import LogUnavailableError, RedisStreamLog, TrimPolicy
from hypervisor.observability._core.codec import decode_events
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.errors import (
    BusClosedError,
    BusFullError,
    BusUnavailableError,
    EventEncodeError,
)
from hypervisor.observability.redis_bus import RedisEventBus
from redis_proxy import ReplyDroppingProxy
from redis_server import RedisServer, free_port

# Per test, not per module: the tests without a redis-server (dead ports, the in-memory log,
# client options) run under `-m "not redis"` too.
pytestmark = pytest.mark.anyio

SRC = Path(__file__).resolve().parents[1] / "src"


async def _stored_events(url: str, stream: str) -> list[HypervisorEvent]:
    """Every decodable event in the stream, read with a fresh client."""
    events: list[HypervisorEvent] = []
    async with RedisStreamLog(url, stream) as log:
        after = "0-0"
        while entries := await log.read(after, 5000):
            decoded, _ = decode_events([e.data or b"" for e in entries])
            events.extend(decoded)
            after = entries[-1].id
    return events


_PRODUCER = textwrap.dedent(
    """
    import sys
    import anyio
    from hypervisor.observability import HypervisorEvent, EventType, RedisEventBus

    url, stream, producer, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    async def main() -> None:
        async with RedisEventBus.from_url(url, stream, reader=False) as bus:
            for n in range(count):
                bus.emit_nowait(
                    HypervisorEvent(
                        event_type=EventType.VFS_WRITE,
                        agent_did=f"did:producer:{producer}",
                        payload={"p": producer, "n": n},
                    )
                )
                if n % 500 == 499:
                    await bus.flush()
            await bus.flush()

    anyio.run(main)
    """
)


@pytest.mark.slow
@pytest.mark.redis
async def test_four_producer_processes_each_event_once_in_order(
    redis_server: RedisServer, stream_name: str
) -> None:
    """4 producer processes x 5k events: one reader sees all 20k exactly once, each in order."""
    producers, count = 4, 5000
    async with RedisEventBus.from_url(redis_server.url, stream_name, max_events=None) as reader:
        seen_per_producer: dict[int, list[int]] = {p: [] for p in range(producers)}
        reader.subscribe(
            EventType.VFS_WRITE,
            lambda e: seen_per_producer[e.payload["p"]].append(e.payload["n"]),
        )
        processes = [
            await anyio.open_process(
                [
                    sys.executable,
                    "-c",
                    _PRODUCER,
                    redis_server.url,
                    stream_name,
                    str(p),
                    str(count),
                ],
                stdout=None,
                stderr=None,
            )
            for p in range(producers)
        ]
        for process in processes:
            assert await process.wait() == 0
        await reader.sync()
        events = await reader.all_events()
        assert len(events) == producers * count
        assert len({e.event_id for e in events}) == producers * count
        for producer in range(producers):
            assert seen_per_producer[producer] == list(range(count))
            mine = await reader.query_by_agent(f"did:producer:{producer}")
            assert [e.payload["n"] for e in mine] == list(range(count))
        assert reader.decode_errors == 0


@pytest.fixture
def aof_server() -> Iterator[RedisServer]:
    """A redis-server of its own with an fsync-always append-only file."""
    with RedisServer("--appendonly", "yes", "--appendfsync", "always") as server:
        yield server


@pytest.mark.slow
@pytest.mark.redis
async def test_sigkill_mid_load_loses_nothing_acknowledged(
    aof_server: RedisServer, stream_name: str
) -> None:
    """Redis killed with SIGKILL mid-load and restarted on its AOF: every event whose ``emit``
    returned is in the stream, the emitters retried through the outage, and the reader resumed
    and indexed everything."""
    emitters, per_emitter = 20, 300
    acknowledged: set[str] = set()
    a_third_done = anyio.Event()
    killed = anyio.Event()
    bus = RedisEventBus.from_url(
        aof_server.url, stream_name, max_events=None, retry_deadline_s=30.0
    )
    async with bus:

        async def emitter(index: int) -> None:
            for n in range(per_emitter):
                event = HypervisorEvent(payload={"emitter": index, "n": n})
                await bus.emit(event)
                acknowledged.add(event.event_id)
                if len(acknowledged) >= emitters * per_emitter // 3:
                    a_third_done.set()

        async def chaos() -> None:
            await a_third_done.wait()
            await anyio.to_thread.run_sync(aof_server.kill)
            killed.set()
            # Down until both the emitters and the tailing reader have run into the outage (no
            # event marks it: poll the counters).
            while True:
                if bus.retries and bus.reader_errors:
                    break
                await anyio.sleep(0.01)
            await anyio.to_thread.run_sync(aof_server.restart)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(chaos)
                for index in range(emitters):
                    tg.start_soon(emitter, index)
        assert killed.is_set()
        assert len(acknowledged) == emitters * per_emitter
        assert bus.retries > 0
        assert bus.failed == 0
        with anyio.fail_after(30):
            await bus.sync()
        indexed = {e.event_id for e in await bus.all_events()}
        assert acknowledged <= indexed
        assert bus.reader_errors > 0
    stored = {e.event_id for e in await _stored_events(aof_server.url, stream_name)}
    assert acknowledged <= stored


@pytest.mark.redis
async def test_garbage_entries_are_skipped_and_counted(
    redis_server: RedisServer, stream_name: str
) -> None:
    """Entries added by hand (bad bytes, a foreign field) are skipped and counted; the valid
    events around them are indexed."""
    good = [HypervisorEvent(payload={"i": i}) for i in range(3)]
    async with RedisEventBus.from_url(redis_server.url, stream_name) as bus:
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            await bus.emit(good[0])
            await raw.xadd(stream_name, {b"e": b"\xc1not msgpack"})
            await bus.emit(good[1])
            await raw.xadd(stream_name, {b"other": b"field"})
            await raw.xadd(stream_name, {b"e": b"\x92\x01\xc0"})  # [1, nil]: wrong shape
            await bus.emit(good[2])
        finally:
            await raw.aclose()
        await bus.sync()
        assert await bus.all_events() == good
        assert bus.decode_errors == 3
    # A bus started later skips the same entries while backfilling.
    async with RedisEventBus.from_url(redis_server.url, stream_name) as later:
        assert await later.all_events() == good
        assert later.decode_errors == 3


@pytest.mark.redis
async def test_second_bus_sees_events_after_sync(
    redis_server: RedisServer, stream_name: str
) -> None:
    """Events emitted by one bus are in another bus's index once it has synced; history is
    backfilled on start."""
    async with RedisEventBus.from_url(redis_server.url, stream_name) as first:
        early = HypervisorEvent(session_id="s", payload={"early": True})
        await first.emit(early)
        async with RedisEventBus.from_url(redis_server.url, stream_name) as second:
            assert await second.query_by_session("s") == [early]
            late = [HypervisorEvent(session_id="s", payload={"i": i}) for i in range(50)]
            await first.emit_many(late)
            await second.sync()
            assert await second.query_by_session("s") == [early, *late]
            lag = await second.index_lag()
            assert lag.entries == 0
            assert lag.applied_id == lag.head_id


@pytest.mark.redis
async def test_retention_bounds_stream_but_keeps_unacknowledged(
    redis_server: RedisServer, stream_name: str
) -> None:
    """With a length bound the stream is trimmed as events are emitted, but never past what a
    consumer group has not acknowledged."""
    retention = TrimPolicy(max_len=100, approximate=False)
    async with RedisStreamLog(redis_server.url, stream_name) as probe:
        await probe.ensure_group("workers")
        bus = RedisEventBus.from_url(
            redis_server.url,
            stream_name,
            retention=retention,
            log_options={"trim_interval_s": 0.0},
            reader=False,
        )
        async with bus:
            await bus.emit_many([HypervisorEvent(payload={"i": i}) for i in range(300)])
            assert await probe.length() == 300  # nothing delivered to the group yet
            delivered = await probe.read_group("workers", "w", 250)
            await probe.ack("workers", [e.id for e in delivered])
            await bus.emit(HypervisorEvent())
            # 301 entries; the group has acked 250, so 51 must stay; the bound allows 100.
            assert await probe.length() == 100
            rest = await probe.read_group("workers", "w", 1000)
            assert len(rest) == 51
            await probe.ack("workers", [e.id for e in rest])
            await bus.emit(HypervisorEvent())
            assert await probe.length() == 100


@pytest.fixture
async def dead_bus() -> AsyncIterator[RedisEventBus]:
    """A started bus (no reader) pointing at a port where nothing listens."""
    bus = RedisEventBus.from_url(
        f"redis://127.0.0.1:{free_port()}/0",
        "nowhere",
        reader=False,
        buffer_size=4,
        batch_size=2,
        retry_deadline_s=0.3,
        retry_base_s=0.01,
        log_options={"connect_timeout_s": 0.2},
    )
    async with bus:
        yield bus


async def test_full_buffer_raises_for_nowait_and_flush_reports_losses(
    dead_bus: RedisEventBus,
) -> None:
    """``emit_nowait`` (and ``emit(block=False)``) raise ``BusFullError`` when the buffer is
    full; events that could not be
    stored make ``flush()`` raise ``BusUnavailableError`` naming how many."""
    for _ in range(4):
        dead_bus.emit_nowait(HypervisorEvent())
    with pytest.raises(BusFullError):
        dead_bus.emit_nowait(HypervisorEvent())
    with pytest.raises(BusFullError):
        await dead_bus.emit(HypervisorEvent(), block=False)
    with anyio.fail_after(10), pytest.raises(BusUnavailableError, match="4 buffered events"):
        await dead_bus.flush()
    assert dead_bus.failed == 4
    await dead_bus.flush()  # each loss is reported once


async def test_awaited_emit_waits_for_space_then_fails_after_deadline(
    dead_bus: RedisEventBus,
) -> None:
    """With the buffer full ``emit`` waits for space instead of failing, and raises
    ``BusUnavailableError`` only after the retry deadline."""
    for _ in range(4):
        dead_bus.emit_nowait(HypervisorEvent())
    started = time.monotonic()
    with anyio.fail_after(10), pytest.raises(BusUnavailableError, match="unavailable"):
        await dead_bus.emit(HypervisorEvent())
    assert time.monotonic() - started >= 0.3
    assert dead_bus.retries > 0
    with pytest.raises(BusUnavailableError):
        await dead_bus.emit_many([HypervisorEvent(), HypervisorEvent()])


@pytest.mark.redis
async def test_unencodable_event_raises_at_the_call(
    redis_server: RedisServer, stream_name: str
) -> None:
    """An event whose payload cannot be encoded raises ``EventEncodeError`` before buffering."""
    async with RedisEventBus.from_url(redis_server.url, stream_name) as bus:
        bad = HypervisorEvent(payload={"tool": {"handle": object()}})
        with pytest.raises(EventEncodeError, match=r"payload\['tool'\]\['handle'\]"):
            await bus.emit(bad)
        with pytest.raises(EventEncodeError):
            bus.emit_nowait(bad)
        with pytest.raises(EventEncodeError):
            await bus.emit_many([HypervisorEvent(), bad])
        assert bus.buffered == 0
        await bus.sync()
        assert await bus.event_count() == 0


@pytest.mark.redis
async def test_closed_bus_rejects_emits(redis_server: RedisServer, stream_name: str) -> None:
    """Emitting on a closed (or never started) bus raises ``BusClosedError``."""
    bus = RedisEventBus.from_url(redis_server.url, stream_name)
    with pytest.raises(BusClosedError):
        await bus.emit(HypervisorEvent())
    async with bus:
        await bus.emit(HypervisorEvent())
    with pytest.raises(BusClosedError):
        bus.emit_nowait(HypervisorEvent())


@pytest.mark.redis
async def test_acl_user_from_url(redis_server: RedisServer, stream_name: str) -> None:
    """ACL username and password come from the URL; wrong credentials fail without retrying."""
    admin = aioredis.Redis.from_url(redis_server.url)
    user = f"u{stream_name[-8:]}"
    try:
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", user, "on", ">s3cret", "~*", "+@all"
        )
    finally:
        await admin.aclose()
    url = f"redis://{user}:s3cret@127.0.0.1:{redis_server.port}/0"
    async with RedisEventBus.from_url(url, stream_name) as bus:
        await bus.emit(HypervisorEvent())
        await bus.sync()
        assert await bus.event_count() == 1
    wrong = f"redis://{user}:nope@127.0.0.1:{redis_server.port}/0"
    started = time.monotonic()
    with pytest.raises(BusUnavailableError, match="credentials"):
        async with RedisEventBus.from_url(wrong, stream_name, retry_deadline_s=30.0):
            pass
    assert time.monotonic() - started < 30.0


@pytest.mark.redis
async def test_reader_stops_on_credentials_changed_under_it(
    redis_server: RedisServer, stream_name: str
) -> None:
    """The user's password changes and its connections are dropped while the bus reads: the
    tailing reader stops at the refusal (one error, never a retry loop), and ``sync()`` raises
    ``BusUnavailableError`` naming the refused credentials, never the password."""
    user = f"r{stream_name[-8:]}"
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", user, "on", ">first-pw", "~*", "+@all"
        )
        url = f"redis://{user}:first-pw@127.0.0.1:{redis_server.port}/0"
        async with RedisEventBus.from_url(url, stream_name, block_s=0.2) as bus:
            await bus.emit(HypervisorEvent())
            await bus.sync()
            await admin.execute_command(  # type: ignore[no-untyped-call]
                "ACL", "SETUSER", user, "resetpass", ">second-pw"
            )
            await admin.execute_command(  # type: ignore[no-untyped-call]
                "CLIENT", "KILL", "USER", user
            )
            # sync() fails on the refusal: the reader's, or the head read's if that comes first.
            with (
                anyio.fail_after(20),
                pytest.raises(BusUnavailableError, match="credentials") as raised,
            ):
                await bus.sync()
            assert "first-pw" not in str(raised.value)
            with anyio.fail_after(20):
                while bus.reader_errors == 0:  # noqa: ASYNC110 - a counter, polled
                    await anyio.sleep(0.01)
            await anyio.sleep(0.5)  # a retry loop would count more errors meanwhile
            assert bus.reader_errors == 1
    finally:
        await admin.aclose()


def test_tls_url_builds_tls_connections() -> None:
    """A ``rediss://`` URL gives TLS connections with the URL's ACL credentials."""
    log = RedisStreamLog("rediss://alice:pw@cache.example:6380/2", "s")
    for client in (log._writer, log._reader, log._control):
        pool = client.connection_pool
        assert pool.connection_class.__name__ == "SSLConnection"
        kwargs = pool.connection_kwargs
        assert (kwargs["username"], kwargs["password"]) == ("alice", "pw")
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("cache.example", 6380, 2)


def test_reader_socket_timeout_exceeds_block() -> None:
    """The reader's socket timeout stays above the longest BLOCK (redis-py 8 defaults to 5 s)."""
    log = RedisStreamLog("redis://127.0.0.1:1/0", "s", max_block_s=10.0)
    assert log._reader.connection_pool.connection_kwargs["socket_timeout"] > 10.0


@pytest.mark.redis
async def test_claim_reports_entries_deleted_while_pending(
    redis_server: RedisServer, stream_name: str
) -> None:
    """A pending entry deleted with XDEL comes back from ``claim_idle`` as a deleted id and from
    a pending re-read as a body-less entry, never as data."""
    async with RedisStreamLog(redis_server.url, stream_name) as log:
        await log.ensure_group("g")
        ids = await log.append_many([b"a", b"b", b"c"])
        await log.read_group("g", "dead", 3)
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            await raw.xdel(stream_name, ids[1])
        finally:
            await raw.aclose()
        again = await log.read_group("g", "dead", 10, pending=True)
        assert [(e.id, e.data) for e in again] == [(ids[0], b"a"), (ids[1], None), (ids[2], b"c")]
        claimed = await log.claim_idle("g", "rescuer", 0.0, 10)
        assert [e.id for e in claimed.entries] == [ids[0], ids[2]]
        assert claimed.deleted_ids == [ids[1]]
        assert (await log.pending_summary("g")).count == 2


async def test_retention_keywords_bound_the_log() -> None:
    """``max_len`` given to the constructor bounds the log; both forms at once are rejected."""
    events = [HypervisorEvent(payload={"i": i}) for i in range(200)]
    async with RedisEventBus.in_memory(max_len=50) as bus:
        await bus.emit_many(events)
        assert await bus.log.length() == 50
        await bus.sync()
        # The tailing reader is not a consumer group: it indexes what the log retains.
        assert await bus.all_events() == events[-50:]
    with pytest.raises(ValueError, match="either"):
        RedisEventBus.in_memory(max_len=5, retention=TrimPolicy(max_len=5))


@pytest.mark.slow
@pytest.mark.redis
def test_hvobs_demo_on_redis_matches_in_process(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """``hvobs demo --redis URL`` runs each agent as a process on the shared bus and reports the
    same ring metrics, saga timeline and spawn tree as the in-process demo."""
    from hypervisor.observability.cli import main

    assert main(["demo", "--seed", "11", "--agents", "5", "--sagas", "3"]) == 0
    in_process = capsys.readouterr().out.splitlines()
    assert (
        main(["demo", "--seed", "11", "--agents", "5", "--sagas", "3", "--redis", redis_server.url])
        == 0
    )
    on_redis = capsys.readouterr().out.splitlines()
    assert "6 agent processes" in on_redis[0]
    # The report, then a blank line and what became of the stream (the demo made it).
    assert on_redis[1:-2] == in_process[1:]
    assert on_redis[-1].startswith("stream hvobs:events deleted")


async def test_close_fails_waiting_emits_instead_of_hanging() -> None:
    """Closing while the backend is down gives waiting emitters ``BusClosedError`` after the
    flush timeout and counts their events as failed."""
    bus = RedisEventBus.from_url(
        f"redis://127.0.0.1:{free_port()}/0",
        "nowhere",
        reader=False,
        retry_deadline_s=60.0,
        retry_base_s=0.01,
        log_options={"connect_timeout_s": 0.2},
    )
    await bus.start()
    bus.emit_nowait(HypervisorEvent())
    errors: list[Exception] = []

    async def emitter() -> None:
        try:
            await bus.emit(HypervisorEvent())
        except BusClosedError as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(emitter)
            await anyio.wait_all_tasks_blocked()
            await bus.aclose(flush_timeout_s=0.2)
    assert len(errors) == 1
    assert bus.failed == 2
    assert bus.emitted == 0


@pytest.mark.redis
async def test_append_past_its_deadline_raises_and_later_appends_stay_correct(
    redis_server: RedisServer, stream_name: str
) -> None:
    """An append stuck past its deadline (writes paused on the server) raises
    ``LogUnavailableError``; the next append gets the ids of its own entries, not replies
    left over from the interrupted pipeline."""
    admin = aioredis.Redis.from_url(redis_server.url)
    async with RedisStreamLog(redis_server.url, stream_name, socket_timeout_s=0.3) as log:
        try:
            await log.append_many([b"warm-up"])
            await admin.execute_command("CLIENT", "PAUSE", 1000, "WRITE")  # type: ignore[no-untyped-call]
            with pytest.raises(LogUnavailableError):
                await log.append_many([b"stuck-1", b"stuck-2"])
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
            await admin.aclose()
        ids = await log.append_many([b"after-1", b"after-2"])
        entries = {e.id: e.data for e in await log.read("0", 100)}
        assert [entries[i] for i in ids] == [b"after-1", b"after-2"]


@pytest.mark.redis
async def test_backfill_reads_only_what_the_index_can_hold(
    redis_server: RedisServer, stream_name: str
) -> None:
    """A bus started on a long stream backfills just its newest ``max_events`` entries."""
    events = [HypervisorEvent(payload={"i": i}) for i in range(500)]
    async with RedisEventBus.from_url(redis_server.url, stream_name, reader=False) as producer:
        await producer.emit_many(events)
    async with RedisEventBus.from_url(redis_server.url, stream_name, max_events=100) as bus:
        assert await bus.all_events() == events[-100:]
        assert bus.applied == 100
        assert bus.evicted_count == 0


def _make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def run(*args: str | Path) -> None:
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True)

    run(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
        *("-keyout", ca_key, "-out", ca_crt, "-subj", "/CN=hvobs-test-ca"),
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=x")
    run(
        *("x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial"),
        *("-out", crt, "-days", "1", "-extfile", ext),
    )
    return ca_crt, crt, key


@pytest.mark.slow
@pytest.mark.redis
async def test_rediss_url_with_acl_user_over_real_tls(tmp_path: Path, stream_name: str) -> None:
    """A ``rediss://user:password@`` URL talks TLS to a real TLS redis-server with an ACL user;
    without the CA the server's certificate is refused."""
    ca, cert, key = _make_tls_files(tmp_path)
    tls_port = free_port()
    tls_args = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert)]
    tls_args += ["--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)]
    tls_args += ["--tls-auth-clients", "no", "--user", "fleet", "on", ">pw", "~*", "+@all"]
    with RedisServer(*tls_args) as server:
        url = f"rediss://fleet:pw@127.0.0.1:{tls_port}/0"
        options = {"ssl_ca_certs": str(ca)}
        async with RedisEventBus.from_url(url, stream_name, log_options=options) as bus:
            await bus.emit(HypervisorEvent(session_id="tls"))
            await bus.sync()
            assert [e.session_id for e in await bus.all_events()] == ["tls"]
        # The plain port holds the same data: the event really went through the TLS port.
        assert [e.session_id for e in await _stored_events(server.url, stream_name)] == ["tls"]
        with pytest.raises(BusUnavailableError):
            async with RedisEventBus.from_url(url, stream_name, retry_deadline_s=0.5):
                pass


@pytest.mark.redis
async def test_a_batch_stored_twice_after_a_lost_reply_is_applied_once(
    redis_server: RedisServer, stream_name: str
) -> None:
    """The reply to an append is lost after Redis applied it (the connection drops); the bus
    retries and the stream holds the batch twice. The reader applies and dispatches each event
    once and counts the copy."""
    events = [HypervisorEvent(event_type=EventType.VFS_WRITE, payload={"i": i}) for i in range(5)]
    async with ReplyDroppingProxy(redis_server.port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        async with RedisEventBus.from_url(
            url, stream_name, max_events=None, retry_base_s=0.01, retry_cap_s=0.05
        ) as bus:
            seen: list[HypervisorEvent] = []
            bus.subscribe(None, seen.append)
            proxy.armed = True
            await bus.emit_many(events)
            assert proxy.dropped == 1
            assert bus.retries >= 1
            await bus.sync()
            copies = await _stored_events(redis_server.url, stream_name)
            assert copies == events + events  # the lost-reply attempt was stored as well
            assert await bus.all_events() == events
            assert seen == events
            assert bus.duplicates == len(events)
            assert bus.applied == len(events)


async def test_dedup_window_is_bounded_and_can_be_turned_off() -> None:
    """Only ids among the last ``dedup_window`` applied are dropped; 0 keeps every copy."""
    events = [HypervisorEvent(payload={"i": i}) for i in range(5)]
    async with RedisEventBus.in_memory(max_events=None, dedup_window=3) as bus:
        await bus.emit_many(events)
        await bus.emit_many([events[0], events[4]])  # events[0] left the window, [4] has not
        await bus.sync()
        assert await bus.all_events() == [*events, events[0]]
        assert bus.duplicates == 1
        assert len(bus._reader.recent) == 3
    async with RedisEventBus.in_memory(max_events=None, dedup_window=0) as bus:
        await bus.emit_many(events + events)
        await bus.sync()
        assert await bus.event_count() == 10
        assert bus.duplicates == 0
    with pytest.raises(ValueError, match="dedup_window"):
        RedisEventBus.in_memory(dedup_window=-1)
