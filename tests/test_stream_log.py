"""The ``StreamLog`` contract, run unchanged against ``MemoryStreamLog`` and ``RedisStreamLog``.

Time passes through ``elapse``: the in-memory log runs on manual clocks that it advances at
once; a Redis server keeps its own time, so for it ``elapse`` sleeps.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest

from hypervisor.observability._backends import (
    LogGroupMissingError,
    MemoryStreamLog,
    RedisStreamLog,
    StreamLog,
    TrimPolicy,
    next_id,
    parse_id,
    previous_id,
    trimmed_before_first,
)
from hypervisor.observability._backends.log import DurableWait, GroupPosition, LogDurabilityError
from manual_clock import ManualClock
from redis_server import RedisServer

pytestmark = pytest.mark.anyio


Elapse = Callable[[float], Awaitable[None]]


class _Clocks:
    """The in-memory log's monotonic and wall clocks, advanced together."""

    def __init__(self) -> None:
        self.monotonic = ManualClock()
        self.wall = ManualClock(time.time())

    def advance(self, seconds: float) -> None:
        self.monotonic.advance(seconds)
        self.wall.advance(seconds)


@pytest.fixture
def clocks() -> _Clocks:
    """Manual clocks for the in-memory log."""
    return _Clocks()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def log(
    request: pytest.FixtureRequest, stream_name: str, clocks: _Clocks
) -> AsyncIterator[StreamLog]:
    """A fresh, empty log of each implementation."""
    if request.param == "memory":
        memory = MemoryStreamLog(stream_name, clock=clocks.monotonic, wall_clock=clocks.wall)
        async with memory:
            yield memory
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    async with RedisStreamLog(server.url, stream_name) as redis_log:
        yield redis_log


@pytest.fixture
def elapse(log: StreamLog, clocks: _Clocks) -> Elapse:
    """Let ``seconds`` pass for ``log``: advance the in-memory log's clocks, or sleep."""

    async def wait(seconds: float) -> None:
        if isinstance(log, MemoryStreamLog):
            clocks.advance(seconds)
        else:
            await anyio.sleep(seconds)

    return wait


def _payloads(n: int, prefix: str = "e") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


async def test_append_returns_strictly_increasing_ids(log: StreamLog) -> None:
    """Ids grow strictly within one append and across appends."""
    ids = await log.append_many(_payloads(5))
    ids += await log.append_many(_payloads(3))
    parsed = [parse_id(i) for i in ids]
    assert parsed == sorted(parsed)
    assert len(set(parsed)) == 8


async def test_read_after_id_in_order_with_count(log: StreamLog) -> None:
    """``read`` returns entries after the id, oldest first, at most ``count``."""
    ids = await log.append_many(_payloads(10))
    first = await log.read("0", 4)
    assert [e.id for e in first] == ids[:4]
    assert [e.data for e in first] == _payloads(4)
    rest = await log.read(first[-1].id, 100)
    assert [e.id for e in rest] == ids[4:]
    assert await log.read(ids[-1], 10) == []


async def test_head_first_and_length(log: StreamLog) -> None:
    """An empty log has head ``0-0`` and no first id; afterwards they track the entries."""
    assert await log.head_id() == "0-0"
    assert await log.first_id() is None
    assert await log.length() == 0
    ids = await log.append_many(_payloads(3))
    assert await log.head_id() == ids[-1]
    assert await log.first_id() == ids[0]
    assert await log.length() == 3


async def test_blocking_read_wakes_on_append(log: StreamLog) -> None:
    """A blocked ``read`` returns as soon as an entry is appended."""
    await log.append_many([b"before"])
    head = await log.head_id()
    got: list[bytes | None] = []

    async def reader() -> None:
        entries = await log.read(head, 10, block_s=5.0)
        got.extend(e.data for e in entries)

    with anyio.fail_after(4):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            # Append once the reader waits (correctness does not depend on it: a read that
            # comes late finds the entry at once).
            await anyio.wait_all_tasks_blocked()
            await log.append_many([b"after"])
    assert got == [b"after"]


async def test_blocking_read_times_out_empty(log: StreamLog) -> None:
    """A blocked ``read`` with nothing new returns an empty list after ``block_s``."""
    await log.append_many([b"x"])
    with anyio.fail_after(3):
        assert await log.read(await log.head_id(), 10, block_s=0.05) == []


async def test_group_delivers_each_entry_once_across_consumers(log: StreamLog) -> None:
    """Two consumers of one group split the entries; none is delivered twice."""
    assert await log.ensure_group("g") is True
    assert await log.ensure_group("g") is False
    ids = await log.append_many(_payloads(10))
    a = await log.read_group("g", "a", 6)
    b = await log.read_group("g", "b", 10)
    assert [e.id for e in a] + [e.id for e in b] == ids
    assert await log.read_group("g", "a", 10, block_s=0.05) == []


async def test_group_from_dollar_sees_only_new_entries(log: StreamLog) -> None:
    """A group created at ``$`` skips entries appended before it."""
    await log.append_many(_payloads(3))
    await log.ensure_group("late", "$")
    new = await log.append_many([b"new"])
    assert [e.id for e in await log.read_group("late", "c", 10)] == new


async def test_pending_reread_ack_and_summary(log: StreamLog) -> None:
    """Delivered entries stay pending until acked; a consumer can re-read its own PEL."""
    await log.ensure_group("g")
    ids = await log.append_many(_payloads(4))
    await log.read_group("g", "a", 2)
    await log.read_group("g", "b", 2)
    summary = await log.pending_summary("g")
    assert summary.count == 4
    assert summary.oldest_id == ids[0]
    assert summary.newest_id == ids[3]
    assert {(c.name, c.pending) for c in summary.consumers} == {("a", 2), ("b", 2)}
    again = await log.read_group("g", "a", 10, pending=True)
    assert [e.id for e in again] == ids[:2]
    assert [e.data for e in again] == _payloads(2)
    assert await log.delivery_counts("g", ids) == {ids[0]: 2, ids[1]: 2, ids[2]: 1, ids[3]: 1}
    assert await log.ack("g", [ids[0], ids[2]]) == 2
    assert await log.ack("g", [ids[0]]) == 0
    assert (await log.pending_summary("g")).count == 2
    assert await log.read_group("g", "a", 10, pending=True) == [again[1]]


async def test_group_position_reads_last_delivered_and_oldest_pending(log: StreamLog) -> None:
    """A group's position: its last delivered id and its lowest pending id (``None`` when
    nothing is pending), of that group only; a missing group or log raises."""
    with pytest.raises(LogGroupMissingError):
        await log.group_position("g")  # no log yet
    await log.ensure_group("g")
    await log.ensure_group("other")
    assert await log.group_position("g") == GroupPosition("0-0", None)
    ids = await log.append_many(_payloads(5))
    await log.read_group("g", "a", 2)
    await log.read_group("g", "b", 2)
    await log.read_group("other", "a", 5)
    assert await log.group_position("g") == GroupPosition(ids[3], ids[0])
    await log.ack("g", [ids[0], ids[2]])
    assert await log.group_position("g") == GroupPosition(ids[3], ids[1])
    await log.ack("g", [ids[1], ids[3]])
    assert await log.group_position("g") == GroupPosition(ids[3], None)
    assert await log.group_position("other") == GroupPosition(ids[4], ids[0])
    with pytest.raises(LogGroupMissingError):
        await log.group_position("nope")


async def test_missing_group_raises(log: StreamLog) -> None:
    """Reading or inspecting a group that does not exist raises ``LogGroupMissingError``."""
    await log.append_many([b"x"])
    with pytest.raises(LogGroupMissingError):
        await log.read_group("nope", "c", 1)
    with pytest.raises(LogGroupMissingError):
        await log.pending_summary("nope")


async def test_claim_idle_moves_entries_to_claimer(log: StreamLog, elapse: Elapse) -> None:
    """Entries idle long enough move to the claiming consumer; fresh ones stay."""
    await log.ensure_group("g")
    ids = await log.append_many(_payloads(3))
    await log.read_group("g", "dead", 3)
    nothing = await log.claim_idle("g", "rescuer", 60.0, 10)
    assert nothing.entries == []
    await elapse(0.02)
    claimed = await log.claim_idle("g", "rescuer", 0.01, 10)
    assert [e.id for e in claimed.entries] == ids
    assert [e.data for e in claimed.entries] == _payloads(3)
    assert claimed.deleted_ids == []
    assert parse_id(claimed.next_start_id) == (0, 0)
    summary = await log.pending_summary("g")
    assert {(c.name, c.pending) for c in summary.consumers} == {("rescuer", 3)}
    assert await log.delivery_counts("g", ids[:1]) == {ids[0]: 2}


async def test_group_info_reports_lag_and_pending(log: StreamLog) -> None:
    """``group_info`` reports last-delivered id, pending, lag and consumers."""
    assert await log.group_info() == []
    await log.ensure_group("g")
    ids = await log.append_many(_payloads(5))
    await log.read_group("g", "a", 2)
    (info,) = await log.group_info()
    assert info.name == "g"
    assert info.last_delivered_id == ids[1]
    assert info.pending == 2
    assert info.lag == 3
    assert info.consumers == 1


async def test_delete_consumer_reports_dropped_pending(log: StreamLog) -> None:
    """Deleting a consumer returns how many pending entries it held."""
    await log.ensure_group("g")
    await log.append_many(_payloads(3))
    await log.read_group("g", "a", 3)
    assert await log.delete_consumer("g", "a") == 3
    assert (await log.pending_summary("g")).count == 0


async def test_trim_by_length_keeps_newest(log: StreamLog) -> None:
    """Exact trimming by length keeps the newest ``max_len`` entries when no group needs more."""
    ids = await log.append_many(_payloads(50))
    removed = await log.trim(TrimPolicy(max_len=20, approximate=False))
    assert removed == 30
    assert await log.length() == 20
    assert await log.first_id() == ids[30]
    assert await log.head_id() == ids[-1]


async def test_trim_never_removes_unacknowledged_entries(log: StreamLog) -> None:
    """Retention stops at the oldest pending or undelivered entry of every group."""
    await log.ensure_group("slow")
    await log.ensure_group("fast")
    ids = await log.append_many(_payloads(40))
    await log.read_group("fast", "f", 40)
    await log.ack("fast", ids)
    await log.read_group("slow", "s", 10)
    await log.ack("slow", ids[:5])
    # "slow" still holds ids[5:10] pending and has not seen ids[10:].
    await log.trim(TrimPolicy(max_len=3, approximate=False))
    assert await log.first_id() == ids[5]
    await log.ack("slow", ids[5:10])
    await log.trim(TrimPolicy(max_len=3, approximate=False))
    assert await log.first_id() == ids[10]
    await log.read_group("slow", "s", 40)
    await log.ack("slow", ids[10:])
    await log.trim(TrimPolicy(max_len=3, approximate=False))
    assert await log.first_id() == ids[-3]


async def test_trim_by_length_keeps_what_a_reading_group_holds_pending(log: StreamLog) -> None:
    """A group that read entries without acknowledging them (no lag, many pending) keeps
    them through a trim by length, down to its oldest pending entry."""
    await log.ensure_group("g")
    ids = await log.append_many(_payloads(40))
    await log.read_group("g", "c", 40)
    ids += await log.append_many(_payloads(40, "more"))
    await log.read_group("g", "c", 40)
    assert await log.trim(TrimPolicy(max_len=10, approximate=False)) == 0
    await log.ack("g", ids[:35])
    await log.trim(TrimPolicy(max_len=10, approximate=False))
    assert await log.first_id() == ids[35]
    await log.ack("g", ids[35:])
    await log.trim(TrimPolicy(max_len=10, approximate=False))
    assert await log.first_id() == ids[-10]


async def test_stream_info_counts_entries_ever_added(log: StreamLog) -> None:
    """``stream_info`` reports length, head, first retained id and every entry ever appended,
    trimmed ones included, so the entries gone before the first are counted exactly."""
    empty = await log.stream_info()
    assert (empty.length, empty.head_id, empty.first_id) == (0, "0-0", None)
    assert trimmed_before_first(empty) == 0
    ids = await log.append_many(_payloads(30))
    await log.trim(TrimPolicy(max_len=12, approximate=False))
    info = await log.stream_info()
    assert info.length == 12
    assert info.head_id == ids[-1]
    assert info.first_id == ids[18]
    assert info.entries_added == 30
    assert info.max_deleted_id == "0-0"
    assert trimmed_before_first(info) == 18


async def test_read_with_info_returns_the_read_and_the_counters(log: StreamLog) -> None:
    """``read_with_info`` reads like a non-blocking ``read`` and returns the counters with it;
    on a log that does not exist yet it returns nothing and empty counters."""
    entries, info = await log.read_with_info("0-0", 10)
    assert entries == []
    assert (info.length, info.head_id, info.first_id) == (0, "0-0", None)
    ids = await log.append_many(_payloads(8))
    await log.trim(TrimPolicy(max_len=5, approximate=False))
    entries, info = await log.read_with_info(ids[0], 2)
    assert [e.id for e in entries] == ids[3:5]
    assert info.first_id == ids[3]
    assert info.head_id == ids[-1]
    assert trimmed_before_first(info) == 3


async def test_group_info_reports_entries_read(log: StreamLog) -> None:
    """A group's ``entries_read`` is the count of entries ever appended up to the last one
    delivered to it, trimmed entries included."""
    ids = await log.append_many(_payloads(20))
    await log.trim(TrimPolicy(max_len=10, approximate=False))
    await log.ensure_group("g")
    await log.read_group("g", "c", 4)
    (group,) = await log.group_info()
    assert group.last_delivered_id == ids[13]
    assert group.entries_read == 14
    await log.read_group("g", "c", 100)
    (group,) = await log.group_info()
    assert group.entries_read == 20


async def test_trim_by_age(log: StreamLog, elapse: Elapse) -> None:
    """Trimming by age removes entries older than ``max_age_s`` and keeps younger ones."""
    old = await log.append_many(_payloads(5, "old"))
    await elapse(0.3)
    young = await log.append_many(_payloads(5, "young"))
    removed = await log.trim(TrimPolicy(max_age_s=0.2, approximate=False))
    assert removed == len(old)
    assert await log.first_id() == young[0]


async def test_retention_applies_on_append() -> None:
    """A log built with a retention policy stays bounded as entries are appended."""
    async with MemoryStreamLog(retention=TrimPolicy(max_len=10, approximate=False)) as memory:
        for _ in range(10):
            await memory.append_many(_payloads(7))
        assert await memory.length() == 10


async def test_server_version(log: StreamLog) -> None:
    """``server_version`` returns a (major, minor, patch) tuple of a Redis 6.2+ compatible API."""
    version = await log.server_version()
    assert len(version) == 3
    assert version >= (6, 2, 0)


async def test_count_after(log: StreamLog) -> None:
    """``count_after`` counts the entries after an id, capped at ``limit``."""
    assert await log.count_after("0", 100) == 0
    ids = await log.append_many(_payloads(10))
    assert await log.count_after("0", 100) == 10
    assert await log.count_after(ids[3], 100) == 6
    assert await log.count_after(ids[3], 4) == 4
    assert await log.count_after(ids[-1], 100) == 0


async def test_id_from_end(log: StreamLog) -> None:
    """``id_from_end`` finds the n-th newest id, or the oldest when fewer are retained."""
    assert await log.id_from_end(5) is None
    ids = await log.append_many(_payloads(10))
    assert await log.id_from_end(1) == ids[-1]
    assert await log.id_from_end(4) == ids[-4]
    assert await log.id_from_end(10) == ids[0]
    assert await log.id_from_end(50) == ids[0]


def test_previous_and_next_id_bracket_an_id() -> None:
    """``previous_id`` and ``next_id`` are the nearest ids below and above."""
    assert previous_id("5-3") == "5-2"
    assert previous_id("5-0") == f"4-{2**64 - 1}"
    assert previous_id("0-0") == "0-0"
    assert next_id("5-3") == "5-4"
    assert next_id(previous_id("7-0")) == "7-0"


async def test_durability_offer_and_an_unmet_durable_append(log: StreamLog) -> None:
    """``durability()`` says what an append can wait for: neither an fsync nor a replica here
    (the in-memory log; the test server runs without an append-only file and replicas). An
    append that asks for a replica is stored and raises ``LogDurabilityError`` saying nothing
    confirmed it; one that asks for nothing returns its ids."""
    offer = await log.durability()
    assert (offer.aof, offer.replicas, offer.local_fsync) == (False, 0, False)
    if offer.version != (0, 0, 0):  # Redis: WAITAOF exactly from 7.2 (probed, not assumed)
        assert offer.waitaof == (offer.version >= (7, 2, 0))
    with pytest.raises(LogDurabilityError) as caught:
        await log.append_many([b"a", b"b"], DurableWait(local=False, replicas=1, timeout_s=0.05))
    assert caught.value.replicas == 0
    assert "the 2 entries are stored" in str(caught.value)
    assert [e.data for e in await log.read("0-0", 10)] == [b"a", b"b"]
    ids = await log.append_many([b"c"], DurableWait(local=False, replicas=0, timeout_s=0.05))
    assert [e.id for e in await log.read(ids[0], 10)] == []
    assert (await log.read("0-0", 10))[-1].id == ids[0]
