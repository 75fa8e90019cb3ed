"""``durable=True``: each flush waits for the fsync or for replicas, against real servers (a
primary with a replica); a server that offers neither is refused at start in one clear line."""

from __future__ import annotations

import logging

import pytest

from hypervisor.observability._backends import RedisStreamLog
from hypervisor.observability._backends.log import DurableWait, LogDurabilityError
from hypervisor.observability._backends.redis_append import check_waits
from hypervisor.observability._core.codec import decode_events
from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability.errors import BusDurabilityError
from hypervisor.observability.redis_bus import RedisEventBus
from redis_server import RedisServer, redis_server_version, server_info, wait_until

pytestmark = pytest.mark.anyio


async def _stored(url: str, stream: str) -> list[HypervisorEvent]:
    async with RedisStreamLog(url, stream) as log:
        entries = await log.read("0-0", 10_000)
    return decode_events([e.data or b"" for e in entries])[0]


@pytest.mark.redis
async def test_durable_bus_waits_for_the_replica_and_reports_a_missing_one(
    replicated: tuple[RedisServer, RedisServer],
    stream_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a primary with a replica a durable bus says at start that each flush waits for one
    replica (WAIT) and, on Redis before 7.2, that the fsync is not awaited for want of
    WAITAOF; its emits return once the replica has the events (the replica holds them). With
    the replica gone, an emit raises ``BusDurabilityError``: stored on the primary, not
    confirmed, the event carried, re-emitting said to be safe."""
    primary, replica = replicated
    with caplog.at_level(logging.INFO, logger="hypervisor.observability.redis_bus"):
        async with RedisEventBus.from_url(
            primary.url, stream_name, reader=False, durable=True, durable_timeout_s=0.5
        ) as bus:
            lines = [r.getMessage() for r in caplog.records if "durable:" in r.getMessage()]
            assert len(lines) == 1, lines
            assert "each flush waits for 1 replica (WAIT; 1 connected now)" in lines[0]
            version = redis_server_version()
            assert version is not None
            if version < (7, 2, 0):
                assert "the fsync is not awaited" in lines[0]
                assert "has no WAITAOF (Redis 7.2 and later)" in lines[0]

            events = [HypervisorEvent(session_id="durable", payload={"i": i}) for i in range(50)]
            await bus.emit_many(events)
            # WAIT returned: the replica received them (read it at once, no polling).
            assert await _stored(replica.url, stream_name) == events

            replica.stop()
            wait_until(
                "replica gone",
                lambda: server_info(primary.url, "replication").get("connected_slaves") == "0",
            )
            lost = HypervisorEvent(session_id="unconfirmed")
            with pytest.raises(BusDurabilityError) as caught:
                await bus.emit(lost)
            error = caught.value
            assert error.events == (lost,)
            assert error.stored_unknown is True
            assert "stored on the primary but not confirmed within 0.5 s" in str(error)
            assert "0 of 1 replicas confirmed (WAIT)" in str(error)
            assert "re-emitting the events (error.events) is safe" in str(error)
    assert (await _stored(primary.url, stream_name))[-1] == lost


@pytest.mark.redis
@pytest.mark.parametrize("aof", [False, True], ids=["no-aof", "aof"])
async def test_durable_bus_refuses_a_server_that_offers_nothing(
    stream_name: str, aof: bool
) -> None:
    """Without a replica, and without an fsync to wait for (no append-only file, or Redis
    before 7.2, which has no WAITAOF), ``start()`` raises ``BusDurabilityError`` saying why
    and what to change; on Redis 7.2+ with ``appendonly yes`` it waits for the fsync."""
    version = redis_server_version()
    assert version is not None
    with RedisServer(*(["--appendonly", "yes"] if aof else [])) as server:
        bus = RedisEventBus.from_url(server.url, stream_name, reader=False, durable=True)
        if aof and version >= (7, 2, 0):
            async with bus:
                await bus.emit(HypervisorEvent(session_id="fsynced"))
            return
        with pytest.raises(BusDurabilityError) as caught:
            await bus.start()
        message = str(caught.value)
        assert "durable=True, but there is nothing to wait for" in message
        assert "no replica is connected (WAIT)" in message
        if version < (7, 2, 0):
            assert "has no WAITAOF (Redis 7.2 and later)" in message
        else:
            assert "has appendonly off" in message


async def test_durable_in_memory_bus_is_refused_at_start() -> None:
    """An in-process log has nothing to wait for: a durable bus on it does not start."""
    bus = RedisEventBus.in_memory(durable=True)
    with pytest.raises(BusDurabilityError, match="an in-process log has no append-only file"):
        await bus.start()


def test_waitaof_replies_are_checked_against_the_wait() -> None:
    """The WAITAOF path, which Redis before 7.2 cannot run: its reply ``[local, replicas]``
    after the WAIT reply is read in pipeline order; a local count of 0 fails the wait with a
    message naming the fsync, and both counts are kept on the error."""
    wait = DurableWait(local=True, replicas=1, timeout_s=0.25)
    check_waits(wait, [1, [1, 0]], 3)  # WAIT's count, then WAITAOF's pair: both met
    with pytest.raises(LogDurabilityError) as caught:
        check_waits(wait, [1, [0, 0]], 3)
    assert "the append-only file's fsync did not confirm (WAITAOF)" in str(caught.value)
    assert "within 0.25 s" in str(caught.value)
    assert (caught.value.local, caught.value.replicas) == (0, 1)
    local_only = DurableWait(local=True, replicas=0, timeout_s=1.0)
    check_waits(local_only, [[1, 0]], 3)
    with pytest.raises(LogDurabilityError):
        check_waits(local_only, [[0, 0]], 3)
