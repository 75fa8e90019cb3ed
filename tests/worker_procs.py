"""Worker processes for the multi-process tests: ``hvobs worker`` children and their cleanup.

``WorkerProc`` starts a worker (``metrics-port=`` is its first line of output) and talks to its
HTTP endpoints; the ``procs`` fixture kills every worker a test started, and every process the
test put in ``children``, whatever happens.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hypervisor.observability._backends.log import parse_id
from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
from hypervisor.observability._core.codec import decode_event
from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability.workers import watermark
from workers_support import Reference

__all__ = [
    "WorkerProc",
    "child_env",
    "children",
    "cli",
    "expected_samples",
    "kill_mid_batch",
    "pending_of",
    "procs",
    "scrape",
    "settled",
    "stream_events",
    "worker_argv",
]


def child_env() -> dict[str, str]:
    """The environment of a child process: ours, with unbuffered output."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerProc:
    """One ``hvobs worker`` process and its metrics port."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        # The worker's log goes to a file, kept for the message of a worker that fails to start.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, env=child_env()
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("metrics-port="):
            self.close()
            self._log.seek(0)
            log = self._log.read().decode(errors="replace")[-2000:]
            self._log.close()
            raise AssertionError(f"worker did not start: {line!r}; its log:\n{log}")
        self.port = int(line.strip().split("=")[1])

    def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` from the worker's HTTP port: the status and the body."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    def kill(self) -> None:
        """SIGKILL the worker, reap it and close its output pipe and log (nothing reads a dead
        worker)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def terminate(self) -> int:
        """SIGTERM the worker (it drains) and return its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self._log.close()
        return code

    def close(self) -> None:
        """Kill the worker if it still runs and close its output pipe and log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def cli(*args: str) -> list[str]:
    """The command line of ``hvobs *args`` run by this interpreter."""
    return [sys.executable, "-m", "hypervisor.observability.cli", *args]


def worker_argv(kind: str, url: str, stream: str, consumer: str, *extra: str) -> list[str]:
    """The command line of an ``hvobs worker`` of ``kind`` (its group) with short test timings,
    metrics on a free port, and ``extra`` options."""
    return cli(
        "worker",
        kind,
        "--redis",
        url,
        "--stream",
        stream,
        "--group",
        kind,
        "--consumer",
        consumer,
        "--metrics-port",
        "0",
        "--batch-size",
        "50",
        "--block",
        "0.2",
        "--claim-interval",
        "0.3",
        "--claim-min-idle",
        "0.5",
        *extra,
    )


children: list[subprocess.Popen[bytes]] = []
"""Other child processes of the running test (producers), killed by ``procs`` at its end."""


@pytest.fixture
def procs() -> Iterator[list[WorkerProc]]:
    """Worker (and producer) processes started by a test, killed at the end whatever happens."""
    started: list[WorkerProc] = []
    yield started
    for proc in started:
        proc.close()
    while children:
        child = children.pop()
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)


async def settled(url: str, stream: str, group: str, derivation: str) -> None:
    """Wait until the group acknowledged every entry and every staged entry is applied."""
    async with (
        RedisStreamLog(url, stream) as log,
        RedisStateStore(url, state_prefix(stream, group, derivation)) as store,
    ):
        head = parse_id(await log.head_id())
        with anyio.fail_after(60):
            while True:
                if parse_id(await watermark(log, group)) > head and not await store.backlog():
                    return
                await anyio.sleep(0.05)


def scrape(worker: WorkerProc) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The worker's /metrics, parsed by prometheus_client: sample name -> labels -> value."""
    status, body = worker.get("/metrics")
    assert status == 200
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


def expected_samples(ref: Reference) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    ring = ref.ring
    durations = dict(ring["agent_hypervisor_ring_elevation_duration_seconds"])
    durations.update(ref.open_elevations)
    return {
        "agent_hypervisor_ring_transitions_total": {
            (("agent_did", a), ("event_type", t), ("session_id", s)): float(n)
            for (t, a, s), n in ring["agent_hypervisor_ring_transitions_total"].items()
        },
        "agent_hypervisor_ring_breaches_total": {
            (("agent_did", a), ("session_id", s)): float(n)
            for (a, s), n in ring["agent_hypervisor_ring_breaches_total"].items()
        },
        "agent_hypervisor_ring_current": {
            (("agent_did", a),): float(r) for a, r in ring["agent_hypervisor_ring_current"].items()
        },
        "agent_hypervisor_ring_elevation_duration_seconds": {
            (("agent_did", a),): d for a, d in durations.items()
        },
        "agent_hypervisor_ring_events_processed_total": {(): float(ring["events_processed"])},
        "agent_hypervisor_ring_bad_events_total": {(): float(ref.bad_events)},
    }


async def pending_of(url: str, stream: str, group: str, consumer: str) -> int:
    async with RedisStreamLog(url, stream) as log:
        summary = await log.pending_summary(group)
    return sum(c.pending for c in summary.consumers if c.name == consumer)


def kill_mid_batch(
    url: str,
    stream: str,
    group: str,
    worker: WorkerProc,
    consumer: str,
    feed: Callable[[], object] | None = None,
) -> int:
    """Freeze the worker until it is caught holding pending entries, then SIGKILL it. `feed`,
    when given, writes more entries after each miss, so the catch does not depend on the
    worker being slower than a producer that has already finished."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        worker.proc.send_signal(signal.SIGSTOP)
        held = anyio.run(pending_of, url, stream, group, consumer)
        if held:
            worker.kill()
            return held
        worker.proc.send_signal(signal.SIGCONT)
        if feed is not None:
            feed()
        time.sleep(0.002)
    raise AssertionError("the worker never held pending entries")


async def stream_events(url: str, stream: str) -> list[HypervisorEvent]:
    """The events in stream order (the order the reference must see)."""
    out: list[HypervisorEvent] = []
    async with RedisStreamLog(url, stream) as log:
        after = "0-0"
        while entries := await log.read(after, 1000):
            after = entries[-1].id
            out.extend(decode_event(e.data) for e in entries if e.data is not None)
    return out
