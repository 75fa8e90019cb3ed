"""The causal spawn tree as spans: the pure state machine, the in-process exporter (through the
OpenTelemetry SDK), and the workers (links, determinism through snapshots and takeovers)."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from hypervisor.observability import (
    AgentSpanExporter,
    CausalTraceId,
    EventType,
    HypervisorEvent,
    HypervisorEventBus,
    SagaSpanExporter,
)
from hypervisor.observability._backends.log import parse_id
from hypervisor.observability._backends.memory_log import MemoryStreamLog
from hypervisor.observability._core.agent_spans import (
    AgentSpanRecord,
    AgentSpanState,
    with_genai_attributes,
)
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.spans import SagaSpanState
from hypervisor.observability._core.trace_context import (
    TraceContext,
    attach_context,
    encode_context,
)
from hypervisor.observability.testing import RecordingSpanSink
from hypervisor.observability.workers import (
    AgentSpansDerivation,
    JsonLinesSpanSink,
    MemoryStateStore,
    SagaSpansDerivation,
    Worker,
    WorkerConfig,
    watermark,
)
from hypervisor.observability.workers._snapshot import dump_state, load_state
from workers_support import random_events

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
GROUP = "spans"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ctx(n: int) -> TraceContext:
    """A distinct producer context per ``n``."""
    context = TraceContext.parse(f"00-{n + 1:032x}-{n + 1:016x}-01")
    assert context is not None
    return context


def w3c(causal: CausalTraceId) -> tuple[str, str]:
    """(trace id, span id) of a causal id, as ``to_traceparent`` maps it."""
    _, trace, span, _ = causal.to_traceparent().split("-")
    return trace, span


class Fleet:
    """An orchestrator that spawns a researcher, which spawns a tool agent; the researcher runs
    a two-step saga; the tool agent is elevated and breaches; everyone's session ends."""

    def __init__(self) -> None:
        self.root = CausalTraceId()
        self.researcher = self.root.child()
        self.tool = self.researcher.child()

    def event(
        self, kind: EventType, causal: CausalTraceId | None, agent: str, t: float, **payload: Any
    ) -> HypervisorEvent:
        return HypervisorEvent(
            event_type=kind,
            timestamp=at(t),
            session_id=f"session-{agent}",
            agent_did=f"did:mesh:{agent}",
            causal_trace_id=None if causal is None else causal.full_id,
            payload=payload,
        )

    def events(self) -> list[HypervisorEvent]:
        saga = {"saga_id": "research-1"}
        e = self.event
        return [
            e(EventType.SESSION_CREATED, self.root, "orchestrator", 0),
            e(EventType.SESSION_CREATED, self.researcher, "researcher", 1),
            e(EventType.SAGA_CREATED, self.researcher, "researcher", 2, **saga),
            e(EventType.SAGA_STEP_STARTED, self.researcher, "researcher", 3, **saga, step_id="s1"),
            e(EventType.SESSION_CREATED, self.tool, "tool", 4),
            e(EventType.RING_ELEVATED, self.tool, "tool", 5, from_ring=3, to_ring=1),
            # No causal id: it goes to the tool agent's open span by its DID.
            e(EventType.RING_BREACH_DETECTED, None, "tool", 6, ring=1, attempted_tool="shell"),
            e(
                EventType.SAGA_STEP_COMMITTED,
                self.researcher,
                "researcher",
                7,
                **saga,
                step_id="s1",
            ),
            e(EventType.SAGA_COMPLETED, self.researcher, "researcher", 8, **saga),
            e(EventType.SESSION_TERMINATED, self.tool, "tool", 9),
            e(EventType.SESSION_TERMINATED, self.researcher, "researcher", 10),
            e(EventType.SESSION_TERMINATED, self.root, "orchestrator", 11),
        ]


def apply_all(
    state: AgentSpanState,
    events: list[HypervisorEvent],
    contexts: dict[str, TraceContext] | None = None,
) -> list[AgentSpanRecord]:
    out: list[AgentSpanRecord] = []
    for event in events:
        out.extend(state.apply(event, (contexts or {}).get(event.event_id)))
    return out


# -- the state machine ------------------------------------------------------------------------


def test_one_span_per_agent_parented_by_the_spawner_with_the_sagas_inside() -> None:
    """Each causal span becomes an agent span with the W3C ids of its causal id, its parent the
    spawning agent's span; the researcher's saga span is a child of the researcher's span."""
    fleet = Fleet()
    events = fleet.events()
    records = {r.agent_did: r for r in apply_all(AgentSpanState(), events)}
    sagas = SagaSpanState()
    saga_spans = [span for event in events for span in sagas.apply(event)]
    root, researcher, tool = (
        records["did:mesh:orchestrator"],
        records["did:mesh:researcher"],
        records["did:mesh:tool"],
    )
    assert (root.trace_id, root.span_id) == w3c(fleet.root)
    assert root.parent_span_id is None
    assert (researcher.trace_id, researcher.span_id) == w3c(fleet.researcher)
    assert researcher.parent_span_id == root.span_id
    assert tool.parent_span_id == researcher.span_id
    assert {r.trace_id for r in records.values()} == {root.trace_id}
    saga_span = next(s for s in saga_spans if s.name == "saga.completed.research-1")
    assert saga_span.trace_id == root.trace_id
    assert saga_span.parent_span_id == researcher.span_id
    assert all(
        s.parent_span_id == saga_span.span_id for s in saga_spans if s.name.startswith("saga.step")
    )
    # True times: the first and last events of each agent.
    assert (root.start_time, root.end_time) == (at(0).timestamp(), at(11).timestamp())
    assert (tool.start_time, tool.end_time) == (at(4).timestamp(), at(9).timestamp())
    assert tool.attributes == {
        "agent.did": "did:mesh:tool",
        "session.id": "session-tool",
        "agent.causal_trace_id": fleet.tool.full_id,
        "agent.events": 4,
        "agent.ring": 1,
        "agent.span.end_reason": "terminated",
    }
    assert tool.status == "unset"
    assert tool.name == "agent.run.did:mesh:tool"


def test_ring_transitions_breaches_and_spawns_are_span_events() -> None:
    """The tool agent's span has its elevation and breach as events at their times (the breach
    found by DID); the researcher's span has the tool agent's spawn."""
    fleet = Fleet()
    records = {r.agent_did: r for r in apply_all(AgentSpanState(), fleet.events())}
    tool = records["did:mesh:tool"]
    assert [(e.name, e.time) for e in tool.events] == [
        ("ring.elevated", at(5).timestamp()),
        ("ring.breach_detected", at(6).timestamp()),
    ]
    elevated, breach = tool.events
    assert elevated.attributes["agent.ring.to"] == 1
    assert elevated.attributes["agent.ring.from"] == 3
    assert breach.attributes["agent.ring"] == 1
    assert breach.attributes["agent.event.attempted_tool"] == "shell"
    spawned = records["did:mesh:researcher"].events
    assert [(e.name, e.time, e.attributes) for e in spawned] == [
        (
            "agent.spawned",
            at(4).timestamp(),
            {"agent.causal_trace_id": fleet.tool.full_id, "agent.did": "did:mesh:tool"},
        )
    ]


def test_links_are_the_distinct_producer_contexts_capped() -> None:
    """A span links each distinct producer context of its events once, up to max_links; each
    event whose context was not kept is counted in an attribute."""
    fleet = Fleet()
    events = fleet.events()
    contexts = {event.event_id: ctx(index % 3) for index, event in enumerate(events)}
    records = {r.agent_did: r for r in apply_all(AgentSpanState(), events, contexts)}
    researcher = records["did:mesh:researcher"]
    expected = []
    for index, event in enumerate(events):
        if event.causal_trace_id == fleet.researcher.full_id and ctx(index % 3) not in expected:
            expected.append(ctx(index % 3))
    assert list(researcher.links) == expected
    capped = {r.agent_did: r for r in apply_all(AgentSpanState(max_links=1), events, contexts)}[
        "did:mesh:researcher"
    ]
    assert capped.links == researcher.links[:1]
    not_kept = [
        index
        for index, event in enumerate(events)
        if event.causal_trace_id == fleet.researcher.full_id and ctx(index % 3) != capped.links[0]
    ]
    assert capped.attributes["agent.span.dropped_links"] == len(not_kept)


def test_span_events_are_capped_and_counted() -> None:
    """Beyond max_span_events the events are dropped and counted."""
    agent = CausalTraceId()
    events = [
        HypervisorEvent(
            event_type=EventType.RING_BREACH_DETECTED,
            timestamp=at(n),
            agent_did="did:mesh:rogue",
            causal_trace_id=agent.full_id,
            payload={"ring": 3},
        )
        for n in range(10)
    ]
    state = AgentSpanState(max_span_events=4)
    apply_all(state, events)
    (record,) = state.close_all()
    assert len(record.events) == 4
    assert record.attributes["agent.span.dropped_events"] == 6
    assert record.attributes["agent.span.end_reason"] == "flushed"


def test_killed_idle_evicted_and_late() -> None:
    """A killed agent's span is an error; an agent idle for idle_timeout_s of event time closes
    at its last event; beyond max_open_agents the least recently touched closes; a closed
    node's later events are counted as late and never reopen it."""
    a, b, c, d = (CausalTraceId() for _ in range(4))

    def ev(kind: EventType, causal: CausalTraceId, t: float) -> HypervisorEvent:
        return HypervisorEvent(
            event_type=kind, timestamp=at(t), agent_did=f"did:x:{causal.span_id}",
            causal_trace_id=causal.full_id,
        )  # fmt: skip

    state = AgentSpanState(idle_timeout_s=60, max_open_agents=2)
    assert state.apply(ev(EventType.SESSION_CREATED, a, 0)) == []
    (killed,) = state.apply(ev(EventType.AGENT_KILLED, a, 5))
    assert killed.status == "error"
    assert killed.attributes["error.type"] == "agent_killed"
    assert killed.attributes["agent.span.end_reason"] == "killed"
    assert state.apply(ev(EventType.VFS_WRITE, a, 6)) == []
    assert state.late_events == 1
    state.apply(ev(EventType.SESSION_CREATED, b, 10))
    state.apply(ev(EventType.SESSION_CREATED, c, 20))
    (evicted,) = state.apply(ev(EventType.SESSION_CREATED, d, 30))  # b is the oldest of three
    assert evicted.span_id == w3c(b)[1]
    assert evicted.attributes["agent.span.end_reason"] == "evicted"
    assert state.evicted_open_agents == 1
    # c's last event was at 20: idle past 80 in event time.
    assert state.apply(ev(EventType.VFS_WRITE, d, 80)) == []
    (idle,) = state.apply(ev(EventType.VFS_WRITE, d, 81))
    assert idle.span_id == w3c(c)[1]
    assert idle.attributes["agent.span.end_reason"] == "idle"
    assert idle.end_time == at(20).timestamp()
    assert state.open_span_ids() == [w3c(d)[1]]


def test_out_of_order_timestamps_give_the_earliest_start_and_latest_end() -> None:
    """A span covers its events' time range whatever the order they arrive in."""
    agent = CausalTraceId()
    state = AgentSpanState()
    for t in (10, 3, 7, 12, 1):
        state.apply(
            HypervisorEvent(
                event_type=EventType.VFS_WRITE, timestamp=at(t), causal_trace_id=agent.full_id
            )
        )
    (record,) = state.close_all()
    assert (record.start_time, record.end_time) == (at(1).timestamp(), at(12).timestamp())
    assert record.name == f"agent.run.{w3c(agent)[1]}"  # no agent DID: named by its span id


@pytest.mark.parametrize(
    "causal",
    ["not a causal id", "a/b/c/d", "x" * 100_000, "/abc", "a/" + "b" * 65],
)
def test_bad_causal_ids_are_counted_and_ignored(causal: str) -> None:
    """A causal_trace_id that does not parse (of any length) opens nothing."""
    state = AgentSpanState()
    state.apply(HypervisorEvent(event_type=EventType.VFS_WRITE, causal_trace_id=causal))
    assert state.bad_causal_ids == 1
    assert state.open_agent_count == 0


def test_genai_attributes_are_added_next_to_the_tutorial_names() -> None:
    """with_genai_attributes names the span invoke_agent <name>, adds the gen_ai.* attributes
    and marks spawns as create_agent; the agent.* attributes stay."""
    fleet = Fleet()
    records = {r.agent_did: r for r in apply_all(AgentSpanState(), fleet.events())}
    researcher = with_genai_attributes(records["did:mesh:researcher"])
    assert researcher.name == "invoke_agent researcher"
    assert researcher.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert researcher.attributes["gen_ai.agent.id"] == "did:mesh:researcher"
    assert researcher.attributes["gen_ai.agent.name"] == "researcher"
    assert researcher.attributes["gen_ai.conversation.id"] == "session-researcher"
    assert researcher.attributes["agent.did"] == "did:mesh:researcher"
    (spawned,) = researcher.events
    assert spawned.attributes["gen_ai.operation.name"] == "create_agent"
    assert spawned.attributes["gen_ai.agent.id"] == "did:mesh:tool"
    assert spawned.attributes["gen_ai.agent.name"] == "tool"


def _with_causal_ids(rng: random.Random, count: int) -> list[HypervisorEvent]:
    """Random events, most of them with causal ids of a small random spawn forest."""
    nodes = [CausalTraceId() for _ in range(3)]
    for _ in range(12):
        nodes.append(rng.choice(nodes).child())
    events = []
    for event in random_events(rng, count):
        roll = rng.random()
        causal = event.causal_trace_id
        if roll < 0.7:
            causal = rng.choice(nodes).full_id
        elif roll < 0.75:
            causal = "bad id"
        kind = event.event_type
        if rng.random() < 0.03:
            kind = rng.choice([EventType.SESSION_TERMINATED, EventType.AGENT_KILLED])
        events.append(
            HypervisorEvent(
                event_id=event.event_id,
                event_type=kind,
                timestamp=event.timestamp,
                session_id=event.session_id,
                agent_did=event.agent_did,
                causal_trace_id=causal,
                payload=event.payload,
            )
        )
    return events


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_snapshots_anywhere_give_identical_spans(seed: int) -> None:
    """Snapshotting and restoring the state at any point (as a worker takeover does) gives
    exactly the spans of one uninterrupted run."""
    rng = random.Random(seed)
    events = _with_causal_ids(rng, 500)
    contexts = {e.event_id: ctx(rng.randrange(5)) for e in events if rng.random() < 0.5}
    options: dict[str, Any] = {"idle_timeout_s": 20.0, "max_open_agents": 8, "max_links": 3}
    expected = apply_all(AgentSpanState(**options), events, contexts)
    assert len(expected) > 10
    state = AgentSpanState(**options)
    got: list[AgentSpanRecord] = []
    for event in events:
        if rng.random() < 0.05:
            restored = load_state(dump_state(state))
            assert isinstance(restored, AgentSpanState)
            state = restored
        got.extend(state.apply(event, contexts.get(event.event_id)))
    assert got == expected


# -- in process, through the OpenTelemetry SDK -------------------------------------------------


def test_in_process_exporter_makes_sdk_spans_linked_to_the_emitting_spans() -> None:
    """AgentSpanExporter and SagaSpanExporter on one bus, both into one OTelSpanSink: the SDK
    receives the agent spans with their ids, parents, true times, span events and links to the
    application span each event was emitted in, and the saga span inside the researcher's."""
    otel = pytest.importorskip("hypervisor.observability.exporters.otel")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    exported = InMemorySpanExporter()
    sink = otel.OTelSpanSink(span_exporter=exported, batch=False)
    bus = HypervisorEventBus()
    agents = AgentSpanExporter(bus, sink, genai_attributes=True)
    SagaSpanExporter(bus, sink=sink)
    app = TracerProvider()
    app.add_span_processor(SimpleSpanProcessor(exported))
    tracer = app.get_tracer("agents")
    fleet = Fleet()
    with tracer.start_as_current_span("orchestrate") as producer:
        for event in fleet.events():
            bus.emit(event)
    assert agents.state.open_agent_count == 0
    spans = {span.name: span for span in exported.get_finished_spans()}
    producer_context = producer.get_span_context()
    tool = spans["invoke_agent tool"]
    researcher = spans["invoke_agent researcher"]
    trace_id, span_id = w3c(fleet.tool)
    assert tool.context is not None
    assert researcher.context is not None
    assert (f"{tool.context.trace_id:032x}", f"{tool.context.span_id:016x}") == (trace_id, span_id)
    assert tool.parent is not None
    assert tool.parent.span_id == researcher.context.span_id
    assert tool.start_time == round(at(4).timestamp() * 1e9)
    assert tool.end_time == round(at(9).timestamp() * 1e9)
    assert [(e.name, e.timestamp) for e in tool.events] == [
        ("ring.elevated", round(at(5).timestamp() * 1e9)),
        ("ring.breach_detected", round(at(6).timestamp() * 1e9)),
    ]
    assert [link.context.span_id for link in tool.links] == [producer_context.span_id]
    assert tool.attributes is not None
    assert tool.attributes["gen_ai.agent.id"] == "did:mesh:tool"
    assert tool.status.status_code is StatusCode.UNSET
    saga = spans["saga.completed.research-1"]
    assert saga.parent is not None
    assert saga.parent.span_id == researcher.context.span_id


def test_in_process_exporter_without_opentelemetry_spans_has_no_links() -> None:
    """Emitting outside any span gives spans without links; the buffer and flush work without
    a sink."""
    bus = HypervisorEventBus()
    agents = AgentSpanExporter(bus, max_spans=2)
    fleet = Fleet()
    for event in fleet.events()[:-1]:  # the orchestrator's session stays open
        bus.emit(event)
    assert [r.agent_did for r in agents.completed_spans] == ["did:mesh:tool", "did:mesh:researcher"]
    assert all(r.links == () for r in agents.completed_spans)
    (flushed,) = agents.flush()
    assert flushed.attributes["agent.span.end_reason"] == "flushed"
    assert len(agents.completed_spans) == 2
    assert agents.evicted_spans == 1


def test_a_raising_sink_is_counted_and_the_bus_goes_on() -> None:
    """A sink that raises is counted; the emitter never notices."""

    class Broken:
        def export_agent_span(self, record: AgentSpanRecord) -> None:
            raise RuntimeError("down")

    bus = HypervisorEventBus()
    agents = AgentSpanExporter(bus, Broken())
    for event in Fleet().events():
        bus.emit(event)
    assert agents.sink_errors == 3
    assert len(agents.completed_spans) == 3


# -- the workers -------------------------------------------------------------------------------


def _config(consumer: str) -> WorkerConfig:
    return WorkerConfig(
        group=GROUP,
        consumer=consumer,
        batch_size=5,
        block_s=0.05,
        claim_interval_s=0.05,
        claim_min_idle_s=0.2,
        apply_interval_s=0.002,
        max_apply_batch=11,
        checkpoint_interval_s=0.01,
    )


async def _settled(log: MemoryStreamLog, stores: list[MemoryStateStore]) -> None:
    head = parse_id(await log.head_id())
    with anyio.fail_after(20):
        while True:
            mark = parse_id(await watermark(log, GROUP))
            if mark > head and not any([await store.backlog() for store in stores]):
                return
            await anyio.sleep(0.005)


@pytest.mark.anyio
@pytest.mark.parametrize("n_workers", [1, 3])
async def test_workers_export_the_in_process_agent_spans_and_link_saga_spans(
    n_workers: int, tmp_path: Path
) -> None:
    """Workers sharing a group, with both span derivations, export exactly the agent spans the
    state machine gives in one process (links included), and each saga span links to the
    producer of the event that completed it; the JSON-lines sink writes both kinds."""
    rng = random.Random(n_workers)
    events = _with_causal_ids(rng, 400)
    contexts = {e.event_id: ctx(rng.randrange(4)) for e in events if rng.random() < 0.6}
    log = MemoryStreamLog("events")
    saga_store, agent_store = MemoryStateStore("saga"), MemoryStateStore("agents")
    sink = RecordingSpanSink()
    lines = JsonLinesSpanSink(tmp_path / "spans.jsonl")
    workers = [
        Worker(
            log,
            [
                SagaSpansDerivation(saga_store, [sink, lines]),
                AgentSpansDerivation(agent_store, [sink, lines], idle_timeout_s=20.0),
            ],
            _config(f"w{i}"),
        )
        for i in range(n_workers)
    ]
    async with anyio.create_task_group() as tg:
        for worker in workers:
            tg.start_soon(worker.run)
        for position in range(0, len(events), 23):
            chunk = events[position : position + 23]
            await log.append_many(
                [
                    attach_context(encode_event(e), encode_context(contexts[e.event_id]))
                    if e.event_id in contexts
                    else encode_event(e)
                    for e in chunk
                ]
            )
            await anyio.sleep(0.002)
        await _settled(log, [saga_store, agent_store])
        for worker in workers:
            worker.stop()
    lines.close()
    expected = apply_all(AgentSpanState(idle_timeout_s=20.0), events, contexts)
    assert len(expected) >= 5
    # A span exported twice (a crash between export and commit) is the same span both times.
    by_id: dict[tuple[str, str], AgentSpanRecord] = {}
    for record in sink.agent_records:
        assert by_id.setdefault((record.trace_id, record.span_id), record) == record
    assert sorted(by_id.values(), key=lambda r: (r.trace_id, r.span_id)) == sorted(
        expected, key=lambda r: (r.trace_id, r.span_id)
    )
    # Saga spans: the producer of the event that completed each one.
    sagas = SagaSpanState(max_spans=0)
    completing: dict[str, TraceContext | None] = {}
    for event in events:
        for completed in sagas.apply(event):
            completing[completed.span_id] = contexts.get(event.event_id)
    assert completing
    for saga_record in sink.records:
        found = completing[saga_record.span_id]
        assert saga_record.links == (() if found is None else (found,))
    written = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
    agent_lines = [line for line in written if line.get("kind") == "agent"]
    assert {(line["trace_id"], line["span_id"]) for line in agent_lines} == set(by_id)
    assert any(line.get("links") for line in written if "kind" not in line)


def test_agent_derivation_uses_events_of_the_tree_only() -> None:
    """The derivation stages events with a causal id, and ring and closing events of a named
    agent; not other events without a causal id."""
    derivation = AgentSpansDerivation(MemoryStateStore())
    assert derivation.uses(HypervisorEvent(event_type=EventType.VFS_WRITE, causal_trace_id="a/b"))
    assert derivation.uses(
        HypervisorEvent(event_type=EventType.RING_BREACH_DETECTED, agent_did="did:x")
    )
    assert derivation.uses(
        HypervisorEvent(event_type=EventType.SESSION_TERMINATED, agent_did="did:x")
    )
    assert not derivation.uses(HypervisorEvent(event_type=EventType.VFS_WRITE, agent_did="x"))
    assert not derivation.uses(HypervisorEvent(event_type=EventType.RING_BREACH_DETECTED))
    with pytest.raises(ValueError, match="idle_timeout_s"):
        AgentSpansDerivation(MemoryStateStore(), idle_timeout_s=-1)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        AgentSpanState(idle_timeout_s=math.nan)
