"""OpenTelemetry export, proven on the wire: OTLP/HTTP protobuf received and decoded locally."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from hypervisor.observability.causal_trace import CausalTraceId
from hypervisor.observability.event_bus import (
    EventType,
    HypervisorEvent,
    HypervisorEventBus,
)
from hypervisor.observability.exporters.otel import (
    OTelRingMetricsBridge,
    OTelSpanSink,
    otlp_http_span_sink,
)
from hypervisor.observability.exporters.prometheus import OVERFLOW_VALUE
from hypervisor.observability.prometheus_collector import RingMetricsCollector
from hypervisor.observability.saga_span_exporter import SagaSpanExporter
from otlp_receiver import OtlpReceiver as _Receiver, receiver as receiver


def _attrs(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out


def _saga_events(base: datetime, causal: CausalTraceId) -> list[HypervisorEvent]:
    def at(seconds: float, kind: EventType, **payload: Any) -> HypervisorEvent:
        return HypervisorEvent(
            event_type=kind,
            timestamp=base + timedelta(seconds=seconds),
            session_id="s1",
            agent_did="did:mesh:orchestrator",
            causal_trace_id=causal.full_id if kind is EventType.SAGA_CREATED else None,
            payload={"saga_id": "deploy-v2", **payload},
        )

    return [
        at(0.0, EventType.SAGA_CREATED),
        at(0.1, EventType.SAGA_STEP_STARTED, step_id="validate-config", step_action="validate"),
        at(2.2, EventType.SAGA_STEP_COMMITTED, step_id="validate-config", step_action="validate"),
        at(2.3, EventType.SAGA_STEP_STARTED, step_id="run-migrations", step_action="migrate"),
        at(
            6.8,
            EventType.SAGA_STEP_FAILED,
            step_id="run-migrations",
            step_action="migrate",
            error="connection_timeout",
        ),
        at(7.5, EventType.SAGA_COMPENSATING, step_id="rollback-config", step_action="rollback"),
        at(8.0, EventType.SAGA_ESCALATED, reason="migration failed"),
    ]


def test_otlp_http_export_carries_true_times_ids_parents_and_status(receiver: _Receiver) -> None:
    """Spans sent over OTLP/HTTP keep the records' times, trace/span/parent ids and statuses."""
    bus = HypervisorEventBus()
    sink = otlp_http_span_sink(receiver.url, service_name="hv-test", batch=False)
    exporter = SagaSpanExporter(bus, sink=sink)
    base = datetime.now(UTC) - timedelta(hours=1)
    causal = CausalTraceId()
    for event in _saga_events(base, causal):
        bus.emit(event)
    assert sink.force_flush(10.0)
    records = {record.span_id: record for record in exporter.completed_spans}
    assert len(records) == 4
    received = receiver.spans()
    assert receiver.content_types
    assert all(ct == "application/x-protobuf" for ct in receiver.content_types)
    assert len(received) == 4
    by_name: dict[str, Span] = {}
    for resource, span in received:
        assert resource["service.name"] == "hv-test"
        record = records[span.span_id.hex()]
        assert span.name == record.name
        assert span.trace_id.hex() == record.trace_id
        assert span.parent_span_id.hex() == (record.parent_span_id or "")
        # The event times, an hour ago, not the time of export.
        assert span.start_time_unix_nano / 1e9 == pytest.approx(record.start_time, abs=1e-6)
        assert span.end_time_unix_nano / 1e9 == pytest.approx(record.end_time, abs=1e-6)
        by_name[span.name] = span
    saga = by_name["saga.escalated.deploy-v2"]
    validate = by_name["saga.step.validate"]
    migrate = by_name["saga.step.migrate"]
    rollback = by_name["saga.compensate.rollback"]
    for child in (validate, migrate, rollback):
        assert child.parent_span_id == saga.span_id
        assert child.trace_id == saga.trace_id
    # The saga joins the trace of the agents that ran it (its causal trace id).
    _, causal_trace, causal_span, _ = causal.to_traceparent().split("-")
    assert saga.trace_id.hex() == causal_trace
    assert saga.parent_span_id.hex() == causal_span
    assert validate.end_time_unix_nano - validate.start_time_unix_nano == pytest.approx(2.1e9, 1e-6)
    assert validate.status.code == Status.STATUS_CODE_OK
    assert migrate.status.code == Status.STATUS_CODE_ERROR
    assert migrate.status.message == "connection_timeout"
    assert saga.status.code == Status.STATUS_CODE_ERROR
    assert saga.status.message == "migration failed"
    assert rollback.status.code == Status.STATUS_CODE_UNSET
    assert _attrs(rollback)["agent.saga.compensating"] is True
    assert _attrs(rollback)["agent.saga.state"] == "compensating"
    assert _attrs(validate)["agent.did"] == "did:mesh:orchestrator"
    assert validate.kind == Span.SPAN_KIND_INTERNAL
    sink.shutdown()


def test_record_span_without_ids_makes_root_spans_with_true_times(receiver: _Receiver) -> None:
    """The published record_span path (no ids) still exports a root span with its own times."""
    sink = otlp_http_span_sink(receiver.url, batch=True)
    sink.record_span(
        name="saga.step.validate",
        start_time=1_700_000_000.25,
        end_time=1_700_000_002.75,
        attributes={"agent.saga.id": "s", "agent.saga.attempt": 2, "obj": object.__name__},
        status="ok",
    )
    sink.shutdown()  # a batch processor exports on shutdown
    [(_, span)] = receiver.spans()
    assert span.start_time_unix_nano == 1_700_000_000_250_000_000
    assert span.end_time_unix_nano == 1_700_000_002_750_000_000
    assert span.parent_span_id == b""
    assert len(span.trace_id) == 16
    assert span.trace_id != bytes(16)
    assert _attrs(span)["agent.saga.attempt"] == 2
    assert span.status.code == Status.STATUS_CODE_OK


def test_callers_provider_keeps_random_ids_for_other_tracers() -> None:
    """On a caller's provider our spans carry record ids; other tracers still get random ids."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    sink = OTelSpanSink(provider)
    bus = HypervisorEventBus()
    exporter = SagaSpanExporter(bus, sink=sink)
    for event in _saga_events(datetime.now(UTC), CausalTraceId()):
        bus.emit(event)
    other = provider.get_tracer("someone-else")
    with other.start_as_current_span("unrelated"):
        pass
    finished = memory.get_finished_spans()
    ours = {format(span.context.span_id, "016x") for span in finished if span.name != "unrelated"}
    assert ours == {record.span_id for record in exporter.completed_spans}
    [unrelated] = [span for span in finished if span.name == "unrelated"]
    assert format(unrelated.context.trace_id, "032x") not in {
        record.trace_id for record in exporter.completed_spans
    }
    assert unrelated.parent is None
    sink.shutdown()
    provider.shutdown()


def test_ring_metrics_bridge_observes_the_live_state() -> None:
    """The bridge reports cumulative counters and gauges under the Prometheus series names."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    bus = HypervisorEventBus()
    collector = RingMetricsCollector(bus)
    OTelRingMetricsBridge(collector, meter_provider=provider, max_agents=2)

    def emit(kind: EventType, agent: str, **payload: Any) -> None:
        bus.emit(
            HypervisorEvent(event_type=kind, agent_did=agent, session_id="s1", payload=payload)
        )

    emit(EventType.RING_ASSIGNED, "a", ring=3)
    emit(EventType.RING_ELEVATED, "a", from_ring=3, to_ring=1)
    emit(EventType.RING_BREACH_DETECTED, "a")
    for index in range(3):
        emit(EventType.RING_ASSIGNED, f"flood-{index}", ring=index)

    def collect() -> dict[str, dict[tuple[tuple[str, Any], ...], Any]]:
        out: dict[str, dict[tuple[tuple[str, Any], ...], Any]] = {}
        data: Any = reader.get_metrics_data()
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    points: list[Any] = list(metric.data.data_points)
                    out[metric.name] = {
                        tuple(sorted(p.attributes.items())): p.value for p in points
                    }
        return out

    data = collect()
    breaches = data["agent_hypervisor_ring_breaches_total"]
    assert breaches[(("agent_did", "a"), ("session_id", "s1"))] == 1
    rings = data["agent_hypervisor_ring_current"]
    assert rings[(("agent_did", "a"),)] == 1
    # "a" and "flood-0" are admitted; flood-1 and flood-2 fold, reporting the lowest ring (1).
    assert rings[(("agent_did", OVERFLOW_VALUE),)] == 1
    transitions = data["agent_hypervisor_ring_transitions_total"]
    key = (("agent_did", "a"), ("event_type", "ring.assigned"), ("session_id", "s1"))
    assert transitions[key] == 1
    emit(EventType.RING_BREACH_DETECTED, "a")
    # Collected again: cumulative, not doubled.
    assert (
        collect()["agent_hypervisor_ring_breaches_total"][
            (("agent_did", "a"), ("session_id", "s1"))
        ]
        == 2
    )
    provider.shutdown()


def test_ring_metrics_bridge_exports_over_otlp_http(receiver: _Receiver) -> None:
    """With an OTLP metric exporter the bridge's instruments reach a collector as protobuf."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{receiver.url}/v1/metrics"),
        export_interval_millis=60_000,
    )
    provider = MeterProvider(metric_readers=[reader])
    bus = HypervisorEventBus()
    OTelRingMetricsBridge(RingMetricsCollector(bus), meter_provider=provider)
    bus.emit(
        HypervisorEvent(
            event_type=EventType.RING_BREACH_DETECTED, agent_did="did:mesh:rogue", session_id="s"
        )
    )
    assert provider.force_flush(10_000)
    provider.shutdown()
    names: dict[str, Any] = {}
    for request in receiver.metrics:
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    names[metric.name] = metric
    breaches = names["agent_hypervisor_ring_breaches_total"]
    assert breaches.sum.is_monotonic
    [point] = breaches.sum.data_points
    assert point.as_int == 1
    assert {kv.key: kv.value.string_value for kv in point.attributes} == {
        "agent_did": "did:mesh:rogue",
        "session_id": "s",
    }
