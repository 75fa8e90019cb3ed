"""GovernanceMetrics: the .NET package's instruments on prometheus_client and OpenTelemetry."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hypervisor.observability.exporters.governance import (
    DEFAULT_LATENCY_BUCKETS_MS,
    METER_NAME,
    OTEL_INSTRUMENTS,
    GovernanceMetrics,
)
from hypervisor.observability.exporters.prometheus import OVERFLOW_VALUE, MetricsExportError

otel_metrics = pytest.importorskip("opentelemetry.sdk.metrics")
otel_export = pytest.importorskip("opentelemetry.sdk.metrics.export")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(registry: CollectorRegistry) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _types(registry: CollectorRegistry) -> dict[str, str]:
    text = generate_latest(registry).decode()
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


def _decision(agent: str, tool: str, decision: str) -> dict[str, str]:
    return {"agent_id": agent, "tool_name": tool, "decision": decision}


def test_prometheus_names_types_and_labels_match_the_dotnet_package() -> None:
    """Each decision lands in the Prometheus series the .NET names map to, with .NET's tags."""
    registry = CollectorRegistry()
    metrics = GovernanceMetrics(registry)
    metrics.record_decision(True, "did:mesh:data-analyst", "file_read", 0.05)
    metrics.record_decision(False, "did:mesh:untrusted", "shell_exec", 0.12)
    metrics.record_decision(False, "did:mesh:noisy-agent", "api_call", 0.01, rate_limited=True)
    metrics.record_audit_event("audit.committed", "did:mesh:data-analyst")
    samples = _samples(registry)
    allow = _decision("did:mesh:data-analyst", "file_read", "allow")
    deny = _decision("did:mesh:untrusted", "shell_exec", "deny")
    noisy = _decision("did:mesh:noisy-agent", "api_call", "deny")
    assert samples[_key("agent_governance_policy_decisions_total", **allow)] == 1.0
    assert samples[_key("agent_governance_policy_decisions_total", **deny)] == 1.0
    assert samples[_key("agent_governance_tool_calls_allowed_total", **allow)] == 1.0
    assert _key("agent_governance_tool_calls_allowed_total", **deny) not in samples
    assert samples[_key("agent_governance_tool_calls_blocked_total", **deny)] == 1.0
    assert samples[_key("agent_governance_tool_calls_blocked_total", **noisy)] == 1.0
    assert samples[_key("agent_governance_rate_limit_hits_total", **noisy)] == 1.0
    assert _key("agent_governance_rate_limit_hits_total", **deny) not in samples
    assert samples[_key("agent_governance_evaluation_latency_ms_count", **allow)] == 1.0
    assert samples[_key("agent_governance_evaluation_latency_ms_sum", **allow)] == pytest.approx(
        0.05
    )
    # 0.05 ms lands in the 0.05 bucket (le is inclusive) and not in the 0.025 one.
    assert samples[_key("agent_governance_evaluation_latency_ms_bucket", le="0.05", **allow)] == 1
    assert samples[_key("agent_governance_evaluation_latency_ms_bucket", le="0.025", **allow)] == 0
    assert (
        samples[
            _key(
                "agent_governance_audit_events_total",
                event_type="audit.committed",
                agent_id="did:mesh:data-analyst",
            )
        ]
        == 1.0
    )
    types = _types(registry)
    assert types["agent_governance_policy_decisions"] == "counter"
    assert types["agent_governance_evaluation_latency_ms"] == "histogram"
    buckets = {
        float(dict(labels)["le"])
        for (name, labels), _ in samples.items()
        if name == "agent_governance_evaluation_latency_ms_bucket"
    }
    assert buckets == {*DEFAULT_LATENCY_BUCKETS_MS, float("inf")}


def test_callback_gauges_are_read_at_scrape_time() -> None:
    """Trust scores and active agents come from the callbacks at every scrape."""
    registry = CollectorRegistry()
    metrics = GovernanceMetrics(registry)
    assert not any(name.startswith("agent_governance_trust") for name, _ in _samples(registry))
    scores = {"did:mesh:trusted": 850.0, "did:mesh:suspicious": 320.0}
    active = [2]
    metrics.register_trust_score_gauge(lambda: scores)
    metrics.register_active_agents_gauge(lambda: active[0])
    samples = _samples(registry)
    assert samples[_key("agent_governance_trust_score", agent_id="did:mesh:trusted")] == 850.0
    assert samples[_key("agent_governance_active_agents")] == 2.0
    scores["did:mesh:suspicious"] = 100.0
    active[0] = 7
    samples = _samples(registry)
    assert samples[_key("agent_governance_trust_score", agent_id="did:mesh:suspicious")] == 100.0
    assert samples[_key("agent_governance_active_agents")] == 7.0
    assert _types(registry)["agent_governance_trust_score"] == "gauge"


def test_trust_callback_accepts_measurement_pairs_and_failures_do_not_break_scrapes() -> None:
    """(score, labels) pairs work like .NET Measurements; a raising callback drops its gauge."""
    registry = CollectorRegistry()
    metrics = GovernanceMetrics(registry)
    metrics.register_trust_score_gauge(lambda: [(640.0, {"agent_id": "did:mesh:x"})])
    assert _samples(registry)[_key("agent_governance_trust_score", agent_id="did:mesh:x")] == 640

    def broken() -> int:
        raise RuntimeError("registry offline")

    metrics.register_active_agents_gauge(broken)
    metrics.record_decision(True, "did:mesh:x", "search", 0.2)
    samples = _samples(registry)
    assert _key("agent_governance_active_agents") not in samples
    assert samples[_key("agent_governance_trust_score", agent_id="did:mesh:x")] == 640.0


def test_agent_labels_are_guarded() -> None:
    """Agents beyond max_agents fold into __overflow__, counted; trust keeps the lowest score."""
    registry = CollectorRegistry()
    metrics = GovernanceMetrics(registry, max_agents=2)
    for index in range(6):
        metrics.record_decision(True, f"did:mesh:{index}", "search", 0.1)
    metrics.register_trust_score_gauge(lambda: {f"did:mesh:{i}": 900.0 - i * 100 for i in range(6)})
    samples = _samples(registry)
    folded = _decision(OVERFLOW_VALUE, "search", "allow")
    assert samples[_key("agent_governance_policy_decisions_total", **folded)] == 4.0
    assert samples[_key("agent_governance_label_overflow_total", label="agent_id")] == 4.0
    assert samples[_key("agent_governance_trust_score", agent_id=OVERFLOW_VALUE)] == 400.0
    agents = {
        dict(labels)["agent_id"]
        for (name, labels), _ in samples.items()
        if name == "agent_governance_policy_decisions_total"
    }
    assert agents == {"did:mesh:0", "did:mesh:1", OVERFLOW_VALUE}


def test_second_instance_on_one_registry_is_rejected() -> None:
    """Two GovernanceMetrics cannot share a registry (their series would collide)."""
    registry = CollectorRegistry()
    GovernanceMetrics(registry)
    with pytest.raises(MetricsExportError):
        GovernanceMetrics(registry)


def _otel_data(reader: Any) -> dict[str, Any]:
    data = reader.get_metrics_data()
    out: dict[str, Any] = {}
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            assert scope.scope.name == METER_NAME
            for metric in scope.metrics:
                out[metric.name] = metric
    return out


def test_opentelemetry_meter_gets_the_dotnet_instruments() -> None:
    """On a meter the instruments have .NET's dotted names, the ms unit and the same tags."""
    reader = otel_export.InMemoryMetricReader()
    provider = otel_metrics.MeterProvider(metric_readers=[reader])
    try:
        metrics = GovernanceMetrics(meter=provider.get_meter(METER_NAME))
        assert metrics.registry is None
        metrics.record_decision(True, "did:mesh:a", "file_read", 0.05)
        metrics.record_decision(False, "did:mesh:b", "api_call", 75.0, rate_limited=True)
        metrics.record_audit_event("audit.committed", "did:mesh:a")
        metrics.register_trust_score_gauge(lambda: {"did:mesh:a": 850.0})
        metrics.register_active_agents_gauge(lambda: 2)
        data = _otel_data(reader)
    finally:
        provider.shutdown()
    assert set(data) == set(OTEL_INSTRUMENTS.values())
    decisions = data["agent_governance.policy_decisions"].data
    assert decisions.is_monotonic
    points = {
        tuple(sorted(point.attributes.items())): point.value for point in decisions.data_points
    }
    assert points[tuple(sorted(_decision("did:mesh:a", "file_read", "allow").items()))] == 1
    assert points[tuple(sorted(_decision("did:mesh:b", "api_call", "deny").items()))] == 1
    rate_limited = data["agent_governance.rate_limit_hits"].data.data_points
    assert [dict(point.attributes)["agent_id"] for point in rate_limited] == ["did:mesh:b"]
    latency = data["agent_governance.evaluation_latency_ms"]
    assert latency.unit == "ms"
    slow = next(p for p in latency.data.data_points if p.attributes["agent_id"] == "did:mesh:b")
    assert tuple(slow.explicit_bounds) == DEFAULT_LATENCY_BUCKETS_MS
    assert slow.sum == 75.0
    assert slow.count == 1
    trust = data["agent_governance.trust_score"].data.data_points
    assert [(p.value, dict(p.attributes)) for p in trust] == [(850.0, {"agent_id": "did:mesh:a"})]
    assert [p.value for p in data["agent_governance.active_agents"].data.data_points] == [2]


def test_both_backends_record_the_same_decisions() -> None:
    """With a registry and a meter, one call records on both, with equal counts."""
    reader = otel_export.InMemoryMetricReader()
    provider = otel_metrics.MeterProvider(metric_readers=[reader])
    registry = CollectorRegistry()
    try:
        metrics = GovernanceMetrics(registry, meter=provider.get_meter(METER_NAME))
        for index in range(5):
            metrics.record_decision(index % 2 == 0, "did:mesh:a", "search", 0.1)
        data = _otel_data(reader)
    finally:
        provider.shutdown()
    otel_blocked = sum(
        p.value for p in data["agent_governance.tool_calls_blocked"].data.data_points
    )
    samples = _samples(registry)
    prom_blocked = samples[
        _key(
            "agent_governance_tool_calls_blocked_total", **_decision("did:mesh:a", "search", "deny")
        )
    ]
    assert otel_blocked == prom_blocked == 2
