"""What the live view shows, derived from the event stream: agents, sagas and spawn trees.

:class:`FleetView` is fed every event of the bus (one wildcard subscriber, in log order) and
keeps, each bounded:

* the agents: a :class:`~hypervisor.observability._core.ring.RingMetricsState` (current ring,
  open elevations in event time) plus, per agent, when it was last seen, its causal span and
  its breach count; the least recently seen agents are forgotten beyond ``max_agents``;
* the sagas: a :class:`~hypervisor.observability._core.spans.SagaSpanState` turns saga events
  into spans (steps, compensations, the saga itself), grouped here per saga with the steps
  still running and what became of the saga (running, compensating, completed, rolled back,
  escalated); the least recently updated sagas are forgotten beyond ``max_sagas``;
* the causal spawn trees: each event's ``causal_trace_id`` (``trace/span[/parent]``) adds its
  span to the tree of its trace; the least recently active traces are forgotten beyond
  ``max_traces``, and a tree keeps at most ``max_nodes`` spans.

Everything is a function of the events (event time, never the wall clock), so the same stream
gives the same view. Malformed input (a causal id that does not parse, a saga field of the
wrong type) is counted and otherwise ignored. Pure: no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RingMetricsState
from hypervisor.observability._core.span_sagas import _saga_keys as saga_keys
from hypervisor.observability._core.spans import SagaSpanRecord, SagaSpanState
from hypervisor.observability._core.trace import CausalTraceId

__all__ = [
    "DEFAULT_MAX_AGENTS",
    "DEFAULT_MAX_NODES",
    "DEFAULT_MAX_SAGAS",
    "DEFAULT_MAX_SPANS_PER_SAGA",
    "DEFAULT_MAX_TRACES",
    "FleetView",
    "SagaEntry",
    "TraceTree",
]

DEFAULT_MAX_AGENTS: Final = 10_000
DEFAULT_MAX_SAGAS: Final = 2_000
DEFAULT_MAX_SPANS_PER_SAGA: Final = 100
DEFAULT_MAX_TRACES: Final = 1_000
DEFAULT_MAX_NODES: Final = 2_000
# Agents are forgotten in batches (one pass over the ring state's tables per batch).
_AGENT_SLACK: Final = 0.1
# Running steps tracked per saga.
_MAX_RUNNING: Final = 64

_CREATED: Final = EventType.SAGA_CREATED
_STARTED: Final = EventType.SAGA_STEP_STARTED
_COMMITTED: Final = EventType.SAGA_STEP_COMMITTED
_FAILED: Final = EventType.SAGA_STEP_FAILED
_COMPENSATING: Final = EventType.SAGA_COMPENSATING
_COMPLETED: Final = EventType.SAGA_COMPLETED
_ESCALATED: Final = EventType.SAGA_ESCALATED
_BREACH: Final = EventType.RING_BREACH_DETECTED
_SAGA_EVENTS: Final = frozenset(
    {_CREATED, _STARTED, _COMMITTED, _FAILED, _COMPENSATING, _COMPLETED, _ESCALATED}
)

SAGA_STATES: Final = ("running", "failed", "compensating", "completed", "rolled_back", "escalated")
"""What a saga can be shown as: ``failed`` has a failed step and no compensation yet,
``rolled_back`` completed after a failure or a compensation."""


def _text(value: object) -> str:
    if value is None:
        return ""
    return value if type(value) is str else str(value)


def _saga_keys(event: HypervisorEvent) -> tuple[str, str, str]:
    """``(saga_id, step_key, step_action)``: the span state's keys, a step keyed by its id or
    else its action, as the span state keys its open steps."""
    saga_id, step_id, action = saga_keys(event)
    return saga_id, step_id or action, action


@dataclass(slots=True)
class _Agent:
    first_seen: float
    last_seen: float
    trace_id: str | None = None
    span_id: str | None = None
    session_id: str | None = None
    breaches: int = 0
    events: int = 0


@dataclass(slots=True)
class SagaEntry:
    """One saga as the view shows it.

    Attributes:
        saga_id: the saga's id.
        state: one of :data:`SAGA_STATES`.
        started_at: epoch seconds of its first event seen.
        ended_at: epoch seconds of its completion or escalation, ``None`` while open.
        agent_did: the agent of its first event.
        session_id: the session of its first event.
        trace_id: the first segment of its first event's causal trace id.
        spans: its completed spans (steps, compensations, then the saga span), oldest first.
        running: steps started and not yet ended: step key -> (start, action).
        failed_steps: steps that failed.
        compensations: compensations seen.
        dropped_spans: spans not kept beyond the per-saga cap.
        updated: epoch seconds of its newest event (the least recently updated are forgotten).
    """

    saga_id: str
    state: str
    started_at: float
    agent_did: str | None
    session_id: str | None
    trace_id: str | None
    ended_at: float | None = None
    spans: list[SagaSpanRecord] = field(default_factory=list)
    running: dict[str, tuple[float, str]] = field(default_factory=dict)
    failed_steps: int = 0
    compensations: int = 0
    dropped_spans: int = 0
    updated: float = 0.0


@dataclass(slots=True)
class _Node:
    parent_span_id: str | None
    agent_did: str | None
    first_seen: float
    events: int = 0


@dataclass(slots=True)
class TraceTree:
    """The spans of one causal trace: span id -> node, in order of first sight.

    Attributes:
        trace_id: the trace id (the causal id's first segment).
        nodes: span id -> its parent span id, first agent and first sight.
        last_seen: epoch seconds of the trace's newest event.
        dropped_nodes: spans not kept beyond the per-trace cap.
    """

    trace_id: str
    nodes: dict[str, _Node] = field(default_factory=dict)
    last_seen: float = 0.0
    dropped_nodes: int = 0


class FleetView:
    """The live view's state; feed it every event with :meth:`apply` (one thread or task).

    Args:
        max_agents: agents kept (least recently seen forgotten first).
        max_sagas: sagas kept (least recently updated forgotten first).
        max_spans_per_saga: completed spans kept per saga.
        max_traces: spawn trees kept (least recently active forgotten first).
        max_nodes: spans kept per spawn tree.

    Raises:
        ValueError: a cap is below 1.
    """

    def __init__(
        self,
        *,
        max_agents: int = DEFAULT_MAX_AGENTS,
        max_sagas: int = DEFAULT_MAX_SAGAS,
        max_spans_per_saga: int = DEFAULT_MAX_SPANS_PER_SAGA,
        max_traces: int = DEFAULT_MAX_TRACES,
        max_nodes: int = DEFAULT_MAX_NODES,
    ) -> None:
        for name, value in (
            ("max_agents", max_agents),
            ("max_sagas", max_sagas),
            ("max_spans_per_saga", max_spans_per_saga),
            ("max_traces", max_traces),
            ("max_nodes", max_nodes),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.max_agents = max_agents
        self.max_sagas = max_sagas
        self.max_spans_per_saga = max_spans_per_saga
        self.max_traces = max_traces
        self.max_nodes = max_nodes
        self.ring = RingMetricsState()
        # The view groups spans itself: the span state buffers none.
        self.spans = SagaSpanState(
            max_spans=0, max_open_sagas=max_sagas, max_open_steps=max_sagas * 8
        )
        self._agents: OrderedDict[str, _Agent] = OrderedDict()
        self._sagas: OrderedDict[str, SagaEntry] = OrderedDict()
        self._traces: OrderedDict[str, TraceTree] = OrderedDict()
        self.events_applied = 0
        self.bad_trace_ids = 0
        self.evicted_agents = 0
        self.evicted_sagas = 0
        self.evicted_traces = 0

    # -- feeding -------------------------------------------------------------------------------

    def apply(self, event: HypervisorEvent) -> None:
        """Fold one event into the view; never raises for malformed event content."""
        self.events_applied += 1
        try:
            ts = event.timestamp.timestamp()
        except (AttributeError, OverflowError, ValueError):
            ts = 0.0
        trace = self._trace(event, ts)
        agent = event.agent_did
        if agent is not None and type(agent) is str:
            self._touch_agent(event, agent, ts, trace)
        event_type = event.event_type
        self.ring.apply(event)
        if event_type in _SAGA_EVENTS:
            self._saga_event(event, event_type, ts, trace)

    def _trace(self, event: HypervisorEvent, ts: float) -> CausalTraceId | None:
        causal = event.causal_trace_id
        if not causal:
            return None
        try:
            parsed = CausalTraceId.from_string(causal)
        except ValueError:
            self.bad_trace_ids += 1
            return None
        traces = self._traces
        tree = traces.get(parsed.trace_id)
        if tree is None:
            tree = traces[parsed.trace_id] = TraceTree(parsed.trace_id)
            if len(traces) > self.max_traces:
                traces.popitem(last=False)
                self.evicted_traces += 1
        else:
            traces.move_to_end(parsed.trace_id)
        tree.last_seen = max(tree.last_seen, ts)
        node = tree.nodes.get(parsed.span_id)
        if node is None:
            if len(tree.nodes) >= self.max_nodes:
                tree.dropped_nodes += 1
                return parsed
            node = tree.nodes[parsed.span_id] = _Node(
                parsed.parent_span_id, _text(event.agent_did) or None, ts
            )
        elif node.agent_did is None and event.agent_did:
            node.agent_did = _text(event.agent_did)
        node.events += 1
        return parsed

    def _touch_agent(
        self, event: HypervisorEvent, did: str, ts: float, trace: CausalTraceId | None
    ) -> None:
        agents = self._agents
        info = agents.get(did)
        if info is None:
            info = agents[did] = _Agent(ts, ts)
            if len(agents) > self.max_agents * (1 + _AGENT_SLACK):
                self._forget_agents(len(agents) - self.max_agents)
        else:
            agents.move_to_end(did)
            if ts > info.last_seen:
                info.last_seen = ts
        info.events += 1
        if event.session_id is not None:
            info.session_id = _text(event.session_id)
        if trace is not None and info.span_id is None:
            # The agent's own span: the first causal id it was seen with (its join, spawn).
            info.trace_id, info.span_id = trace.trace_id, trace.span_id
        if event.event_type is _BREACH:
            info.breaches += 1

    def _forget_agents(self, count: int) -> None:
        agents = self._agents
        gone = [agents.popitem(last=False)[0] for _ in range(count)]
        self.ring.forget_agents(gone)
        self.evicted_agents += len(gone)

    def _saga_event(
        self, event: HypervisorEvent, event_type: EventType, ts: float, trace: CausalTraceId | None
    ) -> None:
        saga_id, step_key, action = _saga_keys(event)
        sagas = self._sagas
        entry = sagas.get(saga_id)
        if entry is None or event_type is _CREATED:
            entry = SagaEntry(
                saga_id,
                "running",
                ts,
                _text(event.agent_did) or None,
                _text(event.session_id) or None,
                None if trace is None else trace.trace_id,
            )
            sagas.pop(saga_id, None)
            sagas[saga_id] = entry
            if len(sagas) > self.max_sagas:
                sagas.popitem(last=False)
                self.evicted_sagas += 1
        else:
            sagas.move_to_end(saga_id)
        entry.updated = max(entry.updated, ts)
        if event_type is _STARTED:
            running = entry.running
            running.pop(step_key, None)
            running[step_key] = (ts, action)
            if len(running) > _MAX_RUNNING:
                del running[next(iter(running))]
        elif event_type is _COMMITTED or event_type is _FAILED:
            entry.running.pop(step_key, None)
            if event_type is _FAILED:
                entry.failed_steps += 1
                if entry.state == "running":
                    entry.state = "failed"
        elif event_type is _COMPENSATING:
            entry.compensations += 1
            if entry.state in ("running", "failed"):
                entry.state = "compensating"
        elif event_type is _COMPLETED or event_type is _ESCALATED:
            entry.ended_at = ts
            entry.running.clear()
            if event_type is _ESCALATED:
                entry.state = "escalated"
            elif entry.failed_steps or entry.compensations:
                entry.state = "rolled_back"
            else:
                entry.state = "completed"
        for record in self.spans.apply(event):
            self._add_span(record)

    def _add_span(self, record: SagaSpanRecord) -> None:
        entry = self._sagas.get(record.saga_id)
        if entry is None:
            return
        if len(entry.spans) >= self.max_spans_per_saga:
            entry.dropped_spans += 1
            return
        entry.spans.append(record)

    # -- reading -------------------------------------------------------------------------------

    @property
    def agent_count(self) -> int:
        """Agents kept."""
        return len(self._agents)

    @property
    def saga_count(self) -> int:
        """Sagas kept."""
        return len(self._sagas)

    @property
    def trace_count(self) -> int:
        """Spawn trees kept."""
        return len(self._traces)

    def agent(self, did: str) -> dict[str, Any] | None:
        """One agent as :meth:`agents` lists it, ``None`` when unknown."""
        info = self._agents.get(did)
        if info is None:
            return None
        return self._agent_dict(did, info, self.ring.open_elevations())

    def _agent_dict(
        self, did: str, info: _Agent, open_elevations: dict[str, float]
    ) -> dict[str, Any]:
        ring = self.ring
        elevated_since = ring.elevation_starts.get(did)
        return {
            "agent_did": did,
            "ring": ring.current_rings.get(did),
            "elevated": elevated_since is not None,
            "elevated_since": elevated_since,
            "elevated_seconds": open_elevations.get(did),
            "last_elevation_seconds": ring.elevation_durations.get(did),
            "breaches": info.breaches,
            "events": info.events,
            "first_seen": info.first_seen,
            "last_seen": info.last_seen,
            "session_id": info.session_id,
            "trace_id": info.trace_id,
            "span_id": info.span_id,
        }

    def agents(
        self, *, elevated: bool | None = None, breached: bool | None = None, limit: int = 500
    ) -> tuple[list[dict[str, Any]], int]:
        """The agents matching the filters, most recently seen first, at most ``limit``; and
        how many matched in all."""
        open_elevations = self.ring.open_elevations()
        starts = self.ring.elevation_starts
        result: list[dict[str, Any]] = []
        total = 0
        for did in reversed(self._agents):
            info = self._agents[did]
            if elevated is not None and (did in starts) != elevated:
                continue
            if breached is not None and (info.breaches > 0) != breached:
                continue
            total += 1
            if len(result) < limit:
                result.append(self._agent_dict(did, info, open_elevations))
        return result, total

    def saga(self, saga_id: str) -> SagaEntry | None:
        """The saga ``saga_id``, ``None`` when unknown (or forgotten)."""
        return self._sagas.get(saga_id)

    def sagas(
        self, *, state: str | None = None, agent_did: str | None = None, limit: int = 20
    ) -> tuple[list[SagaEntry], int]:
        """The sagas matching the filters, most recently started first, at most ``limit``;
        and how many matched in all."""
        matched = [
            entry
            for entry in self._sagas.values()
            if (state is None or entry.state == state)
            and (agent_did is None or entry.agent_did == agent_did)
        ]
        matched.sort(key=lambda entry: entry.started_at, reverse=True)
        return matched[:limit], len(matched)

    def trace(self, trace_id: str) -> TraceTree | None:
        """The spawn tree of ``trace_id``, ``None`` when unknown (or forgotten)."""
        return self._traces.get(trace_id)

    def traces(self, limit: int = 100) -> tuple[list[TraceTree], int]:
        """The spawn trees, most recently active first, at most ``limit``; and how many."""
        trees = list(reversed(self._traces.values()))
        return trees[:limit], len(trees)

    def tree_nodes(self, tree: TraceTree) -> list[dict[str, Any]]:
        """The nodes of ``tree`` with their depth and their agent's ring, elevation and
        breaches, parents before children (roots by first sight)."""
        nodes = tree.nodes
        children: dict[str | None, list[str]] = {}
        for span_id, node in nodes.items():
            parent = node.parent_span_id if node.parent_span_id in nodes else None
            children.setdefault(parent, []).append(span_id)
        ring = self.ring
        starts = ring.elevation_starts
        ordered: list[dict[str, Any]] = []
        # Iterative depth-first walk; a cycle (hostile parent links) is cut by ``seen``.
        seen: set[str] = set()
        stack = [(span_id, 0) for span_id in reversed(children.get(None, []))]
        while stack:
            span_id, depth = stack.pop()
            if span_id in seen:
                continue
            seen.add(span_id)
            ordered.append(self._node_dict(span_id, nodes[span_id], depth, ring, starts))
            stack.extend((child, depth + 1) for child in reversed(children.get(span_id, [])))
        # Spans on a cycle have no root: list them at depth 0.
        for span_id, node in nodes.items():
            if span_id not in seen:
                ordered.append(self._node_dict(span_id, node, 0, ring, starts))
        return ordered

    def _node_dict(
        self,
        span_id: str,
        node: _Node,
        depth: int,
        ring: RingMetricsState,
        starts: dict[str, float],
    ) -> dict[str, Any]:
        did = node.agent_did
        info = None if did is None else self._agents.get(did)
        return {
            "span_id": span_id,
            "parent_span_id": node.parent_span_id,
            "depth": depth,
            "agent_did": did,
            "ring": None if did is None else ring.current_rings.get(did),
            "elevated": did is not None and did in starts,
            "breaches": 0 if info is None else info.breaches,
            "first_seen": node.first_seen,
            "events": node.events,
        }
