"""The causal spawn tree as spans: a pure state machine, events in, agent span records out.

``AgentSpanState.apply(event, context=None)`` returns the agent spans the event completed. Like
the saga spans, everything is a function of the events applied (and the trace contexts they
carried), never of the wall clock or of randomness, so a worker replaying a stream produces the
very same spans.

Rules:

* **Nodes.** A node of the spawn tree is a causal span: the ``trace/span`` of an event's
  ``causal_trace_id``, mapped to W3C ids as the saga spans map it
  (:func:`~hypervisor.observability._core.span_ids.causal_span_ids`). Its span's parent is the
  span of the causal id's parent segment, so an agent's span is a child of the agent that
  spawned it, and the saga spans whose causal id is the agent's are children of its span. A
  string that is not a causal id is counted (``bad_causal_ids``) and otherwise ignored.
* **Membership.** An event belongs to the node of its causal id. Ring events and the two
  closing events below without a causal id go to the open node of their ``agent_did`` (the
  newest node that agent's events opened); other events without one are ignored.
* **Timing.** A node opens at its first event; its span starts at the earliest and ends at the
  latest timestamp of its events.
* **Closing**, in event order: ``session.terminated`` of the node (status unset,
  ``agent.span.end_reason=terminated``); ``security.agent_killed`` (status error,
  ``error.type=agent_killed``); idle for ``idle_timeout_s`` of event time, measured from its
  latest event to the newest timestamp applied (``idle``); evicted as the least recently touched
  node when more than ``max_open_agents`` are open (``evicted``); :meth:`close_all`
  (``flushed``). A closed node is remembered (the newest ``max_closed_agents``): its later
  events are counted as late (``late_events``), never reopen it, so a span id is produced once.
* **Span events.** Ring transitions and breaches become span events named by their event type
  (``ring.elevated``, ``ring.breach_detected``), at the event's time, with the rings
  (``agent.ring.to``, ``agent.ring.from``, ``agent.ring``), the event id and a few scalar
  payload values (``agent.event.<key>``, bounded). A node whose parent is open adds an
  ``agent.spawned`` event to its parent's span. At most ``max_span_events`` per span; the rest
  are counted (``agent.span.dropped_events``).
* **Links.** The distinct trace contexts of a node's events (the producers' spans) become its
  span's links, at most ``max_links`` (the OpenTelemetry SDK's default link limit, 128); each
  event whose context is not kept then is counted (``agent.span.dropped_links``).
* **Attributes** (the tutorial's namespace): ``agent.did``, ``session.id`` (of the first event
  that had them), ``agent.causal_trace_id``, ``agent.events``, ``agent.ring`` (the last ring a
  transition gave), ``agent.span.end_reason``. :func:`with_genai_attributes` adds the
  OpenTelemetry GenAI agent names at export, when asked for.

The open state is plain data (``msgspec.Struct`` nodes of strings, floats, ints, lists and
tuples), so it snapshots like the other states.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Final, Protocol, runtime_checkable

import msgspec

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RING_EVENTS, parse_ring
from hypervisor.observability._core.span_ids import causal_span_ids
from hypervisor.observability._core.trace_context import TraceContext

__all__ = [
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_MAX_CLOSED_AGENTS",
    "DEFAULT_MAX_LINKS",
    "DEFAULT_MAX_OPEN_AGENTS",
    "DEFAULT_MAX_SPAN_EVENTS",
    "GENAI_ATTRIBUTES",
    "AgentSpanRecord",
    "AgentSpanSink",
    "AgentSpanState",
    "SpanEventRecord",
    "agent_name",
    "with_genai_attributes",
]

DEFAULT_MAX_OPEN_AGENTS: Final = 10_000
"""Open agent spans tracked by default (the least recently touched is closed beyond it)."""
DEFAULT_MAX_CLOSED_AGENTS: Final = 50_000
"""Closed agent spans remembered, so that their late events never reopen them."""
DEFAULT_IDLE_TIMEOUT_S: Final = 300.0
"""Seconds of event time without an event after which an agent span closes."""
DEFAULT_MAX_SPAN_EVENTS: Final = 128
"""Span events kept per agent span (the OpenTelemetry SDK's default event limit)."""
DEFAULT_MAX_LINKS: Final = 128
"""Links kept per agent span (the OpenTelemetry SDK's default link limit)."""

GENAI_ATTRIBUTES: Final = (
    "gen_ai.operation.name",
    "gen_ai.agent.id",
    "gen_ai.agent.name",
    "gen_ai.conversation.id",
)
"""The OpenTelemetry GenAI agent attributes :func:`with_genai_attributes` adds."""

_KILLED: Final = EventType.AGENT_KILLED
_TERMINATED: Final = EventType.SESSION_TERMINATED
_BREACH: Final = EventType.RING_BREACH_DETECTED
_SPAWNED: Final = "agent.spawned"
_MAX_PAYLOAD_ATTRIBUTES: Final = 8
_MAX_KEY_LENGTH: Final = 64
_MAX_VALUE_LENGTH: Final = 256
_RING_KEYS: Final = frozenset({"to_ring", "ring", "from_ring"})
_MAX_CAUSAL: Final = 3 * 64 + 2  # the longest causal trace id (three segments of 64)


@dataclass(frozen=True, slots=True)
class SpanEventRecord:
    """A timestamped event on a span.

    Attributes:
        name: the event name (``ring.breach_detected``, ``agent.spawned``, ...).
        time: epoch seconds (event time).
        attributes: string, int, float or bool values.
    """

    name: str
    time: float
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AgentSpanRecord:
    """A completed agent span: one node of the causal spawn tree.

    Attributes:
        name: ``agent.run.<agent_did>`` (``invoke_agent <name>`` with the GenAI names).
        agent_did: the agent, ``None`` when no event of the node named one.
        session_id: the session of the node's first event that had one.
        causal_trace_id: the causal trace id of the node's first event.
        start_time: epoch seconds of the node's earliest event.
        end_time: epoch seconds of its latest event.
        status: ``"unset"``, or ``"error"`` for an agent killed.
        attributes: the span's attributes.
        trace_id: W3C trace id (32 hex) of the causal trace.
        span_id: W3C span id (16 hex) of the causal span.
        parent_span_id: W3C span id of the spawning agent's causal span, ``None`` for a root.
        events: ring transitions, breaches and spawned children, in event order.
        links: the producers' span contexts, in first-seen order.
    """

    name: str
    agent_did: str | None
    session_id: str | None
    causal_trace_id: str
    start_time: float
    end_time: float
    status: str
    attributes: dict[str, Any]
    trace_id: str
    span_id: str
    parent_span_id: str | None
    events: tuple[SpanEventRecord, ...] = ()
    links: tuple[TraceContext, ...] = ()

    @property
    def duration_seconds(self) -> float:
        """``end_time - start_time`` in seconds."""
        return self.end_time - self.start_time


@runtime_checkable
class AgentSpanSink(Protocol):
    """Receives completed :class:`AgentSpanRecord` objects."""

    def export_agent_span(self, record: AgentSpanRecord) -> None:
        """Receive one completed agent span."""
        ...


class _OpenAgent(msgspec.Struct):
    """An open node of the spawn tree (plain data: it is part of the snapshotted state)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    causal_trace_id: str
    agent_did: str | None
    session_id: str | None
    start: float
    end: float
    events: list[tuple[str, float, dict[str, Any]]] = msgspec.field(default_factory=list)
    links: list[TraceContext] = msgspec.field(default_factory=list)
    ring: int | None = None
    count: int = 0
    dropped_events: int = 0
    dropped_links: int = 0


@lru_cache(maxsize=4096)
def _ids(causal_trace_id: str) -> tuple[str, str, str | None] | None:
    """The W3C ids of a causal id (cached: an agent's events repeat its id)."""
    return causal_span_ids(causal_trace_id)


def agent_name(agent_did: str | None, span_id: str) -> str:
    """A short agent name: the last ``:`` segment of its DID (``did:mesh:researcher`` gives
    ``researcher``), else the span id."""
    if not agent_did:
        return span_id
    return agent_did.rsplit(":", 1)[-1] or agent_did


def _scalar(value: object) -> str | int | float | bool | None:
    """A payload value as a span attribute value, or ``None`` when it is not a bounded scalar."""
    kind = type(value)
    if kind is str:
        text: str = value  # type: ignore[assignment]
        return text if len(text) <= _MAX_VALUE_LENGTH else text[:_MAX_VALUE_LENGTH]
    if kind is bool:
        return value  # type: ignore[return-value]
    if kind is int:
        number: int = value  # type: ignore[assignment]
        return number if -(1 << 63) <= number < (1 << 63) else None
    if kind is float:
        real: float = value  # type: ignore[assignment]
        return real if math.isfinite(real) else None
    return None


class AgentSpanState:
    """The agent spans of an event stream; feed it with :meth:`apply`.

    Args:
        max_open_agents: open nodes tracked (at least 1).
        max_closed_agents: closed nodes remembered (at least 0).
        idle_timeout_s: event-time seconds without an event after which a node closes
            (positive; ``math.inf`` never closes on idleness).
        max_span_events: span events kept per span (at least 0).
        max_links: links kept per span (at least 0).

    Raises:
        ValueError: a limit is out of range.
    """

    __slots__ = (
        "_by_agent",
        "_closed",
        "_newest",
        "_open",
        "bad_causal_ids",
        "events_processed",
        "evicted_open_agents",
        "idle_timeout_s",
        "late_events",
        "max_closed_agents",
        "max_links",
        "max_open_agents",
        "max_span_events",
        "spans_completed",
    )

    def __init__(
        self,
        *,
        max_open_agents: int = DEFAULT_MAX_OPEN_AGENTS,
        max_closed_agents: int = DEFAULT_MAX_CLOSED_AGENTS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        max_span_events: int = DEFAULT_MAX_SPAN_EVENTS,
        max_links: int = DEFAULT_MAX_LINKS,
    ) -> None:
        if max_open_agents < 1:
            raise ValueError(f"max_open_agents must be >= 1, got {max_open_agents}")
        if max_closed_agents < 0 or max_span_events < 0 or max_links < 0:
            raise ValueError("max_closed_agents, max_span_events and max_links must be >= 0")
        if not idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be positive, got {idle_timeout_s}")
        self.max_open_agents = max_open_agents
        self.max_closed_agents = max_closed_agents
        self.idle_timeout_s = float(idle_timeout_s)
        self.max_span_events = max_span_events
        self.max_links = max_links
        # Least recently touched first: the idle check and eviction look at the head only.
        self._open: OrderedDict[str, _OpenAgent] = OrderedDict()
        self._by_agent: dict[str, str] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._newest = -math.inf
        self.events_processed = 0
        """Events that belonged to a node (opened or touched one)."""
        self.spans_completed = 0
        self.late_events = 0
        """Events of a node already closed (ignored)."""
        self.evicted_open_agents = 0
        self.bad_causal_ids = 0
        """Events whose ``causal_trace_id`` was not a causal trace id (ignored)."""

    @property
    def open_agent_count(self) -> int:
        """Nodes open now."""
        return len(self._open)

    @property
    def newest_timestamp(self) -> float | None:
        """The newest event timestamp applied (epoch seconds), ``None`` if none."""
        return None if self._newest == -math.inf else self._newest

    def open_span_ids(self) -> list[str]:
        """The W3C span ids of the open nodes, least recently touched first."""
        return [node.span_id for node in self._open.values()]

    def reset(self) -> None:
        """Forget every node and counter."""
        self._open.clear()
        self._by_agent.clear()
        self._closed.clear()
        self._newest = -math.inf
        self.events_processed = self.spans_completed = self.late_events = 0
        self.evicted_open_agents = self.bad_causal_ids = 0

    def apply(
        self, event: HypervisorEvent, context: TraceContext | None = None
    ) -> list[AgentSpanRecord]:
        """Fold one event (and the trace context it carried) into the state; return the agent
        spans it completed, oldest first."""
        out: list[AgentSpanRecord] = []
        event_type = event.event_type
        causal = event.causal_trace_id
        node: _OpenAgent | None = None
        key = ""
        ts: float | None = None
        if causal:
            # (Bounded before the cache sees it: a hostile id could be any length.)
            ids = _ids(causal) if type(causal) is str and len(causal) <= _MAX_CAUSAL else None
            if ids is None:
                self.bad_causal_ids += 1
            else:
                ts = event.timestamp.timestamp()
                key = ids[0] + ids[1]
                node = self._node(key, ids, causal, event, ts, out)
        elif event.agent_did and (
            event_type in RING_EVENTS or event_type is _TERMINATED or event_type is _KILLED
        ):
            found = self._by_agent.get(event.agent_did)
            if found is not None:
                ts = event.timestamp.timestamp()
                key = found
                node = self._open[key]
                self._open.move_to_end(key)
        if node is not None and ts is not None:
            self.events_processed += 1
            node.count += 1
            if ts < node.start:
                node.start = ts
            if ts > node.end:
                node.end = ts
            if context is not None:
                self._link(node, context)
            if event_type in RING_EVENTS:
                self._ring_event(node, event, ts)
            elif event_type is _TERMINATED:
                self._close(key, "terminated", out)
            elif event_type is _KILLED:
                self._close(key, "killed", out)
        if ts is None:
            return out
        if ts > self._newest:
            self._newest = ts
            self._expire(out)
        return out

    def close_all(self) -> list[AgentSpanRecord]:
        """Close every open node now (``agent.span.end_reason=flushed``); return their spans."""
        out: list[AgentSpanRecord] = []
        for key in list(self._open):
            self._close(key, "flushed", out)
        return out

    # -- internals ---------------------------------------------------------------------------

    def _node(
        self,
        key: str,
        ids: tuple[str, str, str | None],
        causal: str,
        event: HypervisorEvent,
        ts: float,
        out: list[AgentSpanRecord],
    ) -> _OpenAgent | None:
        """The open node ``key``, touched, or a new one; ``None`` for a closed one."""
        opened = self._open
        node = opened.get(key)
        agent = event.agent_did
        if node is not None:
            opened.move_to_end(key)
            if node.agent_did is None and agent:
                node.agent_did = agent
                self._by_agent[agent] = key
            if node.session_id is None and event.session_id:
                node.session_id = event.session_id
            return node
        if key in self._closed:
            self.late_events += 1
            return None
        trace_id, span_id, parent = ids
        node = _OpenAgent(
            trace_id, span_id, parent, causal, agent or None, event.session_id or None, ts, ts
        )
        opened[key] = node
        if agent:
            self._by_agent[agent] = key
        if parent is not None:
            spawner = opened.get(trace_id + parent)
            if spawner is not None:
                attributes: dict[str, Any] = {"agent.causal_trace_id": causal}
                if agent:
                    attributes["agent.did"] = agent
                self._add_event(spawner, _SPAWNED, ts, attributes)
        if len(opened) > self.max_open_agents:
            self.evicted_open_agents += 1
            self._close(next(iter(opened)), "evicted", out)
        return node

    def _link(self, node: _OpenAgent, context: TraceContext) -> None:
        links = node.links
        if context in links:
            return
        if len(links) < self.max_links:
            links.append(context)
        else:
            node.dropped_links += 1

    def _add_event(
        self, node: _OpenAgent, name: str, ts: float, attributes: dict[str, Any]
    ) -> None:
        if len(node.events) < self.max_span_events:
            node.events.append((name, ts, attributes))
        else:
            node.dropped_events += 1

    def _ring_event(self, node: _OpenAgent, event: HypervisorEvent, ts: float) -> None:
        payload = event.payload
        attributes: dict[str, Any] = {"agent.event.id": event.event_id}
        get = payload.get
        to_ring = parse_ring(get("to_ring"))
        if to_ring is None:
            to_ring = parse_ring(get("ring"))
        from_ring = parse_ring(get("from_ring"))
        if event.event_type is _BREACH:
            if to_ring is not None:
                attributes["agent.ring"] = to_ring
        else:
            if to_ring is not None:
                attributes["agent.ring.to"] = to_ring
                node.ring = to_ring
            if from_ring is not None:
                attributes["agent.ring.from"] = from_ring
        extra = 0
        for name, value in payload.items():
            if extra >= _MAX_PAYLOAD_ATTRIBUTES:
                break
            if name in _RING_KEYS or type(name) is not str or len(name) > _MAX_KEY_LENGTH:
                continue
            scalar = _scalar(value)
            if scalar is not None:
                attributes[f"agent.event.{name}"] = scalar
                extra += 1
        self._add_event(node, event.event_type.value, ts, attributes)

    def _expire(self, out: list[AgentSpanRecord]) -> None:
        """Close the nodes idle for ``idle_timeout_s`` of event time, from the head."""
        opened = self._open
        horizon = self._newest - self.idle_timeout_s
        while opened:
            key = next(iter(opened))
            if opened[key].end >= horizon:
                return
            self._close(key, "idle", out)

    def _close(self, key: str, reason: str, out: list[AgentSpanRecord]) -> None:
        node = self._open.pop(key)
        agent = node.agent_did
        if agent is not None and self._by_agent.get(agent) == key:
            del self._by_agent[agent]
        if self.max_closed_agents:
            closed = self._closed
            closed[key] = None
            if len(closed) > self.max_closed_agents:
                closed.popitem(last=False)
        self.spans_completed += 1
        out.append(_record(node, reason))


def _record(node: _OpenAgent, reason: str) -> AgentSpanRecord:
    attributes: dict[str, Any] = {}
    if node.agent_did:
        attributes["agent.did"] = node.agent_did
    if node.session_id:
        attributes["session.id"] = node.session_id
    attributes["agent.causal_trace_id"] = node.causal_trace_id
    attributes["agent.events"] = node.count
    if node.ring is not None:
        attributes["agent.ring"] = node.ring
    attributes["agent.span.end_reason"] = reason
    if node.dropped_events:
        attributes["agent.span.dropped_events"] = node.dropped_events
    if node.dropped_links:
        attributes["agent.span.dropped_links"] = node.dropped_links
    status = "unset"
    if reason == "killed":
        status = "error"
        attributes["error.type"] = "agent_killed"
    return AgentSpanRecord(
        name=f"agent.run.{node.agent_did or node.span_id}",
        agent_did=node.agent_did,
        session_id=node.session_id,
        causal_trace_id=node.causal_trace_id,
        start_time=node.start,
        end_time=node.end,
        status=status,
        attributes=attributes,
        trace_id=node.trace_id,
        span_id=node.span_id,
        parent_span_id=node.parent_span_id,
        events=tuple(SpanEventRecord(name, ts, attrs) for name, ts, attrs in node.events),
        links=tuple(node.links),
    )


def with_genai_attributes(record: AgentSpanRecord) -> AgentSpanRecord:
    """``record`` with the OpenTelemetry GenAI agent names added next to the ``agent.*`` ones.

    The span is named ``invoke_agent <gen_ai.agent.name>`` and gets ``gen_ai.operation.name``
    (``invoke_agent``), ``gen_ai.agent.id`` (the DID), ``gen_ai.agent.name`` (:func:`agent_name`)
    and ``gen_ai.conversation.id`` (the session); each ``agent.spawned`` event gets
    ``gen_ai.operation.name`` ``create_agent`` and the child's id and name.
    """
    name = agent_name(record.agent_did, record.span_id)
    attributes = dict(record.attributes)
    attributes["gen_ai.operation.name"] = "invoke_agent"
    if record.agent_did:
        attributes["gen_ai.agent.id"] = record.agent_did
    attributes["gen_ai.agent.name"] = name
    if record.session_id:
        attributes["gen_ai.conversation.id"] = record.session_id
    events = tuple(
        _genai_spawn(event) if event.name == _SPAWNED else event for event in record.events
    )
    return replace(record, name=f"invoke_agent {name}", attributes=attributes, events=events)


def _genai_spawn(event: SpanEventRecord) -> SpanEventRecord:
    attributes = dict(event.attributes)
    attributes["gen_ai.operation.name"] = "create_agent"
    child = attributes.get("agent.did")
    if isinstance(child, str):
        attributes["gen_ai.agent.id"] = child
        attributes["gen_ai.agent.name"] = agent_name(child, "")
    return SpanEventRecord(event.name, event.time, attributes)
