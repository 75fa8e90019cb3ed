"""`hvobs worker saga-spans --otlp-endpoint`: a worker process exports its spans over OTLP/HTTP."""

from __future__ import annotations

import random
import threading
import uuid

import anyio
import pytest

pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._core.codec import encode_event
from otlp_receiver import OtlpReceiver, receiver as receiver
from redis_server import RedisServer
from worker_procs import WorkerProc, procs as procs, worker_argv
from workers_support import random_events, reference

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _wait_for_spans(receiver: OtlpReceiver, count: int, timeout_s: float) -> None:
    deadline = threading.Event()
    timer = threading.Timer(timeout_s, deadline.set)
    timer.start()
    try:
        with receiver.changed:
            while len(receiver.spans()) < count and not deadline.is_set():
                receiver.changed.wait(0.2)
    finally:
        timer.cancel()


def test_saga_worker_exports_reference_spans_over_otlp(
    redis_server: RedisServer, procs: list[WorkerProc], receiver: OtlpReceiver
) -> None:
    """A saga-spans worker started with --otlp-endpoint sends every span the in-process
    exporter produces from the same stream to the collector: the same names, true start and end
    times (ns) and the record's trace, span and parent ids."""
    url, stream = redis_server.url, f"o{uuid.uuid4().hex[:8]}"
    events = random_events(random.Random(7), 600, sagas=6)

    async def produce() -> None:
        async with RedisStreamLog(url, stream) as log:
            await log.append_many([encode_event(e) for e in events])

    anyio.run(produce)
    expected = {r.span_id: r for r in reference(events).spans}
    assert len(expected) > 20
    worker = WorkerProc(
        worker_argv("saga-spans", url, stream, "otlp-1", "--otlp-endpoint", receiver.url)
    )
    procs.append(worker)
    _wait_for_spans(receiver, len(expected), timeout_s=60)
    assert worker.terminate() == 0

    received = {span.span_id.hex(): span for _, span in receiver.spans()}
    assert set(received) == set(expected)
    for span_id, record in expected.items():
        span = received[span_id]
        assert span.name == record.name
        assert span.trace_id.hex() == record.trace_id
        assert (span.parent_span_id.hex() or None) == record.parent_span_id
        assert abs(span.start_time_unix_nano - round(record.start_time * 1e9)) <= 1000
        assert abs(span.end_time_unix_nano - round(record.end_time * 1e9)) <= 1000
    assert {resource["service.name"] for resource, _ in receiver.spans()} == {"agent-hypervisor"}
