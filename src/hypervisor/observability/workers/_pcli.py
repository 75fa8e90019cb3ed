"""``hvobs worker ... --partitions N`` (N > 1): a partitioned worker's start and wiring."""

from __future__ import annotations

import argparse
import sys
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from hypervisor.observability._core.partition import PartitionLayout
from hypervisor.observability._core.ring import RingBounds
from hypervisor.observability._core.ring_union import partition_bounds
from hypervisor.observability._core.spans import SpanRecordSink
from hypervisor.observability.errors import (
    PERMANENT_EXIT_STATUS,
    CommandError,
    LogUnavailableError,
    PartitionLayoutError,
)
from hypervisor.observability.workers._derivations import (
    RING_METRICS,
    SAGA_SPANS,
    Derivation,
    RingMetricsDerivation,
    SagaSpansDerivation,
)
from hypervisor.observability.workers._partitioned import Partition, PartitionedWorker

if TYPE_CHECKING:
    from hypervisor.observability.workers._cli import _SignalStop

__all__ = ["serve_partitioned"]


def _bounds(args: argparse.Namespace) -> RingBounds:
    return RingBounds(
        max_agents=args.max_agents,
        max_sessions=args.max_sessions,
        max_tracked_agents=args.max_tracked_agents,
        agent_idle_s=args.agent_idle,
        clock_window=args.agent_clock_window,
    )


async def _check_layout(args: argparse.Namespace, layout: PartitionLayout) -> None:
    from hypervisor.observability._backends.redis_cluster import detect_cluster
    from hypervisor.observability._backends.redis_partitions import check_layout

    tls: dict[str, Any] = args.tls
    try:
        if await detect_cluster(args.redis, connect_timeout_s=args.connect_timeout, **tls):
            raise CommandError(
                "this release's workers run partitions on a single Redis; on a Redis Cluster "
                "they are not supported yet",
                exit_status=2,
            )
        await check_layout(args.redis, layout, **tls)
    except PartitionLayoutError as exc:
        raise CommandError(str(exc), exit_status=PERMANENT_EXIT_STATUS) from None
    except LogUnavailableError as exc:
        raise CommandError(str(exc)) from None


async def serve_partitioned(args: argparse.Namespace, stop: _SignalStop) -> None:
    """Run a partitioned worker as the command line asks (see ``hvobs worker --help``).

    Raises:
        CommandError: ``--agent-spans`` with partitions, another partition count recorded
            (status 78), a Redis Cluster.
    """
    from hypervisor.observability._backends.redis_log import RedisStreamLog
    from hypervisor.observability._backends.redis_partitions import RedisWorkerRegistry
    from hypervisor.observability._backends.redis_state import RedisStateStore
    from hypervisor.observability.workers._cli import _config, serve_worker
    from hypervisor.observability.workers._sinks import JsonLinesSpanSink

    if getattr(args, "agent_spans", False):
        raise CommandError(
            "--agent-spans cannot run with --partitions above 1: an agent span follows "
            "causal ids across agents, whose events land in different partitions",
            exit_status=2,
        )
    tls: dict[str, Any] = args.tls
    layout = PartitionLayout(args.stream, args.partitions)
    await _check_layout(args, layout)
    bounds = _bounds(args) if args.kind == RING_METRICS else None
    sink = None
    otlp_sink = None
    if args.kind == SAGA_SPANS:
        if not (args.jsonl or args.otlp_endpoint):
            print(
                "hvobs worker saga-spans: warning: no span sink, so the spans are derived and "
                "counted but written nowhere; add --jsonl PATH or --otlp-endpoint URL",
                file=sys.stderr,
                flush=True,
            )
        if args.otlp_endpoint:
            try:
                from hypervisor.observability.exporters.otel import otlp_http_span_sink
            except ImportError as exc:
                raise CommandError(
                    "--otlp-endpoint needs the otel extra (pip install "
                    f"'hypervisor-observability[otel]'): {exc}",
                    exit_status=2,
                ) from None
            otlp_sink = otlp_http_span_sink(args.otlp_endpoint, service_name="agent-hypervisor")
        sink = JsonLinesSpanSink(args.jsonl, fsync=args.fsync) if args.jsonl else None
    sinks: list[SpanRecordSink] = [s for s in (sink, otlp_sink) if s is not None]
    try:
        async with AsyncExitStack() as stack:
            partitions: list[Partition] = []
            for index in range(layout.partitions):
                store = RedisStateStore(
                    args.redis, layout.state_prefix(index, args.group, args.kind), **tls
                )
                stack.push_async_callback(store.aclose)
                if args.reset_state:
                    await store.reset()
                derivation: Derivation
                if bounds is not None:
                    share = partition_bounds(bounds, layout.partitions)
                    derivation = RingMetricsDerivation(store, bounds=share)
                else:
                    derivation = SagaSpansDerivation(store, sinks)
                log = await stack.enter_async_context(
                    RedisStreamLog(
                        args.redis, layout.stream_key(index), max_block_s=args.block, **tls
                    )
                )
                dlq = await stack.enter_async_context(
                    RedisStreamLog(args.redis, layout.dead_letter_key(index), **tls)
                )
                partitions.append(Partition(index, log, dlq, [derivation]))
            registry = RedisWorkerRegistry(args.redis, args.stream, args.group, **tls)
            stack.push_async_callback(registry.aclose)
            worker = PartitionedWorker(partitions, _config(args), registry=registry)
            stop.worker = worker
            await serve_worker(
                worker,
                metrics_port=args.metrics_port,
                metrics_host=args.metrics_host,
                handle_signals=False,
                session_label=getattr(args, "session_label", True),
                bounds=bounds,
            )
    finally:
        if sink is not None:
            sink.close()
        if otlp_sink is not None:
            otlp_sink.shutdown()
