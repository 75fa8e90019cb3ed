"""``hvobs worker ... --partitions N`` (N > 1): a partitioned worker's start and wiring."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from hypervisor.observability._core.partition import PartitionLayout
from hypervisor.observability._core.ring_union import partition_bounds
from hypervisor.observability._core.spans import SpanRecordSink
from hypervisor.observability.errors import (
    PERMANENT_EXIT_STATUS,
    CommandError,
    LogError,
    LogPermanentError,
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
from hypervisor.observability.workers._partitioned import Partition, PartitionedWorker, Router

if TYPE_CHECKING:
    from hypervisor.observability.workers._cli import _SignalStop

__all__ = ["serve_partitioned"]


async def _start_layout(args: argparse.Namespace, layout: PartitionLayout) -> Router | None:
    """Check or create the layout record; on a Redis Cluster return the router of the
    partitions' keys (the layout's stream keys, then the registry key)."""
    from hypervisor.observability._backends.redis_cluster import detect_cluster
    from hypervisor.observability._backends.redis_registry import (
        SlotRouter,
        check_layout,
        registry_key,
    )

    tls: dict[str, Any] = args.tls
    try:
        cluster = await detect_cluster(args.redis, connect_timeout_s=args.connect_timeout, **tls)
        router = None
        layout_url = args.redis
        if cluster:
            slots = SlotRouter(args.redis, **tls)
            keys = [layout.stream_key(i) for i in range(layout.partitions)]
            keys.append(registry_key(layout.stream, args.group))

            async def route() -> list[str]:
                return await slots.homes(keys)

            router = route
            layout_url = (await slots.homes([layout.layout_key]))[0]
        await check_layout(layout_url, layout, **tls)
    except PartitionLayoutError as exc:
        raise CommandError(str(exc), exit_status=PERMANENT_EXIT_STATUS) from None
    except LogUnavailableError as exc:
        raise CommandError(str(exc)) from None
    except LogPermanentError:
        raise
    except LogError as exc:
        raise CommandError(str(exc), exit_status=2) from None
    return router


async def serve_partitioned(args: argparse.Namespace, stop: _SignalStop) -> None:
    """Run a partitioned worker as the command line asks (see ``hvobs worker --help``).

    On a Redis Cluster (detected from the URL's node), each partition's logs and state store
    are plain clients of the master serving its slot (every key of a partition shares it), so
    today's scripts and transactions run unchanged; the worker re-reads the slot map at every
    heartbeat and reopens a partition whose slot moved (a reshard) or failed over.

    Raises:
        CommandError: ``--agent-spans`` with partitions, another partition count recorded
            (status 78), Redis unreachable at start.
    """
    from hypervisor.observability._backends.redis_log import RedisStreamLog
    from hypervisor.observability._backends.redis_registry import RedisWorkerRegistry
    from hypervisor.observability._backends.redis_state import RedisStateStore
    from hypervisor.observability.workers._cli import _config, ring_bounds, serve_worker, span_sinks

    if getattr(args, "agent_spans", False):
        raise CommandError(
            "--agent-spans cannot run with --partitions above 1: an agent span follows "
            "causal ids across agents, whose events land in different partitions",
            exit_status=2,
        )
    tls: dict[str, Any] = args.tls
    layout = PartitionLayout(args.stream, args.partitions)
    router = await _start_layout(args, layout)
    bounds = ring_bounds(args) if args.kind == RING_METRICS else None
    sink, otlp_sink = span_sinks(args) if args.kind == SAGA_SPANS else (None, None)
    sinks: list[SpanRecordSink] = [s for s in (sink, otlp_sink) if s is not None]

    async def open_partition(index: int, home: str) -> Partition:
        closers: list[Callable[[], Awaitable[None]]] = []
        try:
            store = RedisStateStore(home, layout.state_prefix(index, args.group, args.kind), **tls)
            closers.append(store.aclose)
            derivation: Derivation
            if bounds is not None:
                share = partition_bounds(bounds, layout.partitions)
                derivation = RingMetricsDerivation(store, bounds=share)
            else:
                derivation = SagaSpansDerivation(store, sinks)
            key = layout.stream_key(index)
            log = RedisStreamLog(home, key, max_block_s=args.block, **tls)
            closers.append(log.aclose)
            dlq = RedisStreamLog(home, layout.dead_letter_key(index), **tls)
            closers.append(dlq.aclose)
        except BaseException:
            for close in reversed(closers):
                await close()
            raise
        return Partition(index, log, dlq, [derivation], home=home, closers=closers)

    try:
        async with AsyncExitStack() as stack:
            homes = [args.redis] * (layout.partitions + 1)
            if router is not None:
                try:
                    homes = await router()
                except LogUnavailableError as exc:
                    raise CommandError(str(exc)) from None
            partitions: list[Partition] = []
            for index in range(layout.partitions):
                partition = await open_partition(index, homes[index])
                partitions.append(partition)
                stack.push_async_callback(partition.aclose)
                if args.reset_state:
                    await partition.derivations[0].store.reset()
            registry = RedisWorkerRegistry(homes[-1], args.stream, args.group, **tls)
            stack.push_async_callback(registry.aclose)
            worker = PartitionedWorker(
                partitions,
                _config(args),
                registry=registry,
                router=router,
                opener=open_partition if router is not None else None,
                registry_home=registry.rehome,
            )
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
