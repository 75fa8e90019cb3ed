"""Benchmark retention at the bus's full emit rate: how long the stream gets, and what it costs.

Runs on a redis-server of its own (free port, no persistence). For each ``max_len`` N and each
emit path (``emit_many``; ``emit_nowait`` + ``flush``) it emits ``--events`` events as fast as
the bus goes, once without retention and once with ``max_len=N``, and then once more with a
consumer group that reads and acknowledges behind the producer (in the same process). A second
client samples ``XLEN`` every few milliseconds meanwhile; the script prints the longest stream
seen against 2N and the emit rate with and without retention. With ``--max-age`` it also runs
``max_age_s`` for ``--age-seconds`` and prints the oldest entry's age seen against twice the
bound.

Usage: ``python scripts/bench_retention.py [--events 300000] [--max-len 5000 20000]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.redis_bus import RedisEventBus
from redis_server import RedisServer


def make_events(n: int) -> list[HypervisorEvent]:
    """Events of the size the fleet emits (a few types, sessions, agents, a small payload)."""
    types = [EventType.VFS_WRITE, EventType.RING_ASSIGNED, EventType.SAGA_STEP_COMMITTED]
    return [
        HypervisorEvent(
            event_type=types[i % 3],
            session_id=f"session-{i % 50}",
            agent_did=f"did:mesh:agent-{i % 200}",
            payload={"path": f"reports/{i}.txt", "bytes": i * 7},
        )
        for i in range(n)
    ]


async def fresh(url: str, key: str) -> None:
    """Delete ``key``: every run starts on a new stream."""
    client = aioredis.Redis.from_url(url)
    try:
        await client.delete(key)
    finally:
        await client.aclose()


class Sampler:
    """Samples ``XLEN`` and the oldest entry's age while a run goes on."""

    def __init__(self, url: str, stream: str) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.stream = stream
        self.max_len = 0
        self.max_age_s = 0.0
        self.stop = anyio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            length = int(await self.client.xlen(self.stream))
            self.max_len = max(self.max_len, length)
            first: Any = await self.client.xrange(self.stream, count=1)
            if first:
                ms = int(bytes(first[0][0]).split(b"-")[0])
                self.max_age_s = max(self.max_age_s, time.time() - ms / 1000)
            with anyio.move_on_after(0.005):
                await self.stop.wait()
        await self.client.aclose()


async def group_consumer(url: str, stream: str, stop: anyio.Event) -> int:
    """Read and acknowledge the stream through a consumer group until ``stop``; return how
    many entries it acknowledged."""
    client = aioredis.Redis.from_url(url)
    acked = 0
    try:
        while not stop.is_set():
            reply: Any = await client.xreadgroup("bench", "c", {stream: ">"}, count=1000, block=20)
            for _, entries in reply or ():
                ids = [entry_id for entry_id, _ in entries]
                if ids:
                    acked += int(await client.xack(stream, "bench", *ids))
    finally:
        await client.aclose()
    return acked


async def one_run(
    url: str,
    events: list[HypervisorEvent],
    *,
    path: str,
    max_len: int | None,
    group: bool,
    max_age_s: float | None = None,
    seconds: float | None = None,
) -> tuple[float, Sampler, int]:
    """Emit ``events`` (or repeat them for ``seconds``) through ``path``; return events/s, the
    sampler and the group's acknowledged count."""
    stream = "bench:retention"
    await fresh(url, stream)
    if group:
        client = aioredis.Redis.from_url(url)
        await client.xgroup_create(stream, "bench", id="0", mkstream=True)
        await client.aclose()
    sampler = Sampler(url, stream)
    stop_group = anyio.Event()
    acked = [0]
    bus = RedisEventBus.from_url(url, stream, reader=False, max_len=max_len, max_age_s=max_age_s)
    async with bus, anyio.create_task_group() as tg:
        tg.start_soon(sampler.run)
        if group:

            async def consume() -> None:
                acked[0] = await group_consumer(url, stream, stop_group)

            tg.start_soon(consume)
        start = time.perf_counter()
        emitted = 0
        deadline = None if seconds is None else start + seconds
        while True:
            if path == "emit_many":
                await bus.emit_many(events)
            else:
                # The buffer holds 65,536 events: flush every 50,000.
                for offset in range(0, len(events), 50_000):
                    for event in events[offset : offset + 50_000]:
                        bus.emit_nowait(event)
                    await bus.flush()
            emitted += len(events)
            if deadline is None or time.perf_counter() >= deadline:
                break
        rate = emitted / (time.perf_counter() - start)
        sampler.stop.set()
        stop_group.set()
    return rate, sampler, acked[0]


async def run(url: str, args: argparse.Namespace) -> None:
    events = make_events(args.events)
    chunk = make_events(50_000)
    print(f"retention at full emit rate: {args.events:,} events per run, redis at {url}")
    print(f"  {'path':<22}{'max_len':>8}{'group':>7}{'max XLEN':>10}{'/ 2N':>8}{'ev/s':>11}")
    for n in args.max_len:
        for path in ("emit_many", "emit_nowait"):
            # Rounds alternate with and without retention; the best rate of each is kept (the
            # machine is shared), and the longest stream seen over all rounds.
            base = plain = grouped = 0.0
            longest = longest_grouped = acked = 0
            for _ in range(args.rounds):
                rate, _, _ = await one_run(url, events, path=path, max_len=None, group=False)
                base = max(base, rate)
                rate, sampler, _ = await one_run(url, events, path=path, max_len=n, group=False)
                plain, longest = max(plain, rate), max(longest, sampler.max_len)
                rate, sampler, acked = await one_run(url, events, path=path, max_len=n, group=True)
                grouped = max(grouped, rate)
                longest_grouped = max(longest_grouped, sampler.max_len)
            print(f"  {path:<22}{'none':>8}{'':>7}{'':>10}{'':>8}{base:>11,.0f}")
            for tag, rate, most in (("no", plain, longest), ("yes", grouped, longest_grouped)):
                print(
                    f"  {path:<22}{n:>8}{tag:>7}{most:>10,}{most / (2 * n):>8.2f}"
                    f"{rate:>11,.0f}  ({rate / base:.0%} of no retention"
                    + (f"; the group, in this process, acked {acked:,})" if tag == "yes" else ")")
                )
    if args.max_age:
        for max_age in args.max_age:
            rate, sampler, _ = await one_run(
                url,
                chunk,
                path="emit_many",
                max_len=None,
                group=False,
                max_age_s=max_age,
                seconds=args.age_seconds,
            )
            print(
                f"  emit_many, max_age_s {max_age:g}: oldest entry seen {sampler.max_age_s:.2f} s "
                f"({sampler.max_age_s / (2 * max_age):.2f} of 2 x max_age), longest stream "
                f"{sampler.max_len:,}, {rate:,.0f} ev/s"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--max-len", type=int, nargs="+", default=[5_000, 20_000])
    parser.add_argument("--max-age", type=float, nargs="*", default=[1.0])
    parser.add_argument("--age-seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3, help="best rate of this many rounds")
    args = parser.parse_args()
    with RedisServer("--appendonly", "no") as server:
        anyio.run(run, server.url, args)


if __name__ == "__main__":
    main()
