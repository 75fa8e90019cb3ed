"""Benchmark the consumer-group workers on a redis-server of their own.

Prints, from one run against one server (started here on a free port, no persistence):

* the raw ceiling: ``XREADGROUP COUNT 500`` + ``XACK`` + msgspec decode, redis-py directly;
* events/s of 1 and of 2 worker processes running both derivations (ring metrics and saga
  spans: consume, decode, stage, acknowledge, apply in order, commit), over a pre-filled stream;
* worker RSS while it consumes ``--rss-events`` events (flat = no growth with events);
* emit to metric-visible latency (the event's effect committed to the global state, what every
  worker's ``/metrics`` serves) at a fixed 5k events/s, p50/p99, with 2 workers;
* a span worker (saga spans and the agents' spawn tree) exporting through ``OTelSpanSink`` (each
  span encoded to OTLP protobuf, then dropped: no network), over events that carry their
  producers' trace contexts (every span then has links) against the same events without them:
  events/s and CPU seconds of the worker process, alternating runs.

Throughput and latency runs are repeated ``--repeat`` times (the machine is shared and noisy);
each run is printed and the median is the figure to report.

Targets (issue 4): >= 50k events/s per worker with both collectors; memory flat over 1M events;
p99 emit-to-visible <= 20 ms at 5k events/s. Issue 13: a worker exporting spans with links keeps
>= 0.9x its throughput without them.

Usage: ``python scripts/bench_worker.py [--events 200000] [--rss-events 1000000] [--repeat 3]``;
``--only-links`` runs the span-links comparison alone.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypervisor.observability._backends.log import parse_id
from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
from hypervisor.observability._core.codec import decode_event, encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.trace_context import (
    TraceContext,
    attach_context,
    encode_context,
)
from hypervisor.observability.workers import watermark
from redis_server import RedisServer

_WORKER = textwrap.dedent(
    """
    import sys, anyio
    from hypervisor.observability._backends.log import TrimPolicy
    from hypervisor.observability._backends.redis_log import RedisStreamLog
    from hypervisor.observability.workers import (
        RingMetricsDerivation, SagaSpansDerivation, Worker, WorkerConfig, dlq_name)
    from hypervisor.observability.workers._cli import serve_worker
    from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
    url, stream, group, consumer, kinds = sys.argv[1:6]
    trim = TrimPolicy(max_len=100_000) if "trim" in kinds else None

    async def main():
        stores = []
        derivations = []
        if "ring" in kinds:
            stores.append(RedisStateStore(url, state_prefix(stream, group, "ring-metrics")))
            derivations.append(RingMetricsDerivation(stores[-1]))
        sinks = []
        if "otel" in kinds:
            from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
            from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
            from hypervisor.observability.exporters.otel import OTelSpanSink

            class Encoded(SpanExporter):
                # What the OTLP exporter does before it sends: protobuf, then nothing.
                def export(self, spans):
                    encode_spans(spans).SerializeToString()
                    return SpanExportResult.SUCCESS

            sinks.append(OTelSpanSink(span_exporter=Encoded(), batch=False))
        if "saga" in kinds:
            stores.append(RedisStateStore(url, state_prefix(stream, group, "saga-spans")))
            derivations.append(SagaSpansDerivation(stores[-1], sinks))
        if "agents" in kinds:
            from hypervisor.observability.workers import AgentSpansDerivation

            stores.append(RedisStateStore(url, state_prefix(stream, group, "agent-spans")))
            derivations.append(AgentSpansDerivation(stores[-1], sinks, idle_timeout_s=2.0))
        config = WorkerConfig(group=group, consumer=consumer, batch_size=500, block_s=0.5)
        async with RedisStreamLog(url, stream, retention=trim) as log, \\
                RedisStreamLog(url, dlq_name(stream)) as dlq:
            async with Worker(log, derivations, config, dlq=dlq) as worker:
                async def announce():
                    await worker.ready.wait()
                    print("ready", flush=True)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(announce)
                    await serve_worker(worker, metrics_port=None)
        for store in stores:
            await store.aclose()
    anyio.run(main)
    """
)


def make_events(
    count: int, seed: int = 1, *, causal: bool = False, contexts: bool = False
) -> list[bytes]:
    """Encoded events: 45% ring, 45% saga lifecycle, 10% other; 1000 agents, 2000 sagas.

    ``causal``: each agent's events carry its causal trace id (agents 1-999 children of agent
    0, so the spawn tree has spans). ``contexts``: each event also carries the trace context of
    the producer span its agent emits in (one of 100, agent number modulo 100), so every span
    the workers export has a link.
    """
    producer_contexts = [
        encode_context(TraceContext(f"00-{n + 1:032x}-{n + 1:016x}-01")) for n in range(100)
    ]
    rng = random.Random(seed)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ring_types = [
        EventType.RING_ASSIGNED,
        EventType.RING_ELEVATED,
        EventType.RING_DEMOTED,
        EventType.RING_BREACH_DETECTED,
    ]
    saga_types = [
        EventType.SAGA_CREATED,
        EventType.SAGA_STEP_STARTED,
        EventType.SAGA_STEP_COMMITTED,
        EventType.SAGA_COMPLETED,
    ]
    out: list[bytes] = []
    for i in range(count):
        ts = t0 + timedelta(milliseconds=i)
        roll = rng.random()
        if roll < 0.45:
            event = HypervisorEvent(
                event_type=rng.choice(ring_types),
                timestamp=ts,
                agent_did=f"did:agent:{rng.randrange(1000)}",
                session_id=f"s{rng.randrange(50)}",
                payload={"to_ring": rng.randrange(4)},
            )
        elif roll < 0.9:
            saga = f"saga-{rng.randrange(2000)}"
            event = HypervisorEvent(
                event_type=rng.choice(saga_types),
                timestamp=ts,
                agent_did=f"did:agent:{rng.randrange(1000)}",
                payload={"saga_id": saga, "step_id": f"st{rng.randrange(3)}", "action": "act"},
            )
        else:
            event = HypervisorEvent(event_type=EventType.VFS_WRITE, timestamp=ts)
        agent = int((event.agent_did or "did:agent:0").rsplit(":", 1)[1])
        if causal:
            parent = "" if agent == 0 else "/00000000"
            event = HypervisorEvent(
                event_id=event.event_id,
                event_type=event.event_type,
                timestamp=event.timestamp,
                session_id=event.session_id,
                agent_did=event.agent_did,
                causal_trace_id=f"a1b2c3d4e5f6/{agent:08x}{parent}",
                payload=event.payload,
            )
        data = encode_event(event)
        if contexts:
            data = attach_context(data, producer_contexts[agent % 100])
        out.append(data)
    return out


async def fill(url: str, stream: str, entries: list[bytes]) -> None:
    async with RedisStreamLog(url, stream) as log:
        for start in range(0, len(entries), 2000):
            await log.append_many(entries[start : start + 2000])


async def raw_ceiling(url: str, stream: str, total: int) -> float:
    """XREADGROUP COUNT 500 + XACK + decode, redis-py directly: events/s."""
    client = aioredis.Redis.from_url(url)
    await client.xgroup_create(stream, "raw", id="0")
    done = 0
    started = time.perf_counter()
    while done < total:
        reply: Any = await client.xreadgroup("raw", "c", {stream: ">"}, count=500)
        if not reply:
            break
        ids: list[Any] = []
        for entry_id, fields in reply[0][1]:
            decode_event(fields[b"e"])
            ids.append(entry_id)
        await client.xack(stream, "raw", *ids)
        done += len(ids)
    elapsed = time.perf_counter() - started
    await client.aclose()
    return done / elapsed


def start_workers(
    url: str, stream: str, group: str, n: int, kinds: str
) -> list[subprocess.Popen[bytes]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, stream, group, f"{group}-{i}", kinds],
            stdout=subprocess.PIPE,
        )
        for i in range(n)
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()


async def wait_settled(url: str, stream: str, group: str, derivations: list[str]) -> None:
    async with RedisStreamLog(url, stream) as log:
        stores = [RedisStateStore(url, state_prefix(stream, group, d)) for d in derivations]
        head = parse_id(await log.head_id())
        while True:
            mark = parse_id(await watermark(log, group))
            if mark > head and not any([await s.backlog() for s in stores]):
                break
            await anyio.sleep(0.01)
        for store in stores:
            await store.aclose()


def worker_rate(url: str, stream: str, group: str, n: int, total: int) -> float:
    procs = start_workers(url, stream, group, n, "ring,saga")
    started = time.perf_counter()
    anyio.run(wait_settled, url, stream, group, ["ring-metrics", "saga-spans"])
    elapsed = time.perf_counter() - started
    stop_workers(procs)
    return total / elapsed


def span_worker_run(url: str, stream: str, group: str, total: int) -> tuple[float, float]:
    """One span worker (saga + agent spans, OTel sink) over a pre-filled stream: events/s, and
    CPU seconds of the worker process (its whole life: start, the run, the drain)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = start_workers(url, stream, group, 1, "saga,agents,otel")
    started = time.perf_counter()
    anyio.run(wait_settled, url, stream, group, ["saga-spans", "agent-spans"])
    elapsed = time.perf_counter() - started
    stop_workers(procs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return total / elapsed, cpu


def links_comparison(url: str, events: int, repeat: int) -> None:
    """Span worker with and without links on the same events, in ABBA order."""
    plain = make_events(events, causal=True)
    linked = make_events(events, causal=True, contexts=True)
    figures: dict[str, list[tuple[float, float]]] = {"links": [], "plain": []}
    for run in range(repeat):
        order = ("links", "plain") if run % 2 == 0 else ("plain", "links")
        for key in order:
            stream = f"links-{key}-{run}"
            anyio.run(fill, url, stream, linked if key == "links" else plain)
            figures[key].append(span_worker_run(url, stream, f"s-{key}-{run}", events))
    rates = {key: [rate for rate, _ in values] for key, values in figures.items()}
    cpus = {key: [cpu for _, cpu in values] for key, values in figures.items()}
    print(_median_line("span worker + OTel sink, no links", rates["plain"], "events/s"))
    print(_median_line("span worker + OTel sink, with links", rates["links"], "events/s"))
    paired = statistics.median(a / b for a, b in zip(rates["links"], rates["plain"], strict=True))
    paired_cpu = statistics.median(b / a for a, b in zip(cpus["links"], cpus["plain"], strict=True))
    print(
        f"{'  with links / without, paired runs':<38}{paired:>10.2f} x (worker CPU "
        f"{statistics.median(cpus['links']):.1f} s vs {statistics.median(cpus['plain']):.1f} s: "
        f"{paired_cpu:.2f} x); target 0.90: {'met' if paired >= 0.9 else 'MISSED'}"
    )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def rss_run(url: str, stream: str, total: int, pid: int) -> list[tuple[int, int]]:
    """Produce ``total`` events while one worker consumes; sample its RSS as it goes."""
    samples: list[tuple[int, int]] = []
    chunk = make_events(50_000, seed=7)
    async with RedisStreamLog(url, stream) as log:
        produced = 0
        while produced < total:
            # Fresh event ids each round (the dedup window would otherwise skip repeats).
            batch = [encode_event(_fresh(decode_event(data))) for data in chunk]
            for start in range(0, len(batch), 2000):
                await log.append_many(batch[start : start + 2000])
            produced += len(batch)
            await wait_settled(url, stream, "rss", ["ring-metrics", "saga-spans"])
            samples.append((produced, rss_kib(pid)))
    return samples


def _fresh(event: HypervisorEvent) -> HypervisorEvent:
    return HypervisorEvent(
        event_type=event.event_type,
        timestamp=event.timestamp,
        session_id=event.session_id,
        agent_did=event.agent_did,
        payload=event.payload,
    )


async def latency_run(url: str, stream: str, rate: int, seconds: float) -> list[float]:
    """Emit ring events at ``rate``/s; measure until each is in the committed ring state."""
    latencies: list[float] = []
    sent: list[tuple[tuple[int, int], float]] = []
    done = anyio.Event()
    async with (
        RedisStreamLog(url, stream) as log,
        RedisStateStore(url, state_prefix(stream, "lat", "ring-metrics")) as store,
    ):

        async def watch() -> None:
            index = 0
            while not (done.is_set() and index >= len(sent)):
                applied = parse_id((await store.meta()).applied_id)
                now = time.perf_counter()
                while index < len(sent) and sent[index][0] <= applied:
                    latencies.append(now - sent[index][1])
                    index += 1
                await anyio.sleep(0.0005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            tick = 0.002
            per_tick = max(1, int(rate * tick))
            start = time.perf_counter()
            n = 0
            while time.perf_counter() - start < seconds:
                events = [
                    encode_event(
                        HypervisorEvent(
                            event_type=EventType.RING_ASSIGNED,
                            agent_did=f"did:agent:{(n + k) % 500}",
                            payload={"to_ring": (n + k) % 4},
                        )
                    )
                    for k in range(per_tick)
                ]
                t_emit = time.perf_counter()
                ids = await log.append_many(events)
                sent.extend((parse_id(i), t_emit) for i in ids)
                n += per_tick
                next_at = start + (n / rate)
                await anyio.sleep(max(0.0, next_at - time.perf_counter()))
            done.set()
    return latencies


def _median_line(label: str, values: list[float], unit: str) -> str:
    runs = ", ".join(f"{v:,.1f}" if v < 100 else f"{v:,.0f}" for v in values)
    median = statistics.median(values)
    shown = f"{median:,.1f}" if median < 100 else f"{median:,.0f}"
    return f"{label:<38}{shown:>10} {unit} (median of {len(values)}: {runs})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rss-events", type=int, default=1_000_000)
    parser.add_argument("--latency-seconds", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--links-events", type=int, default=100_000)
    parser.add_argument("--links-repeat", type=int, default=6)
    parser.add_argument("--only-links", action="store_true", help="only the span-links figures")
    args = parser.parse_args()
    if args.only_links:
        with RedisServer("--appendonly", "no") as server:
            print(
                f"redis-server on port {server.port}; {args.links_events} events, pid {os.getpid()}"
            )
            links_comparison(server.url, args.links_events, args.links_repeat)
        return
    entries = make_events(args.events)
    with RedisServer("--appendonly", "no") as server:
        url = server.url
        print(f"redis-server on port {server.port}; {args.events} events (45% ring, 45% saga)")
        ceilings: list[float] = []
        for run in range(args.repeat):
            anyio.run(fill, url, f"raw{run}", entries)
            ceilings.append(anyio.run(raw_ceiling, url, f"raw{run}", len(entries)))
        print(_median_line("raw XREADGROUP+XACK+decode ceiling", ceilings, "events/s"))
        ceiling = statistics.median(ceilings)
        for n in (1, 2):
            rates: list[float] = []
            for run in range(args.repeat):
                stream = f"w{n}-{run}"
                anyio.run(fill, url, stream, entries)
                rates.append(worker_rate(url, stream, f"g{n}-{run}", n, len(entries)) / n)
            print(
                _median_line(f"{n} worker(s), ring+saga, per worker", rates, "events/s")
                + f" = {statistics.median(rates) / ceiling:.0%} of ceiling; target 50k"
            )
        procs = start_workers(url, "rss", "rss", 1, "ring,saga,trim")
        started = time.perf_counter()
        samples = anyio.run(rss_run, url, "rss", args.rss_events, procs[0].pid)
        elapsed = time.perf_counter() - started
        stop_workers(procs)
        step = max(1, len(samples) // 5)
        marks = samples[step - 1 :: step]
        if marks[-1] != samples[-1]:
            marks.append(samples[-1])
        text = ", ".join(f"{n // 1000:,}k: {kib / 1024:.1f}" for n, kib in marks)
        print(f"worker RSS (MiB) after events         {text} ({elapsed:.0f} s)")
        p50s: list[float] = []
        p99s: list[float] = []
        for run in range(args.repeat):
            stream = f"lat{run}"
            procs = start_workers(url, stream, "lat", 2, "ring")
            latencies = anyio.run(latency_run, url, stream, 5000, args.latency_seconds)
            stop_workers(procs)
            latencies.sort()
            p50s.append(statistics.median(latencies) * 1000)
            p99s.append(latencies[int(len(latencies) * 0.99) - 1] * 1000)
        print(_median_line("emit -> metric visible at 5k/s, p50", p50s, "ms"))
        print(_median_line("emit -> metric visible at 5k/s, p99", p99s, "ms") + "; target 20")
        links_comparison(url, args.links_events, args.links_repeat)


if __name__ == "__main__":
    main()
