"""Benchmark what ``durable=True`` costs: RedisEventBus emits with and without waiting for a
replica (``WAIT``), on a primary and a replica of its own (two redis-servers on free ports, no
persistence; ``WAITAOF`` needs Redis 7.2+ with an append-only file and is measured there only).

Prints events/s, best of ``--rounds`` interleaved rounds, for ``emit_many`` (batches of
``--batch``), awaited ``emit`` from 100 coroutines and from 1 coroutine, each plain and durable.

Usage: ``python scripts/bench_durable.py [--events 20000] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import anyio
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability.redis_bus import RedisEventBus
from redis_server import RedisServer, redis_server_version


def _wait_linked(primary: RedisServer, replica: RedisServer) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with redis.Redis.from_url(replica.url) as r, redis.Redis.from_url(primary.url) as p:
            if (
                r.info("replication").get("master_link_status") == "up"
                and p.info("replication").get("connected_slaves") == 1
            ):
                return
        time.sleep(0.05)
    raise SystemExit("the replica did not link within 30 s")


async def _rate(url: str, mode: str, count: int, batch: int, durable: bool) -> float:
    events = [HypervisorEvent(payload={"i": i}) for i in range(count)]
    stream = f"bench:durable:{time.monotonic_ns()}"
    async with RedisEventBus.from_url(
        url, stream, reader=False, batch_size=batch, durable=durable
    ) as bus:
        start = time.perf_counter()
        if mode == "emit_many":
            await bus.emit_many(events)
        else:
            workers = 100 if mode == "emit x100" else 1
            share = count // workers

            async def emitter(index: int) -> None:
                for event in events[index * share : (index + 1) * share]:
                    await bus.emit(event)

            async with anyio.create_task_group() as group:
                for index in range(workers):
                    group.start_soon(emitter, index)
            count = share * workers
        return count / (time.perf_counter() - start)


def main() -> None:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    modes = {"emit_many": args.events, "emit x100": args.events, "emit x1": args.events // 10}
    best: dict[tuple[str, bool], float] = {}
    with (
        RedisServer() as primary,
        RedisServer("--replicaof", "127.0.0.1", str(primary.port)) as rep,
    ):
        _wait_linked(primary, rep)
        for _ in range(args.rounds):
            for mode, count in modes.items():
                for durable in (False, True):
                    rate = anyio.run(_rate, primary.url, mode, count, args.batch, durable)
                    best[mode, durable] = max(best.get((mode, durable), 0.0), rate)
    version = ".".join(map(str, redis_server_version() or ()))
    print(f"redis-server {version}, one replica, best of {args.rounds}")
    print(f"{'path':<12} {'plain ev/s':>12} {'durable ev/s':>13} {'ratio':>7}")
    for mode in modes:
        plain, waited = best[mode, False], best[mode, True]
        print(f"{mode:<12} {plain:>12,.0f} {waited:>13,.0f} {waited / plain:>7.2f}")


if __name__ == "__main__":
    main()
