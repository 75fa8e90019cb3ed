"""``hvobs demo --redis URL``: the demo fleet with every agent in its own process on one bus.

The parent process opens a ``RedisEventBus`` on a fresh stream with the published consumers
(``RingMetricsCollector``, ``SagaSpanExporter``) subscribed, then starts one producer process
per agent. Each producer regenerates the same fleet from the seed (the generator is
deterministic) and emits only its own agent's events, in order, on its own ``RedisEventBus``.
The parent's tailing reader sees the interleaved stream of all producers and feeds the
consumers, exactly as a monitoring process of a real fleet would.

Run a producer directly: ``python -m hypervisor.observability.demo.over_redis URL STREAM SEED
AGENTS SAGAS AGENT_DID``.
"""

from __future__ import annotations

import sys
import uuid

import anyio

from hypervisor.observability.demo.fleet import DemoResult, Fleet, generate_fleet

__all__ = ["feed_redis"]


async def _produce(url: str, stream: str, fleet: Fleet, agent_did: str) -> int:
    from hypervisor.observability._bus.bus import RedisEventBus

    mine = [event for event in fleet.events if event.agent_did == agent_did]
    async with RedisEventBus.from_url(url, stream, reader=False) as bus:
        await bus.emit_many(mine)
    return len(mine)


async def _feed(fleet: Fleet, url: str, stream: str, sagas: int) -> DemoResult:
    from hypervisor.observability._bus.bus import RedisEventBus
    from hypervisor.observability._core.ring_collector import RingMetricsCollector
    from hypervisor.observability._core.span_exporter import SagaSpanExporter

    agents = [agent.did for agent in fleet.agents]
    async with RedisEventBus.from_url(url, stream, max_events=None) as bus:
        collector = RingMetricsCollector(bus)
        exporter = SagaSpanExporter(bus)
        command = [sys.executable, "-m", __name__, url, stream, str(fleet.seed)]
        command += [str(len(agents) - 1), str(sagas)]
        processes = [await anyio.open_process([*command, did], stdout=None) for did in agents]
        failed = [p.pid for p in processes if await p.wait() != 0]
        if failed:
            raise RuntimeError(f"demo producer processes {failed} failed")
        await bus.sync()
        count = await bus.event_count()
        backend = f"Redis bus ({len(agents)} agent processes, stream {stream})"
        result = DemoResult(backend, count, collector.state, exporter.completed_spans)
        result.extra["decode_errors"] = bus.decode_errors
    return result


def feed_redis(fleet: Fleet, url: str, *, sagas: int, stream: str | None = None) -> DemoResult:
    """Emit the fleet's events from one process per agent on a Redis bus; observe them here.

    Args:
        fleet: the generated fleet (its seed and agent count are passed to the producers).
        url: the Redis URL.
        sagas: the saga count the fleet was generated with.
        stream: the stream key; a fresh ``hvobs:demo:<random>`` by default.
    """
    stream = stream or f"hvobs:demo:{uuid.uuid4().hex[:12]}"
    return anyio.run(_feed, fleet, url, stream, sagas)


def _main(argv: list[str]) -> int:
    url, stream, seed, agents, sagas, agent_did = argv
    fleet = generate_fleet(seed=int(seed), agents=int(agents), sagas=int(sagas))
    anyio.run(_produce, url, stream, fleet, agent_did)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
