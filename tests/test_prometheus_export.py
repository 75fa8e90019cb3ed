"""The prometheus_client side: scrape-time ring collector, push exporter, guard, /metrics."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hypervisor.observability._core.ring import RingMetricsState
from hypervisor.observability.event_bus import EventType, HypervisorEvent, HypervisorEventBus
from hypervisor.observability.exporters.prometheus import (
    OVERFLOW_VALUE,
    LabelGuard,
    MetricsExportError,
    PrometheusExporter,
    RingMetricsPrometheusCollector,
    register_ring_metrics,
    serve_metrics,
)
from hypervisor.observability.prometheus_collector import RingMetricsCollector


def _ring(
    bus: HypervisorEventBus, kind: EventType, agent: str, session: str = "s1", **payload: object
) -> None:
    bus.emit(HypervisorEvent(event_type=kind, agent_did=agent, session_id=session, payload=payload))


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse the registry's exposition text back: ``(sample name, labels) -> value``."""
    text = generate_latest(registry).decode()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


def test_scrape_collector_exposes_the_published_series() -> None:
    """A registered collector serves the four published metrics computed from the live state."""
    bus = HypervisorEventBus()
    collector = RingMetricsCollector(bus)
    registry = CollectorRegistry()
    register_ring_metrics(collector, registry)
    _ring(bus, EventType.RING_ASSIGNED, "did:mesh:a", ring=3)
    _ring(bus, EventType.RING_ELEVATED, "did:mesh:a", from_ring=3, to_ring=1)
    _ring(bus, EventType.RING_BREACH_DETECTED, "did:mesh:a")
    samples = _samples(registry)
    assert (
        samples[
            _key(
                "agent_hypervisor_ring_transitions_total",
                event_type="ring.assigned",
                agent_did="did:mesh:a",
                session_id="s1",
            )
        ]
        == 1.0
    )
    assert (
        samples[
            _key("agent_hypervisor_ring_breaches_total", agent_did="did:mesh:a", session_id="s1")
        ]
        == 1.0
    )
    assert samples[_key("agent_hypervisor_ring_current", agent_did="did:mesh:a")] == 1.0
    assert _key("agent_hypervisor_ring_elevation_duration_seconds", agent_did="did:mesh:a") in (
        samples
    )
    assert samples[_key("agent_hypervisor_ring_events_processed_total")] == 3.0
    # A later event shows up at the next scrape: nothing is cached between scrapes.
    _ring(bus, EventType.RING_BREACH_DETECTED, "did:mesh:a")
    samples = _samples(registry)
    assert (
        samples[
            _key("agent_hypervisor_ring_breaches_total", agent_did="did:mesh:a", session_id="s1")
        ]
        == 2.0
    )


def test_scrape_collector_accepts_a_bare_state_and_rejects_duplicates() -> None:
    """A worker's RingMetricsState can be registered; registering twice is a clear error."""
    state = RingMetricsState()
    registry = CollectorRegistry()
    register_ring_metrics(state, registry)
    state.apply(
        HypervisorEvent(
            event_type=EventType.RING_ASSIGNED, agent_did="w", session_id="s", payload={"ring": 0}
        )
    )
    assert _samples(registry)[_key("agent_hypervisor_ring_current", agent_did="w")] == 0.0
    with pytest.raises(MetricsExportError):
        register_ring_metrics(state, registry)


def test_flood_of_agent_ids_folds_into_overflow() -> None:
    """Agents beyond max_agents share one series; counters are summed and folds counted."""
    bus = HypervisorEventBus()
    registry = CollectorRegistry()
    register_ring_metrics(RingMetricsCollector(bus), registry, max_agents=3, max_sessions=2)
    for index in range(50):
        _ring(bus, EventType.RING_BREACH_DETECTED, f"did:mesh:random-{index}", session="s1")
    samples = _samples(registry)
    breach_series = {
        dict(labels)["agent_did"]: value
        for (name, labels), value in samples.items()
        if name == "agent_hypervisor_ring_breaches_total"
    }
    assert len(breach_series) == 4  # three admitted agents and the overflow series
    assert breach_series[OVERFLOW_VALUE] == 47.0
    assert sum(breach_series.values()) == 50.0
    assert samples[_key("agent_hypervisor_label_overflow_total", label="agent_did")] == 47.0
    assert samples[_key("agent_hypervisor_label_overflow_total", label="session_id")] == 0.0


def test_overflow_gauges_report_the_most_alarming_value() -> None:
    """Folded agents' ring gauge is the lowest ring; their elevation gauge the longest."""
    bus = HypervisorEventBus()
    registry = CollectorRegistry()
    register_ring_metrics(RingMetricsCollector(bus), registry, max_agents=1)
    _ring(bus, EventType.RING_ASSIGNED, "first", ring=3)
    _ring(bus, EventType.RING_ASSIGNED, "second", ring=2)
    _ring(bus, EventType.RING_ASSIGNED, "third", ring=0)
    samples = _samples(registry)
    assert samples[_key("agent_hypervisor_ring_current", agent_did="first")] == 3.0
    assert samples[_key("agent_hypervisor_ring_current", agent_did=OVERFLOW_VALUE)] == 0.0


def test_label_guard_admits_first_values_for_good() -> None:
    """Admitted values stay admitted; agent_did and agent_id share one agent budget."""
    guard = LabelGuard(max_agents=2, max_sessions=1)
    assert guard.admit("agent_did", "a") == "a"
    assert guard.admit("agent_id", "b") == "b"
    assert guard.admit("agent_did", "c") == OVERFLOW_VALUE
    assert guard.admit("agent_id", "a") == "a"
    assert guard.admit("session_id", "s1") == "s1"
    assert guard.admit("session_id", "s2") == OVERFLOW_VALUE
    assert guard.admit("tool_name", "anything") == "anything"
    assert guard.overflow_counts == {"agent_did": 1, "session_id": 1}
    with pytest.raises(ValueError, match="at least 1"):
        LabelGuard(max_agents=0)


def test_tutorial_export_to_prometheus_feeds_a_real_registry() -> None:
    """export_to_prometheus on PrometheusExporter yields real counters, never double counted."""
    bus = HypervisorEventBus()
    collector = RingMetricsCollector(bus)
    exporter = PrometheusExporter(CollectorRegistry())
    _ring(bus, EventType.RING_ASSIGNED, "did:mesh:analyst", ring=3)
    _ring(bus, EventType.RING_BREACH_DETECTED, "did:mesh:analyst")
    collector.export_to_prometheus(exporter)
    collector.export_to_prometheus(exporter)
    _ring(bus, EventType.RING_BREACH_DETECTED, "did:mesh:analyst")
    collector.export_to_prometheus(exporter)
    samples = _samples(exporter.registry)
    assert (
        samples[
            _key(
                "agent_hypervisor_ring_breaches_total",
                agent_did="did:mesh:analyst",
                session_id="s1",
            )
        ]
        == 2.0
    )
    assert (
        samples[
            _key(
                "agent_hypervisor_ring_transitions_total",
                event_type="ring.assigned",
                agent_did="did:mesh:analyst",
                session_id="s1",
            )
        ]
        == 1.0
    )
    assert samples[_key("agent_hypervisor_ring_current", agent_did="did:mesh:analyst")] == 3.0


def test_exporter_guard_folds_and_counts_updates() -> None:
    """The push exporter folds excess agents and counts each folded update."""
    exporter = PrometheusExporter(CollectorRegistry(), max_agents=2)
    for index in range(5):
        exporter.inc_counter("flood_total", 1.0, labels={"agent_did": f"a{index}"})
    samples = _samples(exporter.registry)
    assert samples[_key("flood_total", agent_did=OVERFLOW_VALUE)] == 3.0
    assert samples[_key("agent_hypervisor_label_overflow_total", label="agent_did")] == 3.0


def test_exporter_rejects_shape_changes() -> None:
    """A label set, kind or sign that does not fit the existing metric raises MetricsExportError."""
    exporter = PrometheusExporter(CollectorRegistry())
    exporter.inc_counter("calls_total", 1.0, labels={"agent_did": "a"})
    with pytest.raises(MetricsExportError, match="labels"):
        exporter.inc_counter("calls_total", 1.0, labels={"tool": "x"})
    with pytest.raises(MetricsExportError, match="counter"):
        exporter.set_gauge("calls_total", 1.0, labels={"agent_did": "a"})
    with pytest.raises(MetricsExportError, match="decrease"):
        exporter.inc_counter("calls_total", -1.0, labels={"agent_did": "a"})
    exporter.set_gauge("plain_gauge", 4.5)
    assert _samples(exporter.registry)[_key("plain_gauge")] == 4.5


def test_serve_metrics_answers_a_real_scrape() -> None:
    """serve_metrics serves the registry over HTTP on a free port and close() frees it."""
    bus = HypervisorEventBus()
    registry = CollectorRegistry()
    register_ring_metrics(RingMetricsCollector(bus), registry)
    _ring(bus, EventType.RING_BREACH_DETECTED, "did:mesh:rogue")
    with serve_metrics(registry, "127.0.0.1", 0) as server:
        assert server.port > 0
        with urllib.request.urlopen(server.url, timeout=5) as response:
            body = response.read().decode()
    assert (
        'agent_hypervisor_ring_breaches_total{agent_did="did:mesh:rogue",session_id="s1"} 1.0'
        in (body)
    )
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)


def test_a_shared_guard_keeps_folding_stable_across_collectors() -> None:
    """Collectors built over fresh snapshots with one guard fold the same agents."""
    guard = LabelGuard(max_agents=1)
    first = RingMetricsState()
    first.apply(
        HypervisorEvent(event_type=EventType.RING_ASSIGNED, agent_did="a", payload={"ring": 3})
    )
    registry = CollectorRegistry()
    registry.register(RingMetricsPrometheusCollector(first, guard=guard))
    assert _key("agent_hypervisor_ring_current", agent_did="a") in _samples(registry)
    second = RingMetricsState()  # a newer snapshot where "b" comes first
    for agent in ("b", "a"):
        second.apply(
            HypervisorEvent(
                event_type=EventType.RING_ASSIGNED, agent_did=agent, payload={"ring": 2}
            )
        )
    registry = CollectorRegistry()
    registry.register(RingMetricsPrometheusCollector(second, guard=guard))
    samples = _samples(registry)
    assert _key("agent_hypervisor_ring_current", agent_did="a") in samples
    assert samples[_key("agent_hypervisor_ring_current", agent_did=OVERFLOW_VALUE)] == 2.0
