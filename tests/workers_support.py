"""Shared helpers for the worker tests: random event streams and the in-process reference."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypervisor.observability._backends.log import StreamLog
from hypervisor.observability._backends.state import StateStore
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RING_EVENTS
from hypervisor.observability._core.spans import SagaSpanRecord
from hypervisor.observability.event_bus import HypervisorEventBus
from hypervisor.observability.prometheus_collector import RingMetricsCollector
from hypervisor.observability.saga_span_exporter import SagaSpanExporter
from hypervisor.observability.testing import RecordingSpanSink
from hypervisor.observability.workers._apply import Applier

_T0 = datetime(2026, 1, 1, tzinfo=UTC)
_NOISE = (EventType.SESSION_CREATED, EventType.VFS_WRITE, EventType.AUDIT_COMMITTED)


def random_events(
    rng: random.Random, count: int, *, agents: int = 6, sagas: int = 8
) -> list[HypervisorEvent]:
    """Return ``count`` events: ring transitions, breaches, saga lifecycles and noise.

    Timestamps mostly increase, with some going backwards (skewed clocks). Rings include ``0``,
    strings and the odd bad value, so every rule of the state machines is exercised.
    """
    events: list[HypervisorEvent] = []
    now = _T0
    open_steps: dict[str, list[str]] = {}
    for index in range(count):
        now += timedelta(milliseconds=rng.randint(-20, 200))
        agent = f"did:agent:{rng.randrange(agents)}"
        session = f"s{rng.randrange(3)}"
        roll = rng.random()
        payload: dict[str, Any]
        if roll < 0.45:
            kind = rng.choice(
                [
                    EventType.RING_ASSIGNED,
                    EventType.RING_ELEVATED,
                    EventType.RING_ELEVATED,
                    EventType.RING_DEMOTED,
                    EventType.RING_DEMOTED,
                    EventType.RING_ELEVATION_EXPIRED,
                    EventType.RING_BREACH_DETECTED,
                ]
            )
            payload = {}
            pick = rng.random()
            if pick < 0.6:
                payload["to_ring"] = rng.choice([0, 1, 2, 3, "2", 1.0])
            elif pick < 0.7:
                payload["ring"] = rng.randrange(4)
            elif pick < 0.75:
                payload["to_ring"] = "high"
            if rng.random() < 0.3:
                payload["from_ring"] = rng.randrange(4)
            events.append(
                HypervisorEvent(
                    event_type=kind,
                    timestamp=now,
                    agent_did=agent if rng.random() < 0.95 else None,
                    session_id=session if rng.random() < 0.9 else None,
                    payload=payload,
                )
            )
        elif roll < 0.9:
            saga = f"saga-{rng.randrange(sagas)}"
            steps = open_steps.setdefault(saga, [])
            pick = rng.random()
            if pick < 0.12:
                kind, payload = EventType.SAGA_CREATED, {"saga_id": saga}
            elif pick < 0.45:
                step = f"step-{rng.randrange(4)}"
                steps.append(step)
                kind = EventType.SAGA_STEP_STARTED
                payload = {"saga_id": saga, "step_id": step, "action": f"act{step[-1]}"}
            elif pick < 0.75:
                step = rng.choice(steps) if steps else f"step-{rng.randrange(4)}"
                kind = rng.choice([EventType.SAGA_STEP_COMMITTED, EventType.SAGA_STEP_FAILED])
                payload = {"saga_id": saga, "step_id": step, "action": f"act{step[-1]}"}
                if kind is EventType.SAGA_STEP_FAILED:
                    payload["error"] = "boom"
                else:
                    payload["result"] = {"n": index}
            elif pick < 0.87:
                kind = EventType.SAGA_COMPENSATING
                payload = {"saga_id": saga, "step_id": f"step-{rng.randrange(4)}"}
            else:
                kind = rng.choice([EventType.SAGA_COMPLETED, EventType.SAGA_ESCALATED])
                payload = {"saga_id": saga, "reason": "done"}
            events.append(
                HypervisorEvent(
                    event_type=kind,
                    timestamp=now,
                    agent_did=agent,
                    session_id=session,
                    causal_trace_id=f"{saga.encode().hex()[:12]}/0000abcd"
                    if rng.random() < 0.5
                    else None,
                    payload=payload,
                )
            )
        else:
            events.append(HypervisorEvent(event_type=rng.choice(_NOISE), timestamp=now))
    return events


@dataclass
class Reference:
    """What the in-process collector and exporter produce from a stream (duplicates dropped)."""

    ring: dict[str, Any]
    open_elevations: dict[str, float]
    bad_events: int
    spans: list[SagaSpanRecord] = field(default_factory=list)


def reference(events: list[HypervisorEvent]) -> Reference:
    """Feed the published in-process classes with ``events`` in order, each event id once."""
    bus = HypervisorEventBus(max_events=None)
    collector = RingMetricsCollector(bus)
    sink = RecordingSpanSink()
    SagaSpanExporter(bus, sink=sink, max_spans=0)
    seen: set[str] = set()
    for event in events:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        bus.emit(event)
    return Reference(
        ring=collector.collect(),
        open_elevations=collector.state.open_elevations(),
        bad_events=collector.bad_events,
        spans=sink.records,
    )


def span_key(record: SagaSpanRecord) -> tuple[Any, ...]:
    """Every field of a span, for exact comparison."""
    return (
        record.span_id,
        record.trace_id,
        record.parent_span_id,
        record.name,
        record.saga_id,
        record.step_id,
        record.step_action,
        record.start_time,
        record.end_time,
        record.status,
        tuple(sorted(record.attributes.items())),
    )


def ring_events(seed: int, count: int) -> list[HypervisorEvent]:
    """``count`` ring events of :func:`random_events` (seeded)."""
    events = random_events(random.Random(seed), count * 4)
    return [e for e in events if e.event_type in RING_EVENTS][:count]


async def feed(log: StreamLog, store: StateStore, events: list[HypervisorEvent]) -> None:
    """Append, deliver (group ``g``, consumer ``c``), stage and acknowledge ``events`` as a
    worker does."""
    await log.append_many([encode_event(e) for e in events])
    batch = await log.read_group("g", "c", len(events))
    await store.stage([(e.id, e.data) for e in batch if e.data is not None])
    await log.ack("g", [e.id for e in batch])


async def apply_all(applier: Applier) -> None:
    """Run apply rounds until one applies nothing."""
    while await applier.round():
        pass
