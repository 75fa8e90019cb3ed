"""Helpers for the partitioned-worker tests: raw partition writes (as the bus writes them),
producer processes, and waiting until every partition is applied."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import msgspec

from hypervisor.observability._backends.log import parse_id
from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.redis_registry import SlotRouter
from hypervisor.observability._backends.redis_state import RedisStateStore
from hypervisor.observability._core.codec import decode_event, encode_event
from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability._core.partition import PartitionLayout
from hypervisor.observability.workers import watermark
from worker_procs import WorkerProc, child_env, children, pending_of

__all__ = [
    "homes",
    "kill_holding",
    "partition_events",
    "partitions_settled",
    "start_cluster_producers",
    "start_partition_producers",
]

# A producer: appends its events in random chunks, each chunk split per partition into one
# append per partition stream key (the entries carry the field the bus writes).
_PRODUCER = """
import sys, random, anyio, msgspec
from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.redis_registry import SlotRouter
from hypervisor.observability._core.partition import PartitionLayout
url, stream, path = sys.argv[1], sys.argv[2], sys.argv[4]
n, seed = int(sys.argv[3]), int(sys.argv[5])
items = msgspec.msgpack.decode(open(path, "rb").read(), type=list[tuple[int, bytes]])
layout = PartitionLayout(stream, n)
rng = random.Random(seed)
async def main():
    logs = [RedisStreamLog(url, layout.stream_key(i)) for i in range(n)]
    try:
        i = 0
        while i < len(items):
            chunk = items[i:i + rng.randint(1, 60)]
            i += len(chunk)
            split = {}
            for index, data in chunk:
                split.setdefault(index, []).append(data)
            for index, datas in split.items():
                await logs[index].append_many(datas)
            await anyio.sleep(rng.random() * 0.004)
    finally:
        for log in logs:
            await log.aclose()
anyio.run(main)
"""


def start_partition_producers(
    url: str, layout: PartitionLayout, events: list[HypervisorEvent], tmp: Path, count: int = 4
) -> list[subprocess.Popen[bytes]]:
    """``count`` producer processes, each writing its share of ``events`` to the partitions."""
    producers = []
    for index in range(count):
        path = tmp / f"pproducer-{index}.bin"
        items = [(layout.partition(e), encode_event(e)) for e in events[index::count]]
        path.write_bytes(msgspec.msgpack.encode(items))
        argv = [sys.executable, "-c", _PRODUCER, url, layout.stream, str(layout.partitions)]
        producers.append(subprocess.Popen([*argv, str(path), str(index)], env=child_env()))
    children.extend(producers)
    return producers


async def homes(url: str, layout: PartitionLayout, cluster: bool) -> list[str]:
    """The URL of the node holding each partition (``url`` itself on a single Redis)."""
    if not cluster:
        return [url] * layout.partitions
    router = SlotRouter(url)
    return await router.homes([layout.stream_key(i) for i in range(layout.partitions)])


async def partition_events(
    url: str, layout: PartitionLayout, cluster: bool = False
) -> list[HypervisorEvent]:
    """Every partition's events, each partition in stream order, partitions one after another
    (an order the in-process reference may take: a derivation's order lives in one partition)."""
    out: list[HypervisorEvent] = []
    for index, home in enumerate(await homes(url, layout, cluster)):
        async with RedisStreamLog(home, layout.stream_key(index)) as log:
            after = "0-0"
            while entries := await log.read(after, 1000):
                after = entries[-1].id
                out.extend(decode_event(e.data) for e in entries if e.data is not None)
    return out


async def partitions_settled(
    url: str,
    layout: PartitionLayout,
    group: str,
    derivation: str,
    timeout_s: float = 60,
    cluster: bool = False,
) -> None:
    """Wait until the group acknowledged every entry of every partition and every staged entry
    is applied."""
    with anyio.fail_after(timeout_s):
        for index, home in enumerate(await homes(url, layout, cluster)):
            async with (
                RedisStreamLog(home, layout.stream_key(index)) as log,
                RedisStateStore(home, layout.state_prefix(index, group, derivation)) as store,
            ):
                head = parse_id(await log.head_id())
                while True:
                    if parse_id(await watermark(log, group)) > head and not await store.backlog():
                        break
                    await anyio.sleep(0.05)


async def _held(url: str, layout: PartitionLayout, group: str, consumer: str, cluster: bool) -> int:
    held = 0
    for index, home in enumerate(await homes(url, layout, cluster)):
        held += await pending_of(home, layout.stream_key(index), group, consumer)
    return held


def kill_holding(
    url: str,
    layout: PartitionLayout,
    group: str,
    worker: WorkerProc,
    consumer: str,
    cluster: bool = False,
) -> int:
    """Freeze the worker until it is caught holding pending entries on some partition, then
    SIGKILL it; return how many it held (producers must be writing meanwhile)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        worker.proc.send_signal(signal.SIGSTOP)
        held = anyio.run(_held, url, layout, group, consumer, cluster)
        if held:
            worker.kill()
            return held
        worker.proc.send_signal(signal.SIGCONT)
        time.sleep(0.002)
    raise AssertionError("the worker never held pending entries")


# A producer on a Redis Cluster: each chunk split per partition into one cluster pipeline of
# XADDs (the client sends each node its commands); a failed pipeline is sent again (the
# applier drops a copy of an event by its id, as the reference does). After a failure the
# client is made again from the next node of the cluster: redis-py's cluster client was seen
# to stay stuck on a SIGKILLed seed node ("cannot be connected") after the failover.
_CLUSTER_PRODUCER = """
import sys, random, anyio, msgspec
from hypervisor.observability._backends.redis_cluster import execute_pipeline, make_cluster_client
from hypervisor.observability._core.partition import PartitionLayout
from hypervisor.observability.errors import LogUnavailableError
seeds, stream, path = sys.argv[1].split(","), sys.argv[2], sys.argv[4]
n, seed = int(sys.argv[3]), int(sys.argv[5])
items = msgspec.msgpack.decode(open(path, "rb").read(), type=list[tuple[int, bytes]])
layout = PartitionLayout(stream, n)
rng = random.Random(seed)
def make(attempt):
    seed = seeds[attempt % len(seeds)]
    return make_cluster_client(seed, socket_timeout_s=5.0, connect_timeout_s=2.0)
async def main():
    client = make(0)
    try:
        i = 0
        while i < len(items):
            chunk = items[i:i + rng.randint(1, 60)]
            i += len(chunk)
            for attempt in range(200):
                pipe = client.pipeline(transaction=False)
                for index, data in chunk:
                    pipe.xadd(layout.stream_key(index), {b"e": data})
                try:
                    await execute_pipeline(client, pipe, "producer")
                    break
                except LogUnavailableError as exc:
                    error = exc
                    await client.aclose()
                    client = make(attempt + 1)
                    await anyio.sleep(0.1)
            else:
                raise SystemExit(f"the cluster stayed unavailable: {error}")
            await anyio.sleep(rng.random() * 0.004)
    finally:
        await client.aclose()
anyio.run(main)
"""


def start_cluster_producers(
    urls: list[str],
    layout: PartitionLayout,
    events: list[HypervisorEvent],
    tmp: Path,
    count: int = 4,
) -> list[subprocess.Popen[bytes]]:
    """``count`` producer processes writing their share of ``events`` to a cluster's
    partitions through cluster pipelines (``urls``: the cluster's nodes)."""
    url = ",".join(urls)
    producers = []
    for index in range(count):
        path = tmp / f"cproducer-{index}.bin"
        items = [(layout.partition(e), encode_event(e)) for e in events[index::count]]
        path.write_bytes(msgspec.msgpack.encode(items))
        argv = [sys.executable, "-c", _CLUSTER_PRODUCER, url, layout.stream]
        producers.append(
            subprocess.Popen(
                [*argv, str(layout.partitions), str(path), str(index)], env=child_env()
            )
        )
    children.extend(producers)
    return producers
