"""The live view's state and the stream broadcaster without HTTP: bounds, hostile input, resets."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from hypervisor.observability._bus.bus import RedisEventBus
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.web.encode import encode_event, encode_json
from hypervisor.observability.web.stream import Broadcaster
from hypervisor.observability.web.views import FleetView


def saga_events(saga: str, steps: int) -> list[HypervisorEvent]:
    events = [HypervisorEvent(event_type=EventType.SAGA_CREATED, payload={"saga_id": saga})]
    for i in range(steps):
        step = {"saga_id": saga, "step_id": f"s{i}", "step_action": "work"}
        events.append(HypervisorEvent(event_type=EventType.SAGA_STEP_STARTED, payload=step))
        events.append(HypervisorEvent(event_type=EventType.SAGA_STEP_COMMITTED, payload=step))
    return events


def test_agents_sagas_and_traces_are_bounded_and_evictions_counted() -> None:
    """Past each cap the least recently active entries are forgotten (the ring state too) and
    counted; spans per saga and nodes per tree are capped."""
    view = FleetView(max_agents=10, max_sagas=3, max_spans_per_saga=4, max_traces=2, max_nodes=5)
    for i in range(50):
        view.apply(
            HypervisorEvent(
                event_type=EventType.RING_ASSIGNED,
                agent_did=f"did:mesh:a{i}",
                causal_trace_id=f"t{i // 13}/s{i}",
                payload={"ring": 2},
            )
        )
    assert view.agent_count <= 11
    assert view.evicted_agents == 50 - view.agent_count
    assert len(view.ring.current_rings) == view.agent_count
    assert "did:mesh:a49" in view.ring.current_rings
    assert view.trace_count == 2
    assert view.evicted_traces == 2
    assert view.trace("t1") is None
    tree = view.trace("t3")  # events 39 to 49: 11 spans
    assert tree is not None
    assert len(tree.nodes) == 5
    assert tree.dropped_nodes == 11 - 5
    for n in range(5):
        for event in saga_events(f"saga-{n}", 6):
            view.apply(event)
    assert view.saga_count == 3
    assert view.evicted_sagas == 2
    entry = view.saga("saga-4")
    assert entry is not None
    assert len(entry.spans) == 4
    assert entry.dropped_spans == 2


def test_hostile_causal_ids_and_cycles_do_not_break_the_tree() -> None:
    """Causal ids that do not parse are counted and skipped; parent links forming a cycle
    still list every span once."""
    view = FleetView()
    for causal in ("not a trace id", "x" * 500, "a/b/c/d", "t/x/y", "t/y/x"):
        view.apply(HypervisorEvent(agent_did="did:mesh:h", causal_trace_id=causal))
    assert view.bad_trace_ids == 3
    tree = view.trace("t")
    assert tree is not None
    nodes = view.tree_nodes(tree)
    assert sorted(n["span_id"] for n in nodes) == ["x", "y"]


@pytest.mark.anyio
async def test_a_slow_stream_client_is_reset_with_the_count_of_events_it_lost() -> None:
    """A client whose queue is full loses the queued messages (counted) and gets one reset
    message, then the live messages again."""
    async with RedisEventBus.in_memory(max_events=1000) as bus:
        broadcaster = Broadcaster(bus, "0000abcd", max_client_messages=2)
        messages = broadcaster.connect(None)
        assert (await anext(messages)).startswith(b"retry:")
        for round_no in range(4):
            await bus.emit_many([HypervisorEvent(payload={"r": round_no}) for _ in range(3)])
            await bus.sync()
            broadcaster.broadcast()
        # Rounds 0 and 1 queued, round 2 overflows (all three lost), round 3 waits for the reset.
        assert broadcaster.dropped_events == 12
        reset = await anext(messages)
        assert b"event: reset" in reset
        data = json.loads(reset.split(b"data: ", 1)[1])
        assert data["dropped"] == broadcaster.dropped_events
        await bus.emit_many([HypervisorEvent(payload={"r": "after"})])
        await bus.sync()
        broadcaster.broadcast()
        live = await anext(messages)
        assert b"event: events" in live
        assert json.loads(live.split(b"data: ", 1)[1])[0]["payload"] == {"r": "after"}
        await messages.aclose()
        assert not broadcaster.clients


@settings(max_examples=300, deadline=None)
@given(
    event_id=st.text(max_size=30),
    stamp=st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=2))])),
    session=st.none() | st.text(max_size=10),
    payload=st.dictionaries(
        st.text(max_size=8), st.none() | st.integers() | st.text(max_size=20) | st.floats()
    ),
)
def test_encoded_event_is_exactly_its_to_dict(
    event_id: str, stamp: datetime, session: str | None, payload: dict[str, object]
) -> None:
    """The fast encoding of an event gives the very JSON of its ``to_dict()``, whatever its
    strings hold (quotes, 'Z' and key names included)."""
    event = HypervisorEvent(
        event_id=event_id + 'Z","session_id":',
        timestamp=stamp,
        session_id=session,
        agent_did='x"Z","session_id":',
        payload=payload,
    )
    assert json.loads(encode_event(event)) == json.loads(encode_json(event.to_dict()))
    assert encode_event(event) == encode_json(event.to_dict())
