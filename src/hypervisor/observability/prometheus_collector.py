"""Ring metrics collector (the published module path).

Re-exports only: the collector lives in the pure core (``_core/ring_collector.py``).
"""

from hypervisor.observability._core.ring_collector import (
    METRIC_RING_BREACHES_TOTAL,
    METRIC_RING_CURRENT,
    METRIC_RING_ELEVATION_DURATION,
    METRIC_RING_TRANSITIONS_TOTAL,
    PrometheusExporterProtocol,
    RingMetricsCollector,
    RingMetricsState,
)

# `hvobs doctor` tells this file from agent-hypervisor's file of the same path by this line.
__distribution__ = "hypervisor-observability"

__all__ = [
    "METRIC_RING_BREACHES_TOTAL",
    "METRIC_RING_CURRENT",
    "METRIC_RING_ELEVATION_DURATION",
    "METRIC_RING_TRANSITIONS_TOTAL",
    "PrometheusExporterProtocol",
    "RingMetricsCollector",
    "RingMetricsState",
]
