"""Bounded ring metrics across real worker processes on a real redis-server: two workers of one
group with different scrape histories serve byte-identical ring series under a flood of agent
ids, equal to an in-process bounded state over the stream, and retired agents' series vanish."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RingBounds, RingMetricsState
from hypervisor.observability.exporters.prometheus import RingMetricsPrometheusCollector
from redis_server import RedisServer
from worker_procs import WorkerProc, settled, stream_events, worker_argv

pytestmark = [pytest.mark.redis, pytest.mark.slow]

T0 = datetime(2026, 5, 1, tzinfo=UTC)
BOUNDS = RingBounds(
    max_agents=5, max_sessions=3, max_tracked_agents=40, agent_idle_s=100.0, clock_window=1
)
BOUND_ARGS = (
    "--max-agents",
    "5",
    "--max-sessions",
    "3",
    "--max-tracked-agents",
    "40",
    "--agent-idle",
    "100",
    "--agent-clock-window",
    "1",
)


@pytest.fixture
def workers() -> Iterator[list[WorkerProc]]:
    """Worker processes started by a test, killed at the end whatever happens."""
    started: list[WorkerProc] = []
    yield started
    for proc in started:
        proc.close()


def ring_lines(body: bytes) -> list[str]:
    """The ring metrics part of a /metrics body (help, type and sample lines), in order."""
    return [line for line in body.decode().splitlines() if "agent_hypervisor_" in line]


def scrape_ring(worker: WorkerProc) -> list[str]:
    status, body = worker.get("/metrics")
    assert status == 200
    return ring_lines(body)


def expected_lines(events: list[HypervisorEvent]) -> list[str]:
    """What an in-process bounded state fed the stream in order exports."""
    state = RingMetricsState(BOUNDS)
    for event in events:
        state.apply(event)
    registry = CollectorRegistry()
    registry.register(RingMetricsPrometheusCollector(state))
    return ring_lines(generate_latest(registry))


def flood(rng: random.Random, start: float, agents: range) -> list[HypervisorEvent]:
    """Each agent appears, is assigned, elevated or breaches a few times, and goes quiet."""
    events = []
    at = start
    for index in agents:
        agent = f"did:flood:{index}"
        session = f"s{rng.randrange(6)}"
        for _ in range(rng.randint(1, 4)):
            at += rng.random() * 2.0
            kind = rng.choice(
                [
                    EventType.RING_ASSIGNED,
                    EventType.RING_ELEVATED,
                    EventType.RING_DEMOTED,
                    EventType.RING_BREACH_DETECTED,
                ]
            )
            events.append(
                HypervisorEvent(
                    event_type=kind,
                    timestamp=T0 + timedelta(seconds=at),
                    agent_did=agent,
                    session_id=session,
                    payload={"to_ring": rng.randrange(4)}
                    if kind is not EventType.RING_BREACH_DETECTED
                    else {},
                )
            )
    return events


async def append(url: str, stream: str, events: list[HypervisorEvent]) -> None:
    async with RedisStreamLog(url, stream) as log:
        for start in range(0, len(events), 40):
            await log.append_many([encode_event(e) for e in events[start : start + 40]])


def test_workers_serve_identical_series_under_an_agent_flood(
    redis_server: RedisServer, workers: list[WorkerProc]
) -> None:
    """Two ring-metrics workers of one group, one scraped throughout a flood of 400 agent ids
    and one scraped only at the end, serve byte-identical ring series, equal to an in-process
    bounded state over the stream: at most --max-agents agents have series of their own, the
    rest are under __overflow__. Agents retired for idleness or beyond --max-tracked-agents
    (among them the first ones, which had series of their own) have no series any more, and
    the retirements are counted."""
    url, stream = redis_server.url, f"l{uuid.uuid4().hex[:8]}"
    rng = random.Random(9)
    first = [
        HypervisorEvent(
            event_type=EventType.RING_BREACH_DETECTED,
            timestamp=T0 + timedelta(seconds=i),
            agent_did=f"did:early:{i}",
            session_id="s-early",
        )
        for i in range(3)
    ]
    first.append(
        HypervisorEvent(
            event_type=EventType.RING_ASSIGNED,
            timestamp=T0 + timedelta(seconds=4),
            agent_did="did:early:ring",
            session_id="s-early",
            payload={"ring": 2},
        )
    )
    scraped = WorkerProc(worker_argv("ring-metrics", url, stream, "w-scraped", *BOUND_ARGS))
    workers.append(scraped)
    quiet = WorkerProc(worker_argv("ring-metrics", url, stream, "w-quiet", *BOUND_ARGS))
    workers.append(quiet)
    anyio.run(append, url, stream, first)
    anyio.run(settled, url, stream, "ring-metrics", "ring-metrics")
    early = scrape_ring(scraped)
    assert any('agent_did="did:early:0"' in line for line in early)
    assert any('agent_did="did:early:ring"' in line for line in early)

    events = flood(rng, 10.0, range(400))
    for start in range(0, len(events), 200):
        anyio.run(append, url, stream, events[start : start + 200])
        scrape_ring(scraped)  # a different scrape history from the quiet worker's
    anyio.run(settled, url, stream, "ring-metrics", "ring-metrics")

    from_scraped, from_quiet = scrape_ring(scraped), scrape_ring(quiet)
    assert from_scraped == from_quiet
    assert from_scraped == expected_lines(anyio.run(stream_events, url, stream))
    own = {
        line.split('agent_did="')[1].split('"')[0]
        for line in from_scraped
        if line.startswith("agent_hypervisor_ring_current{")
    }
    assert "__overflow__" in own
    assert 1 < len(own - {"__overflow__"}) <= 5
    assert not any("did:early" in line for line in from_scraped)
    retired = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in from_scraped
        if line.startswith("agent_hypervisor_ring_agents_retired_total{")
    }
    assert retired["idle"] > 0
    assert retired["capacity"] > 0
    tracked = [
        float(line.rsplit(" ", 1)[1])
        for line in from_scraped
        if line.startswith("agent_hypervisor_ring_agents_tracked ")
    ]
    assert len(tracked) == 1
    assert 0 < tracked[0] <= 40
