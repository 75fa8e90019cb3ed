"""Workers as real processes on a real redis-server: producers, SIGKILL mid-stream and
restart, metrics scraped over HTTP and parsed with prometheus_client, spans from JSON-lines
files, dead letters through the CLI, and a clean SIGTERM drain."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.workers import span_to_dict
from redis_server import RedisServer
from worker_procs import (
    WorkerProc,
    child_env,
    children,
    cli,
    expected_samples,
    kill_mid_batch,
    pending_of,
    procs as procs,
    scrape,
    settled,
    stream_events,
    worker_argv,
)
from workers_support import random_events, reference

pytestmark = [pytest.mark.redis, pytest.mark.slow]

_PRODUCER = """
import sys, random, time, anyio, msgspec
from hypervisor.observability._backends.redis_log import RedisStreamLog
url, stream, path, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
entries = msgspec.msgpack.decode(open(path, "rb").read(), type=list[bytes])
rng = random.Random(seed)
async def main():
    async with RedisStreamLog(url, stream) as log:
        i = 0
        while i < len(entries):
            n = rng.randint(1, 60)
            await log.append_many(entries[i:i + n])
            i += n
            await anyio.sleep(rng.random() * 0.004)
anyio.run(main)
"""

_POISON_WORKER = """
import sys, anyio
from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability.workers import RingMetricsDerivation, Worker, WorkerConfig, dlq_name
from hypervisor.observability.workers._cli import serve_worker
from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
url, stream, poison = sys.argv[1], sys.argv[2], sys.argv[3]

class Poison(RingMetricsDerivation):
    def prepare(self, event):
        if event.event_id == poison:
            raise RuntimeError("handler bug on this entry")

async def main():
    store = RedisStateStore(url, state_prefix(stream, "ring", "ring-metrics"))
    config = WorkerConfig(group="ring", consumer="p1", block_s=0.2, claim_interval_s=0.2,
                          claim_min_idle_s=0.1, max_deliveries=3)
    async with RedisStreamLog(url, stream) as log, RedisStreamLog(url, dlq_name(stream)) as dlq:
        async with Worker(log, [Poison(store)], config, dlq=dlq) as worker:
            await serve_worker(worker, metrics_port=0)
    await store.aclose()
anyio.run(main)
"""


def start_producers(
    url: str, stream: str, events: list[HypervisorEvent], tmp: Path
) -> list[subprocess.Popen[bytes]]:
    """Four producer processes, each appending its quarter of ``events`` in random chunks."""
    producers = []
    for index in range(4):
        path = tmp / f"producer-{index}.bin"
        path.write_bytes(msgspec.msgpack.encode([encode_event(e) for e in events[index::4]]))
        producers.append(
            subprocess.Popen(
                [sys.executable, "-c", _PRODUCER, url, stream, str(path), str(index)],
                env=child_env(),
            )
        )
    children.extend(producers)
    return producers


def test_ring_workers_killed_and_restarted_equal_reference(
    redis_server: RedisServer, procs: list[WorkerProc], tmp_path: Path
) -> None:
    """Four producers and three ring-metrics worker processes; one worker is SIGKILLed while
    holding a batch and restarted under its name. Every worker's scraped /metrics equals the
    in-process collector over the stream's order."""
    url, stream = redis_server.url, f"p{uuid.uuid4().hex[:8]}"
    events = random_events(random.Random(101), 6000, agents=12)
    for name in ("r0", "r1", "r2"):
        procs.append(WorkerProc(worker_argv("ring-metrics", url, stream, name)))
    producers = start_producers(url, stream, events, tmp_path)
    held = kill_mid_batch(url, stream, "ring-metrics", procs[1], "r1")
    assert held > 0
    procs.append(WorkerProc(worker_argv("ring-metrics", url, stream, "r1")))
    for producer in producers:
        assert producer.wait(timeout=120) == 0
    anyio.run(settled, url, stream, "ring-metrics", "ring-metrics")
    expected = expected_samples(reference(anyio.run(stream_events, url, stream)))
    for worker in (procs[0], procs[2], procs[3]):
        got = scrape(worker)
        for name, samples in expected.items():
            assert got.get(name, {}) == samples, name
    health = [json.loads(w.get("/healthz")[1]) for w in (procs[0], procs[2], procs[3])]
    assert all(h["connected"] for h in health)
    # The killed worker's held batch was delivered again (own PEL re-read or claimed).
    redelivered = [scrape(w)["hvobs_worker_redeliveries_total"] for w in procs[2:] + procs[:1]]
    assert sum(sum(samples.values()) for samples in redelivered) >= held
    assert anyio.run(pending_of, url, stream, "ring-metrics", "r1") == 0


def test_saga_workers_killed_and_restarted_export_reference_spans(
    redis_server: RedisServer, procs: list[WorkerProc], tmp_path: Path
) -> None:
    """Four producers and two saga-spans worker processes writing JSON lines; one is SIGKILLed
    mid-batch and restarted. The spans in the files (each span id once, repeated lines
    identical) equal the in-process exporter's spans: names, times, statuses, attributes, ids."""
    url, stream = redis_server.url, f"p{uuid.uuid4().hex[:8]}"
    events = random_events(random.Random(202), 5000, sagas=30)
    files = [tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"]
    for name, path in zip(("s0", "s1"), files, strict=True):
        procs.append(WorkerProc(worker_argv("saga-spans", url, stream, name, "--jsonl", str(path))))
    producers = start_producers(url, stream, events, tmp_path)
    kill_mid_batch(url, stream, "saga-spans", procs[1], "s1")
    procs.append(WorkerProc(worker_argv("saga-spans", url, stream, "s1", "--jsonl", str(files[1]))))
    for producer in producers:
        assert producer.wait(timeout=120) == 0
    anyio.run(settled, url, stream, "saga-spans", "saga-spans")
    assert procs[0].terminate() == 0
    assert procs[2].terminate() == 0
    by_id: dict[str, dict[str, Any]] = {}
    for path in files:
        for line in path.read_text().splitlines():
            span = json.loads(line)
            assert by_id.setdefault(span["span_id"], span) == span
    ref = reference(anyio.run(stream_events, url, stream))
    expected = {r.span_id: json.loads(json.dumps(span_to_dict(r))) for r in ref.spans}
    assert len(expected) == len(ref.spans) > 100
    assert by_id == expected


def test_poison_entry_dead_lettered_while_worker_keeps_going(
    redis_server: RedisServer, procs: list[WorkerProc], tmp_path: Path
) -> None:
    """A worker process whose handling of one entry always fails keeps consuming; that entry is
    dead-lettered after max_deliveries with its error, an undecodable entry at once; ``hvobs dlq
    list`` shows both and ``hvobs dlq replay`` appends each letter back once."""
    url, stream = redis_server.url, f"p{uuid.uuid4().hex[:8]}"
    events = random_events(random.Random(303), 400)
    poison = next(e for e in events if e.event_type is EventType.RING_ELEVATED)
    procs.append(WorkerProc([sys.executable, "-c", _POISON_WORKER, url, stream, poison.event_id]))

    async def produce() -> None:
        async with RedisStreamLog(url, stream) as log:
            await log.append_many([encode_event(e) for e in events[:200]])
            await log.append_many([b"\x00garbage"])
            await log.append_many([encode_event(e) for e in events[200:]])

    anyio.run(produce)
    anyio.run(settled, url, stream, "ring", "ring-metrics")
    listing = subprocess.run(
        cli("dlq", "list", "--redis", url, "--stream", stream),
        capture_output=True,
        check=True,
        env=child_env(),
    )
    letters = [json.loads(line) for line in listing.stdout.decode().splitlines()]
    by_reason = {letter["reason"]: letter for letter in letters}
    assert sorted(by_reason) == ["max_deliveries", "undecodable"]
    assert by_reason["max_deliveries"]["deliveries"] == 4
    assert "handler bug on this entry" in by_reason["max_deliveries"]["error"]
    assert bytes.fromhex(by_reason["undecodable"]["data"]) == b"\x00garbage"
    assert by_reason["undecodable"]["deliveries"] == 1
    got = scrape(procs[0])
    expected = expected_samples(reference([e for e in events if e is not poison]))
    assert got["agent_hypervisor_ring_current"] == expected["agent_hypervisor_ring_current"]
    assert got["hvobs_worker_dead_lettered_total"][(("group", "ring"), ("reason", "undecodable"))]
    replay = [cli("dlq", "replay", "--redis", url, "--stream", stream)] * 2
    outputs = [subprocess.run(a, capture_output=True, check=True, env=child_env()) for a in replay]
    replayed = [{line.split()[0] for line in out.stdout.decode().splitlines()} for out in outputs]
    assert replayed[0] == {letter["dlq_id"] for letter in letters}
    # The replayed garbage is dead-lettered again under a new id; nothing is replayed twice.
    assert not replayed[0] & replayed[1]


def test_sigterm_drains_with_nothing_pending(
    redis_server: RedisServer, procs: list[WorkerProc], tmp_path: Path
) -> None:
    """SIGTERM while events stream in: the worker stops reading, acknowledges and applies the
    batch in hand, exits 0, and leaves nothing pending and nothing staged unapplied."""
    url, stream = redis_server.url, f"p{uuid.uuid4().hex[:8]}"
    events = random_events(random.Random(404), 4000)
    procs.append(WorkerProc(worker_argv("ring-metrics", url, stream, "t0")))
    producers = start_producers(url, stream, events, tmp_path)
    while json.loads(procs[0].get("/healthz")[1])["events"] < 500:
        time.sleep(0.01)
    assert procs[0].terminate() == 0
    assert anyio.run(pending_of, url, stream, "ring-metrics", "t0") == 0

    async def backlog() -> int:
        async with RedisStateStore(url, state_prefix(stream, "ring-metrics", "ring-metrics")) as s:
            return await s.backlog()

    assert anyio.run(backlog) == 0
    for producer in producers:
        assert producer.wait(timeout=120) == 0
