"""Retention holds at the bus's full emit rate (``docs/redis-bus.md``, "Retention").

A producer emits a burst as fast as the bus goes with ``max_len`` N while a consumer group
reads and acknowledges behind it, always one batch late. A second client samples the stream's
length together with what the group still needs (``XLEN`` and ``XINFO GROUPS`` in one
pipeline): the stream never holds more than 2N entries beyond what the group needs, and the
group receives every entry (nothing unacknowledged was trimmed). With ``max_age_s`` the oldest
entry stays young at the same rate; the trim schedule is tested on its own clock.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from hypervisor.observability._backends import TrimPolicy
from hypervisor.observability._backends.redis_trim import TrimSchedule
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.redis_bus import RedisEventBus
from redis_server import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

BURST = 200_000


async def _sample(
    client: aioredis.Redis, stream: str, done: anyio.Event, samples: list[tuple[int, int]]
) -> None:
    """Record ``(XLEN, entries the group needs)`` until ``done`` (the producer's last append:
    retention trims on appends, so afterwards the stream keeps what it holds)."""
    while not done.is_set():
        pipe = client.pipeline(transaction=False)
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        replies: list[Any] = await pipe.execute()
        length, groups = replies
        group = groups[0]
        lag = group["lag"]
        assert isinstance(lag, int), "lag is exact while nothing is deleted mid-stream"
        pending = group["pending"]
        assert isinstance(pending, int)
        samples.append((int(length), lag + pending))
        with anyio.move_on_after(0.002):
            await done.wait()


async def _consume(client: aioredis.Redis, stream: str, done: anyio.Event) -> int:
    """Read through the group and acknowledge each batch one batch late; return how many
    entries were delivered, once the producer is done and the group has read everything."""
    delivered = 0
    late: list[bytes] = []
    while True:
        reply: Any = await client.xreadgroup("g", "c", {stream: ">"}, count=500, block=50)
        ids: list[bytes] = [entry_id for _, entries in reply or () for entry_id, _ in entries]
        delivered += len(ids)
        if late:
            await client.xack(stream, "g", *late)
        late = ids
        if not ids and done.is_set():
            return delivered


@pytest.mark.parametrize("max_len", [5_000, 20_000])
async def test_max_len_holds_at_full_rate_and_spares_unacknowledged(
    redis_server: RedisServer, stream_name: str, max_len: int
) -> None:
    """With ``max_len`` N at the full ``emit_many`` rate, the sampled stream length stays
    within 2N plus the entries the group has not acknowledged or read, the group receives
    all of the burst, and once it has caught up one trim brings the stream back within 2N."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.xgroup_create(stream_name, "g", id="0", mkstream=True)
    events = [
        HypervisorEvent(event_type=EventType.VFS_WRITE, session_id=f"s{i % 50}", payload={"i": i})
        for i in range(BURST)
    ]
    samples: list[tuple[int, int]] = []
    produced = anyio.Event()
    sampled = anyio.Event()
    delivered = [0]
    bus = RedisEventBus.from_url(redis_server.url, stream_name, max_len=max_len, reader=False)
    try:
        async with bus, anyio.create_task_group() as tg:
            sampler = aioredis.Redis.from_url(redis_server.url)
            tg.start_soon(_sample, sampler, stream_name, sampled, samples)

            async def consume() -> None:
                delivered[0] = await _consume(client, stream_name, produced)

            tg.start_soon(consume)
            await bus.emit_many(events)
            sampled.set()
            produced.set()
            with anyio.fail_after(120):
                while delivered[0] == 0:  # noqa: ASYNC110 - the consumer's result, polled
                    await anyio.sleep(0.01)
            # Everything is acknowledged now: one trim brings the stream back within 2N.
            await bus.log.trim(TrimPolicy(max_len=max_len))
        await sampler.aclose()
        assert delivered[0] == BURST
        assert len(samples) > 10
        over = [(length, needed) for length, needed in samples if length > 2 * max_len + needed]
        assert not over, f"stream longer than 2N + what the group needs: {over[:5]}"
        assert max(length for length, _ in samples) > max_len  # the bound was exercised
        info = await client.xinfo_stream(stream_name)
        assert info["entries-added"] == BURST
        assert info["length"] <= 2 * max_len
    finally:
        await client.aclose()


def test_trim_schedule_counts_entries_and_time() -> None:
    """A trim is due after every ``max_len / 4`` appended entries whatever the time, and after
    ``interval_s`` (at most ``max_age_s / 2``) whatever the count; each due trim restarts both."""
    now = [100.0]
    by_length = TrimSchedule(TrimPolicy(max_len=1000), 1.0, clock=lambda: now[0])
    assert by_length.appended(1)  # the first append trims: nothing is known yet
    assert [by_length.appended(100) for _ in range(3)] == [False, False, True]
    assert not by_length.appended(249)
    now[0] += 1.0
    assert by_length.appended(1)  # the interval passed
    by_age = TrimSchedule(TrimPolicy(max_age_s=0.5), 1.0, clock=lambda: now[0])
    assert by_age.appended(10_000)
    assert not by_age.appended(10_000_000)  # no length bound: only time makes it due
    now[0] += 0.24
    assert not by_age.appended(1)
    now[0] += 0.01
    assert by_age.appended(1)  # max_age_s / 2 is the interval


async def test_max_age_holds_at_full_rate(redis_server: RedisServer, stream_name: str) -> None:
    """With ``max_age_s`` 0.5 at the full ``emit_many`` rate for 4 s, the oldest entry (by its
    id's time against the server's clock) is never older than 2.5 s (the schedule keeps it near
    0.75 s; the rest is slack for a loaded machine), and the bound was exercised."""
    client = aioredis.Redis.from_url(redis_server.url)
    batch = [
        HypervisorEvent(event_type=EventType.VFS_WRITE, session_id=f"s{i % 50}", payload={"i": i})
        for i in range(5_000)
    ]
    ages: list[float] = []
    done = anyio.Event()

    async def sample() -> None:
        while not done.is_set():
            pipe = client.pipeline(transaction=False)
            pipe.time()
            pipe.xrange(stream_name, count=1)
            replies: list[Any] = await pipe.execute()
            (seconds, micros), first = replies
            if first:
                oldest_ms = int(first[0][0].split(b"-")[0])
                ages.append((seconds * 1000 + micros // 1000 - oldest_ms) / 1000)
            with anyio.move_on_after(0.01):
                await done.wait()

    try:
        bus = RedisEventBus.from_url(redis_server.url, stream_name, max_age_s=0.5, reader=False)
        async with bus, anyio.create_task_group() as tg:
            tg.start_soon(sample)
            deadline = anyio.current_time() + 4.0
            while anyio.current_time() < deadline:
                await bus.emit_many(batch)
            done.set()
        assert len(ages) > 20
        assert max(ages) > 0.5  # the bound was exercised
        assert max(ages) <= 2.5, sorted(ages)[-5:]
    finally:
        await client.aclose()
