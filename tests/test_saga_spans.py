"""Saga spans: the pure ``SagaSpanState`` and the published ``SagaSpanExporter``."""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from hypervisor.observability._core.spans import SagaSpanState, span_id_for, trace_id_for_saga
from hypervisor.observability.causal_trace import CausalTraceId
from hypervisor.observability.event_bus import EventType, HypervisorEvent, HypervisorEventBus
from hypervisor.observability.saga_span_exporter import (
    SagaSpanExporter,
    SagaSpanRecord,
    SpanRecordSink,
    SpanSink,
)
from hypervisor.observability.testing import RecordingSpanSink

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")


def saga_event(
    event_type: EventType,
    at: float = 0.0,
    *,
    agent: str | None = None,
    session: str | None = None,
    causal: str | None = None,
    **payload: Any,
) -> HypervisorEvent:
    """A saga event ``at`` seconds after T0."""
    return HypervisorEvent(
        event_type=event_type,
        timestamp=T0 + timedelta(seconds=at),
        agent_did=agent,
        session_id=session,
        causal_trace_id=causal,
        payload=payload,
    )


def apply_all(
    events: list[HypervisorEvent], state: SagaSpanState | None = None
) -> tuple[SagaSpanState, list[SagaSpanRecord]]:
    state = state if state is not None else SagaSpanState()
    produced: list[SagaSpanRecord] = []
    for event in events:
        produced.extend(state.apply(event))
    return state, produced


def deploy_saga(causal: str | None = "a1b2c3d4e5f6/01234567") -> list[HypervisorEvent]:
    """The tutorial's saga with explicit timestamps: validate ok, migrate fails, rollback."""
    who = {"agent": "did:mesh:orchestrator", "session": "s1"}
    return [
        saga_event(EventType.SAGA_CREATED, 0.0, causal=causal, saga_id="deploy-v2", **who),
        saga_event(
            EventType.SAGA_STEP_STARTED,
            1.0,
            saga_id="deploy-v2",
            step_id="validate-config",
            step_action="validate",
            **who,
        ),
        saga_event(
            EventType.SAGA_STEP_COMMITTED,
            1.5,
            saga_id="deploy-v2",
            step_id="validate-config",
            step_action="validate",
            result="all checks passed",
            **who,
        ),
        saga_event(
            EventType.SAGA_STEP_STARTED,
            2.0,
            saga_id="deploy-v2",
            step_id="run-migrations",
            step_action="migrate",
        ),
        saga_event(
            EventType.SAGA_STEP_FAILED,
            32.0,
            saga_id="deploy-v2",
            step_id="run-migrations",
            step_action="migrate",
            error="connection_timeout",
            reason="database unreachable after 30s",
        ),
        saga_event(
            EventType.SAGA_COMPENSATING,
            33.0,
            saga_id="deploy-v2",
            step_id="rollback-config",
            step_action="rollback",
        ),
        saga_event(EventType.SAGA_COMPLETED, 34.0, saga_id="deploy-v2"),
    ]


def test_step_span_has_the_published_name_status_timing_and_attributes() -> None:
    """A committed step is ``saga.step.<action>``, ok, timed from its start, with attributes."""
    _, spans = apply_all(deploy_saga()[:3])
    assert len(spans) == 1
    span = spans[0]
    assert (span.name, span.status, span.saga_id, span.step_id, span.step_action) == (
        "saga.step.validate",
        "ok",
        "deploy-v2",
        "validate-config",
        "validate",
    )
    assert span.duration_seconds == pytest.approx(0.5)
    assert span.start_time == (T0 + timedelta(seconds=1)).timestamp()
    assert span.attributes == {
        "agent.saga.id": "deploy-v2",
        "agent.saga.step_id": "validate-config",
        "agent.saga.step_action": "validate",
        "agent.saga.state": "ok",
        "agent.saga.result": "all checks passed",
        "agent.did": "did:mesh:orchestrator",
        "session.id": "s1",
    }


def test_failure_compensation_and_completion_spans() -> None:
    """A failed step is an error span, compensation starts at the failure, the saga spans all."""
    _, spans = apply_all(deploy_saga())
    assert [(s.name, s.status) for s in spans] == [
        ("saga.step.validate", "ok"),
        ("saga.step.migrate", "error"),
        ("saga.compensate.rollback", "compensating"),
        ("saga.completed.deploy-v2", "ok"),
    ]
    failed, compensation, saga = spans[1:]
    assert failed.attributes["agent.saga.error"] == "connection_timeout"
    assert failed.attributes["agent.saga.reason"] == "database unreachable after 30s"
    assert "agent.did" not in failed.attributes
    assert failed.duration_seconds == pytest.approx(30.0)
    # The compensation runs from the failure (32 s) to the compensating event (33 s).
    assert compensation.start_time == failed.end_time
    assert compensation.duration_seconds == pytest.approx(1.0)
    assert (compensation.step_id, compensation.step_action) == ("rollback-config", "rollback")
    assert compensation.attributes["agent.saga.state"] == "compensating"
    assert (saga.step_id, saga.step_action) == ("", "complete")
    assert saga.duration_seconds == pytest.approx(34.0)


def test_escalated_saga_is_an_error_span() -> None:
    """``saga.escalated`` closes the saga as ``saga.escalated.<id>`` with status error."""
    _, spans = apply_all(
        [
            saga_event(EventType.SAGA_CREATED, 0, saga_id="x"),
            saga_event(EventType.SAGA_ESCALATED, 5, saga_id="x", reason="manual review"),
        ]
    )
    assert [(s.name, s.status, s.step_action) for s in spans] == [
        ("saga.escalated.x", "error", "escalate")
    ]
    assert spans[0].attributes["agent.saga.reason"] == "manual review"
    assert spans[0].duration_seconds == 5.0


def test_saga_close_without_creation_gives_no_span() -> None:
    """As published, completing or escalating an unknown saga records nothing."""
    state, spans = apply_all(
        [
            saga_event(EventType.SAGA_COMPLETED, 0, saga_id="ghost"),
            saga_event(EventType.SAGA_ESCALATED, 0, saga_id="ghost"),
        ]
    )
    assert spans == []
    assert state.events_processed == 2


def test_consecutive_compensations_chain() -> None:
    """Each compensation starts where the previous one ended."""
    _, spans = apply_all(
        [
            saga_event(EventType.SAGA_CREATED, 0, saga_id="x"),
            saga_event(EventType.SAGA_STEP_FAILED, 10, saga_id="x", step_id="c"),
            saga_event(EventType.SAGA_COMPENSATING, 12, saga_id="x", step_action="undo-b"),
            saga_event(EventType.SAGA_COMPENSATING, 15, saga_id="x", step_action="undo-a"),
        ]
    )
    comp_b, comp_a = spans[1:]
    assert (comp_b.name, comp_b.start_time - T0.timestamp(), comp_b.duration_seconds) == (
        "saga.compensate.undo-b",
        10.0,
        2.0,
    )
    assert (comp_a.start_time, comp_a.duration_seconds) == (comp_b.end_time, 3.0)
    assert comp_a.step_id == "compensation"


def test_compensation_without_failure_is_instantaneous() -> None:
    """With no failure to start from, a compensation starts and ends at its event."""
    _, spans = apply_all(
        [
            saga_event(EventType.SAGA_CREATED, 0, saga_id="x"),
            saga_event(EventType.SAGA_COMPENSATING, 4, saga_id="x", step_id="undo"),
        ]
    )
    assert spans[0].name == "saga.compensate.undo"
    assert spans[0].step_action == "compensate"
    assert spans[0].duration_seconds == 0.0


def test_saga_id_step_action_and_step_key_fallbacks() -> None:
    """saga_id falls back to the causal id then "unknown"; action wins over step_action."""
    _, spans = apply_all(
        [
            saga_event(EventType.SAGA_STEP_STARTED, 0, causal="t/s", action="fetch"),
            saga_event(EventType.SAGA_STEP_COMMITTED, 2, causal="t/s", action="fetch"),
            saga_event(EventType.SAGA_STEP_FAILED, 3, step_action="write", action="put"),
        ]
    )
    assert [(s.saga_id, s.step_id, s.step_action, s.name) for s in spans] == [
        ("t/s", "fetch", "fetch", "saga.step.fetch"),
        ("unknown", "put", "put", "saga.step.put"),
    ]
    assert spans[0].duration_seconds == 2.0


def test_step_named_by_id_only_uses_the_id() -> None:
    """A step without an action is named and keyed by its step id."""
    _, spans = apply_all(
        [
            saga_event(EventType.SAGA_STEP_STARTED, 0, saga_id="x", step_id=7),
            saga_event(EventType.SAGA_STEP_COMMITTED, 1, saga_id="x", step_id=7),
        ]
    )
    assert [(s.name, s.step_id, s.duration_seconds) for s in spans] == [("saga.step.7", "7", 1.0)]


def test_step_end_without_start_starts_at_its_end() -> None:
    """As published, a step whose start was never seen is a zero-length span."""
    _, spans = apply_all([saga_event(EventType.SAGA_STEP_COMMITTED, 9, saga_id="x", step_id="a")])
    assert spans[0].start_time == spans[0].end_time


def test_ids_follow_the_saga_causal_trace() -> None:
    """The trace is the saga's causal trace; the saga span is parent of steps and compensation."""
    causal = CausalTraceId.from_string("a1b2c3d4e5f6/89abcdef/01234567")
    _, spans = apply_all(deploy_saga(causal.full_id))
    _, w3c_trace, w3c_span, _ = causal.to_traceparent().split("-")
    saga = spans[-1]
    assert all(span.trace_id == w3c_trace for span in spans)
    assert saga.parent_span_id == w3c_span
    assert all(span.parent_span_id == saga.span_id for span in spans[:-1])
    assert len({span.span_id for span in spans}) == len(spans)
    for span in spans:
        assert HEX32.fullmatch(span.trace_id)
        assert HEX16.fullmatch(span.span_id)


def test_ids_without_a_causal_trace_hash_the_saga_id() -> None:
    """Without a causal id the trace id is a hash of the saga id and the saga span is a root."""
    _, spans = apply_all(deploy_saga(causal=None))
    trace_id, parent = trace_id_for_saga("deploy-v2", None)
    assert parent is None
    assert HEX32.fullmatch(trace_id)
    assert {span.trace_id for span in spans} == {trace_id}
    assert spans[-1].parent_span_id is None
    # An unparseable causal id falls back the same way.
    assert trace_id_for_saga("deploy-v2", "not a trace id") == (trace_id, None)


def test_ids_are_a_function_of_the_events() -> None:
    """Replaying the same events gives the same ids; a new saga.created event id changes them."""
    events = deploy_saga()
    _, first = apply_all(events)
    _, again = apply_all(events)
    assert first == again
    other_created = HypervisorEvent(
        event_type=EventType.SAGA_CREATED,
        timestamp=events[0].timestamp,
        causal_trace_id=events[0].causal_trace_id,
        payload=events[0].payload,
    )
    _, other = apply_all([other_created, *events[1:]])
    assert other[-1].span_id != first[-1].span_id
    assert other[-1].trace_id == first[-1].trace_id
    # Step span ids hash the saga id, the step key and the start event id.
    assert first[0].span_id == span_id_for(
        "step", "deploy-v2", "validate-config", events[1].event_id
    )


def test_steps_of_an_unknown_saga_have_no_parent() -> None:
    """A step of a saga never seen created is a root span in the trace of its own causal id."""
    causal = CausalTraceId()
    _, spans = apply_all(
        [saga_event(EventType.SAGA_STEP_FAILED, 1, causal=causal.full_id, saga_id="x", step_id="a")]
    )
    assert spans[0].parent_span_id is None
    assert spans[0].trace_id == causal.to_traceparent().split("-")[1]


def test_completed_span_buffer_is_bounded() -> None:
    """Only the newest ``max_spans`` spans are kept; evictions are counted."""
    state = SagaSpanState(max_spans=3)
    events = [
        saga_event(EventType.SAGA_STEP_COMMITTED, i, saga_id="x", step_id=f"s{i}") for i in range(5)
    ]
    _, produced = apply_all(events, state)
    assert len(produced) == 5
    assert [s.step_id for s in state.completed_spans] == ["s2", "s3", "s4"]
    assert state.evicted_spans == 2


def test_zero_max_spans_buffers_nothing() -> None:
    """``max_spans=0`` keeps no spans (a forwarding worker) but still returns them."""
    state, produced = apply_all(
        [saga_event(EventType.SAGA_STEP_COMMITTED, 0, saga_id="x", step_id="a")],
        SagaSpanState(max_spans=0),
    )
    assert len(produced) == 1
    assert state.completed_spans == []
    assert state.evicted_spans == 0


def test_open_steps_are_bounded_and_the_oldest_is_evicted() -> None:
    """Past ``max_open_steps`` the oldest open step is forgotten (its end becomes zero-length)."""
    state = SagaSpanState(max_open_steps=2)
    events = [
        saga_event(EventType.SAGA_STEP_STARTED, 0, saga_id="x", step_id="a"),
        saga_event(EventType.SAGA_STEP_STARTED, 1, saga_id="x", step_id="b"),
        saga_event(EventType.SAGA_STEP_STARTED, 2, saga_id="x", step_id="c"),
        saga_event(EventType.SAGA_STEP_COMMITTED, 5, saga_id="x", step_id="a"),
        saga_event(EventType.SAGA_STEP_COMMITTED, 5, saga_id="x", step_id="b"),
    ]
    _, spans = apply_all(events, state)
    assert [s.duration_seconds for s in spans] == [0.0, 4.0]
    assert state.evicted_open_steps == 1
    assert state.open_step_count == 1


def test_open_sagas_are_bounded_and_the_oldest_is_evicted() -> None:
    """Past ``max_open_sagas`` the oldest open saga is forgotten and its close gives no span."""
    state = SagaSpanState(max_open_sagas=2)
    events = [saga_event(EventType.SAGA_CREATED, i, saga_id=f"g{i}") for i in range(3)]
    events += [saga_event(EventType.SAGA_COMPLETED, 9, saga_id=f"g{i}") for i in range(3)]
    _, spans = apply_all(events, state)
    assert [s.name for s in spans] == ["saga.completed.g1", "saga.completed.g2"]
    assert state.evicted_open_sagas == 1
    assert state.open_saga_count == 0


@pytest.mark.parametrize(
    "caps",
    [{"max_spans": -1}, {"max_open_steps": 0}, {"max_open_sagas": 0}],
)
def test_invalid_caps_are_rejected(caps: dict[str, int]) -> None:
    """Negative span caps and non-positive open-buffer caps raise ValueError."""
    with pytest.raises(ValueError, match="max_"):
        SagaSpanState(**caps)


def test_non_saga_events_are_ignored_by_the_state() -> None:
    """The state counts and reacts to the seven saga lifecycle events only."""
    state, spans = apply_all(
        [
            saga_event(EventType.SAGA_FANOUT_STARTED, 0, saga_id="x"),
            saga_event(EventType.RING_ASSIGNED, 0, saga_id="x"),
        ]
    )
    assert (spans, state.events_processed) == ([], 0)


def test_record_keeps_the_published_positional_fields() -> None:
    """Eight positional arguments build a record; ids default to valid derived W3C ids."""
    record = SagaSpanRecord("n", "saga", "step", "act", 1.0, 3.5, "ok", {"k": "v"})
    assert [f.name for f in dataclasses.fields(record)][:8] == [
        "name",
        "saga_id",
        "step_id",
        "step_action",
        "start_time",
        "end_time",
        "status",
        "attributes",
    ]
    assert record.duration_seconds == 2.5
    assert HEX32.fullmatch(record.trace_id)
    assert HEX16.fullmatch(record.span_id)
    assert record.parent_span_id is None
    assert record == SagaSpanRecord("n", "saga", "step", "act", 1.0, 3.5, "ok", {"k": "v"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.name = "other"  # type: ignore[misc]


# --- the published exporter on a bus -----------------------------------------------------


class KeywordOnlySink:
    """A published-style sink that accepts keyword arguments only."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def record_span(
        self,
        *,
        name: str,
        start_time: float,
        end_time: float,
        attributes: dict[str, Any],
        status: str,
    ) -> None:
        self.calls.append(
            {
                "name": name,
                "start_time": start_time,
                "end_time": end_time,
                "attributes": attributes,
                "status": status,
            }
        )


class FailingSink:
    """A sink that raises on every span."""

    def __init__(self) -> None:
        self.attempts = 0

    def record_span(
        self,
        name: str,
        start_time: float,
        end_time: float,
        attributes: dict[str, Any],
        status: str,
    ) -> None:
        self.attempts += 1
        raise RuntimeError(f"backend down for {name}")


def test_exporter_buffers_and_forwards_with_keywords() -> None:
    """Spans are buffered and sent to a ``record_span`` sink with keyword arguments."""
    bus = HypervisorEventBus()
    sink = KeywordOnlySink()
    # Keyword-only parameters do not match the protocol's signature for mypy, but they prove
    # that the exporter calls record_span with keywords, as published.
    exporter = SagaSpanExporter(bus, sink=sink)  # type: ignore[arg-type]
    for event in deploy_saga():
        bus.emit(event)
    spans = exporter.completed_spans
    assert [call["name"] for call in sink.calls] == [s.name for s in spans]
    assert sink.calls[0] == {
        "name": spans[0].name,
        "start_time": spans[0].start_time,
        "end_time": spans[0].end_time,
        "attributes": spans[0].attributes,
        "status": spans[0].status,
    }
    assert exporter.events_processed == 7
    assert isinstance(sink, SpanSink)


def test_exporter_prefers_export_span_so_sinks_get_ids() -> None:
    """A sink with ``export_span`` receives the records themselves, ids included."""
    bus = HypervisorEventBus()
    sink = RecordingSpanSink()
    exporter = SagaSpanExporter(bus)
    exporter.attach_sink(sink)
    for event in deploy_saga():
        bus.emit(event)
    assert sink.records == exporter.completed_spans
    assert isinstance(sink, SpanRecordSink)
    assert exporter.sink is sink


def test_recording_sink_builds_records_from_record_span() -> None:
    """The shipped recording sink also accepts the published ``record_span`` call."""
    sink = RecordingSpanSink()
    sink.record_span(
        name="saga.step.x",
        start_time=1.0,
        end_time=2.0,
        attributes={"agent.saga.id": "g", "agent.saga.step_id": "x"},
        status="ok",
    )
    (record,) = sink.records
    assert (record.name, record.saga_id, record.step_id, record.duration_seconds) == (
        "saga.step.x",
        "g",
        "x",
        1.0,
    )
    assert sink.names == ["saga.step.x"]
    sink.clear()
    assert sink.records == []


def test_failing_sink_is_isolated_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A raising sink never reaches emit(); spans are still buffered; errors are counted."""
    bus = HypervisorEventBus()
    sink = FailingSink()
    exporter = SagaSpanExporter(bus, sink=sink)
    later: list[HypervisorEvent] = []
    bus.subscribe(event_type=EventType.SAGA_STEP_COMMITTED, handler=later.append)
    with caplog.at_level(logging.DEBUG, logger="hypervisor.observability.spans"):
        for event in deploy_saga():
            bus.emit(event)
    assert sink.attempts == 4
    assert exporter.sink_errors == 4
    assert len(exporter.completed_spans) == 4
    assert len(later) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "RuntimeError" in warnings[0].getMessage()


def test_detach_sink_stops_forwarding_but_keeps_buffering() -> None:
    """After ``detach_sink()`` spans are buffered only."""
    bus = HypervisorEventBus()
    sink = RecordingSpanSink()
    exporter = SagaSpanExporter(bus, sink=sink)
    events = deploy_saga()
    for event in events[:3]:
        bus.emit(event)
    exporter.detach_sink()
    for event in events[3:]:
        bus.emit(event)
    assert len(sink.records) == 1
    assert len(exporter.completed_spans) == 4
    assert exporter.sink is None


def test_completed_spans_is_a_copy_and_reset_clears() -> None:
    """``completed_spans`` returns a copy; ``reset()`` forgets spans, open state and counters."""
    bus = HypervisorEventBus()
    exporter = SagaSpanExporter(bus, max_spans=2)
    for event in deploy_saga():
        bus.emit(event)
    spans = exporter.completed_spans
    spans.clear()
    assert len(exporter.completed_spans) == 2
    assert exporter.evictions == {"spans": 2, "open_steps": 0, "open_sagas": 0}
    bus.emit(saga_event(EventType.SAGA_CREATED, 40, saga_id="next"))
    exporter.reset()
    assert exporter.completed_spans == []
    assert exporter.events_processed == 0
    assert exporter.evictions == {"spans": 0, "open_steps": 0, "open_sagas": 0}
    bus.emit(saga_event(EventType.SAGA_COMPLETED, 41, saga_id="next"))
    assert exporter.completed_spans == []


# --- properties over random saga streams -------------------------------------------------

_KINDS = [
    EventType.SAGA_CREATED,
    EventType.SAGA_STEP_STARTED,
    EventType.SAGA_STEP_COMMITTED,
    EventType.SAGA_STEP_FAILED,
    EventType.SAGA_COMPENSATING,
    EventType.SAGA_COMPLETED,
    EventType.SAGA_ESCALATED,
]


@st.composite
def saga_streams(draw: st.DrawFn) -> list[HypervisorEvent]:
    events = []
    at = 0.0
    for _ in range(draw(st.integers(0, 60))):
        at += draw(st.floats(0, 5, allow_nan=False))
        events.append(
            saga_event(
                draw(st.sampled_from(_KINDS)),
                at,
                causal=draw(st.sampled_from([None, "a1b2c3d4e5f6/01234567", "abc/def"])),
                saga_id=draw(st.sampled_from(["g1", "g2", "g3"])),
                step_id=draw(st.sampled_from(["a", "b", ""])),
            )
        )
    return events


@settings(max_examples=150, deadline=None)
@given(saga_streams(), st.integers(1, 4), st.integers(1, 4), st.integers(0, 5))
def test_random_streams_respect_bounds_and_replay_identically(
    events: list[HypervisorEvent], open_steps: int, open_sagas: int, max_spans: int
) -> None:
    """Buffers stay within their caps, ids are W3C-shaped and replays are identical."""
    caps = {"max_spans": max_spans, "max_open_steps": open_steps, "max_open_sagas": open_sagas}
    state = SagaSpanState(**caps)
    spans: list[SagaSpanRecord] = []
    for event in events:
        produced = state.apply(event)
        assert state.open_step_count <= open_steps
        assert state.open_saga_count <= open_sagas
        assert len(state.completed_spans) <= max_spans
        spans.extend(produced)
        for span in produced:
            assert HEX32.fullmatch(span.trace_id)
            assert HEX16.fullmatch(span.span_id)
            assert span.end_time >= span.start_time
    if max_spans:
        assert len(spans) == len(state.completed_spans) + state.evicted_spans
    _, replay = apply_all(events, SagaSpanState(**caps))
    assert replay == spans


@settings(max_examples=150, deadline=None)
@given(saga_streams())
def test_random_streams_link_steps_to_their_saga_span(events: list[HypervisorEvent]) -> None:
    """Every step or compensation span of an open saga is a child of that saga's span, and
    spans of a saga that is not open have no parent."""
    state = SagaSpanState()
    children: dict[str, list[SagaSpanRecord]] = {}
    for event in events:
        saga_id = event.payload["saga_id"]
        if event.event_type is EventType.SAGA_CREATED:
            children[saga_id] = []
        for span in state.apply(event):
            if span.name.startswith(("saga.step.", "saga.compensate.")):
                if saga_id in children:
                    children[saga_id].append(span)
                else:
                    assert span.parent_span_id is None
            else:
                for child in children.pop(saga_id):
                    assert child.parent_span_id == span.span_id
                    assert child.trace_id == span.trace_id


def test_state_built_records_equal_constructor_built_ones() -> None:
    """Records made by the state behave like records made with the published constructor."""
    _, spans = apply_all(deploy_saga())
    for span in spans:
        rebuilt = SagaSpanRecord(**dataclasses.asdict(span))
        assert rebuilt == span
        assert dataclasses.replace(span) == span
        assert repr(rebuilt) == repr(span)
        with pytest.raises(dataclasses.FrozenInstanceError):
            span.status = "ok"  # type: ignore[misc]


_CAUSAL_TEXT = st.text(alphabet="0123456789abcdefABCXYZ_-/é ", max_size=90)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_CAUSAL_TEXT, st.lists(_CAUSAL_TEXT, min_size=1, max_size=4).map("/".join)))
def test_trace_ids_are_the_causal_ids_traceparent_mapping(causal: str) -> None:
    """trace_id_for_saga maps a causal id exactly as CausalTraceId's traceparent does.

    Hex segments of any width (padded), non-hex and over-long segments (hashed), all-zero ids,
    three-segment ids; anything CausalTraceId rejects falls back to the saga-id hash.
    """
    try:
        parsed = CausalTraceId.from_string(causal)
    except ValueError:
        expected = trace_id_for_saga("g1", None)
    else:
        _, trace, span, _ = parsed.to_traceparent().split("-")
        expected = (trace, span)
    assert trace_id_for_saga("g1", causal) == expected


@settings(max_examples=100, deadline=None)
@given(saga_streams())
def test_per_type_handlers_equal_apply(events: list[HypervisorEvent]) -> None:
    """handler_for(type)(event) gives apply(event)'s span (or None) and state; on_span sees
    each span."""
    by_apply, expected = apply_all(events)
    state = SagaSpanState()
    seen: list[SagaSpanRecord] = []
    state.on_span = seen.append
    produced: list[SagaSpanRecord] = []
    for event in events:
        record = state.handler_for(event.event_type)(event)
        if record is not None:
            produced.append(record)
    assert produced == expected == seen
    assert state.completed_spans == by_apply.completed_spans
    assert state.events_processed == by_apply.events_processed
    with pytest.raises(KeyError):
        state.handler_for(EventType.RING_ASSIGNED)


def test_plain_string_types_are_applied_like_members() -> None:
    """An event whose type is the plain string value of a saga type is applied as that type."""
    events = deploy_saga()
    plain = [
        HypervisorEvent(
            event_id=e.event_id,
            event_type=e.event_type.value,  # type: ignore[arg-type]
            timestamp=e.timestamp,
            agent_did=e.agent_did,
            session_id=e.session_id,
            causal_trace_id=e.causal_trace_id,
            payload=e.payload,
        )
        for e in events
    ]
    assert apply_all(plain)[1] == apply_all(events)[1]


def test_state_snapshots_without_its_hook() -> None:
    """A worker snapshot of the state leaves on_span out, loads with it unset and a step still
    open, and the loaded state goes on as the original."""
    from hypervisor.observability.workers._snapshot import dump_state, load_state

    events = deploy_saga()
    state, _ = apply_all(events[:4])
    assert state.open_step_count == 1
    state.on_span = lambda record: None
    loaded = load_state(dump_state(state))
    assert isinstance(loaded, SagaSpanState)
    assert loaded.on_span is None
    assert loaded.open_saga_count == state.open_saga_count == 1
    assert loaded.open_step_count == state.open_step_count == 1
    assert loaded.events_processed == state.events_processed
    assert loaded.completed_spans == state.completed_spans
    rest = apply_all(events[4:], loaded)[1]
    assert rest
    assert rest == apply_all(events[4:], state)[1]


def apply_deferred(
    events: list[HypervisorEvent], state: SagaSpanState
) -> tuple[SagaSpanState, list[SagaSpanRecord | None]]:
    """Feed ``events`` through the per-type handlers (the bus's path); return what they gave."""
    returned: list[SagaSpanRecord | None] = []
    for event in events:
        returned.append(state.handler_for(event.event_type)(event))
    return state, returned


@settings(max_examples=100, deadline=None)
@given(saga_streams())
def test_lazy_records_are_the_eager_records(events: list[HypervisorEvent]) -> None:
    """lazy_records changes when records are built, never their values or behaviour."""
    from hypervisor.observability.workers._snapshot import dump_state, load_state

    eager_state, eager = apply_all(events)
    lazy_state = SagaSpanState()
    lazy_state.lazy_records = True
    _, returned = apply_deferred(events, lazy_state)
    assert returned == [None] * len(events)  # deferred: nothing built on the emit path
    built = lazy_state.completed_spans
    assert [repr(span) for span in built] == [repr(span) for span in eager]
    assert built == eager == eager_state.completed_spans
    for span, twin in zip(built, eager, strict=True):
        assert type(span) is SagaSpanRecord
        assert vars(span) == vars(twin)
        assert list(span.attributes) == list(twin.attributes)
    # Built once: a second read returns the very same records.
    assert all(a is b for a, b in zip(lazy_state.completed_spans, built, strict=True))
    assert [copy.deepcopy(span) for span in built] == eager
    assert [dataclasses.replace(span) for span in built] == eager
    # A snapshot of a state with spans still unbuilt holds built records once loaded.
    again = SagaSpanState()
    again.lazy_records = True
    apply_deferred(events, again)
    loaded = load_state(dump_state(again))
    assert isinstance(loaded, SagaSpanState)
    assert loaded.lazy_records
    assert loaded.completed_spans == eager
    # apply() returns built records even while deferring.
    applied = SagaSpanState()
    applied.lazy_records = True
    assert apply_all(events, applied)[1] == eager


def test_deferral_needs_no_hook_and_keeps_the_caps() -> None:
    """With an on_span hook spans are built at once even when lazy; caps and evictions hold."""
    events = deploy_saga()
    _, eager = apply_all(events)
    hooked = SagaSpanState()
    hooked.lazy_records = True
    seen: list[SagaSpanRecord] = []
    hooked.on_span = seen.append
    _, returned = apply_deferred(events, hooked)
    assert [span for span in returned if span is not None] == eager == seen
    hooked.on_span = None  # deferring again from now on
    assert apply_deferred(events, hooked)[1] == [None] * len(events)
    assert hooked.completed_spans == eager + eager

    capped = SagaSpanState(max_spans=2)
    capped.lazy_records = True
    apply_deferred(events, capped)
    assert capped.completed_spans == eager[-2:]
    assert capped.evicted_spans == len(eager) - 2
    nothing = SagaSpanState(max_spans=0)
    nothing.lazy_records = True
    apply_deferred(events, nothing)
    assert nothing.completed_spans == []
    assert nothing.evicted_spans == 0
    nothing.reset()
    assert nothing.completed_spans == []


def test_span_record_is_a_plain_frozen_dataclass() -> None:
    """Records are frozen dataclasses with the published field order, id defaults, and the
    links (none by default) last."""
    _, spans = apply_all(deploy_saga())
    step = spans[0]
    with pytest.raises(AttributeError, match="no_such_field"):
        step.no_such_field  # type: ignore[attr-defined]  # noqa: B018
    assert step.duration_seconds == pytest.approx(0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.status = "error"  # type: ignore[misc]
    fields = dataclasses.fields(SagaSpanRecord)
    assert [f.name for f in fields[-2:]] == ["parent_span_id", "links"]
    assert fields[-2].default is None
    assert fields[-1].default == ()
    record = SagaSpanRecord("n", "s", "", "", 0.0, 1.0, "ok")
    assert record.parent_span_id is None
    assert record.links == ()
    assert step.links == ()  # built through its __dict__, without the field


def test_exporter_defers_spans_only_without_a_sink() -> None:
    """Without a sink the exporter's handlers defer spans; with one, the sink gets records."""
    bus = HypervisorEventBus()
    exporter = SagaSpanExporter(bus)
    events = deploy_saga()
    for event in events[:3]:
        bus.emit(event)
    assert exporter.state.lazy_records
    unbuilt = [span for span in exporter.state._spans if type(span) is not SagaSpanRecord]
    assert len(unbuilt) == 1  # the first step's span, not built yet
    sink = RecordingSpanSink()
    exporter.attach_sink(sink)
    assert not exporter.state.lazy_records
    for event in events[3:]:
        bus.emit(event)
    _, eager = apply_all(events)
    assert sink.records == eager[1:]
    assert exporter.completed_spans == eager
    exporter.detach_sink()
    assert exporter.state.lazy_records


def test_snapshots_keep_records_and_open_sagas_with_their_ids() -> None:
    """A worker snapshot holds completed records (as built) and open sagas with what their ids
    derive from: the loaded state gives the same spans, ids included, as the original."""
    from hypervisor.observability.workers._snapshot import dump_state, load_state

    events = deploy_saga()
    state, _ = apply_all(events[:4])  # one completed span, the saga and a step still open
    assert len(state.completed_spans) == 1
    restored = load_state(dump_state(state))
    assert isinstance(restored, SagaSpanState)
    assert [type(span) for span in restored.completed_spans] == [SagaSpanRecord]
    assert restored.completed_spans == state.completed_spans
    assert (restored.open_saga_count, restored.open_step_count) == (1, 1)
    rest = apply_all(events[4:], restored)[1]
    assert rest
    assert rest == apply_all(events[4:], state)[1]
