"""``hvobs demo --redis URL``: the demo fleet with every agent in its own process on one bus.

The parent process opens a ``RedisEventBus`` on the stream (``hvobs:events`` by default, the
stream the workers and ``hvobs serve`` use) with the published consumers
(``RingMetricsCollector``, ``SagaSpanExporter``) subscribed, reading only what is appended from
then on (the report covers this run, whatever the stream held), then starts one producer process
per agent. Each producer regenerates the same fleet from the seed (the generator is
deterministic) and emits only its own agent's events, in order, on its own ``RedisEventBus``.
The parent's tailing reader sees the interleaved stream of all producers and feeds the
consumers, exactly as a monitoring process of a real fleet would.

A stream the demo created is deleted when it ends, unless it is asked to keep it (so that
workers or ``hvobs serve`` started on it can look at it); a stream that existed before (workers
already consuming it) is never deleted.

Run a producer directly: ``python -m hypervisor.observability.demo.over_redis URL STREAM SEED
AGENTS SAGAS AGENT_DID [OPTION=PATH ...]`` (TLS: ``ssl_ca_certs=ca.pem``, ``ssl_certfile=...``,
``ssl_keyfile=...``).
"""

from __future__ import annotations

import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from hypervisor.observability._util.cli import DEFAULT_STREAM
from hypervisor.observability.demo.fleet import DemoResult, Fleet, generate_fleet
from hypervisor.observability.errors import CommandError

if TYPE_CHECKING:
    from hypervisor.observability._backends.redis_log import RedisStreamLog

__all__ = ["feed_redis"]


_TLS_KEYS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


async def _produce(
    url: str, stream: str, fleet: Fleet, agent_did: str, tls: dict[str, str] | None = None
) -> int:
    from hypervisor.observability._bus.bus import RedisEventBus

    mine = [event for event in fleet.events if event.agent_did == agent_did]
    async with RedisEventBus.from_url(url, stream, reader=False, log_options=tls) as bus:
        await bus.emit_many(mine)
    return len(mine)


async def _stream_exists(log: RedisStreamLog) -> bool:
    if await log.length() or await log.group_info():
        return True
    return await log.head_id() != "0-0"


async def _feed(
    fleet: Fleet,
    url: str,
    stream: str,
    sagas: int,
    keep_stream: bool,
    timeout_s: float,
    tls: dict[str, Any],
) -> DemoResult:
    from hypervisor.observability._backends.redis_log import RedisStreamLog
    from hypervisor.observability._bus.bus import RedisEventBus
    from hypervisor.observability._core.ring_collector import RingMetricsCollector
    from hypervisor.observability._core.span_exporter import SagaSpanExporter
    from hypervisor.observability._util.cli import check_redis

    await check_redis(url, timeout_s=timeout_s, **tls)
    agents = [agent.did for agent in fleet.agents]
    async with RedisStreamLog(url, stream, **tls) as admin:
        existed = await _stream_exists(admin)
        try:
            async with RedisEventBus.from_url(
                url, stream, max_events=None, backfill=False, log_options=tls
            ) as bus:
                collector = RingMetricsCollector(bus)
                exporter = SagaSpanExporter(bus)
                command = [sys.executable, "-m", __name__, url, stream, str(fleet.seed)]
                command += [str(len(agents) - 1), str(sagas)]
                tls_args = [f"{key}={path}" for key, path in tls.items()]
                processes = [
                    await anyio.open_process([*command, did, *tls_args], stdout=None)
                    for did in agents
                ]
                failed = [p.pid for p in processes if await p.wait() != 0]
                if failed:
                    raise CommandError(f"demo producer processes {failed} failed (see above)")
                await bus.sync()
                count = await bus.event_count()
                backend = f"Redis bus ({len(agents)} agent processes, stream {stream})"
                result = DemoResult(backend, count, collector.state, exporter.completed_spans)
                result.extra["decode_errors"] = bus.decode_errors
        finally:
            deleted = not existed and not keep_stream and await admin.delete()
    if deleted:
        result.extra["stream"] = (
            f"stream {stream} deleted (the demo made it; --keep-stream keeps it)"
        )
    elif existed:
        result.extra["stream"] = (
            f"stream {stream} kept with the demo's {count} events (it existed before the demo)"
        )
    else:
        result.extra["stream"] = f"stream {stream} kept with its {count} events (--keep-stream)"
    return result


def feed_redis(
    fleet: Fleet,
    url: str,
    *,
    sagas: int,
    stream: str = DEFAULT_STREAM,
    keep_stream: bool = False,
    connect_timeout_s: float = 5.0,
    tls: dict[str, Any] | None = None,
) -> DemoResult:
    """Emit the fleet's events from one process per agent on a Redis bus; observe them here.

    Args:
        fleet: the generated fleet (its seed and agent count are passed to the producers).
        url: the Redis URL.
        sagas: the saga count the fleet was generated with.
        stream: the stream key (the workers' default, ``hvobs:events``, by default).
        keep_stream: keep a stream the demo created (one that existed before is always kept).
        connect_timeout_s: how long to wait for Redis to answer at start.
        tls: TLS files for a ``rediss://`` URL (``ssl_ca_certs``, ``ssl_certfile``,
            ``ssl_keyfile``), for this process and the producers.

    Raises:
        CommandError: Redis does not answer, or a producer process failed.
    """
    return anyio.run(_feed, fleet, url, stream, sagas, keep_stream, connect_timeout_s, tls or {})


def _main(argv: list[str]) -> int:
    from hypervisor.observability._bus.shutdown import run_until_signal

    url, stream, seed, agents, sagas, agent_did, *options = argv
    tls = dict(option.split("=", 1) for option in options)
    unknown = set(tls) - set(_TLS_KEYS)
    if unknown:
        raise SystemExit(f"unknown producer options: {', '.join(sorted(unknown))}")
    fleet = generate_fleet(seed=int(seed), agents=int(agents), sagas=int(sagas))
    # SIGTERM or Ctrl-C stops the producer after it stored what it buffered.
    run_until_signal(partial(_produce, url, stream, fleet, agent_did, tls))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
