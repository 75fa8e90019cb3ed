"""Observability for fleets of autonomous agents: events, causal traces, ring metrics, saga spans.

A drop-in, distributed successor of the published ``hypervisor.observability`` module. Every
public name is importable from here; implementation modules load on first use, so importing the
package never imports a backend client (``RedisEventBus`` loads redis-py only when used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.observability._util.lazy import lazy_exports

if TYPE_CHECKING:
    from hypervisor.observability.agent_spans import (
        AgentSpanExporter as AgentSpanExporter,
        AgentSpanRecord as AgentSpanRecord,
        AgentSpanSink as AgentSpanSink,
    )
    from hypervisor.observability.causal_trace import CausalTraceId as CausalTraceId
    from hypervisor.observability.errors import (
        BusClosedError as BusClosedError,
        BusDurabilityError as BusDurabilityError,
        BusFullError as BusFullError,
        BusPermissionError as BusPermissionError,
        BusUnavailableError as BusUnavailableError,
        EventDecodeError as EventDecodeError,
        EventEncodeError as EventEncodeError,
        EventTooLargeError as EventTooLargeError,
        HypervisorObservabilityError as HypervisorObservabilityError,
        LogError as LogError,
        LogGroupMissingError as LogGroupMissingError,
        LogPermanentError as LogPermanentError,
        LogUnavailableError as LogUnavailableError,
        MetricsExportError as MetricsExportError,
        PermissionDeniedError as PermissionDeniedError,
    )
    from hypervisor.observability.event_bus import (
        DEFAULT_MAX_EVENTS as DEFAULT_MAX_EVENTS,
        EventHandler as EventHandler,
        EventType as EventType,
        HypervisorEvent as HypervisorEvent,
        HypervisorEventBus as HypervisorEventBus,
    )
    from hypervisor.observability.prometheus_collector import (
        PrometheusExporterProtocol as PrometheusExporterProtocol,
        RingMetricsCollector as RingMetricsCollector,
    )
    from hypervisor.observability.redis_bus import (
        RedisEventBus as RedisEventBus,
        run_until_signal as run_until_signal,
    )
    from hypervisor.observability.saga_span_exporter import (
        SagaSpanExporter as SagaSpanExporter,
        SagaSpanRecord as SagaSpanRecord,
        SpanRecordSink as SpanRecordSink,
        SpanSink as SpanSink,
    )
    from hypervisor.observability.trace_context import TraceContext as TraceContext

# `hvobs doctor` tells this file from agent-hypervisor's file of the same path by this line.
__distribution__ = "hypervisor-observability"

_EXPORTS: dict[str, str] = {
    "EventType": "event_bus",
    "HypervisorEvent": "event_bus",
    "HypervisorEventBus": "event_bus",
    "EventHandler": "event_bus",
    "DEFAULT_MAX_EVENTS": "event_bus",
    "CausalTraceId": "causal_trace",
    "RingMetricsCollector": "prometheus_collector",
    "PrometheusExporterProtocol": "prometheus_collector",
    "SagaSpanExporter": "saga_span_exporter",
    "SagaSpanRecord": "saga_span_exporter",
    "SpanSink": "saga_span_exporter",
    "SpanRecordSink": "saga_span_exporter",
    "RedisEventBus": "redis_bus",
    "run_until_signal": "redis_bus",
    "TraceContext": "trace_context",
    "AgentSpanExporter": "agent_spans",
    "AgentSpanRecord": "agent_spans",
    "AgentSpanSink": "agent_spans",
    "HypervisorObservabilityError": "errors",
    "EventEncodeError": "errors",
    "EventDecodeError": "errors",
    "EventTooLargeError": "errors",
    "BusFullError": "errors",
    "BusUnavailableError": "errors",
    "BusPermissionError": "errors",
    "BusClosedError": "errors",
    "BusDurabilityError": "errors",
    "LogError": "errors",
    "LogGroupMissingError": "errors",
    "LogPermanentError": "errors",
    "LogUnavailableError": "errors",
    "MetricsExportError": "errors",
    "PermissionDeniedError": "errors",
}

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "AgentSpanExporter",
    "AgentSpanRecord",
    "AgentSpanSink",
    "BusClosedError",
    "BusDurabilityError",
    "BusFullError",
    "BusPermissionError",
    "BusUnavailableError",
    "CausalTraceId",
    "EventDecodeError",
    "EventEncodeError",
    "EventHandler",
    "EventTooLargeError",
    "EventType",
    "HypervisorEvent",
    "HypervisorEventBus",
    "HypervisorObservabilityError",
    "LogError",
    "LogGroupMissingError",
    "LogPermanentError",
    "LogUnavailableError",
    "MetricsExportError",
    "PermissionDeniedError",
    "PrometheusExporterProtocol",
    "RedisEventBus",
    "RingMetricsCollector",
    "SagaSpanExporter",
    "SagaSpanRecord",
    "SpanRecordSink",
    "SpanSink",
    "TraceContext",
    "run_until_signal",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
