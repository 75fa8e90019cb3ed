"""A worker's /metrics when its view cannot be brought up to date: the last good exposition
(even when the state it shared with the applier has since taken records it never committed),
marked stale, in both formats; 503 with one line when there is no good view at all."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from hypervisor.observability._backends.memory_log import MemoryStreamLog
from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
from hypervisor.observability._core.codec import encode_event
from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability.errors import LogUnavailableError
from hypervisor.observability.workers import (
    Commit,
    MemoryStateStore,
    RingMetricsDerivation,
    StateMeta,
    Worker,
    WorkerConfig,
)
from hypervisor.observability.workers._http import WorkerHttpServer
from redis_server import free_port
from workers_support import random_events, reference

pytestmark = pytest.mark.anyio

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def http_get(port: int, path: str, accept: str = "") -> tuple[int, str, bytes]:
    """One HTTP/1.1 GET: status, content type and body."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        extra = f"Accept: {accept}\r\n" if accept else ""
        await stream.send(f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode())
        data = b""
        with suppress(anyio.EndOfStream):
            while True:
                data += await stream.receive()
    head, _, body = data.partition(b"\r\n\r\n")
    ctype = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-type:")
    )
    return int(head.split()[1]), ctype, body


def ring_samples(body: bytes, *, openmetrics: bool = False) -> Samples:
    parse = openmetrics_families if openmetrics else text_string_to_metric_families
    out: Samples = {}
    for family in parse(body.decode()):
        for sample in family.samples:
            if sample.name.startswith("agent_hypervisor_ring_"):
                name = sample.name.removesuffix("_total")
                out[(name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def worker_sample(body: bytes, name: str) -> float:
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no {name}")


class FlakyStore(MemoryStateStore):
    """A memory store whose backend can be made to fail: everything (``down``) or commits."""

    def __init__(self) -> None:
        super().__init__("flaky")
        self.down = False
        self.commits_fail = False

    def _check(self) -> None:
        if self.down:
            raise LogUnavailableError("redis unreachable: connection refused")

    async def meta(self) -> StateMeta:
        self._check()
        return await super().meta()

    async def restore(self) -> Any:
        self._check()
        return await super().restore()

    async def replay(self, *args: Any) -> Any:
        self._check()
        return await super().replay(*args)

    async def checkpoint(self, *args: Any) -> Any:
        self._check()
        return await super().checkpoint(*args)

    async def commit(self, commit: Commit) -> bool:
        self._check()
        if self.commits_fail:
            raise LogUnavailableError("commit: redis unreachable: connection closed")
        return await super().commit(commit)


@asynccontextmanager
async def serving(worker: Worker) -> AsyncIterator[WorkerHttpServer]:
    # No background refresh: every refresh in these tests is a scrape's.
    server = WorkerHttpServer(worker, view_refresh_s=3600)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        yield server
        tg.cancel_scope.cancel()


async def feed(
    log: MemoryStreamLog, store: MemoryStateStore, events: list[HypervisorEvent]
) -> None:
    await log.append_many([encode_event(e) for e in events])
    batch = await log.read_group("g", "c", len(events))
    await store.stage([(e.id, e.data) for e in batch if e.data is not None])
    await log.ack("g", [e.id for e in batch])


def expected(events: list[HypervisorEvent]) -> Samples:
    """The reference's ring samples, keyed as ``ring_samples`` keys a scrape's."""
    from worker_procs import expected_samples  # a helper module of the process tests

    return {
        (name.removesuffix("_total"), labels): value
        for name, values in expected_samples(reference(events)).items()
        for labels, value in values.items()
    }


def contains(got: Samples, wanted: Samples) -> bool:
    """Whether ``got`` has every sample of ``wanted`` with its value (the reference has no
    label-limit families)."""
    return all(got.get(key) == value for key, value in wanted.items())


async def test_the_last_good_exposition_is_served_when_the_shared_state_ran_ahead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The view shares the applier's state; the applier folds more records and its commit
    fails (the state is now ahead of the committed one) and the backend goes away. Scrapes in
    both formats answer 200 with the last good numbers, never the uncommitted ones nor zeros,
    and say the view is stale (logged once); once the backend is back, the committed state is
    served."""
    caplog.set_level(logging.WARNING, logger="hypervisor.observability.workers")
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    store = FlakyStore()
    worker = Worker(log, [RingMetricsDerivation(store)], WorkerConfig(group="g", consumer="c"))
    (applier,) = worker.appliers
    events = [e for e in random_events(random.Random(5), 400) if e.event_type.startswith("ring")]
    first, second = events[: len(events) // 2], events[len(events) // 2 :]
    await feed(log, store, first)
    assert await applier.round() == len(first)
    async with serving(worker) as server:
        status, _, text = await http_get(server.port, "/metrics")
        status_om, ctype, om = await http_get(server.port, "/metrics", OPENMETRICS)
        assert (status, status_om) == (200, 200)
        assert ctype.startswith("application/openmetrics-text")
        assert server.views["ring-metrics"].state is applier.state  # shared
        good = ring_samples(text)
        assert ring_samples(om, openmetrics=True) == good
        assert contains(good, expected(first))
        await feed(log, store, second)
        store.commits_fail = True
        with pytest.raises(LogUnavailableError):
            await applier.round()
        store.down = True
        for _ in range(2):
            status, _, text = await http_get(server.port, "/metrics")
            status_om, _, om = await http_get(server.port, "/metrics", OPENMETRICS)
            assert (status, status_om) == (200, 200)
            assert ring_samples(text) == good
            assert ring_samples(om, openmetrics=True) == good
            assert om.endswith(b"# EOF\n")
            assert om.count(b"# EOF") == 1
            assert worker_sample(text, "hvobs_worker_view_stale") == 1.0
        status, _, health = await http_get(server.port, "/healthz")
        assert json.loads(health)["views"]["ring-metrics"]["stale"] is True
        store.down = store.commits_fail = False
        assert await applier.round() == len(second)
        status, _, text = await http_get(server.port, "/metrics")
        assert contains(ring_samples(text), expected(events))
        assert worker_sample(text, "hvobs_worker_view_stale") == 0.0
        # Four scrapes and a health check failed; the outage was logged once.
        assert worker_sample(text, "hvobs_worker_view_refresh_failures_total") == 5.0
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("cannot be brought up to date" in m for m in warned) == 1


async def test_no_good_view_answers_503_with_one_line() -> None:
    """A worker that never reached Redis has no view to serve: /metrics answers 503 with one
    line naming the cause (no zeros), /healthz says the view is stale."""
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    store = RedisStateStore(url, state_prefix("s", "g", "ring-metrics"), socket_timeout_s=2)
    log = RedisStreamLog(url, "s", connect_timeout_s=2)
    worker = Worker(log, [RingMetricsDerivation(store)], WorkerConfig(group="g", consumer="c"))
    try:
        async with serving(worker) as server:
            status, ctype, body = await http_get(server.port, "/metrics")
            assert status == 503
            assert ctype.startswith("text/plain")
            assert body.startswith(b"ring metrics unavailable: ")
            assert b"unreachable" in body
            assert body.count(b"\n") == 1
            assert body.endswith(b"\n")
            status, _, _ = await http_get(server.port, "/metrics", OPENMETRICS)
            assert status == 503
            status, _, health = await http_get(server.port, "/healthz")
            assert status == 503
            view = json.loads(health)["views"]["ring-metrics"]
            assert (view["stale"], view["age_seconds"]) == (True, None)
    finally:
        await store.aclose()
        await log.aclose()
        await worker.dlq.aclose()
