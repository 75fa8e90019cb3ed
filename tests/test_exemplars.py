"""Metrics that lead to traces: exemplars on the ring counters (OpenMetrics only), and the
optional ``session_id`` label, in process, on the workers' ``/metrics`` and on a worker process."""

from __future__ import annotations

import time
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.samples import Sample, Timestamp

from hypervisor.observability import CausalTraceId, EventType, HypervisorEvent
from hypervisor.observability._backends.memory_log import MemoryStreamLog
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.ring import RingMetricsState
from hypervisor.observability.exporters import PrometheusExporter, serve_metrics
from hypervisor.observability.exporters.prometheus import register_ring_metrics
from hypervisor.observability.workers import (
    MemoryStateStore,
    RingMetricsDerivation,
    Worker,
    WorkerConfig,
)
from hypervisor.observability.workers._http import WorkerHttpServer
from hypervisor.observability.workers._snapshot import dump_state, load_state
from redis_server import RedisServer
from worker_procs import WorkerProc, procs as procs, settled, worker_argv

T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
ACCEPT_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
ADMIN = CausalTraceId()


def ids(causal: CausalTraceId) -> dict[str, str]:
    _, trace, span, _ = causal.to_traceparent().split("-")
    return {"trace_id": trace, "span_id": span}


def fleet_events() -> tuple[list[HypervisorEvent], CausalTraceId, CausalTraceId]:
    """A rogue agent breaching in two sessions (the newest breach in s2), and elevations."""
    first, newest = CausalTraceId(), CausalTraceId()
    events = [
        HypervisorEvent(
            event_type=EventType.RING_BREACH_DETECTED,
            timestamp=T0,
            agent_did="did:mesh:rogue",
            session_id="s1",
            causal_trace_id=first.full_id,
            payload={"ring": 3},
        ),
        HypervisorEvent(
            event_type=EventType.RING_BREACH_DETECTED,
            timestamp=T0 + timedelta(seconds=30),
            agent_did="did:mesh:rogue",
            session_id="s2",
            causal_trace_id=newest.full_id,
            payload={"ring": 3},
        ),
        # No causal id: counted, but no exemplar of its own.
        HypervisorEvent(
            event_type=EventType.RING_BREACH_DETECTED,
            timestamp=T0 + timedelta(seconds=40),
            agent_did="did:mesh:rogue",
            session_id="s1",
        ),
        HypervisorEvent(
            event_type=EventType.RING_ELEVATED,
            timestamp=T0 + timedelta(seconds=5),
            agent_did="did:mesh:admin",
            session_id="s1",
            causal_trace_id=ADMIN.full_id,
            payload={"to_ring": 1},
        ),
        HypervisorEvent(
            event_type=EventType.RING_ASSIGNED,
            timestamp=T0 + timedelta(seconds=6),
            agent_did="did:mesh:plain",
            session_id="s1",
            payload={"to_ring": 2},
        ),
    ]
    return events, first, newest


def samples(text: str, name: str) -> list[Sample]:
    """The samples named ``name`` of an OpenMetrics exposition, parsed by prometheus_client."""
    families = text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
    return [sample for family in families for sample in family.samples if sample.name == name]


def openmetrics(registry: CollectorRegistry) -> str:
    """The registry in the OpenMetrics format (what Prometheus asks for)."""
    data: bytes = generate_openmetrics(registry)  # type: ignore[no-untyped-call]
    return data.decode()


def seconds(stamp: object) -> float:
    """An exemplar timestamp (prometheus_client's parser gives a ``Timestamp``) in seconds."""
    assert isinstance(stamp, Timestamp)
    return stamp.sec + stamp.nsec / 1e9


def state_of(events: list[HypervisorEvent]) -> RingMetricsState:
    state = RingMetricsState()
    for event in events:
        state.apply(event)
    return state


def test_openmetrics_exposition_carries_exemplars_with_the_agent_span() -> None:
    """Each breach and transition series carries an exemplar {trace_id, span_id} of its newest
    event with a causal id, timestamped with the event time; the text format has none."""
    events, first, newest = fleet_events()
    registry = CollectorRegistry()
    register_ring_metrics(state_of(events), registry)
    text = openmetrics(registry)
    breaches = {
        s.labels["session_id"]: s for s in samples(text, "agent_hypervisor_ring_breaches_total")
    }
    assert breaches["s1"].value == 2
    assert breaches["s1"].exemplar is not None
    assert breaches["s1"].exemplar.labels == ids(first)
    assert seconds(breaches["s1"].exemplar.timestamp) == T0.timestamp()
    assert breaches["s2"].exemplar is not None
    assert breaches["s2"].exemplar.labels == ids(newest)
    transitions = {
        s.labels["agent_did"]: s for s in samples(text, "agent_hypervisor_ring_transitions_total")
    }
    assert transitions["did:mesh:admin"].exemplar is not None
    assert transitions["did:mesh:admin"].exemplar.labels == ids(ADMIN)
    assert transitions["did:mesh:plain"].exemplar is None
    assert b"trace_id" not in generate_latest(registry)


def test_without_the_session_label_counters_are_summed_with_the_newest_exemplar() -> None:
    """session_label=False: one breach series per agent (the sessions summed), whose exemplar is
    the newest breach's; the transitions have no session_id either."""
    events, _, newest = fleet_events()
    registry = CollectorRegistry()
    register_ring_metrics(state_of(events), registry, session_label=False)
    text = openmetrics(registry)
    (breach,) = samples(text, "agent_hypervisor_ring_breaches_total")
    assert breach.labels == {"agent_did": "did:mesh:rogue"}
    assert breach.value == 3
    assert breach.exemplar is not None
    assert breach.exemplar.labels == ids(newest)
    assert all(
        "session_id" not in s.labels
        for s in samples(text, "agent_hypervisor_ring_transitions_total")
    )


def test_exemplars_survive_a_snapshot_and_old_snapshots_load() -> None:
    """A restored state exports the same exemplars (times as epoch seconds); a snapshot
    written without exemplars loads with none."""
    events, _, _ = fleet_events()
    state = state_of(events)
    restored = load_state(dump_state(state))
    assert isinstance(restored, RingMetricsState)
    live, again = CollectorRegistry(), CollectorRegistry()
    register_ring_metrics(state, live)
    register_ring_metrics(restored, again)
    assert openmetrics(live) == openmetrics(again)
    # A snapshot written before exemplars existed: the same fields without the two maps.
    version, body = msgspec.msgpack.decode(dump_state(state))
    del body["transition_exemplars"], body["breach_exemplars"]
    old = load_state(msgspec.msgpack.encode([version, body]))
    assert isinstance(old, RingMetricsState)
    assert old.breach_exemplars == {}
    assert old.breaches == state.breaches
    state.forget_agents({"did:mesh:rogue"})
    assert state.breach_exemplars == {}


def test_serve_metrics_negotiates_openmetrics_over_http() -> None:
    """serve_metrics answers OpenMetrics (with exemplars) to a scraper that asks for it."""
    events, first, _ = fleet_events()
    registry = CollectorRegistry()
    register_ring_metrics(state_of(events), registry)
    with serve_metrics(registry) as server:
        request = urllib.request.Request(server.url, headers={"Accept": ACCEPT_OPENMETRICS})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            text = response.read().decode()
    found = [s.exemplar for s in samples(text, "agent_hypervisor_ring_breaches_total")]
    assert {tuple(sorted(e.labels.items())) for e in found if e} >= {
        tuple(sorted(ids(first).items()))
    }


def test_push_exporter_can_drop_the_session_label() -> None:
    """PrometheusExporter(session_label=False) drops session_id from the updates it receives,
    so export_to_prometheus sums the sessions."""
    from hypervisor.observability import HypervisorEventBus, RingMetricsCollector

    bus = HypervisorEventBus()
    collector = RingMetricsCollector(bus)
    for event in fleet_events()[0]:
        bus.emit(event)
    exporter = PrometheusExporter(session_label=False)
    collector.export_to_prometheus(exporter)
    value = exporter.registry.get_sample_value(
        "agent_hypervisor_ring_breaches_total", {"agent_did": "did:mesh:rogue"}
    )
    assert value == 3


def test_otel_bridge_can_drop_the_session_label() -> None:
    """OTelRingMetricsBridge(session_label=False) observes counters without session_id."""
    otel = pytest.importorskip("hypervisor.observability.exporters.otel")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    otel.OTelRingMetricsBridge(
        state_of(fleet_events()[0]), meter_provider=provider, session_label=False
    )
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points[metric.name] = list(metric.data.data_points)
    (breach,) = points["agent_hypervisor_ring_breaches_total"]
    assert dict(breach.attributes) == {"agent_did": "did:mesh:rogue"}
    assert breach.value == 3
    provider.shutdown()


async def _get(port: int, accept: str | None) -> tuple[str, str]:
    def fetch() -> tuple[str, str]:
        headers = {"Accept": accept} if accept else {}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.headers["Content-Type"], response.read().decode()

    return await anyio.to_thread.run_sync(fetch)


@pytest.mark.anyio
@pytest.mark.parametrize("session_label", [True, False])
async def test_worker_metrics_negotiate_openmetrics_with_exemplars(session_label: bool) -> None:
    """A ring worker's /metrics gives the global ring metrics with exemplars in OpenMetrics when
    asked (as Prometheus asks), the text format otherwise; session_label=False drops the label."""
    events, first, newest = fleet_events()
    log = MemoryStreamLog("events")
    await log.append_many([encode_event(e) for e in events])
    store = MemoryStateStore()
    config = WorkerConfig(group="ring", consumer="w", block_s=0.05, apply_interval_s=0.002)
    async with Worker(log, [RingMetricsDerivation(store)], config) as worker:
        server = WorkerHttpServer(worker, session_label=session_label)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            port = await tg.start(server.serve)
            with anyio.fail_after(10):
                while (await store.meta()).applied_id == "0-0":  # noqa: ASYNC110 - a store poll
                    await anyio.sleep(0.01)
            content_type, text = await _get(port, ACCEPT_OPENMETRICS)
            plain_type, plain = await _get(port, None)
            worker.stop()
            tg.cancel_scope.cancel()
    assert content_type.startswith("application/openmetrics-text")
    assert plain_type.startswith("text/plain")
    assert "trace_id" not in plain
    found = {
        tuple(sorted(s.labels.items())): s.exemplar
        for s in samples(text, "agent_hypervisor_ring_breaches_total")
    }
    if session_label:
        exemplar = found[(("agent_did", "did:mesh:rogue"), ("session_id", "s1"))]
        assert exemplar is not None
        assert exemplar.labels == ids(first)
    else:
        exemplar = found[(("agent_did", "did:mesh:rogue"),)]
        assert exemplar is not None
        assert exemplar.labels == ids(newest)
    # The worker's own health metrics are valid OpenMetrics too.
    assert samples(text, "hvobs_worker_events_total")


@pytest.mark.redis
@pytest.mark.slow
def test_worker_process_serves_exemplars_without_session_label(
    redis_server: RedisServer, stream_name: str, procs: list[WorkerProc]
) -> None:
    """`hvobs worker ring-metrics --no-session-label` on a real Redis stream: an OpenMetrics
    scrape of the process finds the breach exemplar, and no session_id label."""
    events, _, newest = fleet_events()

    async def produce() -> None:
        from hypervisor.observability._backends.redis_log import RedisStreamLog

        async with RedisStreamLog(redis_server.url, stream_name) as log:
            await log.append_many([encode_event(e) for e in events])

    anyio.run(produce)
    worker = WorkerProc(
        worker_argv("ring-metrics", redis_server.url, stream_name, "x-1", "--no-session-label")
    )
    procs.append(worker)
    # Healthy once connected, i.e. once its consumer group exists (settled needs the group).
    deadline = time.monotonic() + 30
    while worker.get("/healthz")[0] != 200:
        assert time.monotonic() < deadline, "the worker never became healthy"
        time.sleep(0.05)
    anyio.run(settled, redis_server.url, stream_name, "ring-metrics", "ring-metrics")
    request = urllib.request.Request(
        f"http://127.0.0.1:{worker.port}/metrics", headers={"Accept": ACCEPT_OPENMETRICS}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    (breach,) = samples(text, "agent_hypervisor_ring_breaches_total")
    assert breach.labels == {"agent_did": "did:mesh:rogue"}
    assert breach.exemplar is not None
    assert breach.exemplar.labels == ids(newest)
    assert seconds(breach.exemplar.timestamp) == (T0 + timedelta(seconds=30)).timestamp()
    assert worker.terminate() == 0
