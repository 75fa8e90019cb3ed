"""The tutorial's code snippets (sections 3 to 8), run as written, printing what it says.

Each snippet below is the tutorial's code with its indentation restored and nothing else
changed. Snippets that use names defined by earlier ones run in those snippets' namespace, as a
reader following the page would: sections 3 to 5 form one session, section 6 another, section 7
a third; section 8's span bridge starts afresh and its metrics bridge continues section 6 (it
exports ``collector``). Section 8 runs in a subprocess, because OpenTelemetry's global tracer
and meter providers can be set once per process and its console exporters write to the
process's standard output.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest

# --- Section 3: Quick Start ----------------------------------------------------------------

S3_QUICK_START = """
from hypervisor.observability import (
    HypervisorEventBus,
    HypervisorEvent,
    EventType,
    CausalTraceId,
)
# 1. Create the event bus — the central nervous system
bus = HypervisorEventBus()
# 2. Create a causal trace for this workflow
trace = CausalTraceId()
print(f"Trace started: {trace.full_id}")
# e.g. "a1b2c3d4e5f6/01234567"
# 3. Emit a structured event
bus.emit(HypervisorEvent(
    event_type=EventType.SESSION_CREATED,
    session_id="session-001",
    agent_did="did:mesh:data-analyst",
    causal_trace_id=trace.full_id,
    payload={"model": "gpt-4o", "ring": 3},
))
# 4. Query it back
events = bus.query_by_session("session-001")
print(f"Events for session-001: {len(events)}") # 1
print(events[0].to_dict())
"""

S3_SUBSCRIBE = """
# Type-specific subscriber — only ring breaches
def on_breach(event: HypervisorEvent) -> None:
    print(f"!! BREACH: agent={event.agent_did} payload={event.payload}")
bus.subscribe(event_type=EventType.RING_BREACH_DETECTED, handler=on_breach)
# Wildcard subscriber — receives ALL events
bus.subscribe(event_type=None, handler=lambda e: print(f"[audit] {e.event_type.value}"))
# This triggers both subscribers
bus.emit(HypervisorEvent(
    event_type=EventType.RING_BREACH_DETECTED,
    agent_did="did:mesh:rogue-bot",
    session_id="session-001",
    payload={"attempted_tool": "shell_exec", "ring": 3},
))
"""

# --- Section 4: CausalTraceId --------------------------------------------------------------

S4_CREATING = """
from hypervisor.observability import CausalTraceId
# Root trace — generated automatically
root = CausalTraceId()
print(root.full_id) # "a1b2c3d4e5f6/01234567"
print(root.depth) # 0
print(root.parent_span_id) # None
# Child span — same trace, new span, parent linked
child = root.child()
print(child.full_id) # "a1b2c3d4e5f6/89abcdef/01234567"
print(child.depth) # 1
print(child.parent_span_id) # "01234567" (root's span_id)
# Sibling span — parallel work at the same depth
sibling = child.sibling()
print(sibling.depth) # 1 (same as child)
print(sibling.parent_span_id) # "01234567" (same parent)
print(sibling.span_id) # new unique ID
# Deep nesting — each child() increments depth
grandchild = child.child()
print(grandchild.depth) # 2
"""

S4_PARSING = """
parsed = CausalTraceId.from_string("a1b2c3d4e5f6/89abcdef/01234567")
print(parsed.trace_id) # "a1b2c3d4e5f6"
print(parsed.span_id) # "89abcdef"
print(parsed.parent_span_id) # "01234567"
# Root traces (no parent) parse cleanly
root_parsed = CausalTraceId.from_string("a1b2c3d4e5f6/01234567")
print(root_parsed.parent_span_id) # None
# Invalid format raises ValueError
CausalTraceId.from_string("invalid") # — ValueError
"""

S4_DELEGATION = """
orchestrator_trace = CausalTraceId()
researcher_trace = orchestrator_trace.child()
writer_trace = orchestrator_trace.child()
tool_agent_trace = researcher_trace.child()
# Attach trace IDs to events for full causality
bus.emit(HypervisorEvent(
    event_type=EventType.SESSION_CREATED,
    agent_did="did:mesh:tool-agent",
    causal_trace_id=tool_agent_trace.full_id,
))
# Trace tree: orchestrator(0) — researcher(1) — tool-agent(2)
# — writer(1)
"""

S4_ANCESTRY = """
root = CausalTraceId()
child = root.child()
grandchild = child.child()
print(root.is_ancestor_of(grandchild)) # True
print(child.is_ancestor_of(root)) # False
print(root.is_ancestor_of(root)) # False (same depth)
"""

S4_SIBLINGS = """
worker_1 = orchestrator_trace.child()
worker_2 = worker_1.sibling() # Same parent, same depth, new span_id
assert worker_1.parent_span_id == worker_2.parent_span_id # True
assert worker_1.trace_id == worker_2.trace_id # True
"""

# --- Section 5: HypervisorEventBus ---------------------------------------------------------

S5_EVENT = """
event = HypervisorEvent(
    event_type=EventType.SLASH_EXECUTED,
    session_id="session-042",
    agent_did="did:mesh:rogue-agent",
    causal_trace_id="abc123/def456",
    payload={"severity": "critical", "stake_slashed": 150},
)
print(event.event_id) # Auto-generated 16-char UUID hex
print(event.timestamp) # datetime.now(UTC)
# Serialize to JSON-compatible dict
d = event.to_dict()
print(d["event_type"]) # "liability.slash_executed"
print(d["timestamp"]) # "2025-01-15T10:30:00+00:00" (ISO format)
"""

S5_EMITTING = """
bus = HypervisorEventBus()
bus.emit(HypervisorEvent(
    event_type=EventType.RING_ASSIGNED,
    session_id="s1", agent_did="did:mesh:agent-alpha",
    payload={"ring": 3},
))
bus.emit(HypervisorEvent(
    event_type=EventType.RING_ELEVATED,
    session_id="s1", agent_did="did:mesh:agent-alpha",
    payload={"from_ring": 3, "to_ring": 1, "reason": "admin vouch"},
))
print(f"Total events: {bus.event_count}") # 2
print(bus.type_counts()) # {"ring.assigned": 1, "ring.elevated": 1}
"""

S5_QUERYING = """
from datetime import datetime, timedelta, UTC
# By type, session, or agent
sessions = bus.query_by_type(EventType.SESSION_CREATED)
s1_events = bus.query_by_session("s1")
agent_events = bus.query_by_agent("did:mesh:agent-alpha")
# By time range
recent = bus.query_by_time_range(start=datetime.now(UTC) - timedelta(hours=1))
# Combined (AND) with limit
results = bus.query(
    event_type=EventType.RING_ASSIGNED,
    session_id="s1",
    agent_did="did:mesh:analyst",
    limit=10,
)
# Statistics
print(bus.event_count) # Total events
print(bus.type_counts()) # {"ring.assigned": 1, ...}
all_events = bus.all_events # Full log (copy)
"""

# --- Section 6: RingMetricsCollector -------------------------------------------------------

S6_SETUP = """
from hypervisor.observability import (
    HypervisorEventBus, HypervisorEvent, EventType, RingMetricsCollector,
)
bus = HypervisorEventBus()
collector = RingMetricsCollector(bus) # Auto-subscribes to all ring events
bus.emit(HypervisorEvent(
    event_type=EventType.RING_ASSIGNED,
    session_id="s1", agent_did="did:mesh:analyst",
    payload={"ring": 3},
))
bus.emit(HypervisorEvent(
    event_type=EventType.RING_ELEVATED,
    session_id="s1", agent_did="did:mesh:analyst",
    payload={"from_ring": 3, "to_ring": 1},
))
bus.emit(HypervisorEvent(
    event_type=EventType.RING_BREACH_DETECTED,
    session_id="s1", agent_did="did:mesh:analyst",
    payload={"attempted_tool": "shell_exec"},
))
"""

S6_SNAPSHOT = """
snapshot = collector.collect()
# Transition counters — keyed by (event_type, agent_did, session_id)
print(snapshot["agent_hypervisor_ring_transitions_total"][("ring.assigned", "did:mesh:analyst", "s1")]) # 1
# Breach counters — keyed by (agent_did, session_id)
print(snapshot["agent_hypervisor_ring_breaches_total"][("did:mesh:analyst", "s1")]) # 1
# Current ring gauge — keyed by agent_did
print(snapshot["agent_hypervisor_ring_current"]["did:mesh:analyst"]) # 1
print(snapshot["events_processed"]) # 3
"""

S6_ELEVATION = """
import time
bus.emit(HypervisorEvent(
    event_type=EventType.RING_ELEVATED,
    agent_did="did:mesh:analyst", session_id="s1",
    payload={"to_ring": 1},
))
time.sleep(2)
bus.emit(HypervisorEvent(
    event_type=EventType.RING_DEMOTED,
    agent_did="did:mesh:analyst", session_id="s1",
    payload={"to_ring": 3},
))
duration = collector.collect()["agent_hypervisor_ring_elevation_duration_seconds"]
print(f"Elevation lasted {duration['did:mesh:analyst']:.1f}s") # — 2.0s
"""

S6_EXPORT = '''
class MyPrometheusExporter:
    """Bridge to prometheus_client or agent-sre exporter."""
    def set_gauge(self, name, value, labels=None, help_text=""):
        print(f"GAUGE {name}={value} labels={labels}")
    def inc_counter(self, name, value=1.0, labels=None, help_text=""):
        print(f"COUNTER {name} +={value} labels={labels}")
exporter = MyPrometheusExporter()
collector.export_to_prometheus(exporter)
'''

# --- Section 7: SagaSpanExporter -----------------------------------------------------------

S7_SETUP = """
from hypervisor.observability import (
    HypervisorEventBus, HypervisorEvent, EventType,
    SagaSpanExporter, SagaSpanRecord,
)
bus = HypervisorEventBus()
exporter = SagaSpanExporter(bus) # Auto-subscribes to all SAGA_* events
"""

S7_STEP = """
import time
bus.emit(HypervisorEvent(
    event_type=EventType.SAGA_CREATED,
    session_id="s1",
    agent_did="did:mesh:orchestrator",
    payload={"saga_id": "deploy-v2"},
))
bus.emit(HypervisorEvent(
    event_type=EventType.SAGA_STEP_STARTED,
    session_id="s1",
    agent_did="did:mesh:orchestrator",
    payload={"saga_id": "deploy-v2", "step_id": "validate-config", "step_action": "validate"},
))
time.sleep(0.5) # Simulate work
bus.emit(HypervisorEvent(
    event_type=EventType.SAGA_STEP_COMMITTED,
    session_id="s1",
    agent_did="did:mesh:orchestrator",
    payload={
        "saga_id": "deploy-v2", "step_id": "validate-config",
        "step_action": "validate", "result": "all checks passed",
    },
))
span = exporter.completed_spans[0]
print(f"Name: {span.name}") # "saga.step.validate"
print(f"Status: {span.status}") # "ok"
print(f"Duration: {span.duration_seconds:.2f}s") # — 0.50s
print(f"Attrs: {span.attributes}")
# {'agent.saga.id': 'deploy-v2', 'agent.saga.step_id': 'validate-config',
# 'agent.saga.step_action': 'validate', 'agent.saga.state': 'ok',
# 'agent.saga.result': 'all checks passed', 'agent.did': 'did:mesh:orchestrator',
# 'session.id': 's1'}
"""

S7_FAILURE = """
# A step fails
bus.emit(HypervisorEvent(
    event_type=EventType.SAGA_STEP_STARTED,
    payload={"saga_id": "deploy-v2", "step_id": "run-migrations", "step_action": "migrate"},
))
bus.emit(HypervisorEvent(
    event_type=EventType.SAGA_STEP_FAILED,
    payload={
        "saga_id": "deploy-v2", "step_id": "run-migrations", "step_action": "migrate",
        "error": "connection_timeout", "reason": "database unreachable after 30s",
    },
))
# Compensation kicks in
bus.emit(HypervisorEvent(
    event_type=EventType.SAGA_COMPENSATING,
    payload={"saga_id": "deploy-v2", "step_id": "rollback-config", "step_action": "rollback"},
))
error_span = [s for s in exporter.completed_spans if s.status == "error"][-1]
print(error_span.attributes["agent.saga.error"]) # "connection_timeout"
comp_span = [s for s in exporter.completed_spans if s.status == "compensating"][-1]
print(comp_span.name) # "saga.compensate.rollback"
"""

S7_SAGA_LEVEL = """
bus.emit(HypervisorEvent(
    event_type=EventType.SAGA_COMPLETED,
    payload={"saga_id": "deploy-v2"},
))
saga_span = [s for s in exporter.completed_spans if "completed" in s.name][-1]
print(f"Duration: {saga_span.duration_seconds:.2f}s, Status: {saga_span.status}") # "ok"
# Escalated sagas produce error spans:
# EventType.SAGA_ESCALATED — span.status == "error", name == "saga.escalated.{id}"
"""

S7_SINK = '''
from hypervisor.observability import SpanSink
class JaegerSink:
    """Forward saga spans to a Jaeger backend."""
    def record_span(self, name, start_time, end_time, attributes, status):
        duration_ms = (end_time - start_time) * 1000
        print(f"| Jaeger: {name} [{status}] {duration_ms:.0f}ms")
sink = JaegerSink()
exporter.attach_sink(sink) # Spans now go to both buffer AND sink
# ... emit saga events ...
exporter.detach_sink() # Stop real-time forwarding
'''

# --- Section 8: OpenTelemetry --------------------------------------------------------------

S8_SPANS = '''
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, ConsoleSpanExporter
from hypervisor.observability import HypervisorEventBus, SagaSpanExporter, SpanSink
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("agent-hypervisor")
class OTelSpanSink:
    """Bridge hypervisor saga spans to OpenTelemetry."""
    def record_span(self, name, start_time, end_time, attributes, status):
        with tracer.start_as_current_span(name) as span:
            for key, value in attributes.items():
                span.set_attribute(key, str(value))
            if status == "error":
                span.set_status(trace.StatusCode.ERROR, attributes.get("agent.saga.error", ""))
bus = HypervisorEventBus()
exporter = SagaSpanExporter(bus, sink=OTelSpanSink())
# Every saga step now appears as an OTel span in your tracing backend
'''

S8_METRICS = """
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
reader = PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=5000)
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
meter = metrics.get_meter("agent-hypervisor")
ring_transitions = meter.create_counter("agent_hypervisor_ring_transitions_total")
ring_breaches = meter.create_counter("agent_hypervisor_ring_breaches_total")
class OTelPrometheusExporter:
    def set_gauge(self, name, value, labels=None, help_text=""):
        pass # Map to OTel gauge instruments
    def inc_counter(self, name, value=1.0, labels=None, help_text=""):
        if "transitions" in name:
            ring_transitions.add(value, labels or {})
        elif "breaches" in name:
            ring_breaches.add(value, labels or {})
collector.export_to_prometheus(OTelPrometheusExporter())
"""

# Not a tutorial snippet: the saga events the reader would emit after section 8's span bridge
# ("Every saga step now appears as an OTel span"), so that the bridge has spans to export.
DRIVE_SECTION_8_SPANS = """
from hypervisor.observability import EventType, HypervisorEvent
for event_type, extra in [
    (EventType.SAGA_CREATED, {}),
    (EventType.SAGA_STEP_STARTED, {"step_id": "validate-config", "step_action": "validate"}),
    (EventType.SAGA_STEP_COMMITTED, {"step_id": "validate-config", "step_action": "validate"}),
    (EventType.SAGA_STEP_STARTED, {"step_id": "run-migrations", "step_action": "migrate"}),
    (EventType.SAGA_STEP_FAILED, {"step_id": "run-migrations", "step_action": "migrate",
                                  "error": "connection_timeout"}),
    (EventType.SAGA_COMPENSATING, {"step_id": "rollback-config", "step_action": "rollback"}),
    (EventType.SAGA_COMPLETED, {}),
]:
    bus.emit(HypervisorEvent(event_type=event_type, payload={"saga_id": "deploy-v2", **extra}))
"""


@dataclass
class Session:
    """A reader's Python session: snippets run in order in one namespace."""

    namespace: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    saved: dict[str, Any] = field(default_factory=dict)

    def run(self, name: str, source: str) -> list[str]:
        """Execute ``source`` here, returning (and keeping) the lines it printed."""
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                exec(compile(source, f"<tutorial {name}>", "exec"), self.namespace)
        finally:
            self.outputs[name] = buffer.getvalue().splitlines()
        return self.outputs[name]


HEX = "[0-9a-f]"


@pytest.fixture(scope="module")
def sections_3_to_5() -> Session:
    """Sections 3, 4 and 5 in one session (section 4 and 5 reuse section 3's names)."""
    session = Session()
    session.run("3 quick start", S3_QUICK_START)
    session.run("3 subscribe", S3_SUBSCRIBE)
    session.run("4 creating", S4_CREATING)
    with pytest.raises(ValueError, match="invalid"):
        session.run("4 parsing", S4_PARSING)
    session.run("4 delegation", S4_DELEGATION)
    session.saved["section 3 bus"] = session.namespace["bus"]
    session.run("4 ancestry", S4_ANCESTRY)
    session.run("4 siblings", S4_SIBLINGS)
    session.run("5 event", S5_EVENT)
    session.run("5 emitting", S5_EMITTING)
    session.run("5 querying", S5_QUERYING)
    return session


@pytest.fixture(scope="module")
def section_6() -> Session:
    """Section 6 in its own session (its first snippet imports and makes a new bus)."""
    session = Session()
    for name, source in [
        ("6 setup", S6_SETUP),
        ("6 snapshot", S6_SNAPSHOT),
        ("6 elevation", S6_ELEVATION),
        ("6 export", S6_EXPORT),
    ]:
        session.run(name, source)
    return session


@pytest.fixture(scope="module")
def section_7() -> Session:
    """Section 7 in its own session."""
    session = Session()
    for name, source in [
        ("7 setup", S7_SETUP),
        ("7 step", S7_STEP),
        ("7 failure", S7_FAILURE),
        ("7 saga level", S7_SAGA_LEVEL),
        ("7 sink", S7_SINK),
    ]:
        session.run(name, source)
    return session


def test_quick_start_prints_trace_count_and_event(sections_3_to_5: Session) -> None:
    """Section 3 prints the new trace id, one event for the session, and its 8-key dict."""
    lines = sections_3_to_5.outputs["3 quick start"]
    assert len(lines) == 3
    match = re.fullmatch(rf"Trace started: ({HEX}{{12}}/{HEX}{{8}})", lines[0])
    assert match is not None
    assert lines[1] == "Events for session-001: 1"
    printed = ast.literal_eval(lines[2])
    assert list(printed) == [
        "event_id",
        "event_type",
        "timestamp",
        "session_id",
        "agent_did",
        "causal_trace_id",
        "parent_event_id",
        "payload",
    ]
    assert re.fullmatch(f"{HEX}{{16}}", printed["event_id"])
    assert printed["event_type"] == "session.created"
    assert datetime.fromisoformat(printed["timestamp"]).utcoffset() is not None
    assert printed["timestamp"].endswith("+00:00")
    assert printed["session_id"] == "session-001"
    assert printed["agent_did"] == "did:mesh:data-analyst"
    assert printed["causal_trace_id"] == match.group(1)
    assert printed["parent_event_id"] is None
    assert printed["payload"] == {"model": "gpt-4o", "ring": 3}


def test_subscribers_see_the_breach_type_specific_first(sections_3_to_5: Session) -> None:
    """The breach reaches the type-specific subscriber, then the wildcard audit subscriber."""
    assert sections_3_to_5.outputs["3 subscribe"] == [
        "!! BREACH: agent=did:mesh:rogue-bot payload={'attempted_tool': 'shell_exec', 'ring': 3}",
        "[audit] ring.breach_detected",
    ]


def test_causal_trace_ids_print_as_the_tutorial_says(sections_3_to_5: Session) -> None:
    """Root, child, sibling and grandchild ids have the documented shapes and links."""
    lines = sections_3_to_5.outputs["4 creating"]
    assert len(lines) == 10
    root = re.fullmatch(f"({HEX}{{12}})/({HEX}{{8}})", lines[0])
    assert root is not None
    trace_id, root_span = root.groups()
    assert lines[1:3] == ["0", "None"]
    child = re.fullmatch(f"{trace_id}/({HEX}{{8}})/{root_span}", lines[3])
    assert child is not None
    assert lines[4:9] == ["1", root_span, "1", root_span, lines[8]]
    assert re.fullmatch(f"{HEX}{{8}}", lines[8])
    assert lines[8] != child.group(1)
    assert lines[9] == "2"


def test_parsing_prints_parts_then_rejects_invalid(sections_3_to_5: Session) -> None:
    """Parsed ids print their parts; ``from_string("invalid")`` raised ValueError (fixture)."""
    assert sections_3_to_5.outputs["4 parsing"] == [
        "a1b2c3d4e5f6",
        "89abcdef",
        "01234567",
        "None",
    ]


def test_delegation_ancestry_and_siblings(sections_3_to_5: Session) -> None:
    """The delegation event is stored; ancestry prints True/False/False; sibling asserts hold."""
    ns = sections_3_to_5.namespace
    # Section 5 rebinds ``bus``; the delegation event went to section 3's bus.
    (event,) = sections_3_to_5.saved["section 3 bus"].query_by_agent("did:mesh:tool-agent")
    assert event.causal_trace_id == ns["tool_agent_trace"].full_id
    assert ns["tool_agent_trace"].depth == 2
    assert sections_3_to_5.outputs["4 ancestry"] == ["True", "False", "False"]
    assert sections_3_to_5.outputs["4 siblings"] == []


def test_event_fields_and_dict(sections_3_to_5: Session) -> None:
    """An event prints a 16-hex id, an aware timestamp, its type value and ISO timestamp."""
    event_id, timestamp, event_type, iso = sections_3_to_5.outputs["5 event"]
    assert re.fullmatch(f"{HEX}{{16}}", event_id)
    assert datetime.fromisoformat(timestamp).utcoffset() is not None
    assert timestamp.endswith("+00:00")
    assert event_type == "liability.slash_executed"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00", iso)


def test_emitting_and_querying_print_counts(sections_3_to_5: Session) -> None:
    """Two emitted events are counted by total and by type; the queries find them."""
    counts = "{'ring.assigned': 1, 'ring.elevated': 1}"
    assert sections_3_to_5.outputs["5 emitting"] == ["Total events: 2", counts]
    assert sections_3_to_5.outputs["5 querying"] == ["2", counts]
    ns = sections_3_to_5.namespace
    assert ns["sessions"] == []
    assert len(ns["s1_events"]) == len(ns["agent_events"]) == len(ns["recent"]) == 2
    assert ns["results"] == []
    assert ns["all_events"] == ns["s1_events"]


def test_ring_snapshot_prints_published_values(section_6: Session) -> None:
    """The snapshot prints one assignment, one breach, ring 1 and three events."""
    assert section_6.outputs["6 setup"] == []
    assert section_6.outputs["6 snapshot"] == ["1", "1", "1", "3"]


def test_elevation_lasts_about_two_seconds(section_6: Session) -> None:
    """The elevation measured between the two events is the 2 s the snippet slept."""
    (line,) = section_6.outputs["6 elevation"]
    match = re.fullmatch(r"Elevation lasted (\d+\.\d)s", line)
    assert match is not None
    assert 2.0 <= float(match.group(1)) <= 2.5


def test_export_prints_counters_and_gauges(section_6: Session) -> None:
    """The first export sends each counter's total and sets both gauges."""
    lines = section_6.outputs["6 export"]
    analyst = "'agent_did': 'did:mesh:analyst'"
    transitions = "COUNTER agent_hypervisor_ring_transitions_total"
    counters = sorted(line for line in lines if line.startswith("COUNTER"))
    assert counters == sorted(
        [
            f"{transitions} +=1.0 labels={{'event_type': 'ring.assigned', {analyst}, "
            "'session_id': 's1'}",
            f"{transitions} +=2.0 labels={{'event_type': 'ring.elevated', {analyst}, "
            "'session_id': 's1'}",
            f"{transitions} +=1.0 labels={{'event_type': 'ring.demoted', {analyst}, "
            "'session_id': 's1'}",
            f"COUNTER agent_hypervisor_ring_breaches_total +=1.0 labels={{{analyst}, "
            "'session_id': 's1'}",
        ]
    )
    gauges = [line for line in lines if line.startswith("GAUGE")]
    assert len(gauges) == 2
    assert gauges[0] == f"GAUGE agent_hypervisor_ring_current=3.0 labels={{{analyst}}}"
    match = re.fullmatch(
        rf"GAUGE agent_hypervisor_ring_elevation_duration_seconds=([0-9.]+) labels={{{analyst}}}",
        gauges[1],
    )
    assert match is not None
    assert 2.0 <= float(match.group(1)) <= 2.5
    assert len(lines) == 6


def test_saga_step_span_prints_name_status_duration_attrs(section_7: Session) -> None:
    """The committed step prints its name, ok, about 0.50 s, and the documented attributes."""
    name, status, duration, attrs = section_7.outputs["7 step"]
    assert name == "Name: saga.step.validate"
    assert status == "Status: ok"
    match = re.fullmatch(r"Duration: (\d+\.\d\d)s", duration)
    assert match is not None
    assert 0.5 <= float(match.group(1)) <= 0.9
    assert attrs.startswith("Attrs: ")
    assert ast.literal_eval(attrs.removeprefix("Attrs: ")) == {
        "agent.saga.id": "deploy-v2",
        "agent.saga.step_id": "validate-config",
        "agent.saga.step_action": "validate",
        "agent.saga.state": "ok",
        "agent.saga.result": "all checks passed",
        "agent.did": "did:mesh:orchestrator",
        "session.id": "s1",
    }


def test_failure_and_compensation_print(section_7: Session) -> None:
    """The failed step carries its error; the compensation is ``saga.compensate.rollback``."""
    assert section_7.outputs["7 failure"] == ["connection_timeout", "saga.compensate.rollback"]


def test_saga_level_span_prints_duration_and_ok(section_7: Session) -> None:
    """The completed saga spans from creation (before the 0.5 s step) and is ok."""
    (line,) = section_7.outputs["7 saga level"]
    match = re.fullmatch(r"Duration: (\d+\.\d\d)s, Status: ok", line)
    assert match is not None
    assert 0.5 <= float(match.group(1)) <= 0.9


def test_jaeger_sink_attaches_and_detaches(section_7: Session) -> None:
    """The published-style sink is a ``SpanSink``; after detaching, spans are buffered only."""
    ns = section_7.namespace
    assert section_7.outputs["7 sink"] == []
    assert isinstance(ns["sink"], ns["SpanSink"])
    assert ns["exporter"].sink is None
    assert len(ns["exporter"].completed_spans) == 4


def _run_in_subprocess(snippets: list[tuple[str, str]]) -> str:
    """Run snippets in order in one namespace in a fresh interpreter; return its stdout."""
    runner = (
        "import json, sys\n"
        "namespace = {}\n"
        "for name, source in json.load(sys.stdin):\n"
        "    exec(compile(source, f'<tutorial {name}>', 'exec'), namespace)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", runner],
        input=json.dumps(snippets),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_opentelemetry_span_bridge_exports_every_saga_span() -> None:
    """Section 8's sink turns each saga span into an OpenTelemetry span on the console."""
    out = _run_in_subprocess([("8 spans", S8_SPANS), ("driver", DRIVE_SECTION_8_SPANS)])
    for name in (
        "saga.step.validate",
        "saga.step.migrate",
        "saga.compensate.rollback",
        "saga.completed.deploy-v2",
    ):
        assert f'"name": "{name}"' in out
    assert '"status_code": "ERROR"' in out
    assert '"agent.saga.error": "connection_timeout"' in out


def test_opentelemetry_metric_bridge_receives_the_counters() -> None:
    """Section 8's metric bridge, continuing section 6, exports both ring counters."""
    out = _run_in_subprocess(
        [
            ("6 setup", S6_SETUP),
            ("6 snapshot", S6_SNAPSHOT),
            ("6 elevation", S6_ELEVATION),
            ("6 export", S6_EXPORT),
            ("8 metrics", S8_METRICS),
        ]
    )
    # The console exporter prints indented JSON documents (one per collection, at least the
    # one at shutdown); the other lines are the snippets' own prints.
    starts = [m.start() for m in re.finditer(r"^\{$", out, flags=re.MULTILINE)]
    assert starts, out
    document, _ = json.JSONDecoder().raw_decode(out[starts[-1] :])
    points: dict[str, float] = {}
    for resource in document["resource_metrics"]:
        for scope in resource["scope_metrics"]:
            for metric in scope["metrics"]:
                points[metric["name"]] = sum(p["value"] for p in metric["data"]["data_points"])
    assert points == {
        "agent_hypervisor_ring_transitions_total": 4,
        "agent_hypervisor_ring_breaches_total": 1,
    }
