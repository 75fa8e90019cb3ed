"""Worker processes' /metrics when Redis goes away or loses its data: the last good view (marked
stale) or the correct numbers, never zeros; and after a flush, the numbers of the new state
only, never a mix with the lost one."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.events import HypervisorEvent
from redis_server import RedisServer, redis_server_binary
from worker_procs import (
    WorkerProc,
    expected_samples,
    procs,
    settled,
    stream_events,
    worker_argv,
)
from workers_support import random_events, reference

__all__ = ["procs"]  # the fixture, imported for the tests below

pytestmark = [pytest.mark.redis, pytest.mark.slow]

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
_RING = "agent_hypervisor_ring_"


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A redis-server of this test alone (it is killed, restarted and flushed), persisting
    every write to its append-only file."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer("--appendonly", "yes", "--appendfsync", "always") as server:
        yield server


def parse(body: bytes) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def scrape(worker: WorkerProc) -> Samples:
    status, body = worker.get("/metrics")
    assert status == 200, body
    return parse(body)


def ring_of(samples: Samples) -> Samples:
    return {name: values for name, values in samples.items() if name.startswith(_RING)}


def gauge(samples: Samples, name: str) -> float:
    (value,) = samples[name].values()
    return value


async def append(url: str, stream: str, events: list[HypervisorEvent]) -> None:
    async with RedisStreamLog(url, stream) as log:
        for start in range(0, len(events), 200):
            await log.append_many([encode_event(e) for e in events[start : start + 200]])


def expected_ring(url: str, stream: str) -> Samples:
    """The reference over the stream as it is now (its order is the order workers apply)."""
    return {
        name: values
        for name, values in expected_samples(
            reference(anyio.run(stream_events, url, stream))
        ).items()
        if values or name.endswith("_total")
    }


def equal_ring(got: Samples, expected: Samples) -> bool:
    return all(got.get(name, {}) == values for name, values in expected.items())


def test_a_scrape_while_redis_is_down_or_just_restarted_serves_the_last_good_view(
    own_server: RedisServer, procs: list[WorkerProc]
) -> None:
    """Two ring-metrics workers; Redis is killed: every scrape answers 200 with the last good
    numbers and says the view is stale (gauge and /healthz). Redis restarts on the same port:
    the first scrape of each worker gives the correct numbers (never zeros: a dead pooled
    connection is retried), the staleness clears, and new events are applied and served."""
    url, stream = own_server.url, f"v{uuid.uuid4().hex[:8]}"
    events = random_events(random.Random(11), 1200, agents=8)
    for name in ("r0", "r1"):
        procs.append(WorkerProc(worker_argv("ring-metrics", url, stream, name)))
    anyio.run(append, url, stream, events[:600])
    anyio.run(settled, url, stream, "ring-metrics", "ring-metrics")
    expected = expected_ring(url, stream)
    assert expected[f"{_RING}events_processed_total"][()] > 0
    for worker in procs:
        assert equal_ring(scrape(worker), expected)
        assert gauge(scrape(worker), "hvobs_worker_view_stale") == 0.0
    own_server.kill()
    for _ in range(3):
        for worker in procs:
            got = scrape(worker)
            assert equal_ring(got, expected)
            assert gauge(got, "hvobs_worker_view_stale") == 1.0
            assert gauge(got, "hvobs_worker_view_refresh_failures_total") >= 1.0
            assert gauge(got, "hvobs_worker_connected") == 0.0
    health = json.loads(procs[0].get("/healthz")[1])
    assert health["views"]["ring-metrics"]["stale"] is True
    assert "unreachable" in health["views"]["ring-metrics"]["stale_error"]
    own_server.start()
    for worker in procs:
        first = scrape(worker)
        assert equal_ring(first, expected)
        assert gauge(first, "hvobs_worker_view_stale") == 0.0
    anyio.run(append, url, stream, events[600:])
    anyio.run(settled, url, stream, "ring-metrics", "ring-metrics")
    expected = expected_ring(url, stream)
    for worker in procs:
        assert _until(lambda w=worker: equal_ring(scrape(w), expected))
        assert gauge(scrape(worker), "hvobs_worker_state_resets_total") == 0.0


def _until(condition: Any, timeout_s: float = 30.0) -> bool:
    """Poll ``condition`` until it holds (``True``) or the deadline passes (``False``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _renamed(events: list[HypervisorEvent], prefix: str) -> list[HypervisorEvent]:
    """The events with agent ids of their own, so no series is shared with other events."""
    return [
        msgspec.structs.replace(e, agent_did=e.agent_did.replace("did:agent:", prefix))
        if e.agent_did
        else e
        for e in events
    ]


async def _flush_and_wait_for_group(url: str, stream: str) -> None:
    async with aioredis.Redis.from_url(url) as client:
        await client.flushall()
    async with RedisStreamLog(url, stream) as log:
        with anyio.fail_after(30):
            while True:  # the workers recreate it when they meet NOGROUP: poll
                if any(g.name == "ring-metrics" for g in await log.group_info()):
                    return
                await anyio.sleep(0.05)


def test_after_a_flush_every_worker_serves_the_new_state_never_a_mix(
    own_server: RedisServer, procs: list[WorkerProc]
) -> None:
    """Two ring-metrics workers apply events; Redis is flushed (state and stream lost). Each
    worker sees the state's epoch change (counted), drops its copy, and from then on serves
    only what was applied after the flush: every scrape's series are a part of the reference
    over the new events (none of the old agents), and finally equal it."""
    url, stream = own_server.url, f"v{uuid.uuid4().hex[:8]}"
    before = _renamed(random_events(random.Random(21), 800, agents=6), "did:before:")
    after = _renamed(random_events(random.Random(22), 800, agents=6), "did:after:")
    for name in ("r0", "r1"):
        procs.append(WorkerProc(worker_argv("ring-metrics", url, stream, name)))
    anyio.run(append, url, stream, before)
    anyio.run(settled, url, stream, "ring-metrics", "ring-metrics")
    old = expected_ring(url, stream)
    for worker in procs:
        assert equal_ring(scrape(worker), old)
    anyio.run(_flush_and_wait_for_group, url, stream)
    for worker in procs:
        assert _until(lambda w=worker: gauge(scrape(w), "hvobs_worker_state_resets_total") >= 1)
    anyio.run(append, url, stream, after)
    new = expected_ring(url, stream)

    def no_mix(worker: WorkerProc) -> bool:
        got = ring_of(scrape(worker))
        for name, values in got.items():
            for labels, value in values.items():
                assert "did:before:" not in str(labels), (name, labels)
                if name.endswith("_total"):
                    assert value <= new.get(name, {}).get(labels, 0.0), (name, labels, value)
        return equal_ring(got, new)

    for worker in procs:
        assert _until(lambda w=worker: no_mix(w))
    anyio.run(settled, url, stream, "ring-metrics", "ring-metrics")
    for worker in procs:
        assert equal_ring(scrape(worker), new)
