"""Benchmark a ring-metrics worker under a flood of churning agent ids, on its own redis-server.

One ``hvobs worker ring-metrics`` process (the real CLI, default label and retirement limits
unless ``--worker-arg`` says otherwise) consumes a stream on a redis-server started here (free
port, no persistence). The stream is fed ``--agents`` distinct agent ids that churn: about
``--concurrent`` agents are active at a time; each appears (``ring.assigned``), is elevated and
demoted or breaches a ring boundary, and goes quiet for good (three ring events per agent).
Event time advances ``--seconds-per-event`` per event.

At 1k, 10k, 100k, 250k, 500k and 1M agents (when everything fed so far is applied) it prints
the worker's RSS, the tracked agents and retirements it reports, and the time of a ``/metrics``
scrape: the first after the feed (it brings the worker's view of the state up to date) and the
median of three more (nothing new to fold: the exposition alone), with the machine's load
average (the figures are wall-clock times on whatever else the machine runs).

Targets (issue 9): worker RSS <= 150 MiB after 1M churning agents (about 42 MiB after 1k);
``/metrics`` scrape < 200 ms.

Usage: ``python scripts/bench_labels.py [--agents 1000000] [--concurrent 2000]``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypervisor.observability._backends.log import LogError, TrimPolicy, parse_id
from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.workers import watermark
from redis_server import RedisServer

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STREAM = "bench:labels"
GROUP = "ring-metrics"
MILESTONES = (1_000, 10_000, 100_000, 250_000, 500_000, 1_000_000)
TARGET_RSS_MIB = 150.0
TARGET_SCRAPE_MS = 200.0


def churn(
    agents: int, concurrent: int, seconds_per_event: float, seed: int
) -> Iterator[tuple[bytes, int]]:
    """Encoded events of ``agents`` churning agents, about ``concurrent`` active at a time,
    each with the number of agents that have appeared so far."""
    rng = random.Random(seed)
    active: list[tuple[str, str, list[tuple[EventType, dict[str, int]]]]] = []
    started = 0
    at = 0.0
    while started < agents or active:
        if started < agents and len(active) < concurrent and (not active or rng.random() < 0.5):
            ring = rng.randrange(1, 4)
            if rng.random() < 0.6:
                middle: tuple[EventType, dict[str, int]] = (
                    EventType.RING_ELEVATED,
                    {"from_ring": ring, "to_ring": ring - 1},
                )
                last: tuple[EventType, dict[str, int]] = (EventType.RING_DEMOTED, {})
            else:
                middle = (EventType.RING_BREACH_DETECTED, {"ring": ring - 1})
                last = (EventType.RING_ASSIGNED, {"ring": ring})
            plan = [last, middle, (EventType.RING_ASSIGNED, {"ring": ring})]
            active.append((f"did:churn:{started:07d}", f"session-{started // 50:06d}", plan))
            started += 1
        index = rng.randrange(len(active))
        agent, session, plan = active[index]
        event_type, payload = plan.pop()
        if not plan:
            active[index] = active[-1]
            active.pop()
        at += seconds_per_event
        event = HypervisorEvent(
            event_type=event_type,
            timestamp=T0 + timedelta(seconds=at),
            agent_did=agent,
            session_id=session,
            payload=payload,
        )
        yield encode_event(event), started


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def scrape(port: int) -> tuple[float, bytes]:
    """One ``/metrics`` request: (seconds, body)."""
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=120) as response:
        body = bytes(response.read())
    return time.perf_counter() - started, body


def sample_value(body: bytes, prefix: str) -> float:
    for line in body.decode().splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def feed(url: str, chunk: list[bytes]) -> None:
    """Append ``chunk``, wait until the worker applied all of it, trim what it acknowledged."""
    async with (
        RedisStreamLog(url, STREAM) as log,
        RedisStateStore(url, state_prefix(STREAM, GROUP, "ring-metrics")) as store,
    ):
        for start in range(0, len(chunk), 2000):
            await log.append_many(chunk[start : start + 2000])
        head = parse_id(await log.head_id())
        while True:
            if parse_id(await watermark(log, GROUP)) > head and not await store.backlog():
                break
            await anyio.sleep(0.02)
        try:
            await log.trim(TrimPolicy(max_len=1000))
        except LogError as exc:  # only housekeeping: the next chunk trims again
            print(f"(trim failed: {exc})", file=sys.stderr)


def start_worker(url: str, consumer: str, extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    command = [
        sys.executable,
        "-m",
        "hypervisor.observability.cli",
        "worker",
        "ring-metrics",
        "--redis",
        url,
        "--stream",
        STREAM,
        "--group",
        GROUP,
        "--consumer",
        consumer,
        "--metrics-port",
        "0",
        "--log-level",
        "WARNING",
        *extra,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("metrics-port="):
        raise SystemExit(f"the worker did not start: {line!r}")
    return proc, int(line.split("=", 1)[1])


Worker = tuple[subprocess.Popen[bytes], int]
# mark -> per worker (RSS MiB, first scrape s, median of three more s)
Results = dict[int, list[tuple[float, float, float]]]


def measure(
    args: argparse.Namespace, marks: list[int], url: str, workers: list[Worker]
) -> tuple[int, float, Results]:
    """Feed the churn, printing a row per worker at each mark; return (events, seconds,
    results)."""
    print(
        f"{'agents':>9} {'events':>9} {'worker':>6} {'RSS MiB':>8} {'tracked':>8} {'retired':>9} "
        f"{'scrape+refresh':>15} {'scrape':>8} {'body':>8} {'feed s':>7} {'load':>5}"
    )
    events = churn(args.agents, args.concurrent, args.seconds_per_event, args.seed)
    fed = 0
    appeared = 0
    started = time.perf_counter()
    results: Results = {}
    for mark in marks:
        chunk_started = time.perf_counter()
        # Up to the event that brings in agent number ``mark`` (the last mark: to the end).
        while appeared < mark or mark == marks[-1]:
            chunk: list[bytes] = []
            for data, appeared in events:
                chunk.append(data)
                if len(chunk) >= 100_000 or (appeared >= mark and mark != marks[-1]):
                    break
            if not chunk:
                break
            anyio.run(feed, url, chunk)
            fed += len(chunk)
        feed_s = time.perf_counter() - chunk_started
        rows = results[mark] = []
        for number, (proc, port) in enumerate(workers, 1):
            refresh_s, _ = scrape(port)
            timed = [scrape(port) for _ in range(3)]
            steady_s = statistics.median(seconds for seconds, _ in timed)
            body = timed[-1][1]
            rss = rss_mib(proc.pid)
            tracked = sample_value(body, "agent_hypervisor_ring_agents_tracked ")
            retired = sum(
                sample_value(body, f'agent_hypervisor_ring_agents_retired_total{{reason="{r}"}}')
                for r in ("idle", "capacity")
            )
            rows.append((rss, refresh_s, steady_s))
            print(
                f"{mark:>9,} {fed:>9,} {number:>6} {rss:>8.1f} {tracked:>8,.0f} {retired:>9,.0f} "
                f"{refresh_s * 1000:>12.1f} ms {steady_s * 1000:>5.1f} ms "
                f"{len(body) / 1024:>5.0f} KiB {feed_s:>7.1f} {os.getloadavg()[0]:>5.1f}",
                flush=True,
            )
    return fed, time.perf_counter() - started, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=1_000_000)
    parser.add_argument("--concurrent", type=int, default=2000)
    parser.add_argument("--seconds-per-event", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--workers", type=int, default=1, help="workers in the group (the first starts first)"
    )
    parser.add_argument(
        "--worker-arg", action="append", default=[], help="extra worker option (repeatable)"
    )
    args = parser.parse_args()
    marks = [m for m in MILESTONES if m < args.agents] + [args.agents]
    with RedisServer("--appendonly", "no") as server:
        workers: list[Worker] = []
        try:
            for number in range(1, args.workers + 1):
                workers.append(start_worker(server.url, f"bench-{number}", args.worker_arg))
            print(
                f"redis-server on port {server.port}; {args.workers} worker(s), RSS at start "
                + ", ".join(f"{rss_mib(proc.pid):.1f}" for proc, _ in workers)
                + f" MiB; {args.agents:,} agents, ~{args.concurrent} active at a time, 3 ring "
                f"events each, {args.seconds_per_event} s of event time per event"
            )
            fed, elapsed, results = measure(args, marks, server.url, workers)
        finally:
            for proc, _ in workers:
                proc.terminate()
            for proc, _ in workers:
                proc.wait(timeout=60)
                if proc.stdout is not None:
                    proc.stdout.close()
    print(f"{fed:,} events in {elapsed:.0f} s ({fed / elapsed:,.0f} events/s end to end)")
    first, last = results[marks[0]], results[marks[-1]]
    worst_rss = max(rss for rss, _, _ in last)
    worst_scrape = max(max(r[1], r[2]) for rows in results.values() for r in rows)
    print("targets:")
    print(
        f"  [{'PASS' if worst_rss <= TARGET_RSS_MIB else 'MISS'}] worker RSS after "
        f"{marks[-1]:,} agents <= {TARGET_RSS_MIB:.0f} MiB ({worst_rss:.1f} MiB; "
        f"{max(rss for rss, _, _ in first):.1f} MiB after {marks[0]:,}, about 42 expected)"
    )
    print(
        f"  [{'PASS' if worst_scrape * 1000 < TARGET_SCRAPE_MS else 'MISS'}] /metrics scrape "
        f"< {TARGET_SCRAPE_MS:.0f} ms (slowest, refresh included: {worst_scrape * 1000:.1f} ms)"
    )


if __name__ == "__main__":
    main()
