"""The demo fleet kept alive, for ``hvobs serve --demo``: its history, then new activity.

:class:`LiveFleet` takes a generated :class:`~hypervisor.observability.demo.fleet.Fleet`,
moves its events so that they end just before now (:meth:`LiveFleet.history`), and then
plans new activity on the wall clock every few seconds (:meth:`LiveFleet.due` returns what is
due): sagas whose steps take a second or two and sometimes fail and are compensated or
escalated, elevations that are later demoted or expire, breaches, agents spawned by agents
(children and siblings in the causal tree, up to ``max_agents``), and some audit and VFS
traffic. Pure (the caller passes the time); :func:`drive` runs it on a bus.
"""

from __future__ import annotations

import heapq
import itertools
import random
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import anyio
import msgspec

from hypervisor.observability._bus.bus import RedisEventBus
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RingMetricsState
from hypervisor.observability.demo.fleet import SESSION_ID, DemoAgent, Fleet

__all__ = ["LiveFleet", "drive"]

_ROLES: Final = ("researcher", "writer", "coder", "reviewer", "tool-runner", "analyst", "planner")
_SAGA_NAMES: Final = (
    "deploy-v2",
    "ingest-reports",
    "refresh-index",
    "rotate-keys",
    "publish-notes",
    "migrate-db",
)
_ACTIONS: Final = ("validate", "fetch", "transform", "build", "test", "deploy", "notify")
_TOOLS: Final = ("shell_exec", "net_raw", "fs_write_root")


class LiveFleet:
    """Plans the demo fleet's activity on the wall clock.

    Args:
        fleet: the generated fleet (its agents and history).
        seed: seeds the choices of the live activity.
        max_agents: agents spawned at most, the orchestrator included.
        pace_s: the mean time between two new activities.
    """

    def __init__(
        self, fleet: Fleet, *, seed: int = 0, max_agents: int = 16, pace_s: float = 2.0
    ) -> None:
        self.fleet = fleet
        self.max_agents = max_agents
        self.pace_s = pace_s
        self._rng = random.Random(seed)
        self.agents: list[DemoAgent] = list(fleet.agents)
        ring = RingMetricsState()
        for event in fleet.events:
            ring.apply(event)
        # The ring each agent goes back to after an elevation.
        self._rings = {agent.did: ring.current_rings.get(agent.did, 3) for agent in self.agents}
        self._busy_until: dict[str, datetime] = {}
        self._last_child: dict[str, DemoAgent] = {}
        for agent in self.agents:
            if agent.spawned_by is not None:
                self._last_child[agent.spawned_by] = agent
        self._sagas = sum(1 for e in fleet.events if e.event_type is EventType.SAGA_CREATED)
        self._queue: list[tuple[datetime, int, HypervisorEvent]] = []
        self._order = itertools.count()
        self._next_activity: datetime | None = None

    def history(self, now: datetime) -> list[HypervisorEvent]:
        """The fleet's generated events, moved to end one second before ``now``."""
        events = self.fleet.events
        if not events:
            return []
        shift = now - timedelta(seconds=1) - events[-1].timestamp
        return [msgspec.structs.replace(e, timestamp=e.timestamp + shift) for e in events]

    def due(self, now: datetime) -> list[HypervisorEvent]:
        """The events planned at or before ``now``, in time order; plans new activity first
        when it is time to."""
        if self._next_activity is None or now >= self._next_activity:
            self._plan(now)
            self._next_activity = now + timedelta(
                seconds=self._rng.uniform(0.5 * self.pace_s, 1.5 * self.pace_s)
            )
        due: list[HypervisorEvent] = []
        queue = self._queue
        while queue and queue[0][0] <= now:
            due.append(heapq.heappop(queue)[2])
        return due

    @property
    def planned(self) -> int:
        """Events planned and not yet due."""
        return len(self._queue)

    # -- planning ------------------------------------------------------------------------------

    def _at(
        self,
        when: datetime,
        event_type: EventType,
        agent: DemoAgent,
        payload: dict[str, Any],
        *,
        parent_event_id: str | None = None,
    ) -> HypervisorEvent:
        event = HypervisorEvent(
            event_type=event_type,
            timestamp=when,
            session_id=SESSION_ID,
            agent_did=agent.did,
            causal_trace_id=agent.trace.full_id,
            parent_event_id=parent_event_id,
            payload=payload,
        )
        heapq.heappush(self._queue, (when, next(self._order), event))
        return event

    def _plan(self, now: datetime) -> None:
        rng = self._rng
        workers = self.agents[1:] or self.agents
        choices = ["saga", "saga", "elevation", "elevation", "breach", "noise", "noise"]
        if len(self.agents) < self.max_agents:
            choices.append("spawn")
        kind = rng.choice(choices)
        if kind == "saga":
            self._saga(now, rng.choice(self.agents))
        elif kind == "elevation":
            idle = [a for a in workers if self._busy_until.get(a.did, now) <= now]
            if idle:
                self._elevation(now, rng.choice(idle))
            else:
                self._saga(now, rng.choice(self.agents))
        elif kind == "breach":
            agent = rng.choice(workers)
            self._at(
                now,
                EventType.RING_BREACH_DETECTED,
                agent,
                {"attempted_tool": rng.choice(_TOOLS), "ring": self._rings.get(agent.did, 3)},
            )
        elif kind == "spawn":
            self._spawn(now, rng.choice(self.agents))
        else:
            agent = rng.choice(self.agents)
            if rng.random() < 0.5:
                self._at(now, EventType.AUDIT_COMMITTED, agent, {"entries": rng.randint(1, 20)})
            else:
                path = f"/workspace/{agent.role}/notes-{rng.randint(1, 99)}.md"
                self._at(now, EventType.VFS_WRITE, agent, {"path": path})

    def _saga(self, now: datetime, owner: DemoAgent) -> None:
        rng = self._rng
        self._sagas += 1
        name = _SAGA_NAMES[(self._sagas - 1) % len(_SAGA_NAMES)]
        saga_id = f"saga-{self._sagas:02d}-{name}"
        outcome = rng.choices(("ok", "rolled-back", "escalated"), weights=(6, 3, 1))[0]
        at = now
        self._at(at, EventType.SAGA_CREATED, owner, {"saga_id": saga_id})
        steps = rng.sample(_ACTIONS, rng.randint(2, 4))
        committed: list[tuple[str, str]] = []
        failed = outcome != "ok"
        for index, action in enumerate(steps):
            at += timedelta(seconds=rng.uniform(0.1, 0.4))
            step = {"saga_id": saga_id, "step_id": f"{action}-{index + 1}", "step_action": action}
            self._at(at, EventType.SAGA_STEP_STARTED, owner, step)
            at += timedelta(seconds=rng.uniform(0.8, 2.5))
            if failed and index == len(steps) - 1:
                self._at(
                    at,
                    EventType.SAGA_STEP_FAILED,
                    owner,
                    {**step, "error": "connection_timeout", "reason": f"{action} unreachable"},
                )
                break
            self._at(at, EventType.SAGA_STEP_COMMITTED, owner, {**step, "result": "done"})
            committed.append((step["step_id"], action))
        if failed:
            for step_id, action in reversed(committed):
                at += timedelta(seconds=rng.uniform(0.4, 1.2))
                # Names the step it undoes: the span is saga.compensate.<action>.
                undo = {"saga_id": saga_id, "step_id": step_id, "step_action": action}
                self._at(at, EventType.SAGA_COMPENSATING, owner, undo)
        at += timedelta(seconds=rng.uniform(0.2, 0.5))
        if outcome == "escalated":
            reason = "compensation needs human review"
            self._at(at, EventType.SAGA_ESCALATED, owner, {"saga_id": saga_id, "reason": reason})
        else:
            result = "rolled back" if failed else "all steps committed"
            self._at(at, EventType.SAGA_COMPLETED, owner, {"saga_id": saga_id, "result": result})

    def _elevation(self, now: datetime, agent: DemoAgent) -> None:
        rng = self._rng
        base = self._rings.get(agent.did, 3)
        to_ring = max(0, base - rng.choice((1, 1, 2)))
        ttl = rng.uniform(8.0, 25.0)
        self._at(
            now,
            EventType.RING_ELEVATED,
            agent,
            {
                "from_ring": base,
                "to_ring": to_ring,
                "reason": "vouched by did:mesh:orchestrator",
                "ttl_seconds": round(ttl, 1),
            },
        )
        if rng.random() < 0.6:
            end = now + timedelta(seconds=rng.uniform(3.0, ttl))
            payload = {"from_ring": to_ring, "to_ring": base, "reason": "task finished"}
            self._at(end, EventType.RING_DEMOTED, agent, payload)
        else:
            end = now + timedelta(seconds=ttl)
            self._at(end, EventType.RING_ELEVATION_EXPIRED, agent, {"from_ring": to_ring})
        self._busy_until[agent.did] = end

    def _spawn(self, now: datetime, spawner: DemoAgent) -> None:
        rng = self._rng
        index = len(self.agents)
        sibling = self._last_child.get(spawner.did)
        # A spawner's first delegate is its child; the next ones are that child's siblings.
        trace = sibling.trace.sibling() if sibling is not None else spawner.trace.child()
        role = _ROLES[(index - 1) % len(_ROLES)]
        agent = DemoAgent(f"did:mesh:{role}-{index}", role, trace, spawner.did)
        self.agents.append(agent)
        self._last_child[spawner.did] = agent
        ring = rng.choice((2, 3, 3))
        self._rings[agent.did] = ring
        self._at(now, EventType.SESSION_JOINED, agent, {"role": role, "spawned_by": spawner.did})
        self._at(now + timedelta(milliseconds=100), EventType.RING_ASSIGNED, agent, {"ring": ring})


async def drive(bus: RedisEventBus, live: LiveFleet, *, tick_s: float = 0.25) -> None:
    """Emit the fleet's history on ``bus``, then its live activity as it falls due; until
    cancelled."""
    history = live.history(datetime.now(UTC))
    for start in range(0, len(history), 1000):
        await bus.emit_many(history[start : start + 1000])
    while True:
        events = live.due(datetime.now(UTC))
        if events:
            await bus.emit_many(events)
        await anyio.sleep(tick_s)
