"""Bounded ring metrics (what the workers run): label admission and agent retirement decided
while folding, in stream order; a bounded state is small, a pure function of the event
sequence, survives the snapshot round trip, and exports the same text whatever was scraped."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from hypothesis import given, settings, strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from hypervisor.observability._backends.memory_log import MemoryStreamLog
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import (
    OVERFLOW_LABEL,
    RING_EVENTS,
    RING_TRANSITION_EVENTS,
    RingBounds,
    RingMetricsState,
)
from hypervisor.observability.errors import WorkerStateError
from hypervisor.observability.exporters.prometheus import (
    RingMetricsPrometheusCollector,
    render_ring_metrics,
)
from hypervisor.observability.workers import (
    Applier,
    Commit,
    MemoryStateStore,
    RingMetricsDerivation,
)
from hypervisor.observability.workers._http import SnapshotView
from hypervisor.observability.workers._snapshot import dump_state, load_state
from workers_support import random_events, reference

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OVER = OVERFLOW_LABEL
_TRANSITIONS = sorted(RING_TRANSITION_EVENTS, key=lambda member: member.value)


def ev(
    event_type: EventType,
    at: float,
    agent: str | None,
    session: str | None = "s1",
    **payload: Any,
) -> HypervisorEvent:
    """A ring event ``at`` seconds after T0."""
    return HypervisorEvent(
        event_type=event_type,
        timestamp=T0 + timedelta(seconds=at),
        agent_did=agent,
        session_id=session,
        payload=payload,
    )


def fold(events: list[HypervisorEvent], bounds: RingBounds | None) -> RingMetricsState:
    state = RingMetricsState(bounds)
    for event in events:
        state.apply(event)
    return state


def everything(state: RingMetricsState) -> dict[str, Any]:
    """Every slot of the state, ordered containers as lists (order is part of the state)."""
    slots = {name: getattr(state, name) for name in RingMetricsState.__slots__}
    slots["_agents"] = list(slots["_agents"].items())
    return slots


def exposition(state: RingMetricsState) -> bytes:
    registry = CollectorRegistry()
    registry.register(RingMetricsPrometheusCollector(state))
    return generate_latest(registry)


_ring_values = st.one_of(st.none(), st.integers(0, 3), st.just("high"))


@st.composite
def floods(draw: st.DrawFn, agents: int = 12, sessions: int = 5) -> list[HypervisorEvent]:
    """Ring streams over many agents and sessions; time mostly moves on, sometimes back, and
    may jump (an idle stretch)."""
    n = draw(st.integers(0, 80))
    events = []
    at = 0.0
    for _ in range(n):
        at += draw(st.sampled_from([0.0, 1.0, 3.0, 40.0, -2.0]))
        event_type = draw(st.sampled_from([*_TRANSITIONS, EventType.RING_BREACH_DETECTED]))
        payload: dict[str, Any] = {}
        for key in ("to_ring", "ring", "from_ring"):
            if draw(st.booleans()):
                payload[key] = draw(_ring_values)
        agent = draw(st.one_of(st.none(), st.sampled_from([f"a{i}" for i in range(agents)])))
        session = draw(st.one_of(st.none(), st.sampled_from([f"s{i}" for i in range(sessions)])))
        events.append(ev(event_type, at, agent, session, **payload))
    return events


_SMALL = RingBounds(
    max_agents=3, max_sessions=2, max_tracked_agents=5, agent_idle_s=30.0, clock_window=1
)


class Model:
    """The bounded-mode label and retirement rules, written plainly for comparison (clock
    window 1: the clock is the newest timestamp)."""

    def __init__(self, bounds: RingBounds) -> None:
        self.bounds = bounds
        self.tracked: list[tuple[str, float]] = []  # least recently active first
        self.admitted: dict[str, set[str]] = {}
        self.clock = float("-inf")
        self.counts: Counter[tuple[str, ...]] = Counter()
        self.retired = {"idle": 0, "capacity": 0}

    def retire(self, agent: str) -> None:
        if self.admitted.pop(agent, None) is None:
            return  # a folded agent's counts stay in the overflow series
        for key in list(self.counts):
            if (key[0] if len(key) == 2 else key[1]) == agent:
                del self.counts[key]

    def sessions(self) -> set[str]:
        return {s for sessions in self.admitted.values() for s in sessions if s != OVER}

    def apply(self, event: HypervisorEvent) -> None:
        stamp = event.timestamp.timestamp()
        if stamp > self.clock:
            self.clock = stamp
            while self.tracked and self.tracked[0][1] < self.clock - self.bounds.agent_idle_s:
                self.retire(self.tracked.pop(0)[0])
                self.retired["idle"] += 1
        if event.event_type is not EventType.RING_BREACH_DETECTED and any(
            value == "high" for value in event.payload.values()
        ):
            return  # a bad event changes no label state
        agent, session = event.agent_did or "unknown", event.session_id or "unknown"
        names = [name for name, _ in self.tracked]
        if agent in names:
            del self.tracked[names.index(agent)]
        else:
            while len(self.tracked) >= self.bounds.max_tracked_agents:
                self.retire(self.tracked.pop(0)[0])
                self.retired["capacity"] += 1
            if len(self.admitted) < self.bounds.max_agents:
                self.admitted[agent] = set()
        self.tracked.append((agent, self.clock))
        if agent in self.admitted:
            mine = self.admitted[agent]
            admitted = self.sessions()
            if session in mine | admitted or len(admitted) < self.bounds.max_sessions:
                label = session
            else:
                label = OVER
            mine.add(label)
            labels: tuple[str, str] = (agent, label)
        else:
            labels = (OVER, OVER)
        if event.event_type is EventType.RING_BREACH_DETECTED:
            self.counts[labels] += 1
        else:
            self.counts[(event.event_type.value, *labels)] += 1


@settings(max_examples=100, deadline=None)
@given(floods())
def test_bounded_state_follows_the_admission_and_retirement_rules(
    events: list[HypervisorEvent],
) -> None:
    """Over random floods with small limits, the counters, the admitted agents, the tracked
    agents (in order) and the retirement counts equal a plain model of the rules, and every
    container stays within its limit after every event."""
    state = RingMetricsState(_SMALL)
    model = Model(_SMALL)
    for event in events:
        state.apply(event)
        model.apply(event)
        assert state.tracked_agents <= 5
        assert len(state.admitted_agents) <= 3
        assert state.admitted_sessions <= 2
        tracked = set(state._agents)
        for table in (state.current_rings, state.elevation_durations, state.elevation_starts):
            assert set(table) <= tracked
    counts: dict[tuple[str, ...], int] = {k: v for k, v in state.transitions.items()}
    counts.update({k: v for k, v in state.breaches.items()})
    assert counts == dict(model.counts)
    assert [agent for agent, _ in model.tracked] == list(state._agents)
    assert set(state.admitted_agents) == set(model.admitted)
    assert state.retired_idle == model.retired["idle"]
    assert state.retired_capacity == model.retired["capacity"]


@settings(max_examples=60, deadline=None)
@given(floods(agents=4, sessions=3))
def test_bounded_state_within_its_limits_equals_the_published_fold(
    events: list[HypervisorEvent],
) -> None:
    """While no limit is reached (few agents and sessions, nobody idle for a day), the bounded
    state holds exactly what the published, unbounded fold holds."""
    bounded = fold(events, RingBounds())
    published = fold(events, None)
    assert bounded.snapshot() == published.snapshot()
    assert bounded.open_elevations() == published.open_elevations()
    assert bounded.bad_events == published.bad_events
    assert bounded.retired_idle == bounded.retired_capacity == 0


@settings(max_examples=60, deadline=None)
@given(floods(), st.integers(0, 80), st.sampled_from([1, 4, 8]))
def test_bounded_state_is_a_function_of_the_sequence_and_survives_snapshots(
    events: list[HypervisorEvent], cut: int, window: int
) -> None:
    """The same events give the same state, slot for slot (order included), and the same
    exposition; a state snapshotted part-way with the workers' dump/load, restored through the
    ring derivation and fed the rest ends up identical."""
    bounds = RingBounds(
        max_agents=3, max_sessions=2, max_tracked_agents=5, agent_idle_s=20.0, clock_window=window
    )
    whole = fold(events, bounds)
    assert everything(fold(events, bounds)) == everything(whole)
    derivation = RingMetricsDerivation(MemoryStateStore(), bounds=bounds)
    part = fold(events[:cut], bounds)
    resumed = derivation.restored(load_state(dump_state(part)))
    for event in events[cut:]:
        derivation.apply(resumed, event)
    assert everything(resumed) == everything(whole)
    assert exposition(resumed) == exposition(whole)


def test_flood_of_agents_keeps_every_container_bounded() -> None:
    """Twenty thousand distinct agents, each in its own session: the state keeps at most
    max_tracked_agents agents, max_agents admitted, max_sessions sessions, and a fixed number of
    counter keys; the overflow counters hold every folded event."""
    bounds = RingBounds(max_agents=10, max_sessions=4, max_tracked_agents=100, agent_idle_s=0.0)
    state = RingMetricsState(bounds)
    for i in range(20_000):
        state.apply(ev(EventType.RING_ELEVATED, i, f"a{i}", f"s{i}", from_ring=3, to_ring=2))
        state.apply(ev(EventType.RING_BREACH_DETECTED, i, f"a{i}", f"s{i}"))
    assert state.tracked_agents == 100
    assert len(state.current_rings) == len(state.elevation_starts) == 100
    assert len(state.admitted_agents) <= 10
    assert state.admitted_sessions <= 4
    # Admitted agents have series in their admitted sessions; everyone else is folded.
    assert len(state.transitions) <= 10 + 1
    assert len(state.breaches) <= 10 + 1
    assert state.transitions[("ring.elevated", OVER, OVER)] == state.folded_agent_events // 2
    assert state.retired_capacity == 20_000 - 100
    assert sum(state.transitions.values()) + state.retired_capacity >= 19_900


def test_admission_is_first_come_in_stream_order_and_released_on_retirement() -> None:
    """The first max_agents agents in stream order get series; a later one is counted under
    __overflow__ (agent and session) and stays folded while it is tracked; when an admitted
    agent is retired its slot goes to the next new agent, and the folded agent's events keep
    counting under __overflow__ (the overflow counters never go down)."""
    bounds = RingBounds(max_agents=2, max_sessions=10, max_tracked_agents=3, agent_idle_s=0.0)
    state = RingMetricsState(bounds)
    for agent in ("a", "b", "c"):
        state.apply(ev(EventType.RING_ASSIGNED, 0, agent, ring=3))
    assert set(state.admitted_agents) == {"a", "b"}
    assert state.transitions == {
        ("ring.assigned", "a", "s1"): 1,
        ("ring.assigned", "b", "s1"): 1,
        ("ring.assigned", OVER, OVER): 1,
    }
    state.apply(ev(EventType.RING_ASSIGNED, 1, "d", ring=2))  # retires "a" (least recent)
    assert state.retired_capacity == 1
    assert set(state.admitted_agents) == {"b", "d"}
    assert ("ring.assigned", "a", "s1") not in state.transitions
    assert "a" not in state.current_rings
    state.apply(ev(EventType.RING_ASSIGNED, 2, "c", ring=1))  # "c" stays folded
    assert state.transitions[("ring.assigned", OVER, OVER)] == 2
    assert state.current_rings["c"] == 1
    state.apply(ev(EventType.RING_ASSIGNED, 3, "a", ring=0))  # "a" returns: retires "b"
    assert set(state.admitted_agents) == {"d", "a"}
    assert state.transitions[("ring.assigned", "a", "s1")] == 1  # restarted from zero
    assert state.folded_agent_events == 2


def test_sessions_beyond_the_limit_fold_and_are_released_with_their_agents() -> None:
    """An admitted agent's events in sessions without series of their own count under
    session_id="__overflow__"; a session is released when no admitted agent has series in it
    any more, and then the next new session takes its place."""
    bounds = RingBounds(max_agents=5, max_sessions=2, max_tracked_agents=2, agent_idle_s=0.0)
    state = RingMetricsState(bounds)
    state.apply(ev(EventType.RING_BREACH_DETECTED, 0, "a", "s1"))
    state.apply(ev(EventType.RING_BREACH_DETECTED, 0, "a", "s2"))
    state.apply(ev(EventType.RING_BREACH_DETECTED, 0, "a", "s3"))
    state.apply(ev(EventType.RING_BREACH_DETECTED, 0, "b", "s3"))
    assert state.breaches == {("a", "s1"): 1, ("a", "s2"): 1, ("a", OVER): 1, ("b", OVER): 1}
    assert state.folded_session_events == 2
    state.apply(ev(EventType.RING_BREACH_DETECTED, 1, "c", "s3"))  # retires "a"
    assert state.admitted_sessions == 1
    assert state.breaches == {("b", OVER): 1, ("c", "s3"): 1}


def test_idle_agents_are_retired_in_event_time() -> None:
    """An agent whose last ring event is more than agent_idle_s behind the clock is retired:
    its counters, ring and elevation disappear, and when it returns it starts afresh."""
    bounds = RingBounds(agent_idle_s=60.0, clock_window=1)
    state = RingMetricsState(bounds)
    state.apply(ev(EventType.RING_ELEVATED, 0, "old", from_ring=3, to_ring=1))
    state.apply(ev(EventType.RING_BREACH_DETECTED, 0, "old"))
    state.apply(ev(EventType.RING_ASSIGNED, 30, "busy", ring=2))
    state.apply(ev(EventType.RING_ASSIGNED, 61, "busy", ring=2))
    assert state.retired_idle == 1
    assert "old" not in state.current_rings
    assert "old" not in state.elevation_starts
    assert all("old" not in key for key in [*state.transitions, *state.breaches])
    assert state.current_rings == {"busy": 2}
    state.apply(ev(EventType.RING_BREACH_DETECTED, 62, "old"))
    assert state.breaches[("old", "s1")] == 1


def test_one_far_future_event_cannot_retire_every_agent() -> None:
    """With the default clock window (the median of recent timestamps), one event stamped in
    year 9999 moves the clock nowhere: no agent is retired; a majority of such events would be
    needed. With a window of 1 (the newest timestamp) the same event retires all the others."""
    events = [ev(EventType.RING_ASSIGNED, i, f"a{i % 50}", None, ring=2) for i in range(3000)]
    future = HypervisorEvent(
        event_type=EventType.RING_ASSIGNED,
        timestamp=datetime(9999, 12, 31, tzinfo=UTC),
        agent_did="attacker",
        payload={"ring": 0},
    )
    events.insert(2000, future)
    robust = fold(events, RingBounds(agent_idle_s=600.0))
    assert all(f"a{i}" in robust.current_rings for i in range(50))
    assert robust.transitions[("ring.assigned", "a0", "unknown")] == 60
    assert robust.retired_idle <= 1  # the attacker itself, silent since
    naive = fold(events, RingBounds(agent_idle_s=600.0, clock_window=1))
    assert naive.retired_idle == 50
    assert naive.transitions[("ring.assigned", "a0", "unknown")] == 20


def test_the_clock_follows_time_and_retires_with_the_default_window() -> None:
    """With the default window the clock starts once 1024 ring events were seen and follows
    their median timestamp: agents silent for longer than agent_idle_s are retired."""
    events = [ev(EventType.RING_ASSIGNED, 0, "early", ring=3)]
    events += [ev(EventType.RING_ASSIGNED, i, f"a{i % 7}", ring=2) for i in range(5000)]
    state = fold(events, RingBounds(agent_idle_s=1000.0))
    assert state.retired_idle == 1
    assert "early" not in state.current_rings
    assert state.tracked_agents == 7


def test_bounded_exposition_folds_gauges_and_counts_retirements() -> None:
    """The exported bounded state: counters as folded; the overflow ring gauge is the lowest
    ring among folded agents and the overflow elevation the longest per-agent value (an open
    elevation replacing the agent's last finished one); folded events and retirements are
    counted; a retired agent has no series left."""
    bounds = RingBounds(max_agents=1, max_tracked_agents=3, agent_idle_s=0.0, clock_window=1)
    state = RingMetricsState(bounds)
    state.apply(ev(EventType.RING_ASSIGNED, 0, "z", ring=3))
    state.apply(ev(EventType.RING_ELEVATED, 1, "e", from_ring=3, to_ring=2))
    state.apply(ev(EventType.RING_ELEVATED, 10, "b", from_ring=3, to_ring=2))
    state.apply(ev(EventType.RING_DEMOTED, 30, "b"))  # b: ring 3, finished 20 s
    state.apply(ev(EventType.RING_DEMOTED, 41, "e"))  # e: finished 40 s ...
    state.apply(ev(EventType.RING_ELEVATED, 45, "e", from_ring=3, to_ring=1))  # ... now open
    state.apply(ev(EventType.RING_ASSIGNED, 50, "d", ring=3))  # retires "z", takes its slot
    lines = [line for line in exposition(state).decode().splitlines() if line[0] != "#"]
    assert 'agent_hypervisor_ring_current{agent_did="__overflow__"} 1.0' in lines
    assert 'agent_hypervisor_ring_current{agent_did="d"} 3.0' in lines
    elevation = "agent_hypervisor_ring_elevation_duration_seconds"
    assert f'{elevation}{{agent_did="__overflow__"}} 20.0' in lines
    assert 'agent_hypervisor_label_overflow_total{label="agent_did"} 5.0' in lines
    assert 'agent_hypervisor_ring_agents_retired_total{reason="capacity"} 1.0' in lines
    assert "agent_hypervisor_ring_agents_tracked 3.0" in lines
    assert not any('"z"' in line for line in lines)


def test_restored_state_takes_the_derivations_bounds() -> None:
    """A snapshot restored by a ring derivation with a lower max_tracked_agents retires the
    least recently active agents at once; an unbounded snapshot is refused with a clear
    error."""
    state = fold(
        [ev(EventType.RING_ASSIGNED, i, f"a{i}", ring=2) for i in range(10)],
        RingBounds(agent_idle_s=0.0),
    )
    smaller = RingBounds(max_tracked_agents=4, agent_idle_s=0.0)
    restored = RingMetricsDerivation(MemoryStateStore(), bounds=smaller).restored(
        load_state(dump_state(state))
    )
    assert restored.bounds == smaller
    assert list(restored._agents) == ["a6", "a7", "a8", "a9"]
    assert restored.retired_capacity == 6
    with pytest.raises(WorkerStateError, match="--reset-state"):
        RingMetricsDerivation(MemoryStateStore()).restored(load_state(dump_state(fold([], None))))


def test_bounds_are_validated() -> None:
    """Limits below 1, a negative or infinite idle time and an empty clock window are
    refused."""
    for bad in (
        {"max_agents": 0},
        {"max_sessions": 0},
        {"max_tracked_agents": 0},
        {"agent_idle_s": -1.0},
        {"agent_idle_s": float("inf")},
        {"agent_idle_s": float("nan")},
        {"clock_window": 0},
    ):
        with pytest.raises(ValueError, match="must be"):
            RingBounds(**bad)
    with pytest.raises(ValueError, match="bounded state"):
        RingMetricsState().set_bounds(RingBounds())


class GatedCommitStore(MemoryStateStore):
    """A memory store whose commits wait for ``gate`` while it is set up (a commit in flight)."""

    def __init__(self) -> None:
        super().__init__("gated")
        self.gate: anyio.Event | None = None
        self.entered = anyio.Event()

    async def commit(self, commit: Commit) -> bool:
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        return await super().commit(commit)


@pytest.mark.anyio
async def test_the_leaders_view_shares_the_appliers_state_only_while_it_is_committed() -> None:
    """A /metrics view of the worker whose applier holds the lease uses the applier's state (no
    copy, nothing to fold); while a round's commit is in flight it builds its own copy of the
    committed state instead (never showing uncommitted records); once another applier has the
    lease, the old one drops its state and the view keeps its own, equal to the reference."""
    events = [e for e in random_events(random.Random(5), 400) if e.event_type in RING_EVENTS]
    events = events[:60]
    store = GatedCommitStore()
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    applier = Applier(log, "g", RingMetricsDerivation(store), checkpoint_interval_s=3600)
    view = SnapshotView(applier.derivation, applier)

    async def feed(part: list[HypervisorEvent]) -> None:
        await log.append_many([encode_event(e) for e in part])
        batch = await log.read_group("g", "c", len(part))
        await store.stage([(e.id, e.data) for e in batch if e.data is not None])
        await log.ack("g", [e.id for e in batch])

    await feed(events[:20])
    assert await applier.round() == 20
    await view.refresh()
    assert view.state is applier.state
    assert view.meta == await store.meta()
    assert view.rebuilds == 0

    await feed(events[20:40])
    store.gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(applier.round)
        await store.entered.wait()
        await view.refresh()
        assert view.state is not applier.state
        assert view.state.snapshot() == reference(events[:20]).ring
        store.gate.set()
    store.gate = None
    await view.refresh()
    assert view.state is applier.state
    assert view.state.snapshot() == reference(events[:40]).ring

    await store.release_lease(applier.token)
    other = Applier(log, "g", RingMetricsDerivation(store), token="other")
    await feed(events[40:])
    assert await other.round() == 20
    assert await applier.round() == 0
    assert applier.state is None
    await view.refresh()
    assert view.state is not other.state
    assert view.state.snapshot() == reference(events).ring


_ODD_NAMES = ["a", 'q"uote', "back\\slash", "new\nline", "é-ü", "__overflow__", "s1", ""]


@st.composite
def odd_floods(draw: st.DrawFn) -> list[HypervisorEvent]:
    """Ring streams whose labels need escaping and whose times make long elevations."""
    events = []
    at = 0.0
    for _ in range(draw(st.integers(0, 40))):
        at += draw(st.sampled_from([0.5, 3.0, 9_999_999.5]))
        event_type = draw(st.sampled_from([*_TRANSITIONS, EventType.RING_BREACH_DETECTED]))
        payload = {"to_ring": draw(st.integers(0, 3))} if draw(st.booleans()) else {}
        agent = draw(st.sampled_from(_ODD_NAMES))
        events.append(ev(event_type, at, agent, draw(st.sampled_from(_ODD_NAMES)), **payload))
    return events


@settings(max_examples=60, deadline=None)
@given(odd_floods(), st.integers(1, 4))
def test_rendered_text_equals_prometheus_clients(
    events: list[HypervisorEvent], max_agents: int
) -> None:
    """The worker's direct rendering of a bounded state is byte for byte what prometheus_client
    writes for the scrape-time collector, escaping and float formatting included."""
    bounds = RingBounds(max_agents=max_agents, max_sessions=2, max_tracked_agents=5)
    state = fold(events, bounds)
    assert render_ring_metrics(state) == exposition(state)


@pytest.mark.anyio
async def test_concurrent_view_refreshes_fold_each_record_once() -> None:
    """A scrape and a health check refreshing the same view at once fold the new records once
    (refreshes are serialised); the view equals the reference."""
    events = [e for e in random_events(random.Random(8), 400) if e.event_type in RING_EVENTS]
    store = MemoryStateStore()
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    applier = Applier(log, "g", RingMetricsDerivation(store), checkpoint_interval_s=3600)
    view = SnapshotView(RingMetricsDerivation(store))
    for start in (0, 30):
        part = events[start : start + 30]
        await log.append_many([encode_event(e) for e in part])
        batch = await log.read_group("g", "c", len(part))
        await store.stage([(e.id, e.data) for e in batch if e.data is not None])
        await log.ack("g", [e.id for e in batch])
        assert await applier.round() == len(part)
        async with anyio.create_task_group() as tg:
            tg.start_soon(view.refresh)
            tg.start_soon(view.refresh)
        assert view.state.snapshot() == reference(events[: start + 30]).ring
    assert view.rebuilds == 1
