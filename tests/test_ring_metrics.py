"""Ring metrics: the pure ``RingMetricsState`` and the published ``RingMetricsCollector``."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from hypervisor.observability._core.ring import RingMetricsState, parse_ring
from hypervisor.observability.event_bus import EventType, HypervisorEvent, HypervisorEventBus
from hypervisor.observability.prometheus_collector import (
    METRIC_RING_BREACHES_TOTAL,
    METRIC_RING_CURRENT,
    METRIC_RING_ELEVATION_DURATION,
    METRIC_RING_TRANSITIONS_TOTAL,
    PrometheusExporterProtocol,
    RingMetricsCollector,
)
from hypervisor.observability.testing import RecordingPrometheusExporter

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def ring_event(
    event_type: EventType,
    at: float = 0.0,
    agent: str | None = "did:mesh:a",
    session: str | None = "s1",
    **payload: Any,
) -> HypervisorEvent:
    """An event ``at`` seconds after T0."""
    return HypervisorEvent(
        event_type=event_type,
        timestamp=T0 + timedelta(seconds=at),
        agent_did=agent,
        session_id=session,
        payload=payload,
    )


def apply_all(events: list[HypervisorEvent]) -> RingMetricsState:
    state = RingMetricsState()
    for event in events:
        state.apply(event)
    return state


def test_metric_names_are_the_published_ones() -> None:
    """The four metric name constants keep their published values."""
    assert METRIC_RING_TRANSITIONS_TOTAL == "agent_hypervisor_ring_transitions_total"
    assert METRIC_RING_BREACHES_TOTAL == "agent_hypervisor_ring_breaches_total"
    assert METRIC_RING_CURRENT == "agent_hypervisor_ring_current"
    assert METRIC_RING_ELEVATION_DURATION == "agent_hypervisor_ring_elevation_duration_seconds"


def test_collector_counts_the_tutorial_sequence() -> None:
    """Assign, elevate and breach give the tutorial's counters, ring and event count."""
    bus = HypervisorEventBus()
    collector = RingMetricsCollector(bus)
    bus.emit(ring_event(EventType.RING_ASSIGNED, agent="did:mesh:analyst", ring=3))
    bus.emit(
        ring_event(EventType.RING_ELEVATED, 1, agent="did:mesh:analyst", from_ring=3, to_ring=1)
    )
    bus.emit(
        ring_event(
            EventType.RING_BREACH_DETECTED, 2, agent="did:mesh:analyst", attempted_tool="shell"
        )
    )
    snapshot = collector.collect()
    assert snapshot == {
        METRIC_RING_TRANSITIONS_TOTAL: {
            ("ring.assigned", "did:mesh:analyst", "s1"): 1,
            ("ring.elevated", "did:mesh:analyst", "s1"): 1,
        },
        METRIC_RING_BREACHES_TOTAL: {("did:mesh:analyst", "s1"): 1},
        METRIC_RING_CURRENT: {"did:mesh:analyst": 1},
        METRIC_RING_ELEVATION_DURATION: {},
        "events_processed": 3,
    }
    assert collector.state.events_processed == collector.events_processed == 3


def test_missing_agent_and_session_become_unknown() -> None:
    """Events without agent or session are keyed under ``"unknown"``."""
    state = apply_all(
        [
            ring_event(EventType.RING_ASSIGNED, agent=None, session=None, ring=2),
            ring_event(EventType.RING_BREACH_DETECTED, agent=None, session=None),
        ]
    )
    assert state.transitions == {("ring.assigned", "unknown", "unknown"): 1}
    assert state.breaches == {("unknown", "unknown"): 1}
    assert state.current_rings == {"unknown": 2}


def test_to_ring_zero_is_a_ring() -> None:
    """``to_ring: 0`` (the root ring) sets the current ring instead of being dropped as falsy."""
    state = apply_all(
        [
            ring_event(EventType.RING_ASSIGNED, ring=2),
            ring_event(EventType.RING_ELEVATED, 1, from_ring=2, to_ring=0, ring=2),
        ]
    )
    assert state.current_rings == {"did:mesh:a": 0}


def test_ring_is_used_when_to_ring_is_absent_or_none() -> None:
    """``payload["ring"]`` gives the ring when ``to_ring`` is missing or ``None``."""
    state = apply_all(
        [
            ring_event(EventType.RING_ASSIGNED, agent="x", ring=3),
            ring_event(EventType.RING_ASSIGNED, agent="y", to_ring=None, ring=2),
        ]
    )
    assert state.current_rings == {"x": 3, "y": 2}


def test_demotion_without_ring_returns_to_the_elevations_from_ring() -> None:
    """A demotion naming no ring returns the agent to the ``from_ring`` of its elevation."""
    state = apply_all(
        [
            ring_event(EventType.RING_ELEVATED, 0, from_ring=3, to_ring=1),
            ring_event(EventType.RING_DEMOTED, 5, reason="done"),
        ]
    )
    assert state.current_rings == {"did:mesh:a": 3}
    assert state.elevation_durations == {"did:mesh:a": 5.0}


def test_expiry_without_ring_returns_to_the_ring_held_before_elevation() -> None:
    """Without ``from_ring`` the ring held when the elevation began is restored on expiry."""
    state = apply_all(
        [
            ring_event(EventType.RING_ASSIGNED, 0, ring=2),
            ring_event(EventType.RING_ELEVATED, 1, to_ring=1),
            ring_event(EventType.RING_ELEVATION_EXPIRED, 4),
        ]
    )
    assert state.current_rings == {"did:mesh:a": 2}
    assert state.elevation_durations == {"did:mesh:a": 3.0}


def test_demotion_without_ring_or_open_elevation_keeps_the_current_ring() -> None:
    """A demotion that names only the ring it left leaves the current ring unchanged."""
    state = apply_all(
        [
            ring_event(EventType.RING_ASSIGNED, 0, ring=1),
            ring_event(EventType.RING_DEMOTED, 1, from_ring=1),
        ]
    )
    assert state.current_rings == {"did:mesh:a": 1}
    assert state.transitions[("ring.demoted", "did:mesh:a", "s1")] == 1
    assert state.bad_events == 0


def test_explicit_to_ring_on_demotion_wins_over_the_elevation_origin() -> None:
    """A demotion that names its ring sets that ring, whatever the elevation came from."""
    state = apply_all(
        [
            ring_event(EventType.RING_ELEVATED, 0, from_ring=3, to_ring=1),
            ring_event(EventType.RING_DEMOTED, 2, from_ring=1, to_ring=2),
        ]
    )
    assert state.current_rings == {"did:mesh:a": 2}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (3, 3),
        (1.0, 1),
        ("2", 2),
        (" 1 ", 1),
        (True, None),
        (False, None),
        (-1, None),
        (1.5, None),
        (float("nan"), None),
        ("high", None),
        ("", None),
        ("-1", None),
        ("²", None),
        ("9" * 5000, None),  # more digits than int() converts: not a ring, not an exception
        ("0" * 30 + "7", 7),
        ([1], None),
        ({"ring": 1}, None),
    ],
)
def test_parse_ring_accepts_only_non_negative_integers(value: object, expected: int | None) -> None:
    """Rings are non-negative integers given as int, integral float or decimal string."""
    assert parse_ring(value) == expected


@pytest.mark.parametrize(
    "payload",
    [
        {"to_ring": "high"},
        {"ring": None, "to_ring": True},
        {"ring": "sandbox"},
        {"to_ring": 1, "from_ring": "root"},
        {"to_ring": [1]},
    ],
)
def test_non_numeric_ring_is_a_bad_event_and_changes_nothing(
    payload: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A ring field that is not a ring is counted in ``bad_events``, logged, and ignored."""
    state = apply_all([ring_event(EventType.RING_ASSIGNED, 0, ring=3)])
    before = state.snapshot()
    with caplog.at_level(logging.DEBUG, logger="hypervisor.observability.ring"):
        state.apply(ring_event(EventType.RING_ELEVATED, 1, **payload))
    assert state.bad_events == 1
    after = state.snapshot()
    assert after["events_processed"] == before["events_processed"] + 1
    del after["events_processed"], before["events_processed"]
    assert after == before
    assert state.elevation_starts == {}
    assert any("not a ring" in record.getMessage() for record in caplog.records)


def test_bad_ring_never_raises_into_emit() -> None:
    """Emitting a junk ring reaches later subscribers and is counted by the collector."""
    bus = HypervisorEventBus()
    collector = RingMetricsCollector(bus)
    seen: list[HypervisorEvent] = []
    bus.subscribe(event_type=EventType.RING_ASSIGNED, handler=seen.append)
    event = ring_event(EventType.RING_ASSIGNED, ring="high")
    bus.emit(event)
    assert seen == [event]
    assert collector.bad_events == 1
    assert collector.collect()[METRIC_RING_CURRENT] == {}


def test_non_ring_events_are_ignored_by_the_state() -> None:
    """The state counts ring events only, so a worker may feed it a whole stream."""
    state = apply_all(
        [
            ring_event(EventType.SESSION_CREATED, 0, ring=1),
            ring_event(EventType.SAGA_CREATED, 100),
        ]
    )
    assert state.events_processed == 0
    assert state.snapshot()[METRIC_RING_CURRENT] == {}
    assert state.newest_timestamp is None


def test_elevation_duration_is_the_difference_of_event_timestamps() -> None:
    """Finished elevations last exactly the time between their two events' timestamps."""
    state = apply_all(
        [
            ring_event(EventType.RING_ELEVATED, 10.0, agent="x", to_ring=1),
            ring_event(EventType.RING_ELEVATED, 11.0, agent="y", to_ring=2),
            ring_event(EventType.RING_DEMOTED, 12.5, agent="x", to_ring=3),
            ring_event(EventType.RING_ELEVATION_EXPIRED, 41.0, agent="y", to_ring=3),
        ]
    )
    assert state.elevation_durations == {"x": 2.5, "y": 30.0}
    assert state.elevation_starts == {}


def test_open_elevations_are_measured_to_the_newest_event_not_the_wall_clock() -> None:
    """An open elevation lasts until the newest event applied, even for events from long ago."""
    long_ago = datetime(2001, 1, 1, tzinfo=UTC)
    state = RingMetricsState()
    state.apply(
        HypervisorEvent(
            event_type=EventType.RING_ELEVATED, timestamp=long_ago, agent_did="x", payload={}
        )
    )
    assert state.open_elevations() == {"x": 0.0}
    state.apply(
        HypervisorEvent(
            event_type=EventType.RING_BREACH_DETECTED,
            timestamp=long_ago + timedelta(seconds=7),
            agent_did="other",
        )
    )
    # An out-of-order older event does not move the clock back.
    state.apply(
        HypervisorEvent(
            event_type=EventType.RING_ASSIGNED,
            timestamp=long_ago + timedelta(seconds=3),
            agent_did="late",
            payload={"ring": 3},
        )
    )
    assert state.open_elevations() == {"x": 7.0}
    assert METRIC_RING_ELEVATION_DURATION in state.snapshot()
    assert state.snapshot()[METRIC_RING_ELEVATION_DURATION] == {}


def test_a_new_elevation_restarts_the_clock() -> None:
    """As published, a second elevation while elevated restarts the elevation clock."""
    state = apply_all(
        [
            ring_event(EventType.RING_ELEVATED, 0, from_ring=3, to_ring=2),
            ring_event(EventType.RING_ELEVATED, 5, from_ring=2, to_ring=1),
            ring_event(EventType.RING_ELEVATION_EXPIRED, 6),
        ]
    )
    assert state.elevation_durations == {"did:mesh:a": 1.0}
    assert state.current_rings == {"did:mesh:a": 2}


def test_collect_returns_the_published_shape() -> None:
    """``collect()`` has exactly the four metric keys (tuple keys) and ``events_processed``."""
    bus = HypervisorEventBus()
    collector = RingMetricsCollector(bus)
    bus.emit(ring_event(EventType.RING_ELEVATED, 0, to_ring=1))
    snapshot = collector.collect()
    assert list(snapshot) == [
        METRIC_RING_TRANSITIONS_TOTAL,
        METRIC_RING_BREACHES_TOTAL,
        METRIC_RING_CURRENT,
        METRIC_RING_ELEVATION_DURATION,
        "events_processed",
    ]
    # The open elevation is not in collect(), as published.
    assert snapshot[METRIC_RING_ELEVATION_DURATION] == {}
    # A snapshot is a copy.
    snapshot[METRIC_RING_CURRENT]["did:mesh:a"] = 99
    assert collector.collect()[METRIC_RING_CURRENT] == {"did:mesh:a": 1}


def test_recording_exporter_satisfies_the_protocol() -> None:
    """The shipped recording exporter type-checks as a ``PrometheusExporterProtocol``."""
    exporter: PrometheusExporterProtocol = RecordingPrometheusExporter()
    exporter.inc_counter("c", 2.0, labels={"a": "b"})
    exporter.set_gauge("g", 3.0)
    assert isinstance(exporter, RecordingPrometheusExporter)
    assert exporter.counter("c", a="b") == 2.0
    assert exporter.gauge("g") == 3.0


def test_export_sends_counter_increases_only() -> None:
    """The first export sends totals, a repeated export sends nothing, later ones send deltas."""
    bus = HypervisorEventBus()
    collector = RingMetricsCollector(bus)
    bus.emit(ring_event(EventType.RING_ASSIGNED, 0, ring=3))
    bus.emit(ring_event(EventType.RING_ASSIGNED, 1, ring=2))
    bus.emit(ring_event(EventType.RING_BREACH_DETECTED, 2))
    exporter = RecordingPrometheusExporter()

    collector.export_to_prometheus(exporter)
    assigned = {"event_type": "ring.assigned", "agent_did": "did:mesh:a", "session_id": "s1"}
    assert [(c.name, c.value, c.labels) for c in exporter.counter_calls()] == [
        (METRIC_RING_TRANSITIONS_TOTAL, 2.0, assigned),
        (METRIC_RING_BREACHES_TOTAL, 1.0, {"agent_did": "did:mesh:a", "session_id": "s1"}),
    ]

    exporter.clear_calls()
    collector.export_to_prometheus(exporter)
    assert exporter.counter_calls() == []
    # Gauges are set on every export.
    assert [(c.name, c.value) for c in exporter.gauge_calls()] == [(METRIC_RING_CURRENT, 2.0)]

    bus.emit(ring_event(EventType.RING_ASSIGNED, 3, ring=1))
    exporter.clear_calls()
    collector.export_to_prometheus(exporter)
    assert [(c.name, c.value) for c in exporter.counter_calls()] == [
        (METRIC_RING_TRANSITIONS_TOTAL, 1.0)
    ]
    assert exporter.counter(METRIC_RING_TRANSITIONS_TOTAL, **assigned) == 3.0
    assert exporter.counter(METRIC_RING_BREACHES_TOTAL, agent_did="did:mesh:a", session_id="s1")
    assert exporter.gauge(METRIC_RING_CURRENT, agent_did="did:mesh:a") == 1.0
    assert all(c.help_text for c in exporter.calls)


def test_export_reports_open_elevations_in_event_time() -> None:
    """The elevation gauge of an open elevation is measured to the newest event applied."""
    bus = HypervisorEventBus()
    collector = RingMetricsCollector(bus)
    long_ago = 1_000_000.0  # seconds after T0 is irrelevant; only differences matter
    bus.emit(ring_event(EventType.RING_ELEVATED, long_ago, agent="x", to_ring=1))
    bus.emit(ring_event(EventType.RING_ELEVATED, long_ago, agent="y", to_ring=1))
    bus.emit(ring_event(EventType.RING_DEMOTED, long_ago + 4, agent="y", to_ring=3))
    bus.emit(ring_event(EventType.RING_BREACH_DETECTED, long_ago + 9, agent="z"))
    exporter = RecordingPrometheusExporter()
    collector.export_to_prometheus(exporter)
    assert exporter.gauge(METRIC_RING_ELEVATION_DURATION, agent_did="x") == 9.0
    assert exporter.gauge(METRIC_RING_ELEVATION_DURATION, agent_did="y") == 4.0


def test_reset_forgets_metrics_and_the_export_baseline() -> None:
    """After ``reset()`` the collector is empty and the next export sends the new totals."""
    bus = HypervisorEventBus()
    collector = RingMetricsCollector(bus)
    bus.emit(ring_event(EventType.RING_ASSIGNED, 0, ring=3))
    bus.emit(ring_event(EventType.RING_ASSIGNED, 0, ring="junk"))
    exporter = RecordingPrometheusExporter()
    collector.export_to_prometheus(exporter)
    collector.reset()
    assert collector.collect() == {
        METRIC_RING_TRANSITIONS_TOTAL: {},
        METRIC_RING_BREACHES_TOTAL: {},
        METRIC_RING_CURRENT: {},
        METRIC_RING_ELEVATION_DURATION: {},
        "events_processed": 0,
    }
    assert collector.bad_events == 0
    bus.emit(ring_event(EventType.RING_ASSIGNED, 1, ring=2))
    exporter.clear_calls()
    collector.export_to_prometheus(exporter)
    assert [c.value for c in exporter.counter_calls()] == [1.0]


# A small model of the rules, written independently of the implementation, for hypothesis.
_AGENTS = ["a", "b", "c"]
_SESSIONS = ["s1", "s2", None]
_TRANSITIONS = [
    EventType.RING_ASSIGNED,
    EventType.RING_ELEVATED,
    EventType.RING_DEMOTED,
    EventType.RING_ELEVATION_EXPIRED,
]
_ring_values = st.one_of(st.none(), st.integers(0, 3), st.sampled_from(["high", True, 1.5]))


@st.composite
def ring_streams(draw: st.DrawFn) -> list[HypervisorEvent]:
    n = draw(st.integers(0, 40))
    events = []
    at = 0.0
    for _ in range(n):
        at += draw(st.floats(0, 10, allow_nan=False))
        event_type = draw(st.sampled_from([*_TRANSITIONS, EventType.RING_BREACH_DETECTED]))
        payload: dict[str, Any] = {}
        for key in ("to_ring", "ring", "from_ring"):
            if draw(st.booleans()):
                payload[key] = draw(_ring_values)
        events.append(
            ring_event(
                event_type,
                at,
                agent=draw(st.sampled_from(_AGENTS)),
                session=draw(st.sampled_from(_SESSIONS)),
                **payload,
            )
        )
    return events


def _is_bad(payload: dict[str, Any]) -> bool:
    values = [payload.get(key) for key in ("to_ring", "ring", "from_ring")]
    return any(
        value is not None and (type(value) is not int or value not in (0, 1, 2, 3))
        for value in values
    )


@settings(max_examples=200, deadline=None)
@given(ring_streams())
def test_totals_equal_naive_counts(events: list[HypervisorEvent]) -> None:
    """Over random ring streams, every counter equals a naive count of the good events."""
    state = apply_all(events)
    good = [
        e
        for e in events
        if e.event_type is EventType.RING_BREACH_DETECTED or not _is_bad(e.payload)
    ]
    transitions = Counter(
        (e.event_type.value, e.agent_did or "unknown", e.session_id or "unknown")
        for e in good
        if e.event_type in _TRANSITIONS
    )
    breaches = Counter(
        (e.agent_did or "unknown", e.session_id or "unknown")
        for e in good
        if e.event_type is EventType.RING_BREACH_DETECTED
    )
    assert state.transitions == dict(transitions)
    assert state.breaches == dict(breaches)
    assert state.bad_events == len(events) - len(good)
    assert state.events_processed == len(events)
    # Agents whose last good event named a ring are at that ring.
    for agent in _AGENTS:
        mine = [e for e in good if e.agent_did == agent and e.event_type in _TRANSITIONS]
        if mine:
            last = mine[-1].payload
            named = last.get("to_ring") if last.get("to_ring") is not None else last.get("ring")
            if named is not None:
                assert state.current_rings[agent] == named


@settings(max_examples=100, deadline=None)
@given(ring_streams())
def test_state_is_a_function_of_the_event_sequence(events: list[HypervisorEvent]) -> None:
    """Two states fed the same events agree on everything, open elevations included."""
    first, second = apply_all(events), apply_all(events)
    assert first.snapshot() == second.snapshot()
    assert first.open_elevations() == second.open_elevations()
    assert all(seconds >= 0.0 for seconds in first.open_elevations().values())
    assert all(seconds >= 0.0 for seconds in first.elevation_durations.values())


@settings(max_examples=100, deadline=None)
@given(ring_streams(), st.integers(0, 40))
def test_split_exports_sum_to_the_totals(events: list[HypervisorEvent], cut: int) -> None:
    """Exporting part-way and again at the end sends, in sum, exactly the final counters."""
    bus = HypervisorEventBus()
    collector = RingMetricsCollector(bus)
    exporter = RecordingPrometheusExporter()
    for event in events[:cut]:
        bus.emit(event)
    collector.export_to_prometheus(exporter)
    for event in events[cut:]:
        bus.emit(event)
    collector.export_to_prometheus(exporter)
    collector.export_to_prometheus(exporter)
    snapshot = collector.collect()
    for (event_type, agent, session), count in snapshot[METRIC_RING_TRANSITIONS_TOTAL].items():
        labels = {"event_type": event_type, "agent_did": agent, "session_id": session}
        assert exporter.counter(METRIC_RING_TRANSITIONS_TOTAL, **labels) == count
    for (agent, session), count in snapshot[METRIC_RING_BREACHES_TOTAL].items():
        labels = {"agent_did": agent, "session_id": session}
        assert exporter.counter(METRIC_RING_BREACHES_TOTAL, **labels) == count
    assert sum(c.value for c in exporter.counter_calls()) == sum(
        snapshot[METRIC_RING_TRANSITIONS_TOTAL].values()
    ) + sum(snapshot[METRIC_RING_BREACHES_TOTAL].values())


class UnhashableExporter(RecordingPrometheusExporter):
    """An exporter that defines equality and so is unhashable."""

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = None  # type: ignore[assignment]


def test_each_exporter_gets_the_totals_once() -> None:
    """Baselines are per exporter: a second exporter starts from the totals, then deltas."""
    bus = HypervisorEventBus()
    collector = RingMetricsCollector(bus)
    bus.emit(ring_event(EventType.RING_BREACH_DETECTED, 0))
    first, second = RecordingPrometheusExporter(), RecordingPrometheusExporter()
    odd = UnhashableExporter()
    for exporter in (first, second, odd, first, second, odd):
        collector.export_to_prometheus(exporter)
    bus.emit(ring_event(EventType.RING_BREACH_DETECTED, 1))
    for exporter in (first, second, odd):
        collector.export_to_prometheus(exporter)
        labels = {"agent_did": "did:mesh:a", "session_id": "s1"}
        assert exporter.counter(METRIC_RING_BREACHES_TOTAL, **labels) == 2.0
        assert [c.value for c in exporter.counter_calls()] == [1.0, 1.0]


@settings(max_examples=100, deadline=None)
@given(ring_streams(), st.randoms(use_true_random=False))
def test_per_type_handlers_equal_apply(events: list[HypervisorEvent], rng: Any) -> None:
    """handler_for(type)(event) folds as apply(event) does, in any timestamp order, and the
    newest timestamp is the largest one applied."""
    rng.shuffle(events)  # timestamps out of order too
    by_apply = apply_all(events)
    by_handlers = RingMetricsState()
    for event in events:
        by_handlers.handler_for(event.event_type)(event)
    assert by_handlers.snapshot() == by_apply.snapshot()
    assert by_handlers.open_elevations() == by_apply.open_elevations()
    assert by_handlers.bad_events == by_apply.bad_events
    assert by_handlers.newest_timestamp == by_apply.newest_timestamp
    expected = max((e.timestamp.timestamp() for e in events), default=None)
    assert by_apply.newest_timestamp == expected


def test_handler_for_takes_ring_types_only() -> None:
    """A plain string value finds its type's handler; other types raise KeyError."""
    state = RingMetricsState()
    state.handler_for("ring.assigned")(ring_event(EventType.RING_ASSIGNED, ring=2))  # type: ignore[arg-type]
    assert state.current_rings == {"did:mesh:a": 2}
    with pytest.raises(KeyError):
        state.handler_for(EventType.SAGA_CREATED)


def test_naive_timestamps_are_read_as_local_time() -> None:
    """A naive timestamp counts as local time (as datetime.timestamp reads it) among aware ones."""
    naive = datetime(2026, 3, 1, 12, 0, 30)
    events = [
        ring_event(EventType.RING_ELEVATED, 0.0, from_ring=2, to_ring=1),
        HypervisorEvent(
            event_type=EventType.RING_BREACH_DETECTED, timestamp=naive, agent_did="did:mesh:b"
        ),
        ring_event(EventType.RING_ASSIGNED, 10.0, ring=3),
    ]
    state = apply_all(events)
    expected = max(e.timestamp.timestamp() for e in events)
    assert state.newest_timestamp == expected
    assert state.open_elevations() == {"did:mesh:a": expected - T0.timestamp()}


def test_state_snapshots_keep_the_newest_timestamp_exactly_and_go_on() -> None:
    """A worker snapshot of the state keeps the newest timestamp exactly (at any offset, even
    past what a UTC datetime can hold), and the loaded state goes on as the original."""
    from hypervisor.observability.workers._snapshot import dump_state, load_state

    late = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5)))
    events = [
        ring_event(EventType.RING_ELEVATED, 1.25, from_ring=2, to_ring=1),
        ring_event(EventType.RING_ASSIGNED, 7.5, agent="did:mesh:b", ring=3),
    ]
    state = apply_all(events)
    far = apply_all([*events, HypervisorEvent(event_type=EventType.RING_ELEVATED, timestamp=late)])
    for original in (state, far):
        loaded = load_state(dump_state(original))
        assert isinstance(loaded, RingMetricsState)
        assert loaded.newest_timestamp == original.newest_timestamp
        assert loaded.open_elevations() == original.open_elevations()
        assert loaded.snapshot() == original.snapshot()
    later = ring_event(EventType.RING_DEMOTED, 9.0, to_ring=2)
    loaded = load_state(dump_state(state))
    assert isinstance(loaded, RingMetricsState)
    loaded.apply(later)
    assert loaded.elevation_durations == {"did:mesh:a": 7.75}
    empty = load_state(dump_state(RingMetricsState()))
    assert isinstance(empty, RingMetricsState)
    assert empty.newest_timestamp is None


def test_forget_agents_drops_every_table_entry_of_those_agents_only() -> None:
    """``forget_agents`` removes the agents' transitions, breaches, rings and elevations in
    place (readers holding the tables see it) and leaves the other agents and counters alone."""
    state = RingMetricsState()
    for agent in ("a", "b"):
        state.apply(
            HypervisorEvent(
                event_type=EventType.RING_ASSIGNED,
                agent_did=agent,
                session_id="s",
                payload={"ring": 3},
            )
        )
        state.apply(
            HypervisorEvent(
                event_type=EventType.RING_ELEVATED,
                agent_did=agent,
                session_id="s",
                payload={"from_ring": 3, "to_ring": 1},
            )
        )
        state.apply(
            HypervisorEvent(
                event_type=EventType.RING_BREACH_DETECTED, agent_did=agent, session_id="s"
            )
        )
    transitions = state.transitions
    processed = state.events_processed
    state.forget_agents(["a"])
    assert transitions is state.transitions
    assert all(key[1] == "b" for key in transitions)
    assert list(state.breaches) == [("b", "s")]
    assert list(state.current_rings) == ["b"]
    assert list(state.elevation_starts) == ["b"]
    assert state.events_processed == processed
    # The forgotten agent starts from nothing: a demotion no longer finds its elevation.
    state.apply(
        HypervisorEvent(
            event_type=EventType.RING_DEMOTED,
            agent_did="a",
            session_id="s",
            payload={"from_ring": 1},
        )
    )
    assert "a" not in state.elevation_durations
