"""Causal trace IDs for cross-agent distributed tracing (the published module path)."""

from hypervisor.observability._core.trace import CausalTraceId

__all__ = ["CausalTraceId"]
