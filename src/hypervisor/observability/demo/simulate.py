"""A fleet simulator: a steady, realistic agent workload, with its metrics on ``/metrics``.

Run ``python -m hypervisor.observability.demo.simulate --port 8000``. Every tick the
simulated agents get ring assignments, elevations, demotions and expiries, ask the governance
layer for tool calls (allowed, denied, rate limited; with evaluation latencies), write audit
records and run sagas whose steps sometimes fail and are compensated. Three agents are there to
light up the tutorial's alert rules:

* ``did:mesh:rogue-bot`` breaches its ring ``--breach-rate`` times per second (default 2/s,
  above ``HighRingBreachRate``'s 0.5/s), and its trust score sinks;
* ``did:mesh:stuck-admin`` was elevated to ring 0 ten minutes before start (in event time) and
  is never demoted (``ElevationTooLong``);
* a ``--slow-fraction`` of decisions (default 3%) go to a slow external policy backend taking
  60-200 ms (``GovernanceLatencyHigh``: the p99 is above 50 ms).

The fleet works in runs of ``--run-seconds`` (default 60): an orchestrator (``did:mesh:
orchestrator``) with a root causal trace id spawns every agent as its child; the agents' events
carry their causal ids (so the breaches carry exemplars leading to the rogue agent's span), and
at the end of a run every session is terminated and the next run starts with new causal ids,
so the agent spans of the spawn tree close and reach the tracing backend.

Without ``--redis`` the events go to an in-process ``HypervisorEventBus``; a
``RingMetricsCollector`` on it is exposed through
:class:`~hypervisor.observability.exporters.prometheus.RingMetricsPrometheusCollector`, next to
the :class:`~hypervisor.observability.exporters.governance.GovernanceMetrics` of the simulated
policy engine, and ``--otlp-endpoint`` sends the saga spans and the agent spans of the spawn
tree over OTLP/HTTP. With ``--redis URL``
the events are appended to the shared stream instead (for the ring-metrics and saga-span
workers), and ``/metrics`` serves the governance metrics only.

``--otel-metrics-port N`` also records every decision through an OpenTelemetry meter named like
the .NET one and serves it with OpenTelemetry's Prometheus exporter on port N: the series a .NET
kernel's exporter would publish (the ``_milliseconds`` unit suffix included), to check that the
deployed relabelling puts both languages on one series name. Needs
``opentelemetry-exporter-prometheus`` (the ``otel`` extra).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import anyio
from prometheus_client import CollectorRegistry, disable_created_metrics

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.trace import CausalTraceId
from hypervisor.observability.exporters.governance import METER_NAME, GovernanceMetrics
from hypervisor.observability.exporters.prometheus import register_ring_metrics, serve_metrics

__all__ = ["FleetSimulator", "main"]

ROGUE: Final = "rogue-bot"
STUCK: Final = "stuck-admin"
NOISY: Final = "noisy-agent"
_TOOLS: Final = ("file_read", "search", "api_call", "db_query", "file_write", "shell_exec")
_SLOW_TOOL: Final = "vector_search"
_SAGA_STEPS: Final = (("validate-config", "validate"), ("run-migrations", "migrate"))
_SAGA_DEPLOY: Final = ("deploy", "deploy")
_FAILED: Final = EventType.SAGA_STEP_FAILED
_COMMITTED: Final = EventType.SAGA_STEP_COMMITTED


@dataclass
class _Agent:
    did: str
    session: str
    ring: int = 3
    elevated_until: float | None = None
    trust: float = 850.0
    causal: str | None = None  # the agent's causal trace id in the current run


@dataclass
class FleetSimulator:
    """Generates the workload; :meth:`tick` returns the events of one tick.

    Decisions and trust scores go straight to ``governance``; events are returned for the
    caller to emit (to an in-process bus or a Redis stream).

    Args:
        governance: where policy decisions and audit events are recorded.
        agents: ordinary agents besides the rogue, stuck and noisy ones.
        breach_rate: breaches per second of the rogue agent.
        slow_fraction: share of decisions evaluated by the slow backend.
        seed: random seed (the workload is reproducible for a given tick sequence).
        fleet: prefix of this simulator's agent and session names, so several simulators
            sharing one stream have agents of their own (``did:mesh:<fleet>.rogue-bot``).
        run_seconds: length of a run of the fleet (its spawn tree), in simulated seconds.
    """

    governance: GovernanceMetrics
    agents: int = 6
    breach_rate: float = 2.0
    slow_fraction: float = 0.03
    seed: int = 7
    fleet: str = ""
    run_seconds: float = 60.0
    _rng: random.Random = field(init=False)
    _fleet: list[_Agent] = field(init=False)
    _breach_credit: float = field(default=0.0, init=False)
    _saga_credit: float = field(default=0.0, init=False)
    _sagas: int = field(default=0, init=False)
    _root: CausalTraceId | None = field(default=None, init=False)
    _run_started: float = field(default=0.0, init=False)
    events_emitted: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self.rogue, self.stuck, self.noisy = self.did(ROGUE), self.did(STUCK), self.did(NOISY)
        self.orchestrator = self.did("orchestrator")
        fleet = [
            _Agent(self.did(f"agent-{i:02d}"), self.session(f"{i % 3:03d}"))
            for i in range(self.agents)
        ]
        fleet.append(_Agent(self.rogue, self.session("rogue"), trust=420.0))
        fleet.append(_Agent(self.noisy, self.session("000"), trust=700.0))
        self._fleet = fleet
        self.governance.register_trust_score_gauge(self.trust_scores)
        self.governance.register_active_agents_gauge(lambda: len(self._fleet) + 1)

    def did(self, name: str) -> str:
        """The DID of the simulated agent ``name`` in this fleet."""
        return f"did:mesh:{self.fleet}.{name}" if self.fleet else f"did:mesh:{name}"

    def session(self, name: str) -> str:
        """The id of the simulated session ``name`` in this fleet."""
        return f"{self.fleet}.session-{name}" if self.fleet else f"session-{name}"

    def trust_scores(self) -> dict[str, float]:
        """Current trust score of every simulated agent (0-1000)."""
        scores = {agent.did: round(agent.trust, 1) for agent in self._fleet}
        scores[self.stuck] = 610.0
        return scores

    def _run(self, now: datetime) -> list[HypervisorEvent]:
        """End the current run (every session terminated, the orchestrator's last), if any,
        and start the next: the orchestrator and every agent get new causal ids."""
        events: list[HypervisorEvent] = []
        orchestrator = self.session("orchestrator")
        root = self._root
        if root is not None:
            for agent in self._fleet:
                events.append(
                    HypervisorEvent(
                        event_type=EventType.SESSION_TERMINATED,
                        timestamp=now,
                        agent_did=agent.did,
                        session_id=agent.session,
                        causal_trace_id=agent.causal,
                    )
                )
            events.append(
                HypervisorEvent(
                    event_type=EventType.SESSION_TERMINATED,
                    timestamp=now,
                    agent_did=self.orchestrator,
                    session_id=orchestrator,
                    causal_trace_id=root.full_id,
                )
            )
        root = self._root = CausalTraceId()
        self._run_started = now.timestamp()
        events.append(
            HypervisorEvent(
                event_type=EventType.SESSION_CREATED,
                timestamp=now,
                agent_did=self.orchestrator,
                session_id=orchestrator,
                causal_trace_id=root.full_id,
            )
        )
        for agent in self._fleet:
            agent.causal = root.child().full_id
            events.append(
                HypervisorEvent(
                    event_type=EventType.SESSION_CREATED,
                    timestamp=now,
                    agent_did=agent.did,
                    session_id=agent.session,
                    causal_trace_id=agent.causal,
                )
            )
        return events

    def start(self, now: datetime) -> list[HypervisorEvent]:
        """Events at start: the first run, ring assignments, and the stuck agent's old
        elevation."""
        events = self._run(now)
        events += [
            HypervisorEvent(
                event_type=EventType.RING_ASSIGNED,
                timestamp=now,
                agent_did=agent.did,
                session_id=agent.session,
                causal_trace_id=agent.causal,
                payload={"ring": agent.ring},
            )
            for agent in self._fleet
        ]
        events.append(
            HypervisorEvent(
                event_type=EventType.RING_ASSIGNED,
                timestamp=now - timedelta(minutes=15),
                agent_did=self.stuck,
                session_id=self.session("admin"),
                payload={"ring": 2},
            )
        )
        events.append(
            HypervisorEvent(
                event_type=EventType.RING_ELEVATED,
                timestamp=now - timedelta(minutes=10),
                agent_did=self.stuck,
                session_id=self.session("admin"),
                payload={"from_ring": 2, "to_ring": 0, "reason": "break-glass maintenance"},
            )
        )
        self.events_emitted += len(events)
        return events

    def tick(self, now: datetime, dt: float) -> list[HypervisorEvent]:
        """Advance the simulation by ``dt`` seconds ending at ``now``; return its events."""
        rng = self._rng
        events: list[HypervisorEvent] = []
        t = now.timestamp()
        if t - self._run_started >= self.run_seconds:
            events.extend(self._run(now))
        gov = self.governance
        for agent in self._fleet:
            if agent.did == self.rogue:
                continue
            if agent.elevated_until is None and rng.random() < 0.4 * dt:
                agent.elevated_until = t + rng.uniform(0.5, 3.0)
                events.append(self._ring(EventType.RING_ELEVATED, agent, now, 3, 1))
                agent.ring = 1
            elif agent.elevated_until is not None and t >= agent.elevated_until:
                kind = (
                    EventType.RING_DEMOTED
                    if rng.random() < 0.7
                    else EventType.RING_ELEVATION_EXPIRED
                )
                events.append(self._ring(kind, agent, now, 1, 3))
                agent.ring = 3
                agent.elevated_until = None
            for _ in range(rng.randint(1, 3)):
                self._decide(agent, rng)
            agent.trust = min(1000.0, max(0.0, agent.trust + rng.uniform(-4.0, 4.2)))

        rogue = self._fleet[self.agents]
        self._breach_credit += self.breach_rate * dt
        while self._breach_credit >= 1.0:
            self._breach_credit -= 1.0
            events.append(
                HypervisorEvent(
                    event_type=EventType.RING_BREACH_DETECTED,
                    timestamp=now,
                    agent_did=rogue.did,
                    session_id=rogue.session,
                    causal_trace_id=rogue.causal,
                    payload={"attempted_tool": "shell_exec", "ring": rogue.ring},
                )
            )
            gov.record_decision(False, rogue.did, "shell_exec", rng.uniform(0.05, 0.4))
            rogue.trust = max(150.0, rogue.trust - 0.5)

        if rng.random() < 0.5 * dt * 10:
            audited = rng.choice(self._fleet)
            events.append(
                HypervisorEvent(
                    event_type=EventType.AUDIT_COMMITTED,
                    timestamp=now,
                    agent_did=audited.did,
                    session_id=audited.session,
                    causal_trace_id=audited.causal,
                    payload={"entries": rng.randint(1, 20)},
                )
            )
            gov.record_audit_event(EventType.AUDIT_COMMITTED.value, audited.did)

        self._saga_credit += dt / 2.0
        if self._saga_credit >= 1.0:
            self._saga_credit -= 1.0
            events.extend(self._saga(now, rng))
        self.events_emitted += len(events)
        return events

    def _ring(
        self, kind: EventType, agent: _Agent, now: datetime, from_ring: int, to_ring: int
    ) -> HypervisorEvent:
        return HypervisorEvent(
            event_type=kind,
            timestamp=now,
            agent_did=agent.did,
            session_id=agent.session,
            causal_trace_id=agent.causal,
            payload={"from_ring": from_ring, "to_ring": to_ring},
        )

    def _decide(self, agent: _Agent, rng: random.Random) -> None:
        if rng.random() < self.slow_fraction:
            tool = _SLOW_TOOL
            latency = rng.uniform(60.0, 200.0)
        else:
            tool = rng.choice(_TOOLS)
            latency = min(40.0, rng.lognormvariate(math.log(0.08), 0.8))
        rate_limited = agent.did == self.noisy and rng.random() < 0.3
        allowed = not rate_limited and not (tool == "shell_exec" and agent.ring > 1)
        self.governance.record_decision(allowed, agent.did, tool, latency, rate_limited)

    def _saga(self, now: datetime, rng: random.Random) -> list[HypervisorEvent]:
        """A saga that ran over the last few seconds, as its lifecycle events."""
        self._sagas += 1
        saga_id = f"deploy-{self._sagas:05d}"
        agent = rng.choice(self._fleet[: self.agents])
        durations = [rng.uniform(0.2, 1.2) for _ in range(3)]
        t = now - timedelta(seconds=sum(durations) + 0.05)
        # The agent's causal id: its saga spans are children of its agent span.
        common: dict[str, Any] = {
            "agent_did": agent.did,
            "session_id": agent.session,
            "causal_trace_id": agent.causal,
        }
        events = [
            HypervisorEvent(
                event_type=EventType.SAGA_CREATED,
                timestamp=t,
                payload={"saga_id": saga_id},
                **common,
            )
        ]
        fail = rng.random() < 0.2
        steps = [*_SAGA_STEPS, _SAGA_DEPLOY]
        for index, ((step_id, action), seconds) in enumerate(zip(steps, durations, strict=True)):
            step = {"saga_id": saga_id, "step_id": step_id, "step_action": action}
            events.append(
                HypervisorEvent(
                    event_type=EventType.SAGA_STEP_STARTED,
                    timestamp=t,
                    payload=step,
                    **common,
                )
            )
            t += timedelta(seconds=seconds)
            failed = fail and index == 1
            events.append(
                HypervisorEvent(
                    event_type=EventType.SAGA_STEP_FAILED
                    if failed
                    else EventType.SAGA_STEP_COMMITTED,
                    timestamp=t,
                    payload={**step, "error": "connection_timeout"}
                    if failed
                    else {**step, "result": "ok"},
                    **common,
                )
            )
            if failed:
                t += timedelta(seconds=0.1)
                events.append(
                    HypervisorEvent(
                        event_type=EventType.SAGA_COMPENSATING,
                        timestamp=t,
                        payload={
                            "saga_id": saga_id,
                            "step_id": "rollback-config",
                            "step_action": "rollback",
                        },
                        **common,
                    )
                )
                events.append(
                    HypervisorEvent(
                        event_type=EventType.SAGA_ESCALATED,
                        timestamp=t,
                        payload={"saga_id": saga_id, "reason": "migration failed"},
                        **common,
                    )
                )
                return events
        events.append(
            HypervisorEvent(
                event_type=EventType.SAGA_COMPLETED,
                timestamp=t,
                payload={"saga_id": saga_id},
                **common,
            )
        )
        return events


def build_parser() -> argparse.ArgumentParser:
    """The simulator's command line (docker-compose.yml runs it; tests parse its commands)."""
    parser = argparse.ArgumentParser(
        prog="python -m hypervisor.observability.demo.simulate",
        description="Simulate a fleet of agents and serve its metrics on /metrics.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve /metrics on")
    parser.add_argument("--port", type=int, default=8000, help="port to serve /metrics on")
    parser.add_argument("--agents", type=int, default=6, help="ordinary agents")
    parser.add_argument("--tick", type=float, default=0.1, help="seconds between ticks")
    parser.add_argument("--breach-rate", type=float, default=2.0, help="rogue breaches per second")
    parser.add_argument("--slow-fraction", type=float, default=0.03, help="slow decisions share")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds to run (0: forever)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fleet", default="", help="prefix of agent and session names")
    parser.add_argument(
        "--run-seconds",
        type=float,
        default=60.0,
        help="length of a run of the fleet: its spawn tree's sessions end and a new one starts",
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("HVOBS_REDIS_URL") or None,
        metavar="URL",
        help="append events to this Redis instead (default: $HVOBS_REDIS_URL, which keeps the "
        "URL's password out of the process list)",
    )
    parser.add_argument("--stream", default="hvobs:events", help="Redis stream key")
    parser.add_argument(
        "--otlp-endpoint", default=None, help="OTLP/HTTP endpoint for saga spans (in-process)"
    )
    parser.add_argument(
        "--otel-metrics-port",
        type=int,
        default=None,
        help="also serve the governance metrics via an OpenTelemetry meter on this port",
    )
    return parser


async def _run(args: argparse.Namespace) -> int:
    registry = CollectorRegistry()
    closers: list[Any] = []
    otel_server = None
    meter = None
    if args.otel_metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import REGISTRY

        # The reader registers on prometheus_client's global registry: this process owns it.
        provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
        closers.append(provider.shutdown)
        meter = provider.get_meter(METER_NAME)
        otel_server = serve_metrics(REGISTRY, args.host, args.otel_metrics_port)
        print(f"simulator: serving OpenTelemetry view on {otel_server.url}", flush=True)
    governance = GovernanceMetrics(registry, meter=meter)
    sim = FleetSimulator(
        governance,
        agents=args.agents,
        breach_rate=args.breach_rate,
        slow_fraction=args.slow_fraction,
        seed=args.seed,
        fleet=args.fleet,
        run_seconds=args.run_seconds,
    )
    emit_local = None
    redis_bus = None
    if args.redis:
        from hypervisor.observability._bus.bus import RedisEventBus

        # A producer only: no tailing reader and no local index.
        redis_bus = RedisEventBus.from_url(args.redis, stream=args.stream, reader=False)
        await redis_bus.start(wait_backfill=False)
    else:
        from hypervisor.observability._core.event_bus import HypervisorEventBus
        from hypervisor.observability._core.ring_collector import RingMetricsCollector
        from hypervisor.observability._core.span_exporter import SagaSpanExporter

        bus = HypervisorEventBus(max_events=50_000)
        register_ring_metrics(RingMetricsCollector(bus), registry)
        if args.otlp_endpoint:
            from hypervisor.observability._core.agent_span_exporter import AgentSpanExporter
            from hypervisor.observability.exporters.otel import otlp_http_span_sink

            sink = otlp_http_span_sink(args.otlp_endpoint, service_name="agent-hypervisor")
            closers.append(sink.shutdown)
            SagaSpanExporter(bus, sink=sink)
            AgentSpanExporter(bus, sink)
        emit_local = bus.emit

    server = serve_metrics(registry, args.host, args.port)
    print(f"simulator: serving {server.url}", flush=True)
    stop = anyio.Event()

    async def watch_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                stop.set()
                return

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_signals)
            clock = anyio.current_time()
            started = clock
            batch = sim.start(datetime.now(UTC))
            while True:
                if emit_local is not None:
                    for event in batch:
                        emit_local(event)
                elif redis_bus is not None:
                    await redis_bus.emit_many(batch)
                if stop.is_set() or (args.duration and clock - started >= args.duration):
                    break
                with anyio.move_on_after(args.tick):
                    await stop.wait()
                now = anyio.current_time()
                batch = sim.tick(datetime.now(UTC), now - clock)
                clock = now
            tg.cancel_scope.cancel()
    finally:
        server.close()
        if otel_server is not None:
            otel_server.close()
        if redis_bus is not None:
            with anyio.move_on_after(15):
                await redis_bus.aclose(flush_timeout_s=10.0)
        for close in closers:
            close()
    print(f"simulator: stopped after {sim.events_emitted} events", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until ``--duration`` elapses or SIGINT/SIGTERM arrives."""
    args = build_parser().parse_args(argv)
    # One sample per series keeps the demo's /metrics readable; this process owns its client.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    return anyio.run(_run, args)


if __name__ == "__main__":
    sys.exit(main())
