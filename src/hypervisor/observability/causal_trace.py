"""Causal trace IDs for cross-agent distributed tracing (the published module path)."""

from hypervisor.observability._core.trace import CausalTraceId

# `hvobs doctor` tells this file from agent-hypervisor's file of the same path by this line.
__distribution__ = "hypervisor-observability"

__all__ = ["CausalTraceId"]
