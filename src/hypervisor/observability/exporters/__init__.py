"""Exporters: Prometheus (``prometheus_client``), governance metrics, OpenTelemetry.

``prometheus`` and ``governance`` need only ``prometheus_client`` (a core dependency).
``otel`` needs the ``otel`` extra (``pip install hypervisor-observability[otel]``); its names load
on first use, so importing this package never imports the OpenTelemetry SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.observability._util.lazy import lazy_exports

if TYPE_CHECKING:
    from hypervisor.observability.exporters.governance import GovernanceMetrics
    from hypervisor.observability.exporters.otel import (
        OTelRingMetricsBridge,
        OTelSpanSink,
        RecordIdGenerator,
        otlp_http_span_sink,
    )
    from hypervisor.observability.exporters.prometheus import (
        OVERFLOW_VALUE,
        LabelGuard,
        MetricsExportError,
        MetricsServer,
        PrometheusExporter,
        RingMetricsPrometheusCollector,
        register_ring_metrics,
        serve_metrics,
    )

_EXPORTS: dict[str, str] = {
    "GovernanceMetrics": "governance",
    "OTelRingMetricsBridge": "otel",
    "OTelSpanSink": "otel",
    "RecordIdGenerator": "otel",
    "otlp_http_span_sink": "otel",
    "OVERFLOW_VALUE": "prometheus",
    "LabelGuard": "prometheus",
    "MetricsExportError": "prometheus",
    "MetricsServer": "prometheus",
    "PrometheusExporter": "prometheus",
    "RingMetricsPrometheusCollector": "prometheus",
    "register_ring_metrics": "prometheus",
    "serve_metrics": "prometheus",
}

__all__ = [
    "OVERFLOW_VALUE",
    "GovernanceMetrics",
    "LabelGuard",
    "MetricsExportError",
    "MetricsServer",
    "OTelRingMetricsBridge",
    "OTelSpanSink",
    "PrometheusExporter",
    "RecordIdGenerator",
    "RingMetricsPrometheusCollector",
    "otlp_http_span_sink",
    "register_ring_metrics",
    "serve_metrics",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
