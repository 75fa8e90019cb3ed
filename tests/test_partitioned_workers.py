"""Workers on a partitioned stream (issue 12): the union of the partitions' ring states, the
assignment of partitions to live workers, and worker processes on a real redis-server with
four producers writing the partition streams, SIGKILLs, and workers added and removed."""

from __future__ import annotations

import json
import random
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from hypervisor.observability._core.partition import PartitionLayout
from hypervisor.observability._core.ring import RingBounds, RingMetricsState
from hypervisor.observability._core.ring_union import partition_bounds, union_ring_states
from hypervisor.observability.workers import span_to_dict
from hypervisor.observability.workers._partitioned import assign_partitions
from partition_procs import (
    kill_holding,
    partition_events,
    partitions_settled,
    start_cluster_producers,
    start_partition_producers,
)
from redis_cluster import RedisCluster
from redis_server import RedisServer
from worker_procs import (
    WorkerProc,
    child_env,
    cli,
    expected_samples,
    procs as procs,
    scrape,
    worker_argv,
)
from workers_support import random_events, reference

_N = 4


def test_union_of_partition_states_equals_the_in_process_collector() -> None:
    """Folding each partition's events (in order) into its own bounded state and taking the
    union gives the in-process collector's counters, rings, elevations (open ones measured
    against the newest time of all partitions) and counts."""
    events = random_events(random.Random(7), 4000, agents=20)
    layout = PartitionLayout("u", _N)
    bounds = RingBounds()
    states = []
    for part in layout.split(events).values():
        state = RingMetricsState(partition_bounds(bounds, _N))
        for event in part:
            state.apply(event)
        states.append(state)
    assert len(states) == _N
    union = union_ring_states(states, bounds)
    ref = reference(events)
    ring = ref.ring
    assert union.transitions == ring["agent_hypervisor_ring_transitions_total"]
    assert union.breaches == ring["agent_hypervisor_ring_breaches_total"]
    assert union.current_rings == ring["agent_hypervisor_ring_current"]
    assert union.elevation_durations == ring["agent_hypervisor_ring_elevation_duration_seconds"]
    assert union.open_elevations() == ref.open_elevations
    assert union.events_processed == ring["events_processed"]
    assert union.bad_events == ref.bad_events


def test_partition_bounds_divide_the_limits() -> None:
    """Each partition folds with its share of the agent and session limits (rounded up, at
    least one), so the union stays within the configured limits up to the rounding."""
    bounds = RingBounds(max_agents=10, max_sessions=3, max_tracked_agents=100)
    share = partition_bounds(bounds, 4)
    assert (share.max_agents, share.max_sessions, share.max_tracked_agents) == (3, 1, 25)
    assert share.agent_idle_s == bounds.agent_idle_s
    assert partition_bounds(bounds, 1) == bounds


def test_assignment_is_round_robin_over_the_sorted_live_names() -> None:
    """Partition i belongs to live[i % W] of the sorted names, whatever order they came in."""
    assert assign_partitions(["b", "a", "c"], 5) == ["a", "b", "c", "a", "b"]
    assert assign_partitions(["w"], 3) == ["w", "w", "w"]
    assert assign_partitions([], 2) == ["", ""]


def _pargv(kind: str, url: str, stream: str, consumer: str, *extra: str) -> list[str]:
    return worker_argv(
        kind, url, stream, consumer, "--partitions", str(_N), "--lease-ttl", "1.5", *extra
    )


def _health(worker: WorkerProc) -> dict[str, Any]:
    status, body = worker.get("/healthz")
    document: dict[str, Any] = json.loads(body)
    assert status in (200, 503), status
    return document


def _wait_owners(workers: list[WorkerProc], names: list[str], timeout_s: float = 30) -> None:
    """Wait until the workers run exactly the partitions the sorted live names give them."""
    want = assign_partitions(names, _N)
    deadline = time.monotonic() + timeout_s
    while True:
        docs = [_health(w) for w in workers]
        runs = {d["consumer"]: sorted(d["owned"]) for d in docs}
        expected = {n: [i for i, o in enumerate(want) if o == n] for n in names}
        if runs == expected and all(d["live"] == sorted(names) for d in docs):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"owners {runs}, wanted {expected}")
        time.sleep(0.1)


def _assert_reference(
    url: str, layout: PartitionLayout, workers: list[WorkerProc], cluster: bool = False
) -> None:
    anyio.run(partitions_settled, url, layout, "ring-metrics", "ring-metrics", 60, cluster)
    expected = expected_samples(reference(anyio.run(partition_events, url, layout, cluster)))
    assert sum(expected["agent_hypervisor_ring_transitions_total"].values()) > 100
    for worker in workers:
        deadline = time.monotonic() + 20
        while True:  # the views follow the committed states (503 until a failed-over
            # partition's view is loaded again: the union is never served partial)
            got = scrape(worker) if worker.get("/metrics")[0] == 200 else {}
            if all(got.get(name, {}) == samples for name, samples in expected.items()):
                break
            if time.monotonic() > deadline:
                for name, samples in expected.items():
                    assert got.get(name, {}) == samples, name
            time.sleep(0.1)


@pytest.mark.redis
@pytest.mark.slow
def test_partitioned_ring_workers_killed_and_restarted_equal_reference(
    redis_server: RedisServer, procs: list[WorkerProc], tmp_path: Path
) -> None:
    """Four producers write four partitions; three ring-metrics workers divide them; one is
    SIGKILLed mid-stream and restarted under its name. Every worker serves the union equal to
    the in-process collector, and the partitions are owned as the live names give them."""
    url, stream = redis_server.url, f"pp{uuid.uuid4().hex[:8]}"
    layout = PartitionLayout(stream, _N)
    events = random_events(random.Random(303), 6000, agents=16)
    for name in ("r0", "r1", "r2"):
        procs.append(WorkerProc(_pargv("ring-metrics", url, stream, name)))
    _wait_owners(procs, ["r0", "r1", "r2"])
    producers = start_partition_producers(url, layout, events, tmp_path)
    assert kill_holding(url, layout, "ring-metrics", procs[1], "r1") > 0
    procs.append(WorkerProc(_pargv("ring-metrics", url, stream, "r1")))
    for producer in producers:
        assert producer.wait(timeout=120) == 0
    live = [procs[0], procs[2], procs[3]]
    _wait_owners(live, ["r0", "r1", "r2"])
    _assert_reference(url, layout, live)


@pytest.mark.redis
@pytest.mark.slow
def test_worker_added_and_removed_mid_stream_reassigns_partitions(
    redis_server: RedisServer, procs: list[WorkerProc], tmp_path: Path
) -> None:
    """Two workers run the four partitions; a third joins mid-stream and the partitions are
    divided over three; then one is stopped (SIGTERM) and another SIGKILLed, and the one left
    takes every partition within a few lease periods. The union served is still exact."""
    url, stream = redis_server.url, f"pa{uuid.uuid4().hex[:8]}"
    layout = PartitionLayout(stream, _N)
    events = random_events(random.Random(404), 6000, agents=16)
    procs.append(WorkerProc(_pargv("ring-metrics", url, stream, "a")))
    procs.append(WorkerProc(_pargv("ring-metrics", url, stream, "b")))
    _wait_owners(procs, ["a", "b"])
    producers = start_partition_producers(url, layout, events, tmp_path)
    procs.append(WorkerProc(_pargv("ring-metrics", url, stream, "c")))
    _wait_owners(procs, ["a", "b", "c"])
    assert procs[0].terminate() == 0
    _wait_owners(procs[1:], ["b", "c"])
    procs[1].kill()
    _wait_owners(procs[2:], ["c"])
    for producer in producers:
        assert producer.wait(timeout=120) == 0
    _assert_reference(url, layout, procs[2:])


@pytest.mark.redis
@pytest.mark.slow
def test_partitioned_saga_workers_export_reference_spans(
    redis_server: RedisServer, procs: list[WorkerProc], tmp_path: Path
) -> None:
    """Two saga-spans workers on four partitions, one SIGKILLed mid-stream and restarted: the
    spans written (each span id once, repeated lines identical) equal the in-process
    exporter's."""
    url, stream = redis_server.url, f"ps{uuid.uuid4().hex[:8]}"
    layout = PartitionLayout(stream, _N)
    events = random_events(random.Random(505), 5000, sagas=30)
    files = [tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"]
    for name, path in zip(("s0", "s1"), files, strict=True):
        procs.append(WorkerProc(_pargv("saga-spans", url, stream, name, "--jsonl", str(path))))
    producers = start_partition_producers(url, layout, events, tmp_path)
    assert kill_holding(url, layout, "saga-spans", procs[1], "s1") > 0
    procs.append(WorkerProc(_pargv("saga-spans", url, stream, "s1", "--jsonl", str(files[1]))))
    for producer in producers:
        assert producer.wait(timeout=120) == 0
    anyio.run(partitions_settled, url, layout, "saga-spans", "saga-spans")
    assert procs[0].terminate() == 0
    assert procs[2].terminate() == 0
    by_id: dict[str, dict[str, Any]] = {}
    for path in files:
        for line in path.read_text().splitlines():
            span = json.loads(line)
            assert by_id.setdefault(span["span_id"], span) == span
    ref = reference(anyio.run(partition_events, url, layout))
    expected = {r.span_id: json.loads(json.dumps(span_to_dict(r))) for r in ref.spans}
    assert len(expected) == len(ref.spans) > 100
    assert by_id == expected


@pytest.mark.redis
def test_another_partition_count_is_refused_naming_both(redis_server: RedisServer) -> None:
    """A worker started with 3 partitions on a stream recorded with 4 exits with status 78 and
    one line naming both counts; --agent-spans with partitions is refused with one line."""
    url, stream = redis_server.url, f"pc{uuid.uuid4().hex[:8]}"
    from hypervisor.observability._backends.redis_registry import check_layout

    anyio.run(check_layout, url, PartitionLayout(stream, 4))
    argv = worker_argv("ring-metrics", url, stream, "x", "--partitions", "3")
    done = subprocess.run(argv, capture_output=True, env=child_env(), timeout=60)
    assert done.returncode == 78
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "4 partitions" in lines[0], lines
    assert "with 3" in lines[0], lines
    argv = cli("worker", "saga-spans", "--redis", url, "--stream", stream, "--group", "g")
    done = subprocess.run(
        [*argv, "--partitions", "4", "--agent-spans", "--metrics-port", "0"],
        capture_output=True,
        env=child_env(),
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "--agent-spans" in lines[0], lines


@pytest.mark.redis
@pytest.mark.slow
def test_cluster_ring_workers_killed_and_restarted_equal_reference(
    redis_cluster: RedisCluster, procs: list[WorkerProc], tmp_path: Path
) -> None:
    """On a 3-master Redis Cluster (the URL names one node): four producers write the
    partitions through cluster pipelines, three ring-metrics workers divide them, one is
    SIGKILLed mid-stream and restarted. Every worker serves the in-process collector's
    numbers."""
    url, stream = redis_cluster.url, f"cp{uuid.uuid4().hex[:8]}"
    layout = PartitionLayout(stream, _N)
    # The partitions live on more than one master (4 spread tags over 3 equal ranges).
    assert len({redis_cluster.master_of_slot(layout.slot(i)).port for i in range(_N)}) >= 2
    events = random_events(random.Random(606), 6000, agents=16)
    for name in ("r0", "r1", "r2"):
        procs.append(WorkerProc(_pargv("ring-metrics", url, stream, name)))
    _wait_owners(procs, ["r0", "r1", "r2"])
    producers = start_cluster_producers(_node_urls(redis_cluster), layout, events, tmp_path)
    assert kill_holding(url, layout, "ring-metrics", procs[1], "r1", cluster=True) > 0
    procs.append(WorkerProc(_pargv("ring-metrics", url, stream, "r1")))
    for producer in producers:
        assert producer.wait(timeout=120) == 0
    live = [procs[0], procs[2], procs[3]]
    _wait_owners(live, ["r0", "r1", "r2"])
    _assert_reference(url, layout, live, cluster=True)


@pytest.mark.redis
@pytest.mark.slow
def test_cluster_master_killed_mid_stream_workers_keep_going(
    redis_cluster: RedisCluster, procs: list[WorkerProc], tmp_path: Path
) -> None:
    """A master serving a partition is SIGKILLed while producers write and two workers apply;
    its replica is promoted. The workers follow the partition to the new master and keep
    going; their union equals the in-process collector over the events that survived in the
    streams (replication is asynchronous: an acknowledged write the replica had not received
    is lost, and the state of that partition goes back with it, consistently)."""
    url, stream = redis_cluster.url, f"cf{uuid.uuid4().hex[:8]}"
    layout = PartitionLayout(stream, _N)
    events = random_events(random.Random(707), 6000, agents=16)
    try:
        for name in ("f0", "f1"):
            procs.append(WorkerProc(_pargv("ring-metrics", url, stream, name)))
        _wait_owners(procs, ["f0", "f1"])
        producers = start_cluster_producers(_node_urls(redis_cluster), layout, events, tmp_path)
        victim = redis_cluster.master_of_slot(layout.slot(0)).port
        _wait_applied(procs[0], 500)
        redis_cluster.kill_master(victim)
        for producer in producers:
            assert producer.wait(timeout=120) == 0
        url = redis_cluster.url  # a live master
        _assert_reference(url, layout, procs, cluster=True)
        assert all(w.proc.poll() is None for w in procs)
    finally:
        redis_cluster.heal()


@pytest.mark.redis
@pytest.mark.slow
def test_cluster_slot_resharded_while_events_flow(
    redis_cluster: RedisCluster, procs: list[WorkerProc], tmp_path: Path
) -> None:
    """A partition's slot (its stream, dead letters and worker state) is moved to another
    master while producers write and two workers apply: the workers reopen the partition on
    its new master and the union stays exact."""
    url, stream = redis_cluster.url, f"cr{uuid.uuid4().hex[:8]}"
    layout = PartitionLayout(stream, _N)
    events = random_events(random.Random(808), 6000, agents=16)
    for name in ("m0", "m1"):
        procs.append(WorkerProc(_pargv("ring-metrics", url, stream, name)))
    _wait_owners(procs, ["m0", "m1"])
    producers = start_cluster_producers(_node_urls(redis_cluster), layout, events, tmp_path)
    slot = layout.slot(1)
    source = redis_cluster.master_of_slot(slot).port
    target = next(m.port for m in redis_cluster.masters() if m.port != source)
    _wait_applied(procs[0], 500)
    assert redis_cluster.move_slot(slot, target) > 0
    for producer in producers:
        assert producer.wait(timeout=120) == 0
    assert redis_cluster.master_of_slot(slot).port == target
    _assert_reference(url, layout, procs, cluster=True)
    moved = [_health(w) for w in procs]
    assert all(w.proc.poll() is None for w in procs), moved


def _node_urls(cluster: RedisCluster) -> list[str]:
    return [f"redis://{host}:{port}/0" for host, port in cluster.addresses]


def _wait_applied(worker: WorkerProc, count: int, timeout_s: float = 30) -> None:
    """Wait until the union the worker serves counts ``count`` ring events (mid-stream)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = scrape(worker).get("agent_hypervisor_ring_events_processed_total", {})
        if sum(got.values()) >= count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the workers applied {got} ring events")
        time.sleep(0.05)


@pytest.mark.redis
@pytest.mark.slow
def test_partitioned_bus_and_worker_under_their_acl_users(
    redis_server: RedisServer, procs: list[WorkerProc]
) -> None:
    """The whole partitioned pipeline under least privilege: a ``RedisEventBus(partitions=4)``
    as the ``producer`` user of ``hvobs acl --partitions 4`` and a partitioned ring-metrics
    worker as its ``worker`` user (state, dead letters, layout record and the group's
    registry): the worker's union equals the in-process collector over the stream."""
    from hypervisor.observability import RedisEventBus
    from hypervisor.observability.acl import acl_line

    url, stream = redis_server.url, f"pa{uuid.uuid4().hex[:8]}"
    layout = PartitionLayout(stream, _N)
    tag = uuid.uuid4().hex[:6]
    admin = redis.Redis.from_url(url)
    try:
        for role, groups in (("producer", ()), ("worker", ("ring-metrics",))):
            line = acl_line(
                role, stream, f"{role}-{tag}", f"pw-{tag}", groups=groups, partitions=_N
            )
            admin.execute_command(*line.split())  # type: ignore[no-untyped-call]
    finally:
        admin.close()

    def as_user(role: str) -> str:
        return url.replace("redis://", f"redis://{role}-{tag}:pw-{tag}@", 1)

    worker = WorkerProc(_pargv("ring-metrics", as_user("worker"), stream, "r0"))
    procs.append(worker)
    _wait_owners([worker], ["r0"])
    events = random_events(random.Random(404), 2000, agents=12)

    async def produce() -> None:
        async with RedisEventBus.from_url(
            as_user("producer"), stream, partitions=_N, reader=False
        ) as bus:
            await bus.emit_many(events)

    anyio.run(produce)
    _assert_reference(url, layout, [worker])
    assert worker.proc.poll() is None
