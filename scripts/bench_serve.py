"""Benchmark of ``hvobs serve``: query latency, stream fan-out latency, dependency size.

Starts its own redis-server and a real ``hvobs serve --redis`` process, then measures:

1. ``GET /api/events`` with filters over 100k indexed events, 50 concurrent keep-alive
   clients, p50/p99 latency. Two load shapes: *closed loop* (each client sends its next
   request as soon as the previous answer arrived: the server is saturated, latency is mostly
   queueing behind the other 49) and *open loop* at a fixed total rate (each client sends on a
   schedule; latency counts from the scheduled time, so a stall is not hidden).
2. ``/api/stream``: 10 connected clients while a producer process emits 10k events/s on the
   stream; the latency from emit (a timestamp in the payload) to arrival at each client of
   each message's oldest event (the one that waited longest in its batch), p50/p99.
3. The installed size of the runtime dependencies ``hvobs serve`` added (Starlette, uvicorn
   and uvicorn's own dependencies h11 and click).

The load generator is a minimal HTTP/1.1 client on raw asyncio streams (a few microseconds per
request), in this process; the server runs in its own process.

    .venv/bin/python scripts/bench_serve.py [--duration 10] [--rate 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import statistics
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from importlib.metadata import distribution
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.redis_bus import RedisEventBus
from redis_server import RedisServer

EVENTS = 100_000
AGENTS = 200
SESSIONS = 20
TYPES = [
    EventType.RING_ASSIGNED,
    EventType.RING_ELEVATED,
    EventType.RING_BREACH_DETECTED,
    EventType.SAGA_STEP_STARTED,
    EventType.SAGA_STEP_COMMITTED,
    EventType.VFS_WRITE,
    EventType.AUDIT_COMMITTED,
]
T0 = datetime.now(UTC) - timedelta(hours=1)


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def make_events() -> list[HypervisorEvent]:
    """100k events of 200 agents in 20 sessions over an hour."""
    rng = random.Random(5)
    step = 3600 / EVENTS
    return [
        HypervisorEvent(
            event_type=rng.choice(TYPES),
            agent_did=f"did:mesh:agent-{rng.randrange(AGENTS):03d}",
            session_id=f"session-{rng.randrange(SESSIONS):02d}",
            timestamp=T0 + timedelta(seconds=i * step),
            payload={"ring": rng.randrange(4), "tool": "file_read", "n": i},
        )
        for i in range(EVENTS)
    ]


def query_paths() -> list[str]:
    """A mix of filtered queries, as the page and an operator's scripts send them."""
    rng = random.Random(9)
    paths: list[str] = []
    for _ in range(400):
        agent = f"did:mesh:agent-{rng.randrange(AGENTS):03d}"
        session = f"session-{rng.randrange(SESSIONS):02d}"
        since = (T0 + timedelta(seconds=rng.uniform(0, 3000))).strftime("%Y-%m-%dT%H:%M:%SZ")
        kind = rng.randrange(4)
        if kind == 0:
            paths.append(f"/api/events?event_type=ring.breach_detected&agent_did={agent}&limit=50")
        elif kind == 1:
            paths.append(f"/api/events?session_id={session}&since={since}&limit=50")
        elif kind == 2:
            paths.append(f"/api/events?agent_did={agent}&limit=50")
        else:
            paths.append(f"/api/events?event_type=vfs.write&session_id={session}&limit=50")
    return paths


async def request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[int, bytes]:
    """One GET on a keep-alive connection; the status and the body."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


async def closed_loop(port: int, clients: int, seconds: float) -> tuple[list[float], int]:
    """Each client sends its next request when the previous answer arrived."""
    paths = itertools.cycle(query_paths())
    latencies: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            started = time.perf_counter()
            status, _ = await request(reader, writer, next(paths))
            latencies.append(time.perf_counter() - started)
            errors += status != 200
        writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, errors


async def open_loop(
    port: int, clients: int, seconds: float, rate: float
) -> tuple[list[float], int]:
    """Each client sends on a fixed schedule (``rate / clients`` per second); latency counts
    from the scheduled send time."""
    paths = itertools.cycle(query_paths())
    latencies: list[float] = []
    errors = 0
    interval = clients / rate

    async def client(offset: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.perf_counter() + offset
        for n in itertools.count():
            due = start + n * interval
            if due > start + seconds:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            status, _ = await request(reader, writer, next(paths))
            latencies.append(time.perf_counter() - due)
            errors += status != 200
        writer.close()

    await asyncio.gather(*(client(i * interval / clients) for i in range(clients)))
    return latencies, errors


PRODUCER = textwrap.dedent(
    """
    import asyncio, sys, time
    from hypervisor.observability._core.events import EventType, HypervisorEvent
    from hypervisor.observability.redis_bus import RedisEventBus

    async def main(url, stream, rate, seconds):
        async with RedisEventBus.from_url(url, stream, reader=False) as bus:
            batch = max(1, int(rate / 100))  # every 10 ms
            start = time.perf_counter()
            for n in range(int(seconds * 100)):
                due = start + n / 100
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                now = time.time()
                for i in range(batch):
                    bus.emit_nowait(HypervisorEvent(
                        event_type=EventType.AUDIT_COMMITTED,
                        agent_did="did:mesh:bench",
                        payload={"t": now, "i": i},
                    ))
            await bus.flush()

    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
    """
)


async def stream_latency(
    port: int, url: str, stream: str, clients: int, rate: float, seconds: float
) -> tuple[list[float], int, int]:
    """Latency from emit to arrival at each of ``clients`` stream clients at ``rate``/s;
    also the messages and events received."""
    latencies: list[float] = []
    counts = [0, 0]
    done = asyncio.Event()

    async def client(ready: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=64 * 2**20)
        writer.write(b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        ready.set()
        while not done.is_set():
            try:
                line = await asyncio.wait_for(reader.readline(), 1.0)
            except TimeoutError:
                continue
            # Chunked transfer: chunk-size lines and message lines; only data lines matter.
            if not line.startswith(b"data: ["):
                continue
            arrived = time.time()
            counts[0] += 1
            counts[1] += line.count(b'"event_id"')
            # The oldest event of the message waited longest in its batch: its latency is the
            # message's worst (decoding every event would load this process more than the
            # server).
            at = line.find(b'"t":')
            if at >= 0:
                end = line.find(b",", at)
                latencies.append(arrived - float(line[at + 4 : end]))
        writer.close()

    readies = [asyncio.Event() for _ in range(clients)]
    tasks = [asyncio.create_task(client(ready)) for ready in readies]
    for ready in readies:
        await ready.wait()
    producer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PRODUCER, url, stream, str(rate), str(seconds)
    )
    await producer.wait()
    await asyncio.sleep(1.0)
    done.set()
    await asyncio.gather(*tasks)
    return latencies, counts[0], counts[1]


def installed_size(names: list[str]) -> dict[str, int]:
    """Bytes of each installed distribution's files (compiled caches excluded)."""
    sizes: dict[str, int] = {}
    for name in names:
        dist = distribution(name)
        total = 0
        for file in dist.files or []:
            if "__pycache__" in str(file):
                continue
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                total += path.stat().st_size
        sizes[f"{name} {dist.version}"] = total
    return sizes


async def fill(url: str, stream: str) -> None:
    """Append the 100k events to the stream."""
    events = make_events()
    async with RedisEventBus.from_url(url, stream, reader=False) as bus:
        for start in range(0, len(events), 10_000):
            await bus.emit_many(events[start : start + 10_000])


def start_server(url: str, stream: str) -> tuple[subprocess.Popen[str], int]:
    """``hvobs serve --redis`` on a free port; its process and port."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hypervisor.observability.cli",
            "serve",
            "--redis",
            url,
            "--stream",
            stream,
            "--port",
            "0",
            "--max-events",
            str(EVENTS),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    port = int(line.split(" on http://127.0.0.1:", 1)[1].split("/", 1)[0])
    return process, port


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


async def run(args: argparse.Namespace) -> None:
    with RedisServer() as redis:
        stream = "bench:serve"
        started = time.perf_counter()
        await fill(redis.url, stream)
        print(f"filled {EVENTS} events in {time.perf_counter() - started:.1f} s")
        server, port = start_server(redis.url, stream)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            _, body = await request(reader, writer, "/api/status")
            indexed = msgspec.json.decode(body)["events_indexed"]
            writer.close()
            print(f"hvobs serve indexed {indexed} events (pid {server.pid})")
            await closed_loop(port, args.clients, 2.0)  # warm-up
            print(f"\n== GET /api/events with filters, {args.clients} concurrent clients")
            lat, errors = await closed_loop(port, args.clients, args.duration)
            print(
                f"closed loop: {len(lat) / args.duration:.0f} req/s, p50 "
                f"{ms(statistics.median(lat))}, p99 {ms(percentile(lat, 0.99))}, "
                f"max {ms(max(lat))}, errors {errors}"
            )
            service = args.duration / len(lat) * 1e6
            print(f"  (one server process: {service:.0f} us of server time per request)")
            lat, errors = await open_loop(port, args.clients, args.duration, args.rate)
            p99 = percentile(lat, 0.99)
            print(
                f"open loop at {args.rate:.0f} req/s in all: p50 {ms(statistics.median(lat))}, "
                f"p99 {ms(p99)}, max {ms(max(lat))}, errors {errors}"
            )
            print(f"target: p99 <= 5 ms: {'met' if p99 <= 0.005 else 'NOT met'} (open loop)")
            print(
                f"\n== /api/stream: {args.stream_clients} clients, producer at "
                f"{args.stream_rate:.0f} events/s for {args.duration:.0f} s"
            )
            lat, messages, received = await stream_latency(
                port,
                redis.url,
                stream,
                args.stream_clients,
                args.stream_rate,
                args.duration,
            )
            expected = int(args.stream_rate * args.duration) * args.stream_clients
            p99 = percentile(lat, 0.99)
            print(
                f"events received {received} of {expected} ({messages} messages: "
                f"{received / max(1, messages):.0f} events per message)"
            )
            print(
                "emit-to-client latency (oldest event of each message): p50 "
                f"{ms(statistics.median(lat))}, p99 {ms(p99)}, max {ms(max(lat))}"
            )
            print(f"target: p99 <= 250 ms: {'met' if p99 <= 0.25 else 'NOT met'}")
        finally:
            server.terminate()
            server.wait(10)
    print("\n== installed size of the added runtime dependencies")
    sizes = installed_size(["starlette", "uvicorn", "h11", "click"])
    for name, size in sizes.items():
        print(f"  {name:<22} {size / 1024:7.0f} KiB")
    both = sum(size for name, size in sizes.items() if name.split()[0] in ("starlette", "uvicorn"))
    print(f"  Starlette + uvicorn    {both / 1024:7.0f} KiB ({both / 2**20:.2f} MiB)")
    print(
        f"  with h11 and click     {sum(sizes.values()) / 1024:7.0f} KiB "
        f"({sum(sizes.values()) / 2**20:.2f} MiB); target: about 1 MiB"
    )
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"(machine: {os.cpu_count()} cores, load average {load}: figures on a busy machine")
    print(" are queueing behind other processes, not the server's own cost)")


def main() -> None:
    """Parse the options and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--clients", type=int, default=50, help="concurrent query clients")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop requests/s")
    parser.add_argument("--stream-clients", type=int, default=10)
    parser.add_argument("--stream-rate", type=float, default=10_000.0, help="events/s")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
