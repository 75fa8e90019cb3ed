"""The causal spawn tree as spans: one span per agent, ring transitions and breaches as events."""

from hypervisor.observability._core.agent_span_exporter import AgentSpanExporter
from hypervisor.observability._core.agent_spans import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CLOSED_AGENTS,
    DEFAULT_MAX_LINKS,
    DEFAULT_MAX_OPEN_AGENTS,
    DEFAULT_MAX_SPAN_EVENTS,
    GENAI_ATTRIBUTES,
    AgentSpanRecord,
    AgentSpanSink,
    AgentSpanState,
    SpanEventRecord,
    agent_name,
    with_genai_attributes,
)

__all__ = [
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_MAX_CLOSED_AGENTS",
    "DEFAULT_MAX_LINKS",
    "DEFAULT_MAX_OPEN_AGENTS",
    "DEFAULT_MAX_SPAN_EVENTS",
    "GENAI_ATTRIBUTES",
    "AgentSpanExporter",
    "AgentSpanRecord",
    "AgentSpanSink",
    "AgentSpanState",
    "SpanEventRecord",
    "agent_name",
    "with_genai_attributes",
]
