"""``hvobs demo``: run as the installed console script, its report checked against its events.

The expected figures are computed here, naively, from the events the demo generates
(``generate_fleet`` with the same arguments), not from the collector or the span exporter.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hypervisor.observability.causal_trace import CausalTraceId
from hypervisor.observability.demo import (
    DEFAULT_AGENTS,
    DEFAULT_SAGAS,
    DEFAULT_SEED,
    Fleet,
    generate_fleet,
)
from hypervisor.observability.demo.live import LiveFleet
from hypervisor.observability.event_bus import EventType, HypervisorEvent

HVOBS = Path(sys.executable).parent / "hvobs"


def run_hvobs(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script."""
    assert HVOBS.exists(), f"console script not installed at {HVOBS}"
    return subprocess.run(
        [str(HVOBS), *args], capture_output=True, text=True, timeout=120, check=False
    )


def sections(output: str) -> dict[str, list[str]]:
    """Split the report into its ``== Title`` sections (the header is under "")."""
    found: dict[str, list[str]] = {"": []}
    current = ""
    for line in output.splitlines():
        if line.startswith("== "):
            current = re.sub(r" \(.*", "", line[3:])
            found[current] = [line]
        elif line:
            found[current].append(line)
    return found


def ts(event: HypervisorEvent) -> float:
    return event.timestamp.timestamp()


def expected_rings(fleet: Fleet) -> dict[str, int]:
    """Final ring per agent: the last ring named, or, after an expiry naming none, the ring
    the agent held before it was elevated."""
    rings: dict[str, int] = {}
    before_elevation: dict[str, int] = {}
    for event in fleet.events:
        agent, payload = event.agent_did or "unknown", event.payload
        if event.event_type is EventType.RING_ELEVATED:
            before_elevation[agent] = payload["from_ring"]
        if event.event_type in (
            EventType.RING_ASSIGNED,
            EventType.RING_ELEVATED,
            EventType.RING_DEMOTED,
            EventType.RING_ELEVATION_EXPIRED,
        ):
            named = payload.get("to_ring", payload.get("ring"))
            if named is None and event.event_type is EventType.RING_ELEVATION_EXPIRED:
                named = before_elevation[agent]
            if named is not None:
                rings[agent] = named
    return rings


def check_report(output: str, fleet: Fleet) -> None:
    """Assert every figure of the report against the fleet's events."""
    events = fleet.events
    parts = sections(output)
    assert list(parts) == ["", "Ring metrics", "Saga span timeline", "Causal spawn tree"]
    agents, sagas = (
        len(fleet.agents),
        Counter(e.event_type for e in events)[EventType.SAGA_CREATED],
    )
    header = parts[""][0]
    match = re.match(
        rf"hvobs demo: seed {fleet.seed}, (\d+) agents? \(an orchestrator and (\d+) spawned\), "
        rf"{sagas} sagas?, ",
        header,
    )
    assert match is not None, header
    # The agent count is the number of agents the report lists (tree and current rings).
    assert int(match.group(1)) == agents == len(parts["Causal spawn tree"]) - 1
    assert int(match.group(2)) == agents - 1
    assert f"{len(events)} event" in header

    # Ring metrics.
    ring_events = [e for e in events if e.event_type.value.startswith("ring.")]
    ring = parts["Ring metrics"]
    assert ring[0] == f"== Ring metrics (events processed: {len(ring_events)}, bad events: 0)"
    by_type = Counter(e.event_type.value for e in ring_events)
    for value in ("ring.assigned", "ring.elevated", "ring.demoted", "ring.elevation_expired"):
        assert f"  {value:<24} {by_type[value]:>4}" in ring
    breaches = Counter(
        e.agent_did for e in events if e.event_type is EventType.RING_BREACH_DETECTED
    )
    assert f"Breaches (total {sum(breaches.values())}):" in ring
    for agent, count in breaches.items():
        assert f"  {agent:<28} {'session-001':<14} {count:>4}" in ring
    for did, ring_number in expected_rings(fleet).items():
        assert f"  {did:<28} ring {ring_number}" in ring
    assert sum(" ring " in line for line in ring) == agents
    newest_ring_event = max(ts(e) for e in ring_events)
    started: dict[str, float] = {}
    durations: dict[str, str] = {}
    for event in ring_events:
        agent = event.agent_did or "unknown"
        if event.event_type is EventType.RING_ELEVATED:
            started[agent] = ts(event)
        elif event.event_type in (EventType.RING_DEMOTED, EventType.RING_ELEVATION_EXPIRED):
            durations[agent] = f"{ts(event) - started.pop(agent):>8.1f}s  finished"
    for agent, start in started.items():
        durations[agent] = f"{newest_ring_event - start:>8.1f}s  still elevated"
    for agent, text in durations.items():
        assert f"  {agent:<28} {text}" in ring

    # Saga timeline: one line per saga, with its duration and what became of it, then its
    # steps and compensations, each with its own outcome.
    timeline = parts["Saga span timeline"]
    saga_lines = [line for line in timeline[1:] if line.startswith("saga-")]
    created = {e.payload["saga_id"]: e for e in events if e.event_type is EventType.SAGA_CREATED}
    closed = {
        e.payload["saga_id"]: e
        for e in events
        if e.event_type in (EventType.SAGA_COMPLETED, EventType.SAGA_ESCALATED)
    }
    troubled = {
        e.payload["saga_id"]
        for e in events
        if e.event_type in (EventType.SAGA_STEP_FAILED, EventType.SAGA_COMPENSATING)
    }
    assert len(saga_lines) == len(created)
    for line in saga_lines:
        match = re.fullmatch(
            r"(\S+) +\|=+\| +(\d+\.\d\d)s \[(completed|rolled back|escalated)\]", line
        )
        assert match is not None, line
        saga_id, seconds, outcome = match.groups()
        end = closed[saga_id]
        assert float(seconds) == pytest.approx(ts(end) - ts(created[saga_id]), abs=0.006)
        if end.event_type is EventType.SAGA_ESCALATED:
            assert outcome == "escalated"
        else:
            # A saga that failed a step and was compensated is shown as rolled back.
            assert outcome == ("rolled back" if saga_id in troubled else "completed")
    step_lines = [line for line in timeline if line.startswith("  step ")]
    undo_lines = [line for line in timeline if line.startswith("  undo ")]
    ends = Counter(e.event_type for e in events)
    assert len(step_lines) == ends[EventType.SAGA_STEP_COMMITTED] + ends[EventType.SAGA_STEP_FAILED]
    assert len(undo_lines) == ends[EventType.SAGA_COMPENSATING]
    assert sum(line.endswith("[failed]") for line in step_lines) == ends[EventType.SAGA_STEP_FAILED]
    assert sum(line.endswith("[ok]") for line in step_lines) == ends[EventType.SAGA_STEP_COMMITTED]
    # Every compensation of a saga that ended is over: none is shown as still compensating.
    assert all(line.endswith("[compensated]") for line in undo_lines)
    assert "compensating" not in output
    spans = len(step_lines) + len(undo_lines) + len(saga_lines)
    assert timeline[0] == f"== Saga span timeline ({spans} spans)"
    doubled = re.search(r"\b([A-Za-z]+)[\s-]+\1\b", output, re.IGNORECASE)
    assert doubled is None, doubled

    # Spawn tree: every agent once, indented by its depth, with its causal id.
    tree = parts["Causal spawn tree"][1:]
    assert len(tree) == len(fleet.agents)
    printed: dict[str, CausalTraceId] = {}
    for line in tree:
        match = re.fullmatch(r"( *)(?:- )?(did:mesh:\S+) +(\S+)  depth (\d+)", line)
        assert match is not None, line
        indent, did, full_id, depth = match.groups()
        trace = CausalTraceId.from_string(full_id)
        assert len(indent) // 2 == int(depth)
        printed[did] = trace
    for member in fleet.agents:
        assert printed[member.did].full_id == member.trace.full_id
        if member.spawned_by is not None:
            spawner = printed[member.spawned_by]
            assert printed[member.did].parent_span_id == spawner.span_id
            assert printed[member.did].trace_id == spawner.trace_id


def test_default_demo_report_matches_its_events() -> None:
    """``hvobs demo`` exits 0 and prints figures that follow from the default fleet's events."""
    completed = run_hvobs("demo")
    assert completed.returncode == 0, completed.stderr
    check_report(completed.stdout, generate_fleet(DEFAULT_SEED, DEFAULT_AGENTS, DEFAULT_SAGAS))


def test_demo_options_change_the_fleet() -> None:
    """``--seed``, ``--agents`` and ``--sagas`` shape the fleet the report describes."""
    completed = run_hvobs("demo", "--seed", "11", "--agents", "9", "--sagas", "6")
    assert completed.returncode == 0, completed.stderr
    check_report(completed.stdout, generate_fleet(11, 9, 6))
    small = run_hvobs("demo", "--agents", "1", "--sagas", "0")
    assert small.returncode == 0, small.stderr
    check_report(small.stdout, generate_fleet(DEFAULT_SEED, 1, 0))


def test_demo_is_deterministic_for_a_seed() -> None:
    """Two runs with one seed print the same report; another seed prints another."""
    first, second = run_hvobs("demo", "--seed", "5"), run_hvobs("demo", "--seed", "5")
    other = run_hvobs("demo", "--seed", "6")
    assert first.stdout == second.stdout
    assert first.stdout != other.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--agents", "0"], "--agents: must be at least 1"),
        (["demo", "--sagas", "-1"], "--sagas: must be at least 0"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_arguments_exit_with_usage(args: list[str], message: str) -> None:
    """Invalid options and a missing command exit with status 2 and say why."""
    completed = run_hvobs(*args)
    assert completed.returncode == 2
    assert message in completed.stderr


def test_default_fleet_covers_the_scenario() -> None:
    """The default fleet has child and sibling spawns, each ring transition kind, a breach,
    a failed step with its compensation and an escalated saga, on a monotonic clock."""
    fleet = generate_fleet()
    kinds = Counter(e.event_type for e in fleet.events)
    for kind in (
        EventType.RING_ASSIGNED,
        EventType.RING_ELEVATED,
        EventType.RING_DEMOTED,
        EventType.RING_ELEVATION_EXPIRED,
        EventType.RING_BREACH_DETECTED,
        EventType.SAGA_STEP_FAILED,
        EventType.SAGA_COMPENSATING,
        EventType.SAGA_ESCALATED,
        EventType.SAGA_COMPLETED,
    ):
        assert kinds[kind] >= 1, kind
    parents = Counter(a.trace.parent_span_id for a in fleet.agents if a.spawned_by)
    assert max(parents.values()) >= 2  # siblings share a parent
    assert max(a.trace.depth for a in fleet.agents) >= 2  # delegation below a child
    root = fleet.agents[0].trace
    assert all(root.is_ancestor_of(a.trace) for a in fleet.agents[1:])
    times: list[datetime] = [e.timestamp for e in fleet.events]
    assert times == sorted(times)
    assert len({e.event_id for e in fleet.events}) == len(fleet.events)
    assert [e.event_id for e in generate_fleet().events] == [e.event_id for e in fleet.events]


def _compensations_name_committed_steps(events: list[HypervisorEvent]) -> int:
    """Assert each compensation names a step its saga committed before (its id and action);
    return how many compensations there were."""
    committed: dict[str, set[tuple[object, object]]] = {}
    seen = 0
    for event in events:
        payload = event.payload
        step = (payload.get("step_id"), payload.get("step_action"))
        if event.event_type is EventType.SAGA_STEP_COMMITTED:
            committed.setdefault(payload["saga_id"], set()).add(step)
        elif event.event_type is EventType.SAGA_COMPENSATING:
            seen += 1
            assert step in committed.get(payload["saga_id"], set()), (payload, committed)
    return seen


def test_compensations_name_the_steps_they_undo() -> None:
    """The demo's compensations (in the report and in ``hvobs serve --demo``'s live fleet)
    name the committed step they undo, so a compensation reads "undo deploy", never
    "undo undo-deploy"."""
    fleet = generate_fleet(seed=3, agents=8, sagas=12)
    assert _compensations_name_committed_steps(list(fleet.events)) >= 1
    live = LiveFleet(fleet, seed=3)
    now = datetime(2026, 3, 1, tzinfo=UTC)
    events = live.history(now)
    for second in range(600):
        events += live.due(now + timedelta(seconds=second))
    events.sort(key=lambda e: e.timestamp)
    assert _compensations_name_committed_steps(events) >= 1
