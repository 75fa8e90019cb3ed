"""End to end: producers emit inside OpenTelemetry spans onto a real Redis stream, a span worker
process exports OTLP/HTTP to a local receiver, and the received trace has the producer spans,
the spawn tree's agent spans, the saga and step spans, in their parent and link relations, at
the events' true times."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Tracer

from hypervisor.observability import (
    CausalTraceId,
    EventType,
    HypervisorEvent,
    RedisEventBus,
)
from otlp_receiver import OtlpReceiver, receiver as receiver
from redis_server import RedisServer
from worker_procs import WorkerProc, procs as procs, worker_argv

pytestmark = [pytest.mark.redis, pytest.mark.slow]

# Event time, a minute before the test runs: the spans must carry these times, not export times.
T0 = (datetime.now(UTC) - timedelta(minutes=1)).replace(microsecond=0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ns(seconds: float) -> int:
    return round(at(seconds).timestamp() * 1e9)


def hexed(value: bytes) -> str:
    return value.hex()


def attributes(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        value = kv.value
        kind = value.WhichOneof("value")
        out[kv.key] = getattr(value, kind) if kind else None
    return out


@pytest.fixture
def producer_tracer(receiver: OtlpReceiver) -> Iterator[Tracer]:
    """The agents' own tracer: spans exported over OTLP/HTTP to the same receiver."""
    provider = TracerProvider(resource=Resource.create({"service.name": "agent-fleet"}))
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.url}/v1/traces", timeout=10))
    )
    yield provider.get_tracer("agents")
    provider.shutdown()


def _wait(receiver: OtlpReceiver, service: str, count: int, timeout_s: float) -> list[Span]:
    deadline = threading.Event()
    timer = threading.Timer(timeout_s, deadline.set)
    timer.start()
    try:
        with receiver.changed:
            while not deadline.is_set():
                found = [s for r, s in receiver.spans() if r.get("service.name") == service]
                if len(found) >= count:
                    return found
                receiver.changed.wait(0.2)
    finally:
        timer.cancel()
    return [s for r, s in receiver.spans() if r.get("service.name") == service]


def test_producer_spans_spawn_tree_sagas_and_steps_form_one_linked_trace(
    redis_server: RedisServer,
    procs: list[WorkerProc],
    receiver: OtlpReceiver,
    producer_tracer: Tracer,
) -> None:
    """An orchestrator's span spawns a researcher that spawns a tool agent (their causal ids a
    child of the orchestrator's span), the researcher runs a two-step saga, the tool agent is
    elevated and breaches; a second, independent agent breaches. The worker's spans: one per
    agent, parented along the spawn tree, the first root a child of the producer's span (the
    trace is shared), the other a root of its own trace; the saga inside the researcher's span
    and the steps inside the saga; every derived span linked to the producer span its events
    were emitted in; ring events as span events; all at the events' times."""
    url, stream = redis_server.url, f"e2e{uuid.uuid4().hex[:8]}"
    saga = {"saga_id": "research-1"}
    solo = CausalTraceId()  # the loner's root: a trace of its own

    def event(
        kind: EventType, causal: CausalTraceId | None, agent: str, t: float, **payload: Any
    ) -> HypervisorEvent:
        return HypervisorEvent(
            event_type=kind,
            timestamp=at(t),
            session_id=f"session-{agent}",
            agent_did=f"did:mesh:{agent}",
            causal_trace_id=None if causal is None else causal.full_id,
            payload=payload,
        )

    async def produce() -> None:
        async with RedisEventBus.from_url(url, stream, reader=False) as bus:
            with producer_tracer.start_as_current_span("orchestrate") as orchestrate:
                context = orchestrate.get_span_context()
                root = CausalTraceId.from_traceparent(
                    f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
                ).child()
                researcher = root.child()
                tool = researcher.child()
                await bus.emit(event(EventType.SESSION_CREATED, root, "orchestrator", 0))
                with producer_tracer.start_as_current_span("research"):
                    await bus.emit_many(
                        [
                            event(EventType.SESSION_CREATED, researcher, "researcher", 1),
                            event(EventType.SAGA_CREATED, researcher, "researcher", 2, **saga),
                            event(
                                EventType.SAGA_STEP_STARTED,
                                researcher,
                                "researcher",
                                3,
                                step_id="search",
                                **saga,
                            ),
                        ]
                    )
                    with producer_tracer.start_as_current_span("tool-run"):
                        await bus.emit(event(EventType.SESSION_CREATED, tool, "tool", 4))
                        await bus.emit(
                            event(EventType.RING_ELEVATED, tool, "tool", 5, from_ring=3, to_ring=1)
                        )
                        await bus.emit(
                            event(
                                EventType.RING_BREACH_DETECTED,
                                tool,
                                "tool",
                                6,
                                ring=1,
                                attempted_tool="shell_exec",
                            )
                        )
                        await bus.emit(event(EventType.SESSION_TERMINATED, tool, "tool", 7))
                    await bus.emit_many(
                        [
                            event(
                                EventType.SAGA_STEP_COMMITTED,
                                researcher,
                                "researcher",
                                8,
                                step_id="search",
                                **saga,
                            ),
                            event(
                                EventType.SAGA_STEP_STARTED,
                                researcher,
                                "researcher",
                                8.5,
                                step_id="write",
                                **saga,
                            ),
                        ]
                    )
                with producer_tracer.start_as_current_span("finish"):
                    await bus.emit_many(
                        [
                            event(
                                EventType.SAGA_STEP_COMMITTED,
                                researcher,
                                "researcher",
                                9,
                                step_id="write",
                                **saga,
                            ),
                            event(EventType.SAGA_COMPLETED, researcher, "researcher", 10, **saga),
                            event(EventType.SESSION_TERMINATED, researcher, "researcher", 11),
                            event(EventType.SESSION_TERMINATED, root, "orchestrator", 12),
                        ]
                    )
            with producer_tracer.start_as_current_span("loner"):
                await bus.emit_many(
                    [
                        event(EventType.SESSION_CREATED, solo, "loner", 0.5),
                        # No causal id: the breach finds the loner's span by its DID.
                        event(EventType.RING_BREACH_DETECTED, None, "loner", 1.5, ring=3),
                        event(EventType.AGENT_KILLED, solo, "loner", 2.5),
                    ]
                )

    anyio.run(produce)
    worker = WorkerProc(
        worker_argv(
            "saga-spans",
            url,
            stream,
            "e2e-1",
            "--agent-spans",
            "--genai-attributes",
            "--otlp-endpoint",
            receiver.url,
        )
    )
    procs.append(worker)
    # 4 agent spans, a saga span and 2 step spans; 5 producer spans.
    derived = _wait(receiver, "agent-hypervisor", 7, timeout_s=60)
    assert worker.terminate() == 0
    produced = _wait(receiver, "agent-fleet", 5, timeout_s=10)
    assert len(derived) == 7, [s.name for s in derived]
    by_name = {span.name: span for span in derived}
    producers = {span.name: span for span in produced}
    assert set(producers) == {"orchestrate", "research", "tool-run", "finish", "loner"}

    def span_id(name: str) -> str:
        return hexed(producers[name].span_id)

    orchestrate = producers["orchestrate"]
    root = by_name["invoke_agent orchestrator"]
    researcher = by_name["invoke_agent researcher"]
    tool = by_name["invoke_agent tool"]
    loner = by_name["invoke_agent loner"]
    saga_span = by_name["saga.completed.research-1"]
    steps = [by_name["saga.step.search"], by_name["saga.step.write"]]

    # The spawn tree shares the orchestrator's trace: its root agent is a child of its span.
    trace = hexed(orchestrate.trace_id)
    for span in (root, researcher, tool, saga_span, *steps):
        assert hexed(span.trace_id) == trace, span.name
    assert hexed(root.parent_span_id) == span_id("orchestrate")
    assert researcher.parent_span_id == root.span_id
    assert tool.parent_span_id == researcher.span_id
    assert saga_span.parent_span_id == researcher.span_id
    assert all(step.parent_span_id == saga_span.span_id for step in steps)
    # The loner's tree is its own trace, linked to the producer's.
    assert hexed(loner.trace_id) == solo.to_traceparent().split("-")[1]
    assert not loner.parent_span_id

    def links(span: Span) -> list[tuple[str, str]]:
        return [(hexed(link.trace_id), hexed(link.span_id)) for link in span.links]

    def producer_link(name: str) -> tuple[str, str]:
        return (hexed(producers[name].trace_id), span_id(name))

    assert links(root) == [producer_link("orchestrate"), producer_link("finish")]
    assert links(researcher) == [producer_link("research"), producer_link("finish")]
    assert links(tool) == [producer_link("tool-run")]
    assert links(loner) == [producer_link("loner")]
    assert links(by_name["saga.step.search"]) == [producer_link("research")]
    assert links(by_name["saga.step.write"]) == [producer_link("finish")]
    assert links(saga_span) == [producer_link("finish")]

    # True times: the events' timestamps, to the microsecond.
    def times(span: Span) -> tuple[int, int]:
        return span.start_time_unix_nano, span.end_time_unix_nano

    def close(got: tuple[int, int], expected: tuple[int, int]) -> bool:
        return all(abs(a - b) <= 1000 for a, b in zip(got, expected, strict=True))

    assert close(times(root), (ns(0), ns(12)))
    assert close(times(researcher), (ns(1), ns(11)))
    assert close(times(tool), (ns(4), ns(7)))
    assert close(times(saga_span), (ns(2), ns(10)))
    assert close(times(by_name["saga.step.search"]), (ns(3), ns(8)))
    assert close(times(by_name["saga.step.write"]), (ns(8.5), ns(9)))
    # Ring transitions and breaches are span events on the agent's span, at their times.
    assert [(e.name, e.time_unix_nano) for e in tool.events] == [
        ("ring.elevated", ns(5)),
        ("ring.breach_detected", ns(6)),
    ]
    assert [e.name for e in researcher.events] == ["agent.spawned"]
    assert [(e.name, e.time_unix_nano) for e in loner.events] == [("ring.breach_detected", ns(1.5))]
    # Names: the tutorial's and the GenAI ones; a killed agent is an error.
    tool_attributes = attributes(tool)
    assert tool_attributes["agent.did"] == "did:mesh:tool"
    assert tool_attributes["gen_ai.agent.id"] == "did:mesh:tool"
    assert tool_attributes["gen_ai.operation.name"] == "invoke_agent"
    assert tool_attributes["gen_ai.conversation.id"] == "session-tool"
    assert loner.status.code == loner.status.STATUS_CODE_ERROR
    assert attributes(loner)["error.type"] == "agent_killed"
