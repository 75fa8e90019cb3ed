"""Partitions on Redis Cluster: hash-tag balance over masters and raw per-partition XADD rates.

What it measures, on real servers started here:

1. **Balance**: how the partitions of a few stream names fall on the masters of a fresh
   3-master cluster (slots from ``CLUSTER KEYSLOT``, owners from ``CLUSTER NODES``), for
   several partition counts: with the layout's tags (spread over the slot space) and with plain
   ``{<stream>:p<i>}`` tags.
2. **XADD throughput**: pre-encoded events written in non-transactional pipelines of
   ``--batch`` XADDs spread over ``--partitions`` partition streams, by 1..3 writer processes,
   to a single redis-server (plain client) and to the 3-master cluster (``RedisCluster``
   client, whose pipelines go to every master concurrently). Events/s are the total written
   over the wall time from a common start to the last writer's end.
3. **Failover**: one process writes pipelines over the partitions while the master of
   partition 0 is SIGKILLed; every acknowledged entry id is looked for afterwards on the
   promoted replica, and the time partition 0 could not be written is printed.
4. **Local index bytes per event**: ``bench_index_memory.py``'s measurement (a bus's reader
   backfilling 100k events of distinct session and agent strings with a two-key payload, traced
   with ``tracemalloc``) against the single server, with the issue's target of 450 B.
5. **The bus end to end** (producer and reader): one process emits ``--bus-events`` events
   with ``emit_many`` through ``RedisEventBus.from_url(..., partitions=N)`` (its defaults:
   batches of 1,024 split per partition, one plain pipeline per partition to the node of its
   slot, all sent concurrently) on the single redis-server with 1 and ``--partitions``
   partitions and on the cluster with ``--partitions``; then a reader bus started afterwards
   indexes them all (one reader per partition merged into the local index): its merge rate.
6. **Workers**: ring events emitted through the bus (``emit_many``, no reader) while 1, 2 or 3
   ``hvobs worker ring-metrics --partitions N`` processes divide the partitions; events/s from
   the first emit until every partition's committed state holds its last entry (then a
   worker's union ``/metrics`` is checked to count every event), on a single redis-server, on
   a 3-master cluster without replicas and on one with a replica per master. Per partition:
   one worker on one stream (today's layout), on one partition of N holding every event, and on
   N partitions with the events spread.

Every process runs on this machine: the cores are shared by the
servers and the writers, and the core count is printed beside the figures.

Usage: ``python scripts/bench_cluster.py [--events 100000] [--partitions 12] [--batch 500]
[--failovers 3] [--skip-throughput] [--index-events 100000] [--bus-events 100000]
[--skip-bus] [--skip-workers] [--worker-events 200000] [--worker-partitions 12]
[--repeat 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypervisor.observability import RedisEventBus
from hypervisor.observability._backends.log import parse_id
from hypervisor.observability._backends.redis_client import make_client
from hypervisor.observability._backends.redis_cluster import (
    execute_pipeline,
    make_cluster_client,
)
from hypervisor.observability._backends.state import state_prefix
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.partition import PartitionLayout
from hypervisor.observability.errors import LogUnavailableError
from hypervisor.observability.workers import RING_METRICS
from redis_cluster import RedisCluster
from redis_server import RedisServer
from worker_procs import WorkerProc, cli

STREAMS = ("hvobs:events", "events", "fleet-a", "tenant-7:events")
COUNTS = (3, 6, 12, 24, 64)


def balance(cluster: RedisCluster) -> None:
    """Print how many partitions each master serves, per stream name and partition count, for
    the layout's tags and for plain ``{<stream>:p<i>}`` tags."""
    masters = cluster.masters()
    print(f"\n## Partitions per master ({len(masters)} masters, a fresh cluster)\n")
    print("| stream | tags | " + " | ".join(f"N={n}" for n in COUNTS) + " |")
    print("|---|---|" + "---|" * len(COUNTS))
    for stream in STREAMS:
        for scheme in ("layout", "plain"):
            cells = []
            for n in COUNTS:
                layout = PartitionLayout(stream, n)
                keys = [
                    layout.stream_key(i) if scheme == "layout" else f"{{{stream}:p{i}}}"
                    for i in range(n)
                ]
                owners = Counter(
                    next(m.port for m in masters if m.owns(cluster.keyslot(key))) for key in keys
                )
                cells.append("/".join(str(owners.get(m.port, 0)) for m in masters))
            print(f"| `{stream}` | {scheme} | " + " | ".join(cells) + " |")


def _writer(
    url: str,
    cluster: bool,
    stream: str,
    partitions: int,
    events: int,
    batch: int,
    start_at: float,
    results: multiprocessing.Queue[tuple[float, float]],
) -> None:
    async def run() -> tuple[float, float]:
        layout = PartitionLayout(stream, partitions)
        payload = [
            encode_event(
                HypervisorEvent(
                    event_type=EventType.RING_ASSIGNED,
                    agent_did=f"did:agent:{os.getpid()}:{i}",
                    session_id=f"session-{i % 50}",
                    payload={"to_ring": 2, "reason": "bench"},
                )
            )
            for i in range(batch)
        ]
        keys = [layout.stream_key(i % partitions) for i in range(batch)]
        client = (
            make_cluster_client(url, socket_timeout_s=30.0, connect_timeout_s=5.0)
            if cluster
            else make_client(url, socket_timeout_s=30.0, connect_timeout_s=5.0)
        )
        try:
            await client.ping()
            await asyncio.sleep(max(0.0, start_at - time.time()))
            cpu = time.process_time()
            written = 0
            while written < events:
                pipe = client.pipeline(transaction=False)
                for key, data in zip(keys, payload, strict=True):
                    pipe.xadd(key, {b"e": data})
                await pipe.execute()
                written += batch
            return time.time(), time.process_time() - cpu
        finally:
            await client.aclose()

    results.put(asyncio.run(run()))


def throughput(
    url: str, cluster: bool, writers: int, args: argparse.Namespace
) -> tuple[float, float]:
    """Events/s of ``writers`` processes writing ``args.events`` each, and the writers' CPU time
    per event (µs: the client's share of the cost)."""
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[tuple[float, float]] = context.Queue()
    start_at = time.time() + 2.0  # after every process has started and connected
    stream = f"bench:{os.getpid()}:{time.monotonic_ns()}"
    processes = [
        context.Process(
            target=_writer,
            args=(
                url,
                cluster,
                stream,
                args.partitions,
                args.events,
                args.batch,
                start_at,
                results,
            ),
        )
        for _ in range(writers)
    ]
    for process in processes:
        process.start()
    reports = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    events: int = args.events
    end = max(report[0] for report in reports)
    cpu = sum(report[1] for report in reports)
    return writers * events / (end - start_at), cpu / (writers * events) * 1e6


async def _failover_once(
    cluster: RedisCluster, partitions: int, batch: int
) -> tuple[int, int, float]:
    """Write pipelines of ``batch`` XADDs over ``partitions`` streams while the master of
    partition 0 is SIGKILLed; return (acknowledged entries, acknowledged entries missing after
    the promotion, seconds from the kill until partition 0 took a write again)."""
    layout = PartitionLayout(f"failover:{time.monotonic_ns()}", partitions)
    keys = [layout.stream_key(i % partitions) for i in range(batch)]
    victim = cluster.master_of_slot(layout.slot(0)).port
    client = make_cluster_client(cluster.url, socket_timeout_s=5.0, connect_timeout_s=2.0)
    acked: dict[str, set[bytes]] = {key: set() for key in keys}
    killed_at = recovered_at = 0.0
    counter = 0

    async def kill() -> None:
        nonlocal killed_at
        await asyncio.sleep(1.0)
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill_master, victim)

    try:
        killer = asyncio.create_task(kill())
        while not killer.done() or time.monotonic() < killed_at + 1.0 or not recovered_at:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                counter += 1
                pipe.xadd(key, {b"e": b"%d" % counter})
            try:
                replies = await execute_pipeline(client, pipe, "bench", raise_on_error=False)
            except LogUnavailableError:
                await asyncio.sleep(0.05)
                continue
            for key, reply in zip(keys, replies, strict=True):
                if isinstance(reply, bytes):
                    acked[key].add(reply)
                    if key == keys[0] and killed_at and not recovered_at and killer.done():
                        recovered_at = time.monotonic()
                elif not isinstance(reply, Exception):
                    raise TypeError(f"unexpected XADD reply {reply!r}")
            if any(isinstance(reply, Exception) for reply in replies):
                await asyncio.sleep(0.05)
        await killer
        lost = 0
        for key, ids in acked.items():
            present = {entry_id for entry_id, _ in await client.xrange(key, "-", "+") or []}
            lost += len(ids - present)
        return sum(len(ids) for ids in acked.values()), lost, recovered_at - killed_at
    finally:
        await client.aclose()


def failover(cluster: RedisCluster, args: argparse.Namespace, runs: int) -> None:
    """Print what SIGKILLing a master mid-stream costs the raw cluster client."""
    print(
        f"\n## A master SIGKILLed mid-stream ({args.partitions} partitions, pipelines of "
        f"{args.batch}, cluster-node-timeout {cluster.node_timeout_ms} ms)\n"
    )
    print("| run | acknowledged XADDs | acknowledged, then lost | partition 0 unwritable |")
    print("|---|---|---|---|")
    for run in range(1, runs + 1):
        acked, lost, gap = asyncio.run(_failover_once(cluster, args.partitions, args.batch))
        print(f"| {run} | {acked:,} | {lost:,} | {gap:.1f} s |")
        cluster.heal()


def index_memory(url: str, events: int) -> None:
    """Print the local index's bytes per stored event (``bench_index_memory``'s workload)."""
    # A sibling script, not a package module: imported from this file's folder (sys.path[0]).
    bench_index_memory = importlib.import_module("bench_index_memory")
    args = bench_index_memory.parser().parse_args(["--events", str(events), "--top", "0"])
    print("\n## Local index bytes per event")
    bench_index_memory.report(asyncio.run(bench_index_memory.measure(url, args)), args)


async def _bus_run(url: str, partitions: int, events: int) -> tuple[float, float, float]:
    """Emit ``events`` through a partitioned bus, then index them with a new reader bus:
    emitted events/s, the producer's CPU µs per event, and indexed events/s."""
    stream = f"bench-bus-{os.getpid()}-{time.monotonic_ns()}"
    fleet = [
        HypervisorEvent(
            event_type=EventType.RING_ASSIGNED,
            agent_did=f"did:agent:{i % 5000}",
            session_id=f"session-{i % 50}",
            payload={"to_ring": 2, "reason": "bench"},
        )
        for i in range(events)
    ]
    async with RedisEventBus.from_url(url, stream, partitions=partitions, reader=False) as bus:
        await bus.emit_many(fleet[:1000])  # connections made before the clock starts
        wall, cpu = time.perf_counter(), time.process_time()
        await bus.emit_many(fleet[1000:])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    emitted = (events - 1000) / wall
    start = time.perf_counter()
    async with RedisEventBus.from_url(url, stream, partitions=partitions, max_events=None) as bus:
        indexed = bus.applied
    merged = indexed / (time.perf_counter() - start)
    if indexed != events:
        raise RuntimeError(f"the reader indexed {indexed} of {events} events")
    return emitted, cpu / (events - 1000) * 1e6, merged


def bus_figures(single: RedisServer, cluster: RedisCluster, args: argparse.Namespace) -> None:
    """Print the bus's producer and reader rates on the single server and on the cluster."""
    print(
        f"\n## The bus end to end ({args.bus_events:,} events, one producer process, emit_many)\n"
    )
    print("| deployment | partitions | emitted events/s (CPU µs/event) | reader indexed events/s |")
    print("|---|---|---|---|")
    runs = [
        ("single redis-server", single.url, 1),
        ("single redis-server", single.url, args.partitions),
        ("3-master cluster", cluster.url, args.partitions),
    ]
    for name, url, partitions in runs:
        emitted, cpu, merged = asyncio.run(_bus_run(url, partitions, args.bus_events))
        print(f"| {name} | {partitions} | {emitted:,.0f} ({cpu:.1f} µs) | {merged:,.0f} |")


# --- workers: emit to applied ----------------------------------------------------------------


def _ring_events(count: int, agents: int, partition: int | None = None) -> list[HypervisorEvent]:
    """Ring events over ``agents`` agents (an elevation and a revert each); with ``partition``,
    only agents whose events route to that partition of 12."""
    layout = PartitionLayout("bench", 12)
    names: list[str] = []
    number = 0
    while len(names) < agents:
        name = f"did:agent:{number}"
        number += 1
        probe = HypervisorEvent(event_type=EventType.RING_ELEVATED, agent_did=name)
        if partition is None or layout.partition(probe) == partition:
            names.append(name)
    out = []
    for i in range(count):
        kind = EventType.RING_ELEVATED if i % 2 == 0 else EventType.RING_DEMOTED
        ring = 1 if i % 2 == 0 else 2
        out.append(
            HypervisorEvent(
                event_type=kind,
                agent_did=names[i % agents],
                session_id=f"session-{i % 50}",
                payload={"from_ring": 3 - ring, "to_ring": ring},
            )
        )
    return out


def _owners_ready(workers: list[WorkerProc], partitions: int) -> bool:
    owned: list[int] = []
    for worker in workers:
        status, body = worker.get("/healthz")
        if status not in (200, 503):
            return False
        document = json.loads(body)
        if partitions == 1:  # today's worker: no assignment
            return bool(document["connected"])
        if len(document["live"]) != len(workers):
            return False
        owned.extend(document["owned"])
    return sorted(owned) == list(range(partitions))


def _applied(worker: WorkerProc) -> float:
    """The events counted by a worker's ``/metrics`` (the union it serves)."""
    status, body = worker.get("/metrics")
    if status != 200:
        return 0.0
    for line in body.decode().splitlines():
        if line.startswith("agent_hypervisor_ring_events_processed_total "):
            return float(line.split()[1])
    return 0.0


def _client(url: str, cluster: bool) -> Any:
    if cluster:
        return make_cluster_client(url, socket_timeout_s=30.0, connect_timeout_s=5.0)
    return make_client(url, socket_timeout_s=30.0, connect_timeout_s=5.0)


async def _committed(url: str, cluster: bool, layout: PartitionLayout, deadline: float) -> None:
    """Wait until every partition's committed ring state folds up to the partition's last
    entry (the workers applied and committed every event)."""
    client = _client(url, cluster)
    streams = (
        [layout.stream]
        if layout.partitions == 1
        else [layout.stream_key(i) for i in range(layout.partitions)]
    )
    metas = (
        [state_prefix(layout.stream, "ring", RING_METRICS) + ":meta"]
        if layout.partitions == 1
        else [
            layout.state_prefix(i, "ring", RING_METRICS) + ":meta" for i in range(layout.partitions)
        ]
    )
    try:
        last: list[tuple[int, int] | None] = []
        for key in streams:
            newest = await client.xrevrange(key, count=1)
            last.append(parse_id(newest[0][0].decode()) if newest else None)
        waiting = [i for i, entry in enumerate(last) if entry is not None]
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers never applied every event")
            still = []
            for i in waiting:
                applied = await client.hget(metas[i], "applied")
                if applied is None or parse_id(applied.decode()) < last[i]:  # type: ignore[operator]
                    still.append(i)
            waiting = still
            if waiting:
                await asyncio.sleep(0.01)
    finally:
        await client.aclose()


async def _emit_and_wait(
    url: str,
    cluster: bool,
    layout: PartitionLayout,
    events: list[HypervisorEvent],
    *,
    wait: bool = True,
) -> float:
    """Emit ``events`` through the bus (``emit_many``, no reader), then (with ``wait``) wait
    until every partition committed them: the seconds from the first emit."""
    async with RedisEventBus.from_url(
        url, layout.stream, partitions=layout.partitions, reader=False
    ) as bus:
        started = time.monotonic()
        for first in range(0, len(events), 10_000):
            await bus.emit_many(events[first : first + 10_000])
    if wait:
        await _committed(url, cluster, layout, started + 600)
    return time.monotonic() - started


def end_to_end(
    url: str,
    cluster: bool,
    workers: int,
    partitions: int,
    events: int,
    only_partition: int | None = None,
    *,
    backlog: bool = False,
) -> float:
    """Events/s from the first emit until the workers committed every event, with ``workers``
    ring-metrics worker processes dividing ``partitions`` partitions (all events in one
    partition with ``only_partition``); then checks that a worker serves them all.

    With ``backlog`` the apply rate alone: the workers are stopped (SIGSTOP) while every
    event is written, and the clock runs from their SIGCONT until everything is committed (no
    producer shares the cores meanwhile)."""
    stream = f"e2e{os.getpid()}x{time.monotonic_ns()}"
    layout = PartitionLayout(stream, partitions)
    fleet = _ring_events(events, agents=2000, partition=only_partition)
    argv_extra = ["--partitions", str(partitions), "--batch-size", "500"]
    procs = [
        WorkerProc(
            cli(
                "worker",
                "ring-metrics",
                "--redis",
                url,
                "--stream",
                stream,
                "--group",
                "ring",
                "--consumer",
                f"w{i}",
                "--metrics-port",
                "0",
                "--log-level",
                "WARNING",
                *argv_extra,
            )
        )
        for i in range(workers)
    ]
    try:
        deadline = time.monotonic() + 60
        while not _owners_ready(procs, partitions):
            if time.monotonic() > deadline:
                raise RuntimeError("the workers never divided the partitions")
            time.sleep(0.1)
        if backlog:
            for proc in procs:
                proc.proc.send_signal(signal.SIGSTOP)
            asyncio.run(_emit_and_wait(url, cluster, layout, fleet, wait=False))
            started = time.monotonic()
            for proc in procs:
                proc.proc.send_signal(signal.SIGCONT)
            asyncio.run(_committed(url, cluster, layout, started + 600))
            seconds = time.monotonic() - started
        else:
            seconds = asyncio.run(_emit_and_wait(url, cluster, layout, fleet))
        deadline = time.monotonic() + 30
        while _applied(procs[-1]) < events:  # served once the checkpoints caught up
            if time.monotonic() > deadline:
                raise RuntimeError("a worker never served every event")
            time.sleep(0.1)
        return events / seconds
    finally:
        for proc in procs:
            proc.close()


def _median(runs: list[float]) -> float:
    ordered = sorted(runs)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _spread(runs: list[float]) -> str:
    return f"{_median(runs):,.0f} ({min(runs):,.0f} to {max(runs):,.0f})"


def workers_table(cluster: RedisCluster, single: RedisServer, args: argparse.Namespace) -> None:
    """Print emit-to-committed events/s, single Redis against 3-master clusters (without and
    with replicas), 1 to 3 workers; and one partition's rate against one stream's. Each cell is
    the median of ``--repeat`` runs (the range in brackets), the deployments taking turns so
    that they share the machine's moods."""
    cores = os.cpu_count()
    repeat = args.repeat
    print(
        f"\n## Workers: emit to applied ({args.worker_events:,} ring events through the bus, "
        f"{args.worker_partitions} partitions, {cores} cores)\n"
    )
    print(
        "events/s from the first emit until every partition's committed state holds every "
        f"event; median of {repeat} runs (range)\n"
    )
    print("| ring-metrics workers | single redis-server | 3 masters | 3 masters + 3 replicas |")
    print("|---|---|---|---|")
    n, parts = args.worker_events, args.worker_partitions
    ratios: dict[int, float] = {}
    with RedisCluster(replicas=0) as bare:
        for workers in (1, 2, 3):
            cells: dict[str, list[float]] = {"plain": [], "spread": [], "replicated": []}
            for _ in range(repeat):
                cells["plain"].append(end_to_end(single.url, False, workers, parts, n))
                cells["spread"].append(end_to_end(bare.url, True, workers, parts, n))
                cells["replicated"].append(end_to_end(cluster.url, True, workers, parts, n))
            ratios[workers] = _median(cells["spread"]) / _median(cells["plain"])
            print(
                f"| {workers} | {_spread(cells['plain'])} | {_spread(cells['spread'])} "
                f"| {_spread(cells['replicated'])} |"
            )
    print(
        f"\n3 masters against the single redis-server, 3 workers: {ratios[3]:.2f}x "
        f"(target: at least 1.00x; 1 worker {ratios[1]:.2f}x, 2 workers {ratios[2]:.2f}x)"
    )
    print(
        f"\n### Per partition: one worker, single redis-server, median of {repeat} runs\n\n"
        "apply rate: events/s from the worker's SIGCONT, after every event was written while "
        "it was stopped, until everything is committed; end to end as above\n"
    )
    print("| stream | apply rate | end to end |")
    print("|---|---|---|")
    rows = {
        "one stream (`--partitions 1`, today's layout)": (1, None),
        f"partition 0 of {parts}, every event in it": (parts, 0),
        f"all {parts} partitions, events spread": (parts, None),
    }
    rates: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in rows}
    for _ in range(repeat):
        for name, (count, only) in rows.items():
            applied, through = rates[name]
            applied.append(end_to_end(single.url, False, 1, count, n, only, backlog=True))
            through.append(end_to_end(single.url, False, 1, count, n, only))
    for name, (applied, through) in rates.items():
        print(f"| {name} | {_spread(applied)} | {_spread(through)} |")
    one, alone, every = (_median(rates[name][0]) for name in rows)
    print(
        f"\none partition's apply rate against one stream's: {alone / one:.2f}x (target: at "
        f"least 1.00x); all {parts} partitions in one worker: {every / one:.2f}x"
    )


def main() -> None:
    """Run both parts and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events per writer")
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--batch", type=int, default=500, help="XADDs per pipeline")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--failovers", type=int, default=3, help="failover runs (0: none)")
    parser.add_argument(
        "--index-events", type=int, default=100_000, help="local index bytes/event (0: skip)"
    )
    parser.add_argument("--bus-events", type=int, default=100_000, help="events through the bus")
    parser.add_argument("--skip-bus", action="store_true")
    parser.add_argument("--skip-workers", action="store_true")
    parser.add_argument("--worker-events", type=int, default=200_000)
    parser.add_argument("--worker-partitions", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3, help="runs per workers cell (median)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    with RedisCluster() as cluster, RedisServer() as single:
        balance(cluster)
        if args.index_events:
            index_memory(single.url, args.index_events)
        if not args.skip_bus:
            bus_figures(single, cluster, args)
        if args.failovers:
            failover(cluster, args, args.failovers)
        if not args.skip_workers:
            workers_table(cluster, single, args)
        if args.skip_throughput:
            return
        print(
            f"\n## XADD events/s ({args.partitions} partitions, pipelines of {args.batch}, "
            f"{args.events} events a writer)\n"
        )
        print("events/s, and in brackets the writers' CPU time per event\n")
        print("| writers | single redis-server | 3-master cluster |")
        print("|---|---|---|")
        for writers in (1, 2, 3):
            plain, plain_cpu = throughput(single.url, False, writers, args)
            spread, spread_cpu = throughput(cluster.url, True, writers, args)
            print(
                f"| {writers} | {plain:,.0f} ({plain_cpu:.1f} µs) "
                f"| {spread:,.0f} ({spread_cpu:.1f} µs) |"
            )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
