"""Workers count entries trimmed before their consumer group read them (``docs/workers.md``,
"Gaps"): ``hvobs_worker_gap_entries_total`` on ``/metrics``, ``gap_entries`` in ``/healthz``,
and one warning per gap."""

from __future__ import annotations

import logging

import anyio
import pytest
import redis.asyncio as aioredis

from hypervisor.observability._backends import MemoryStreamLog, RedisStreamLog, TrimPolicy
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.workers import (
    MemoryStateStore,
    RingMetricsDerivation,
    Worker,
    WorkerConfig,
)
from hypervisor.observability.workers._gaps import GroupGaps
from hypervisor.observability.workers._http import _WorkerCollector, health_document
from redis_server import RedisServer

pytestmark = pytest.mark.anyio


def _entries(n: int) -> list[bytes]:
    return [
        encode_event(HypervisorEvent(event_type=EventType.SESSION_CREATED, session_id=f"s{i}"))
        for i in range(n)
    ]


async def test_group_created_after_trimming_counts_what_it_never_got(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A group created at ``"0"`` on a stream that retention already trimmed counts the
    trimmed entries once (a warning, ``/healthz`` and ``/metrics``) and processes the rest."""
    log = MemoryStreamLog("events", retention=TrimPolicy(max_len=10, approximate=False))
    await log.append_many(_entries(50))
    config = WorkerConfig(group="g", consumer="w0", block_s=0.05, claim_interval_s=0.05)
    worker = Worker(log, [RingMetricsDerivation(MemoryStateStore())], config)
    with caplog.at_level(logging.WARNING, "hypervisor.observability.workers"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(30):
                await worker.ready.wait()
                while worker.stats.events < 10:  # noqa: ASYNC110 - a counter, polled
                    await anyio.sleep(0.01)
            document = await health_document(worker, {})
            assert await worker.check_gaps() == 0  # counted once
            worker.stop()
    assert document["gap_entries"] == 40
    assert worker.stats.gap_entries == 40
    assert worker.stats.events == 10
    families = {f.name: f for f in _WorkerCollector(worker, {}).collect()}
    (sample,) = families["hvobs_worker_gap_entries"].samples
    assert (sample.name, sample.value) == ("hvobs_worker_gap_entries_total", 40)
    first = await log.first_id()
    warnings = [r.getMessage() for r in caplog.records if "before the group read" in r.msg]
    assert len(warnings) == 1
    assert f"40 entries after 0-0 and before {first}" in warnings[0]


@pytest.mark.redis
async def test_external_trim_past_a_group_is_counted_exactly(
    redis_server: RedisServer, stream_name: str
) -> None:
    """A trim that does not protect groups (``XTRIM MAXLEN`` by hand) removing entries a
    group has not read is counted exactly from Redis's counters, each entry once, including
    after the group has read part of the stream; nothing is counted once the group is past."""
    raw = aioredis.Redis.from_url(redis_server.url)
    async with RedisStreamLog(redis_server.url, stream_name) as log:
        try:
            await log.ensure_group("g")
            gaps = GroupGaps(log, "g")
            await log.append_many(_entries(50))
            assert await gaps.check() == 0
            await raw.xtrim(stream_name, maxlen=10, approximate=False)
            assert await gaps.check() == 40
            assert await gaps.check() == 0
            await log.read_group("g", "c", 4)  # reads 4 of the 10 retained
            await log.append_many(_entries(20))
            await raw.xtrim(stream_name, maxlen=5, approximate=False)
            # 70 appended, 65 trimmed: of those the group read 44 (40 counted already, then 4
            # read); the 6 unread of the first 50 and the first 15 of the new 20 are a gap.
            assert await gaps.check() == 21
            await log.read_group("g", "c", 100)
            await raw.xtrim(stream_name, maxlen=1, approximate=False)
            assert await gaps.check() == 0
            assert gaps.entries == 61
        finally:
            await raw.aclose()
