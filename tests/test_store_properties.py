"""EventStore index invariants against a naive model (hypothesis, stateful and property based).

The model is the list of every appended event; the store must answer every query exactly as a
linear scan over the model's last ``max_events`` events would.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.store import EventStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TYPES = [
    EventType.RING_ASSIGNED,
    EventType.RING_ELEVATED,
    EventType.SAGA_CREATED,
    EventType.VFS_WRITE,
]
SESSION_KEYS = ["s0", "s1", "s2"]
AGENT_KEYS = ["a0", "a1", "a2", "a3"]
SESSIONS: list[str | None] = [None, *SESSION_KEYS]
AGENTS: list[str | None] = [None, *AGENT_KEYS]

# Mostly increasing timestamps with frequent steps back, so late events are common.
offsets = st.integers(min_value=-30, max_value=60)
events = st.builds(
    lambda t, s, a, off: HypervisorEvent(
        event_type=t, session_id=s, agent_did=a, timestamp=T0 + timedelta(seconds=off)
    ),
    st.sampled_from(TYPES),
    st.sampled_from(SESSIONS),
    st.sampled_from(AGENTS),
    offsets,
)
# 0 and negative limits read as the published ``matches[-limit:]`` (all; all but the oldest n).
limits = st.none() | st.integers(min_value=-14, max_value=12)


def model_query(
    kept: list[HypervisorEvent],
    event_type: EventType | None,
    session_id: str | None,
    agent_did: str | None,
    limit: int | None,
) -> list[HypervisorEvent]:
    found = [
        e
        for e in kept
        if (event_type is None or e.event_type == event_type)
        and (session_id is None or e.session_id == session_id)
        and (agent_did is None or e.agent_did == agent_did)
    ]
    return found if limit is None else found[-limit:]


class StoreMachine(RuleBasedStateMachine):
    """Random appends, extends and clears; every query checked against the model."""

    def __init__(self) -> None:
        super().__init__()
        self.store = EventStore(None)
        self.model: list[HypervisorEvent] = []
        self.cap: int | None = None
        self.clock = 0

    @initialize(cap=st.none() | st.integers(min_value=1, max_value=9))
    def make_store(self, cap: int | None) -> None:
        self.cap = cap
        self.store = EventStore(cap)

    @property
    def kept(self) -> list[HypervisorEvent]:
        return self.model if self.cap is None else self.model[-self.cap :]

    @rule(event=events)
    def append(self, event: HypervisorEvent) -> None:
        self.store.append(event)
        self.model.append(event)

    @rule(batch=st.lists(events, max_size=12))
    def extend(self, batch: list[HypervisorEvent]) -> None:
        self.store.extend(batch)
        self.model.extend(batch)

    @rule(batch=st.lists(events, max_size=12))
    def extend_own(self, batch: list[HypervisorEvent]) -> None:
        """Events the store owns (as the Redis bus's reader's): their posting lists are arrays
        and their session and agent strings become the index's objects, equal to theirs."""
        copies = [
            msgspec.structs.replace(
                e,
                session_id=None if e.session_id is None else "".join(list(e.session_id)),
                agent_did=None if e.agent_did is None else "".join(list(e.agent_did)),
            )
            for e in batch
        ]
        self.store.extend(copies, own_events=True)
        assert copies == batch
        self.model.extend(copies)

    @rule(
        batch=st.lists(events, max_size=8),
        bad_at=st.integers(min_value=0, max_value=8),
        base=events,
        field=st.sampled_from(["event_type", "session_id", "agent_did"]),
    )
    def extend_with_an_unindexable_event(
        self, batch: list[HypervisorEvent], bad_at: int, base: HypervisorEvent, field: str
    ) -> None:
        """An event with an unhashable key (its other keys valid) is rejected and changes
        nothing: with on_rejected the rest of the batch is stored; without, the error is raised
        after what preceded it was stored."""
        bad = msgspec.structs.replace(base, **{field: ["unhashable"]})
        at = min(bad_at, len(batch))
        mixed = [*batch[:at], bad, *batch[at:]]
        rejected: list[HypervisorEvent] = []
        self.store.extend(mixed, lambda event, exc: rejected.append(event))
        assert rejected == [bad]
        self.model.extend(batch)
        with pytest.raises(TypeError):
            self.store.extend(mixed)
        self.model.extend(batch[:at])

    @rule(step=st.integers(min_value=0, max_value=5), n=st.integers(min_value=1, max_value=30))
    def append_in_order(self, step: int, n: int) -> None:
        """A run of in-order events (the common case) that pushes late ones out of the ring."""
        for _ in range(n):
            self.clock += step
            event = HypervisorEvent(
                event_type=TYPES[self.clock % len(TYPES)],
                session_id=SESSIONS[self.clock % len(SESSIONS)],
                agent_did=AGENTS[self.clock % len(AGENTS)],
                timestamp=T0 + timedelta(seconds=self.clock),
            )
            self.store.append(event)
            self.model.append(event)

    @rule(naive_offset=offsets)
    def append_naive(self, naive_offset: int) -> None:
        """A naive timestamp is stored and read as UTC by time-range queries."""
        event = HypervisorEvent(
            session_id="s0", timestamp=(T0 + timedelta(seconds=naive_offset)).replace(tzinfo=None)
        )
        self.store.append(event)
        self.model.append(event)

    @rule()
    def clear(self) -> None:
        self.store.clear()
        self.model.clear()

    @rule(
        event_type=st.none() | st.sampled_from(TYPES),
        session_id=st.sampled_from(SESSIONS),
        agent_did=st.sampled_from(AGENTS),
        limit=limits,
    )
    def query(
        self,
        event_type: EventType | None,
        session_id: str | None,
        agent_did: str | None,
        limit: int | None,
    ) -> None:
        expected = model_query(self.kept, event_type, session_id, agent_did, limit)
        assert self.store.query(event_type, session_id, agent_did, limit) == expected

    @rule(lo=offsets, width=st.integers(min_value=0, max_value=40))
    def time_range(self, lo: int, width: int) -> None:
        start = T0 + timedelta(seconds=lo)
        end = start + timedelta(seconds=width)

        def aware(ts: datetime) -> datetime:
            return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)

        expected = [e for e in self.kept if start <= aware(e.timestamp) <= end]
        assert self.store.time_range(start, end) == expected

    @invariant()
    def indexes_agree_with_model(self) -> None:
        kept = self.kept
        assert len(self.store) == len(kept)
        assert self.store.all() == kept
        for event_type in TYPES:
            assert self.store.by_type(event_type) == [e for e in kept if e.event_type == event_type]
        for session in SESSION_KEYS:
            assert self.store.by_session(session) == [e for e in kept if e.session_id == session]
        for agent in AGENT_KEYS:
            assert self.store.by_agent(agent) == [e for e in kept if e.agent_did == agent]
        counts: dict[str, int] = {}
        for e in kept:
            counts[e.event_type.value] = counts.get(e.event_type.value, 0) + 1
        assert self.store.type_counts() == counts


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


@settings(max_examples=150, deadline=None)
@given(cap=st.integers(min_value=1, max_value=40), batch=st.lists(events, max_size=120))
def test_query_equals_model_after_any_appends(cap: int, batch: list[HypervisorEvent]) -> None:
    """After any appends into a small ring, every query() equals a scan of the last cap events."""
    store = EventStore(cap)
    store.extend(batch)
    kept = batch[-cap:]
    for event_type in [None, *TYPES]:
        for session_id in SESSIONS:
            for agent_did in AGENTS:
                for limit in (None, 0, -2, 1, 2, 3, 5):
                    expected = model_query(kept, event_type, session_id, agent_did, limit)
                    got = store.query(event_type, session_id, agent_did, limit)
                    assert got == expected, (event_type, session_id, agent_did, limit)
    assert store.evicted == max(0, len(batch) - cap)


@settings(max_examples=200, deadline=None)
@given(
    batch=st.lists(events, max_size=150),
    cap=st.integers(min_value=1, max_value=60),
    bounds=st.lists(offsets, min_size=2, max_size=2),
)
def test_time_range_equals_model_with_out_of_order_timestamps(
    batch: list[HypervisorEvent], cap: int, bounds: list[int]
) -> None:
    """time_range() is exact and in emit order whatever the timestamp disorder."""
    store = EventStore(cap)
    store.extend(batch)
    start, end = (T0 + timedelta(seconds=b) for b in sorted(bounds))
    assert store.time_range(start, end) == [e for e in batch[-cap:] if start <= e.timestamp <= end]


@pytest.mark.parametrize("limit", ["3", True, 2.0])
def test_store_rejects_bad_limits(limit: object) -> None:
    """The store itself refuses a limit that is not an int (a bool included), for every filter
    combination."""
    store = EventStore(4)
    for kwargs in ({}, {"session_id": "s0"}, {"event_type": EventType.VFS_WRITE, "agent_did": "a"}):
        with pytest.raises(TypeError, match="limit"):
            store.query(limit=limit, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("cap", [None, 700, 97])
def test_combined_query_type_codes_stay_exact(cap: int | None) -> None:
    """The type-code prefilter agrees with a scan: many chunks, plain-str types, 300 ad-hoc types.

    The agent's list is walked (the shortest), so the type is checked through the per-slot code
    ring; past 255 distinct types new types get no code and are checked on the event. Slots are
    reused by eviction with events of other types.
    """
    store = EventStore(cap)
    rng = random.Random(5)
    batch: list[HypervisorEvent] = []
    customs = 0
    for i in range(3000):
        roll = rng.random()
        if roll < 0.2:
            customs += 1
            kind: object = f"custom.type-{customs % 300}"  # past the 255 codes
        elif roll < 0.15:
            kind = rng.choice(TYPES).value  # a plain string equal to a member
        else:
            kind = rng.choice(TYPES)
        batch.append(
            HypervisorEvent(
                event_type=kind,  # type: ignore[arg-type]
                session_id=rng.choice(SESSION_KEYS),
                # a0 is the busy agent; the others' lists are shorter than any type's.
                agent_did=rng.choice(AGENT_KEYS[1:]) if rng.random() < 0.3 else "a0",
                timestamp=T0 + timedelta(seconds=i),
            )
        )
    store.extend(batch)
    kept = batch if cap is None else batch[-cap:]
    probe_types: list[object] = [*TYPES, "custom.type-1", "custom.type-299", TYPES[0].value]
    for event_type in probe_types:
        for session_id in SESSION_KEYS:
            for agent_did in AGENT_KEYS:
                for limit in (None, 1, 10, 400):
                    expected = model_query(kept, event_type, session_id, agent_did, limit)  # type: ignore[arg-type]
                    got = store.query(event_type, session_id, agent_did, limit)  # type: ignore[arg-type]
                    assert got == expected, (event_type, session_id, agent_did, limit)
