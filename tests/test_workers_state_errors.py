"""Unreadable worker state on a real redis-server: crafted bytes (pickles that would run code,
random and truncated data, msgpack of the wrong shape, keys of the wrong type) in every key a
worker reads neither run code nor stop the worker. It reports them (a log line, ``/healthz``,
``hvobs_worker_state_errors_total``) and recovers as ``docs/workers.md`` says: a bad item is
skipped or repaired and everything else goes on; an unreadable key stops applying and serving
the derivation (consuming goes on) until the key reads again or the state is reset."""

from __future__ import annotations

import json
import pickle
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from hypervisor.observability._backends.log import parse_id
from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
from hypervisor.observability._backends.state import sort_key
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RingMetricsState
from hypervisor.observability._core.spans import SagaSpanState
from hypervisor.observability.workers import (
    RingMetricsDerivation,
    Worker,
    WorkerConfig,
    watermark,
)
from hypervisor.observability.workers._http import WorkerHttpServer
from hypervisor.observability.workers._snapshot import LEGACY_PICKLE_PREFIX, dump_state
from redis_server import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

GROUP = "g"
DERIVATION = "ring-metrics"


class RunsCode:
    """Unpickling this creates ``path``: the proof that a reader ran code from the data."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """One HTTP/1.1 GET against the worker's server: status and body."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        data = b""
        with suppress(anyio.EndOfStream):
            while True:
                data += await stream.receive()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class Rig:
    """A running ring-metrics worker with its HTTP server on a Redis stream, and a raw client
    for writing what a hostile producer with access to the worker's keys could write."""

    def __init__(self, url: str, stream: str, marker: Path) -> None:
        self.url = url
        self.stream = stream
        self.prefix = state_prefix(stream, GROUP, DERIVATION)
        self.marker = marker
        self.pickle = pickle.dumps(RunsCode(marker))
        self.redis = aioredis.Redis.from_url(url)
        self.store = RedisStateStore(url, self.prefix)
        self.log = RedisStreamLog(url, stream)
        self.worker = Worker(
            RedisStreamLog(url, stream),
            [RingMetricsDerivation(self.store)],
            WorkerConfig(
                group=GROUP,
                consumer="w1",
                block_s=0.05,
                apply_interval_s=0.002,
                claim_interval_s=0.2,
                claim_min_idle_s=0.5,
                retry_max_s=0.05,
                # No checkpoint of its own: the redo log (batches, skipped ids) stays readable.
                checkpoint_interval_s=600,
                max_deliveries=1000,
            ),
            dlq=RedisStreamLog(url, f"{stream}:dlq"),
        )
        self.server = WorkerHttpServer(self.worker, port=0)
        self.agents = 0

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    async def append(self) -> str:
        """Append one ring event (a new agent each time); return its stream id."""
        self.agents += 1
        event = HypervisorEvent(
            event_type=EventType.RING_ASSIGNED,
            agent_did=f"did:mesh:{self.agents}",
            payload={"ring": 2},
        )
        (entry_id,) = await self.log.append_many([encode_event(event)])
        return entry_id

    async def applied(self) -> tuple[int, int]:
        try:
            raw: Any = await self.redis.hget(self.key("meta"), "applied")
            return parse_id(raw.decode()) if raw else (0, 0)
        except (ValueError, aioredis.ResponseError):  # what the test itself wrote there
            return 0, 0

    async def health(self) -> tuple[int, dict[str, Any]]:
        status, body = await http_get(self.server.port, "/healthz")
        document: dict[str, Any] = json.loads(body)
        return status, document

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body = await http_get(self.server.port, "/metrics")
        assert status == 200
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    async def state_errors(self, key: str) -> float:
        labels = (("derivation", DERIVATION), ("group", GROUP), ("key", key))
        return (await self.metrics()).get(("hvobs_worker_state_errors_total", labels), 0.0)

    async def until(self, condition: Callable[[], Awaitable[bool]], what: str) -> None:
        with anyio.fail_after(5):
            while True:
                if await condition():
                    break
                await anyio.sleep(0.01)
        assert not self.marker.exists(), "a crafted pickle was unpickled"
        assert not self.worker.stopped.is_set(), f"the worker died ({what})"

    async def applies(self) -> None:
        """Append an event and wait until it is applied and the worker is healthy."""
        last = parse_id(await self.append())

        async def done() -> bool:
            status, _ = await self.health()
            return status == 200 and await self.applied() >= last

        await self.until(done, "applying")

    async def corrupt(self, *commands: tuple[Any, ...], reload: bool = True) -> None:
        """Run ``commands`` atomically, as a commit of another applier would (the version
        moves, so the worker reloads the state and reads what was written)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            if reload:
                pipe.execute_command("HINCRBY", self.key("meta"), "version", 1)
            await pipe.execute()


@asynccontextmanager
async def running(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(redis_server.url, f"t{uuid.uuid4().hex[:8]}", tmp_path / "code-ran")
    async with anyio.create_task_group() as tg:
        tg.start_soon(rig.worker.run)
        await tg.start(rig.server.serve)
        await rig.worker.ready.wait()
        await rig.applies()
        try:
            yield rig
        finally:
            rig.worker.stop()
            await rig.worker.stopped.wait()
            tg.cancel_scope.cancel()
    for closing in (rig.worker.log, rig.worker.dlq, rig.log, rig.store):
        await closing.aclose()
    await rig.redis.aclose()
    assert not rig.marker.exists()


async def blocked_then_reset(
    rig: Rig,
    key: str,
    expect: str,
    *commands: tuple[Any, ...],
    reload: bool = True,
    stages: bool = True,
) -> None:
    """Write ``commands``; wait until the worker reports ``key`` unreadable (log, /healthz,
    counters) while it stays alive and, if ``stages``, goes on consuming; then reset the state
    (what ``--reset-state`` does) and see it apply and serve again."""
    before = await rig.state_errors(key)
    await rig.corrupt(*commands, reload=reload)

    async def reported() -> bool:
        status, document = await rig.health()
        return status == 503 and expect in document["state_errors"].get(DERIVATION, "")

    await rig.until(reported, f"reporting {key}")
    metrics = await rig.metrics()
    assert await rig.state_errors(key) > before
    labels = (("derivation", DERIVATION), ("group", GROUP))
    assert metrics[("hvobs_worker_state_unreadable", labels)] == 1.0
    assert not any(name.startswith("agent_hypervisor_ring") for name, _ in metrics)
    applied = await rig.applied()
    last = parse_id(await rig.append())
    if stages:  # acknowledged (staged), not applied

        async def consumed() -> bool:
            return parse_id(await watermark(rig.log, GROUP)) > last

        await rig.until(consumed, "consuming")
        assert await rig.applied() == applied
    await rig.store.reset()
    await rig.applies()
    _, document = await rig.health()
    assert document["state_errors"] == {}
    labels = (("derivation", DERIVATION), ("group", GROUP))
    assert (await rig.metrics())[("hvobs_worker_state_unreadable", labels)] == 0.0


async def skipped_and_goes_on(
    rig: Rig, key: str, *commands: tuple[Any, ...], reload: bool = True
) -> None:
    """Write ``commands``; wait until the worker counted a bad item of ``key``, while it
    applies and stays healthy."""
    before = await rig.state_errors(key)
    await rig.corrupt(*commands, reload=reload)
    last = parse_id(await rig.append())

    async def counted() -> bool:
        status, _ = await rig.health()
        return (
            status == 200 and await rig.applied() >= last and await rig.state_errors(key) > before
        )

    await rig.until(counted, f"skipping a bad {key} item")


async def test_unreadable_snapshots_stop_the_derivation_until_reset(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Snapshots that are pickles (of an earlier release, or any: one would create a file if
    unpickled), random, truncated, of the wrong shape or kind, or of the wrong key type are
    reported as such, run no code, and the worker applies again after a reset."""
    noise = random.Random(9).randbytes(300)
    valid = dump_state(RingMetricsState())
    async with running(redis_server, tmp_path) as rig:
        snap = rig.key("snap")
        cases: list[tuple[bytes, str]] = [
            (LEGACY_PICKLE_PREFIX + rig.pickle, "--reset-state"),
            (rig.pickle, "unreadable state snapshot"),
            (noise, "unreadable state snapshot"),
            (valid[:-2], "unreadable state snapshot"),
            (b"\x92\x01\x81\xa4type\xa4ring\x00", "unreadable state snapshot"),
            (dump_state(SagaSpanState()), "not the RingMetricsState"),
        ]
        for data, expect in cases:
            await blocked_then_reset(rig, "snapshot", expect, ("SET", snap, data))
        await blocked_then_reset(
            rig, "snap", f"{snap} holds a list", ("DEL", snap), ("RPUSH", snap, rig.pickle)
        )


async def test_unreadable_meta_stops_the_derivation_until_reset(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Meta fields that are not what a commit writes (a pickle, garbage, ids that do not
    match) and a meta key of the wrong type are reported, and a reset recovers."""
    async with running(redis_server, tmp_path) as rig:
        meta = rig.key("meta")
        for field, value in (
            ("version", rig.pickle),
            ("applied", rig.pickle),
            ("applied_key", b"00000000000000000001-00000000000000000000"),
            ("seen_gen", b"1e9"),
            ("seen_count", b"-5"),
            ("checkpoint", rig.pickle),
        ):
            await blocked_then_reset(
                rig,
                "meta",
                f"{meta} field",
                ("HSET", meta, field, value),
                reload=field != "version",
            )
        await blocked_then_reset(
            rig,
            "meta",
            f"{meta} holds a string",
            ("DEL", meta),
            ("SET", meta, rig.pickle),
            reload=False,
        )


async def test_keys_of_the_wrong_type_stop_the_derivation_until_reset(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Staging keys, the skipped-id set and a seen-id list holding another type are named in
    the report; staging waits (entries stay pending), and a reset recovers."""
    async with running(redis_server, tmp_path) as rig:
        for name in ("idx", "open", "batches", "skip", "seen:0"):
            key = rig.key(name)
            await blocked_then_reset(
                rig,
                name.partition(":")[0],
                f"{key} holds a string",
                ("DEL", key),
                ("SET", key, rig.pickle),
                stages=name not in ("idx", "open", "batches"),
            )


async def test_bad_items_are_skipped_and_counted(redis_server: RedisServer, tmp_path: Path) -> None:
    """A garbage staged batch, an index member no worker wrote, a garbage seen-id element and
    skipped-id member are skipped and counted; the worker applies everything else and stays
    healthy. The lease and wake-up keys, when written by someone else (without expiry, of
    another type), are replaced and counted."""
    async with running(redis_server, tmp_path) as rig:
        ms, seq = await rig.applied()
        ahead = sort_key(f"{ms}-{seq + 1}")
        member = ahead + b"|" + ahead + b"|1|" + b"0" * 16
        await skipped_and_goes_on(
            rig,
            "batches",
            ("ZADD", rig.key("idx"), 0, member),
            ("ZADD", rig.key("open"), 0, member),
            ("HSET", rig.key("batches"), member, rig.pickle),
            reload=False,
        )
        odd = b"0" * 20 + b"-" + b"0" * 20 + b"|" + b"9" * 41 + b"|" + rig.pickle[:20]
        await skipped_and_goes_on(
            rig, "idx", ("ZADD", rig.key("idx"), 0, odd), ("ZADD", rig.key("open"), 0, odd)
        )
        await skipped_and_goes_on(rig, "seen", ("RPUSH", rig.key("seen:0"), rig.pickle))
        await skipped_and_goes_on(rig, "skip", ("ZADD", rig.key("skip"), 0, b"0!" + rig.pickle))
        lease = rig.key("lease")
        await skipped_and_goes_on(rig, "lease", ("SET", lease, rig.pickle), reload=False)
        await skipped_and_goes_on(
            rig, "lease", ("DEL", lease), ("HSET", lease, "a", rig.pickle), reload=False
        )
        await skipped_and_goes_on(rig, "wake", ("SET", rig.key("wake"), rig.pickle), reload=False)
        _, document = await rig.health()
        assert document["state_errors"] == {}
        assert document["state_error_counts"][DERIVATION] >= 7


@pytest.mark.slow
def test_worker_process_refuses_an_old_snapshot_until_reset_state(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """An ``hvobs worker`` process meeting a snapshot of an earlier release (a pickle that would
    create a file if unpickled) runs no code and stays up, says so on /healthz (naming
    --reset-state) and /metrics; restarted with --reset-state it applies and serves again."""
    from worker_procs import WorkerProc, worker_argv

    stream = f"t{uuid.uuid4().hex[:8]}"
    kind = "ring-metrics"
    prefix = state_prefix(stream, kind, kind)
    marker = tmp_path / "code-ran"

    async def write(key: str, value: bytes) -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        await client.set(key, value)
        await client.aclose()

    async def append(agent: str) -> None:
        event = HypervisorEvent(
            event_type=EventType.RING_ASSIGNED, agent_did=agent, payload={"ring": 2}
        )
        async with RedisStreamLog(redis_server.url, stream) as log:
            await log.append_many([encode_event(event)])

    def wait_for(worker: WorkerProc, condition: Callable[[int, dict[str, Any]], bool]) -> None:
        deadline = time.monotonic() + 15
        while True:
            status, body = worker.get("/healthz")
            if condition(status, json.loads(body)):
                return
            assert worker.proc.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, body
            time.sleep(0.05)

    old = LEGACY_PICKLE_PREFIX + pickle.dumps(RunsCode(marker))
    anyio.run(write, f"{prefix}:snap", old)
    worker = WorkerProc(worker_argv(kind, redis_server.url, stream, "c1"))
    try:
        anyio.run(append, "did:mesh:before")
        wait_for(
            worker,
            lambda status, doc: (
                status == 503 and "--reset-state" in doc["state_errors"].get(kind, "")
            ),
        )
        _, text = worker.get("/metrics")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples
        }
        labels = (("derivation", kind), ("group", kind))
        assert samples[("hvobs_worker_state_errors_total", (*labels, ("key", "snapshot")))] == 1
        assert samples[("hvobs_worker_state_unreadable", labels)] == 1
        assert worker.terminate() == 0
    finally:
        worker.close()
    assert not marker.exists()
    worker = WorkerProc(worker_argv(kind, redis_server.url, stream, "c1", "--reset-state"))
    try:
        anyio.run(append, "did:mesh:after")
        served = b'agent_hypervisor_ring_current{agent_did="did:mesh:after"} 2.0'
        wait_for(worker, lambda status, doc: status == 200 and served in worker.get("/metrics")[1])
        assert b"did:mesh:before" not in worker.get("/metrics")[1]  # consumed before the reset
        assert worker.terminate() == 0
    finally:
        worker.close()
    assert not marker.exists()


class FailingCollector(Collector):
    """A collector that raises while ``failing`` is set, as an exporter meeting a value it
    cannot export would."""

    def __init__(self) -> None:
        self.failing = True

    def collect(self) -> Iterable[Metric]:
        if self.failing:
            raise OverflowError("int too large to convert to float")
        return iter(())


async def test_a_failing_request_fails_alone_not_the_worker(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A request whose handling raises (here a collector that cannot export a value) answers
    500 while the worker goes on applying; /metrics serves again once the value is gone."""
    async with running(redis_server, tmp_path) as rig:
        failing = FailingCollector()
        rig.server.registry.register(failing)
        for _ in range(2):  # logged once, answered 500 each time
            status, _ = await http_get(rig.server.port, "/metrics")
            assert status == 500
        status, _ = await http_get(rig.server.port, "/healthz")
        assert status == 200
        await rig.applies()
        failing.failing = False
        assert (await http_get(rig.server.port, "/metrics"))[0] == 200
