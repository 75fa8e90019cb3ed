"""Cursor pages and position reads of the EventStore, against a naive model (hypothesis).

``page()`` must return exactly what a linear scan over the stored events gives (filters, time
range inclusive at both ends, the newest ``limit`` below the cursor, oldest first), and paging
backwards must visit every still-stored match exactly once while events are appended and
evicted between the pages.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings, strategies as st

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.store import EventStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TYPES = [EventType.RING_ASSIGNED, EventType.RING_ELEVATED, EventType.SAGA_CREATED]
SESSIONS: list[str | None] = [None, "s0", "s1"]
AGENTS: list[str | None] = [None, "a0", "a1", "a2"]

# Mostly increasing timestamps with frequent steps back, so late events are common.
events = st.builds(
    lambda t, s, a, off: HypervisorEvent(
        event_type=t, session_id=s, agent_did=a, timestamp=T0 + timedelta(seconds=off)
    ),
    st.sampled_from(TYPES),
    st.sampled_from(SESSIONS),
    st.sampled_from(AGENTS),
    st.integers(min_value=-20, max_value=60),
)
bounds = st.none() | st.integers(min_value=-25, max_value=65).map(
    lambda off: T0 + timedelta(seconds=off)
)
filters = st.fixed_dictionaries(
    {
        "event_type": st.none() | st.sampled_from(TYPES),
        "session_id": st.sampled_from(SESSIONS),
        "agent_did": st.sampled_from(AGENTS),
        "since": bounds,
        "until": bounds,
    }
)


def matches(event: HypervisorEvent, f: dict[str, object]) -> bool:
    since, until = f["since"], f["until"]
    return (
        (f["event_type"] is None or event.event_type == f["event_type"])
        and (f["session_id"] is None or event.session_id == f["session_id"])
        and (f["agent_did"] is None or event.agent_did == f["agent_did"])
        and (since is None or event.timestamp >= since)  # type: ignore[operator]
        and (until is None or event.timestamp <= until)  # type: ignore[operator]
    )


@settings(max_examples=300, deadline=None)
@given(
    batch=st.lists(events, max_size=60),
    cap=st.none() | st.integers(min_value=1, max_value=40),
    f=filters,
    limit=st.integers(min_value=1, max_value=7),
    own=st.booleans(),
)
def test_pages_equal_a_scan_of_the_stored_events(
    batch: list[HypervisorEvent], cap: int | None, f: dict[str, object], limit: int, own: bool
) -> None:
    """Every page is the newest ``limit`` matches below its cursor, oldest first, and the pages
    together are every stored match, newest page first, each once (with posting lists or, for
    events the store owns, posting arrays)."""
    store = EventStore(cap)
    store.extend(batch, own_events=own)
    kept = batch if cap is None else batch[-cap:]
    expected = [e for e in kept if matches(e, f)]
    seen: list[HypervisorEvent] = []
    before = None
    for _ in range(len(kept) + 2):
        page = store.page(before=before, limit=limit, **f)  # type: ignore[arg-type]
        remaining = expected[: len(expected) - len(seen)]
        assert page.events == remaining[-limit:]
        assert [store.read_from(p, 1).events[0] for p in page.positions] == page.events
        seen[:0] = page.events
        if page.next_before is None:
            break
        before = page.next_before
    assert seen == expected


@settings(max_examples=200, deadline=None)
@given(
    first=st.lists(events, min_size=1, max_size=40),
    later=st.lists(st.lists(events, max_size=10), min_size=1, max_size=6),
    cap=st.integers(min_value=5, max_value=30),
    f=filters,
    limit=st.integers(min_value=1, max_value=5),
)
def test_paging_is_stable_while_events_are_appended_and_evicted(
    first: list[HypervisorEvent],
    later: list[list[HypervisorEvent]],
    cap: int,
    f: dict[str, object],
    limit: int,
) -> None:
    """Appending (and so evicting) between pages never repeats an event and never skips a match
    that stayed stored: the pages are the matches of the first call's events, minus those
    evicted before their page was read."""
    store = EventStore(cap)
    store.extend(first)
    model = list(first)
    expected_at_start = [e for e in model[-cap:] if matches(e, f)]
    seen: list[HypervisorEvent] = []
    before = None
    for appended in [*later, *([[]] * (len(first) + 2))]:
        page = store.page(before=before, limit=limit, **f)  # type: ignore[arg-type]
        seen[:0] = page.events
        if page.next_before is None:
            break
        before = page.next_before
        store.extend(appended)
        model.extend(appended)
    assert len({id(e) for e in seen}) == len(seen)
    # Every match of the first call's view is seen, unless it was evicted before its page.
    survivors = {id(e) for e in model[-cap:]}
    for event in expected_at_start:
        if id(event) in survivors:
            assert any(e is event for e in seen)
    assert all(any(e is s for e in expected_at_start) for s in seen)


def test_read_from_follows_positions_across_evictions() -> None:
    """``read_from`` returns consecutive events by position, starts at the oldest stored event
    when the asked position was evicted, and returns nothing at the head."""
    store = EventStore(4)
    evs = [HypervisorEvent(agent_did=f"a{i}") for i in range(6)]
    store.extend(evs[:3])
    assert store.first_position == 0
    assert store.next_position == 3
    assert store.read_from(1, 10) == (evs[1:3], 1, 3)
    assert store.read_from(0, 2) == (evs[0:2], 0, 2)
    store.extend(evs[3:])  # evicts positions 0 and 1
    assert store.first_position == 2
    assert store.read_from(0, 10) == (evs[2:6], 2, 6)
    assert store.read_from(6, 10) == ([], 6, 6)
    assert store.read_from(99, 10) == ([], 6, 6)


def test_page_rejects_bad_arguments() -> None:
    """A limit below 1 and naive time bounds are refused with ValueError."""
    store = EventStore(10)
    with pytest.raises(ValueError, match="limit"):
        store.page(limit=0)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.page(since=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="limit"):
        store.read_from(0, 0)
