"""``hvobs demo``: a simulated agent fleet, observed end to end.

The demo has three parts, kept apart so another backend can reuse the first and the last:

1. :func:`generate_fleet` builds a realistic, deterministic event stream from a seed: an
   orchestrator spawns agents (each with a causal trace id, a child or a sibling of its
   spawner's), rings are assigned, agents are elevated and then demoted, expire or stay
   elevated, breaches are detected, and sagas run steps, one failing and being compensated, one
   escalated. Events carry explicit timestamps from a simulated clock and seeded ids, so the
   demo is fast and prints the same report for the same seed.
2. A feeder emits the events on a bus with a ``RingMetricsCollector`` and a
   ``SagaSpanExporter`` subscribed, and returns a :class:`DemoResult`. :func:`feed_in_process`
   uses the in-process ``HypervisorEventBus``.
3. :func:`render_report` prints the ring metrics, a text timeline of the saga spans and the
   causal spawn tree.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RingMetricsState
from hypervisor.observability._core.spans import SagaSpanRecord
from hypervisor.observability._core.trace import CausalTraceId

__all__ = [
    "DEFAULT_AGENTS",
    "DEFAULT_SAGAS",
    "DEFAULT_SEED",
    "DemoAgent",
    "DemoResult",
    "Fleet",
    "feed_in_process",
    "generate_fleet",
    "render_report",
]

DEFAULT_SEED = 7
DEFAULT_AGENTS = 6
DEFAULT_SAGAS = 4

SESSION_ID = "session-001"
ORCHESTRATOR = "did:mesh:orchestrator"
CLOCK_START = datetime(2026, 1, 15, 9, 0, tzinfo=UTC)

_ROLES = ("researcher", "writer", "coder", "reviewer", "tool-runner", "analyst", "planner")
_SAGA_NAMES = (
    "deploy-v2",
    "ingest-reports",
    "refresh-index",
    "rotate-keys",
    "publish-notes",
    "migrate-db",
)
_ACTIONS = ("validate", "fetch", "transform", "build", "test", "deploy", "notify", "archive")
_BAR_WIDTH = 40


@dataclass(frozen=True, slots=True)
class DemoAgent:
    """An agent of the simulated fleet.

    Attributes:
        did: the agent's DID.
        role: what it does.
        trace: its causal trace id (the orchestrator's is the root).
        spawned_by: the DID of the agent that spawned it, ``None`` for the orchestrator.
    """

    did: str
    role: str
    trace: CausalTraceId
    spawned_by: str | None


@dataclass(frozen=True, slots=True)
class Fleet:
    """A generated fleet: its agents (orchestrator first) and its events in emit order."""

    seed: int
    agents: tuple[DemoAgent, ...]
    events: tuple[HypervisorEvent, ...]


@dataclass(slots=True)
class DemoResult:
    """What a feeder observed: the ring metrics state and the saga spans."""

    backend: str
    events_emitted: int
    ring: RingMetricsState
    spans: list[SagaSpanRecord]
    extra: dict[str, Any] = field(default_factory=dict)


class _Builder:
    """Accumulates events on a simulated clock with seeded ids."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.events: list[HypervisorEvent] = []

    def hex(self, width: int) -> str:
        return f"{self.rng.getrandbits(4 * width):0{width}x}"

    def emit(
        self,
        at: float,
        event_type: EventType,
        agent: DemoAgent,
        payload: dict[str, Any],
        *,
        causal: CausalTraceId | None = None,
        parent_event_id: str | None = None,
    ) -> HypervisorEvent:
        event = HypervisorEvent(
            event_id=self.hex(16),
            event_type=event_type,
            timestamp=CLOCK_START + timedelta(seconds=round(at, 3)),
            session_id=SESSION_ID,
            agent_did=agent.did,
            causal_trace_id=(causal or agent.trace).full_id,
            parent_event_id=parent_event_id,
            payload=payload,
        )
        self.events.append(event)
        return event


def generate_fleet(
    seed: int = DEFAULT_SEED, agents: int = DEFAULT_AGENTS, sagas: int = DEFAULT_SAGAS
) -> Fleet:
    """Build the demo's event stream; the same arguments always give the same events.

    Args:
        seed: seeds every random choice and every id.
        agents: agents spawned by the orchestrator and its delegates (at least 1).
        sagas: sagas run by the fleet (at least 0).

    Raises:
        ValueError: ``agents < 1`` or ``sagas < 0``.
    """
    if agents < 1 or sagas < 0:
        raise ValueError("the demo needs at least one agent and a non-negative saga count")
    rng = random.Random(seed)
    build = _Builder(rng)
    root = CausalTraceId(build.hex(12), build.hex(8))
    orchestrator = DemoAgent(ORCHESTRATOR, "orchestrator", root, None)
    fleet = [orchestrator]
    joined = {
        ORCHESTRATOR: build.emit(0.0, EventType.SESSION_CREATED, orchestrator, {"ring": 1}).event_id
    }
    build.emit(0.2, EventType.RING_ASSIGNED, orchestrator, {"ring": 1})
    rings = {ORCHESTRATOR: 1}
    last_child: dict[str, DemoAgent] = {}
    spawned_at: dict[str, float] = {}

    at = 1.0
    for index in range(1, agents + 1):
        at += rng.uniform(2.0, 6.0)
        spawner = orchestrator if index == 1 or rng.random() < 0.5 else rng.choice(fleet[1:])
        sibling = last_child.get(spawner.did)
        # A spawner's first delegate is its child; the next ones are that child's siblings.
        trace = sibling.trace.sibling() if sibling is not None else spawner.trace.child()
        trace = dataclasses.replace(trace, span_id=build.hex(8))
        role = _ROLES[(index - 1) % len(_ROLES)]
        agent = DemoAgent(f"did:mesh:{role}-{index}", role, trace, spawner.did)
        fleet.append(agent)
        last_child[spawner.did] = agent
        spawned_at[agent.did] = at
        joined[agent.did] = build.emit(
            at,
            EventType.SESSION_JOINED,
            agent,
            {"role": role, "spawned_by": spawner.did},
            parent_event_id=joined[spawner.did],
        ).event_id
        rings[agent.did] = rng.choice((2, 3, 3))
        build.emit(at + 0.1, EventType.RING_ASSIGNED, agent, {"ring": rings[agent.did]})

    workers = fleet[1:]
    chosen = rng.sample(workers, min(len(workers), max(3, len(workers) // 2)))
    for position, agent in enumerate(chosen):
        start = spawned_at[agent.did] + rng.uniform(5.0, 30.0)
        from_ring = rings[agent.did]
        to_ring = 1 if from_ring == 2 else rng.choice((1, 2))
        ttl = float(rng.choice((30, 60, 90)))
        build.emit(
            start,
            EventType.RING_ELEVATED,
            agent,
            {
                "from_ring": from_ring,
                "to_ring": to_ring,
                "reason": f"vouched by {ORCHESTRATOR}",
                "ttl_seconds": ttl,
            },
        )
        outcome = ("demoted", "expired", "open")[position % 3]
        if outcome == "demoted":
            build.emit(
                start + rng.uniform(10.0, ttl - 5.0),
                EventType.RING_DEMOTED,
                agent,
                {"from_ring": to_ring, "to_ring": from_ring, "reason": "task finished"},
            )
        elif outcome == "expired":
            # No to_ring: the agent returns to the ring it held before the elevation.
            build.emit(start + ttl, EventType.RING_ELEVATION_EXPIRED, agent, {"from_ring": to_ring})

    breachers = rng.sample(workers, min(len(workers), 1 if len(workers) < 4 else 2))
    for agent in breachers:
        build.emit(
            spawned_at[agent.did] + rng.uniform(3.0, 40.0),
            EventType.RING_BREACH_DETECTED,
            agent,
            {"attempted_tool": rng.choice(("shell_exec", "net_raw", "fs_write_root"))},
        )

    saga_start = 8.0
    for number in range(1, sagas + 1):
        saga_start += rng.uniform(10.0, 25.0)
        plan = _saga_plan(number, rng)
        owner = rng.choice(fleet)
        name = _SAGA_NAMES[(number - 1) % len(_SAGA_NAMES)]
        _run_saga(build, f"saga-{number:02d}-{name}", owner, saga_start, plan)

    events = sorted(build.events, key=lambda event: event.timestamp)
    return Fleet(seed, tuple(fleet), tuple(events))


def _saga_plan(number: int, rng: random.Random) -> str:
    """How saga ``number`` ends: the first succeeds, the second fails and is rolled back, the
    third is escalated; the rest are drawn at random."""
    if number <= 3:
        return ("ok", "rolled-back", "escalated")[number - 1]
    return rng.choices(("ok", "rolled-back", "escalated"), weights=(7, 2, 1))[0]


def _run_saga(build: _Builder, saga_id: str, owner: DemoAgent, at: float, plan: str) -> None:
    rng = build.rng
    build.emit(at, EventType.SAGA_CREATED, owner, {"saga_id": saga_id})
    steps = rng.sample(_ACTIONS, rng.randint(2, 4))
    committed: list[tuple[str, str]] = []
    failed = plan != "ok"
    for index, action in enumerate(steps):
        at += rng.uniform(0.05, 0.5)
        step = {"saga_id": saga_id, "step_id": f"{action}-{index + 1}", "step_action": action}
        build.emit(at, EventType.SAGA_STEP_STARTED, owner, step)
        at += rng.uniform(0.4, 6.0)
        if failed and index == len(steps) - 1:
            build.emit(
                at,
                EventType.SAGA_STEP_FAILED,
                owner,
                {**step, "error": "connection_timeout", "reason": f"{action} backend unreachable"},
            )
            break
        build.emit(at, EventType.SAGA_STEP_COMMITTED, owner, {**step, "result": f"{action} done"})
        committed.append((step["step_id"], action))
    if failed:
        # Each compensation names the step it undoes (its id and action): the span is
        # saga.compensate.<action>.
        for step_id, action in reversed(committed):
            at += rng.uniform(0.3, 2.0)
            build.emit(
                at,
                EventType.SAGA_COMPENSATING,
                owner,
                {"saga_id": saga_id, "step_id": step_id, "step_action": action},
            )
    at += rng.uniform(0.1, 0.5)
    if plan == "escalated":
        reason = "compensation needs human review"
        build.emit(at, EventType.SAGA_ESCALATED, owner, {"saga_id": saga_id, "reason": reason})
    else:
        result = "rolled back" if failed else "all steps committed"
        build.emit(at, EventType.SAGA_COMPLETED, owner, {"saga_id": saga_id, "result": result})


def feed_in_process(fleet: Fleet) -> DemoResult:
    """Emit the fleet's events on an in-process bus observed by the published consumers."""
    from hypervisor.observability._core.event_bus import HypervisorEventBus
    from hypervisor.observability._core.ring_collector import RingMetricsCollector
    from hypervisor.observability._core.span_exporter import SagaSpanExporter

    bus = HypervisorEventBus()
    collector = RingMetricsCollector(bus)
    exporter = SagaSpanExporter(bus)
    for event in fleet.events:
        bus.emit(event)
    return DemoResult("in-process bus", bus.event_count, collector.state, exporter.completed_spans)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _clock(seconds: float) -> str:
    return (datetime.fromtimestamp(seconds, UTC)).strftime("%H:%M:%S.%f")[:-3]


def render_report(fleet: Fleet, result: DemoResult) -> str:
    """Render the demo's report: ring metrics, saga timeline and causal spawn tree."""
    first, last = fleet.events[0].timestamp, fleet.events[-1].timestamp
    saga_count = sum(1 for e in fleet.events if e.event_type is EventType.SAGA_CREATED)
    spawned = len(fleet.agents) - 1
    lines = [
        f"hvobs demo: seed {fleet.seed}, {_plural(len(fleet.agents), 'agent')} (an "
        f"orchestrator and {spawned} spawned), {_plural(saga_count, 'saga')}, "
        f"{_plural(result.events_emitted, 'event')} on the {result.backend}",
        f"simulated clock: {first.isoformat()} to {last.isoformat()}",
        "",
    ]
    lines += _render_ring(result.ring)
    lines.append("")
    lines += _render_sagas(result.spans)
    lines.append("")
    lines += _render_tree(fleet)
    return "\n".join(lines)


def _render_ring(state: RingMetricsState) -> list[str]:
    lines = [
        f"== Ring metrics (events processed: {state.events_processed}, "
        f"bad events: {state.bad_events})"
    ]
    by_type: dict[str, int] = {}
    for (event_type, _, _), count in state.transitions.items():
        by_type[event_type] = by_type.get(event_type, 0) + count
    lines.append("Transitions by type:")
    for member in (
        EventType.RING_ASSIGNED,
        EventType.RING_ELEVATED,
        EventType.RING_DEMOTED,
        EventType.RING_ELEVATION_EXPIRED,
    ):
        lines.append(f"  {member.value:<24} {by_type.get(member.value, 0):>4}")
    lines.append(f"Breaches (total {sum(state.breaches.values())}):")
    for (agent, session), count in sorted(state.breaches.items()):
        lines.append(f"  {agent:<28} {session:<14} {count:>4}")
    lines.append("Current rings:")
    for agent, ring in sorted(state.current_rings.items()):
        lines.append(f"  {agent:<28} ring {ring}")
    lines.append("Elevation durations (event time):")
    open_now = state.open_elevations()
    for agent in sorted(set(state.elevation_durations) | set(open_now)):
        if agent in open_now:
            lines.append(f"  {agent:<28} {open_now[agent]:>8.1f}s  still elevated")
        else:
            lines.append(f"  {agent:<28} {state.elevation_durations[agent]:>8.1f}s  finished")
    return lines


def _bar(start: float, end: float, origin: float, total: float) -> str:
    if total <= 0:
        return "=" * _BAR_WIDTH
    offset = min(_BAR_WIDTH - 1, int((start - origin) / total * _BAR_WIDTH))
    length = max(1, round((end - start) / total * _BAR_WIDTH))
    length = min(length, _BAR_WIDTH - offset)
    return " " * offset + "=" * length + " " * (_BAR_WIDTH - offset - length)


def saga_outcome(saga: SagaSpanRecord, children: list[SagaSpanRecord]) -> str:
    """What became of a saga, from its span and its step and compensation spans: ``escalated``,
    ``rolled back`` (completed after a failed step or a compensation) or ``completed``."""
    if saga.name.startswith("saga.escalated."):
        return "escalated"
    if any(child.status in ("error", "compensating") for child in children):
        return "rolled back"
    return "completed"


def _step_state(span: SagaSpanRecord) -> str:
    # A compensation span is emitted when the compensation has happened: its published status
    # ("compensating") would read as still under way.
    return {"compensating": "compensated", "error": "failed"}.get(span.status, span.status)


def _render_sagas(spans: list[SagaSpanRecord]) -> list[str]:
    lines = [f"== Saga span timeline ({len(spans)} spans)"]
    sagas = [s for s in spans if s.name.startswith(("saga.completed.", "saga.escalated."))]
    children: dict[str, list[SagaSpanRecord]] = {}
    for span in spans:
        if span.parent_span_id is not None and span not in sagas:
            children.setdefault(span.parent_span_id, []).append(span)
    for saga in sorted(sagas, key=lambda s: s.start_time):
        total = saga.duration_seconds
        mine = sorted(children.get(saga.span_id, []), key=lambda s: s.start_time)
        lines.append(
            f"{saga.saga_id:<32} |{_bar(saga.start_time, saga.end_time, saga.start_time, total)}|"
            f" {total:>7.2f}s [{saga_outcome(saga, mine)}]"
        )
        lines.append(
            f"  trace {saga.trace_id} span {saga.span_id} started {_clock(saga.start_time)}"
            f" by {saga.attributes.get('agent.did', 'unknown')}"
        )
        for child in mine:
            label = child.step_action or child.step_id
            kind = "undo" if child.status == "compensating" else "step"
            bar = _bar(child.start_time, child.end_time, saga.start_time, total)
            lines.append(
                f"  {kind} {label:<25} |{bar}| {child.duration_seconds:>7.2f}s "
                f"[{_step_state(child)}]"
            )
    return lines


def _render_tree(fleet: Fleet) -> list[str]:
    lines = ["== Causal spawn tree (trace/span[/parent])"]
    by_spawner: dict[str | None, list[DemoAgent]] = {}
    for agent in fleet.agents:
        by_spawner.setdefault(agent.spawned_by, []).append(agent)

    def walk(agent: DemoAgent, depth: int) -> None:
        label = "  " * depth + ("- " if depth else "") + agent.did
        lines.append(f"{label:<40} {agent.trace.full_id}  depth {agent.trace.depth}")
        for child in by_spawner.get(agent.did, []):
            walk(child, depth + 1)

    for root in by_spawner.get(None, []):
        walk(root, 0)
    return lines
