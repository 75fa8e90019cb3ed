"""``hvobs worker ...``: argument declarations and handler (``hvobs dlq``: ``_dlq_cli``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from hypervisor.observability._core.agent_spans import DEFAULT_IDLE_TIMEOUT_S, AgentSpanSink
from hypervisor.observability._core.codec import DEFAULT_MAX_EVENT_BYTES
from hypervisor.observability._core.partition import MAX_PARTITIONS
from hypervisor.observability._core.ring import RingBounds
from hypervisor.observability._core.spans import SpanRecordSink
from hypervisor.observability._util.cli import (
    LOG_LEVELS,
    add_redis_options,
    check_port_free,
    check_redis,
    listen_error,
    log_level,
    port,
    redis_url_or_env,
    seconds,
    tls_options,
    whole_number,
)
from hypervisor.observability.errors import CommandError
from hypervisor.observability.workers._config import DEFAULT_DRAIN_TIMEOUT_S
from hypervisor.observability.workers._derivations import (
    AGENT_SPANS,
    RING_METRICS,
    SAGA_SPANS,
    AgentSpansDerivation,
    Derivation,
    RingMetricsDerivation,
    SagaSpansDerivation,
)
from hypervisor.observability.workers._dlq import dlq_name
from hypervisor.observability.workers._partitioned import PartitionedWorker
from hypervisor.observability.workers._runtime import Worker, WorkerConfig, default_consumer_name
from hypervisor.observability.workers._sinks import JsonLinesSpanSink

if TYPE_CHECKING:
    from hypervisor.observability.exporters.otel import OTelSpanSink

__all__ = ["add_worker_command", "run_worker", "serve_worker"]

SAGA_METRICS_PORT = 9102
"""The saga-spans worker's default ``/metrics`` port (the ring-metrics worker's is 9101)."""
RING_METRICS_PORT = 9101
"""The ring-metrics worker's default ``/metrics`` port."""
GENAI_OPT_IN_ENV = "OTEL_SEMCONV_STABILITY_OPT_IN"
"""OpenTelemetry's opt-in variable: ``gen_ai_latest_experimental`` in it turns
``--genai-attributes`` on by default."""


def _ring_bounds_options(parser: argparse.ArgumentParser) -> None:
    defaults = RingBounds()
    parser.add_argument(
        "--max-agents",
        type=whole_number(1, None, "agents"),
        default=defaults.max_agents,
        metavar="N",
        help="agents with series of their own, the first in stream order; the others are "
        'counted under agent_did="__overflow__" (default: %(default)s agents)',
    )
    parser.add_argument(
        "--max-sessions",
        type=whole_number(1, None, "sessions"),
        default=defaults.max_sessions,
        metavar="N",
        help='sessions with series of their own; the others are counted under "__overflow__" '
        "(default: %(default)s sessions)",
    )
    parser.add_argument(
        "--max-tracked-agents",
        type=whole_number(1, None, "agents"),
        default=defaults.max_tracked_agents,
        metavar="N",
        help="agents whose ring state is kept; beyond it the least recently active agent is "
        "retired (its series disappear) (default: %(default)s agents)",
    )
    parser.add_argument(
        "--agent-idle",
        type=seconds(allow_zero=True),
        default=defaults.agent_idle_s,
        metavar="SECONDS",
        help="retire an agent after this many seconds of event time without a ring event; 0 "
        "retires by --max-tracked-agents only (default: %(default)g seconds, a day)",
    )
    parser.add_argument(
        "--agent-clock-window",
        type=whole_number(1, None, "events"),
        default=defaults.clock_window,
        metavar="EVENTS",
        help="idleness is measured against the median timestamp of this many recent ring "
        "events (1: the newest timestamp) (default: %(default)s events)",
    )


def _genai_default() -> bool:
    values = os.environ.get(GENAI_OPT_IN_ENV, "")
    return "gen_ai_latest_experimental" in {value.strip() for value in values.split(",")}


def add_worker_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs worker ring-metrics|saga-spans``."""
    parser = subparsers.add_parser(
        "worker",
        help="run a ring-metrics or saga-spans worker on a consumer group",
        description=(
            "Consume the bus on a consumer group and keep ring metrics or saga spans exactly "
            "as the in-process classes would, however many workers share the group."
        ),
    )
    kinds = parser.add_subparsers(title="kinds", dest="kind", metavar="KIND")
    kinds.required = True
    for kind, text in (
        (RING_METRICS, "ring metrics, served on /metrics as one global view"),
        (SAGA_SPANS, "saga spans, written to the span sinks (--jsonl, --otlp-endpoint)"),
    ):
        default_port = RING_METRICS_PORT if kind == RING_METRICS else SAGA_METRICS_PORT
        sub = kinds.add_parser(kind, help=text, description=text)
        add_redis_options(sub)
        sub.add_argument("--group", required=True, help="consumer group (required)")
        sub.add_argument(
            "--consumer",
            default=default_consumer_name(),
            help="consumer name, stable across restarts (default: the host name, %(default)s)",
        )
        sub.add_argument(
            "--metrics-port",
            type=port,
            default=default_port,
            metavar="PORT",
            help="TCP port of /metrics and /healthz (default: %(default)s; 0 picks a free one)",
        )
        sub.add_argument(
            "--metrics-host",
            default="127.0.0.1",
            metavar="ADDRESS",
            help="address /metrics listens on (default: %(default)s, this machine only)",
        )
        if kind == SAGA_SPANS:
            sub.add_argument(
                "--jsonl",
                metavar="PATH",
                help="append spans to this JSON-lines file (default: none)",
            )
            sub.add_argument(
                "--fsync",
                action="store_true",
                help="fsync the span file at every flush (default: off)",
            )
            sub.add_argument(
                "--otlp-endpoint",
                metavar="URL",
                help=(
                    "also export spans over OTLP/HTTP to this collector, such as "
                    "http://localhost:4318 (needs the otel extra) (default: none)"
                ),
            )
            sub.add_argument(
                "--agent-spans",
                action="store_true",
                help="also export the causal spawn tree: one span per agent, with its ring "
                "transitions and breaches as span events (same group, state of its own) "
                "(default: off)",
            )
            sub.add_argument(
                "--agent-idle-timeout",
                type=seconds(),
                default=DEFAULT_IDLE_TIMEOUT_S,
                metavar="SECONDS",
                help="an agent span closes after this long without an event, in event time "
                "(default: %(default)g seconds)",
            )
            sub.add_argument(
                "--genai-attributes",
                action=argparse.BooleanOptionalAction,
                default=_genai_default(),
                help="add the OpenTelemetry GenAI agent attributes (gen_ai.*) to agent spans "
                f"(default: on when ${GENAI_OPT_IN_ENV} has gen_ai_latest_experimental)",
            )
        else:
            sub.add_argument(
                "--session-label",
                action=argparse.BooleanOptionalAction,
                default=True,
                help="label ring counters with session_id (default: on); --no-session-label "
                "sums them over sessions: the first thing to turn off in a large fleet",
            )
        sub.add_argument(
            "--partitions",
            type=whole_number(1, MAX_PARTITIONS, "partitions"),
            default=1,
            metavar="N",
            help="partitions of the stream, as recorded by its first producer or worker; the "
            "workers of the group divide them among themselves (default: %(default)s, one "
            "stream key)",
        )
        sub.add_argument(
            "--lease-ttl",
            type=seconds(600),
            default=5.0,
            metavar="SECONDS",
            help="applier lease time to live; with --partitions, a worker unseen this long "
            "loses its partitions (default: %(default)g seconds)",
        )
        sub.add_argument(
            "--batch-size",
            type=whole_number(1, 100_000, "entries"),
            default=500,
            metavar="N",
            help="entries per read (default: %(default)s entries)",
        )
        sub.add_argument(
            "--block",
            type=seconds(60),
            default=2.0,
            metavar="SECONDS",
            help="longest wait of one blocking read (default: %(default)g seconds)",
        )
        sub.add_argument(
            "--claim-interval",
            type=seconds(),
            default=5.0,
            metavar="SECONDS",
            help="time between sweeps for other consumers' idle entries (default: %(default)g "
            "seconds)",
        )
        sub.add_argument(
            "--claim-min-idle",
            type=seconds(),
            default=30.0,
            metavar="SECONDS",
            help="an entry pending this long on a consumer is claimed (default: %(default)g "
            "seconds)",
        )
        sub.add_argument(
            "--max-deliveries",
            type=whole_number(1, 1000, "deliveries"),
            default=5,
            metavar="N",
            help="deliveries after which an entry is dead-lettered (default: %(default)s)",
        )
        sub.add_argument(
            "--max-event-bytes",
            type=whole_number(1, 512 * 1024 * 1024, "bytes"),
            default=DEFAULT_MAX_EVENT_BYTES,
            metavar="BYTES",
            help="longer entries are dead-lettered without being decoded; the same on every "
            "worker of a group (default: %(default)s bytes, 1 MiB)",
        )
        sub.add_argument(
            "--apply-interval",
            type=seconds(60),
            default=0.005,
            metavar="SECONDS",
            help="fallback poll between apply rounds, doubled while idle up to 1 s "
            "(default: %(default)g seconds)",
        )
        sub.add_argument(
            "--coalesce",
            type=seconds(1, allow_zero=True),
            default=None,
            metavar="SECONDS",
            help="let entries gather this long before the next read after a small one and "
            "before the next apply round after one that applied some: fewer, larger batches "
            "under load for up to about twice this in latency; 0: off (default: 0 on one "
            f"stream, {PARTITIONED_COALESCE_S:g} seconds with --partitions above 1)",
        )
        sub.add_argument(
            "--max-pending-age",
            type=seconds(),
            default=60.0,
            metavar="SECONDS",
            help="/healthz says behind when an entry is pending longer (default: %(default)g "
            "seconds)",
        )
        if kind == RING_METRICS:
            _ring_bounds_options(sub)
        sub.add_argument(
            "--drain-timeout",
            type=seconds(3600),
            default=DEFAULT_DRAIN_TIMEOUT_S,
            metavar="SECONDS",
            help="at SIGTERM/SIGINT, finish the batch in hand, apply and release the lease "
            "within this time; what is left stays pending for the next start (default: "
            "%(default)g seconds)",
        )
        sub.add_argument(
            "--reset-state",
            action="store_true",
            help="delete the derivation's shared state before starting, after a lost stream "
            "(default: off)",
        )
        sub.add_argument(
            "--log-level",
            type=log_level,
            default="INFO",
            metavar="LEVEL",
            help=f"{', '.join(LOG_LEVELS)} (default: info)",
        )
        sub.set_defaults(handler=run_worker)


PARTITIONED_COALESCE_S = 0.05
"""``--coalesce`` of a partitioned worker unless given: throughput first (its union view of the
partitions other workers apply is up to a checkpoint interval behind anyway); one stream keeps
the lowest latency (0)."""


def coalesce_of(args: argparse.Namespace) -> float:
    """``--coalesce``, or its default for the stream's layout."""
    if args.coalesce is not None:
        return float(args.coalesce)
    return PARTITIONED_COALESCE_S if getattr(args, "partitions", 1) > 1 else 0.0


def _config(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        group=args.group,
        consumer=args.consumer,
        batch_size=args.batch_size,
        block_s=args.block,
        claim_interval_s=args.claim_interval,
        claim_min_idle_s=args.claim_min_idle,
        max_deliveries=args.max_deliveries,
        max_event_bytes=args.max_event_bytes,
        apply_interval_s=args.apply_interval,
        coalesce_s=coalesce_of(args),
        max_pending_age_s=args.max_pending_age,
        lease_ttl_s=args.lease_ttl,
        drain_timeout_s=args.drain_timeout,
    )


async def serve_worker(
    worker: Worker | PartitionedWorker,
    *,
    metrics_port: int | None,
    metrics_host: str = "127.0.0.1",
    handle_signals: bool = True,
    session_label: bool = True,
    bounds: RingBounds | None = None,
) -> None:
    """Run ``worker`` with its HTTP endpoints until SIGTERM/SIGINT (or ``worker.stop()``).

    The bound port is printed as ``metrics-port=<n>`` on stdout (useful when ``metrics_port``
    is 0).

    Raises:
        CommandError: the metrics port cannot be bound (in use, not allowed).
    ``session_label=False`` sums the ring counters over sessions (no ``session_id`` label).
    A ``PartitionedWorker`` serves the union of its partitions' ring states, with ``bounds``
    (the configured label limits) applied to the union.
    """
    async with anyio.create_task_group() as tg:
        if handle_signals:
            # Before the port is announced: whoever sees the worker up may stop it at once,
            # and SIGTERM must then drain it rather than kill it.
            await tg.start(_stop_on_signal, worker.stop)
        if metrics_port is not None:
            from hypervisor.observability.workers._http import HttpServerBase, WorkerHttpServer
            from hypervisor.observability.workers._phttp import PartitionedHttpServer

            server: HttpServerBase
            if isinstance(worker, PartitionedWorker):
                server = PartitionedHttpServer(
                    worker,
                    bounds=bounds,
                    host=metrics_host,
                    port=metrics_port,
                    session_label=session_label,
                )
            else:
                server = WorkerHttpServer(
                    worker, host=metrics_host, port=metrics_port, session_label=session_label
                )
            try:
                bound = await tg.start(server.serve)
            except OSError as exc:
                raise listen_error(
                    exc,
                    metrics_host,
                    metrics_port,
                    port_option="--metrics-port",
                    host_option="--metrics-host",
                ) from None
            print(f"metrics-port={bound}", flush=True)
        await worker.run()
        tg.cancel_scope.cancel()


async def _stop_on_signal(
    stop: Callable[[], None], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Call ``stop`` at the first SIGTERM or SIGINT; a second one then has its default effect
    (SIGTERM ends the process at once, SIGINT raises ``KeyboardInterrupt``)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            logging.getLogger("hypervisor.observability.workers").info(
                "signal %s: draining", signal.Signals(signum).name
            )
            stop()
            return


class _SignalStop:
    """Where the worker command's first SIGTERM/SIGINT goes: until the worker exists, it
    cancels the start (waiting for Redis, resetting state); then it drains the worker."""

    def __init__(self) -> None:
        self.starting = anyio.CancelScope()
        self.worker: Worker | PartitionedWorker | None = None

    def __call__(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        else:
            self.starting.cancel()


async def _run_worker(args: argparse.Namespace) -> int:
    # The signals are handled from the very start: a worker still waiting for Redis stops
    # at SIGTERM as promptly as a running one.
    stop = _SignalStop()
    async with anyio.create_task_group() as tg:
        await tg.start(_stop_on_signal, stop)
        with stop.starting:
            await _serve(args, stop)
        tg.cancel_scope.cancel()
    if stop.starting.cancelled_caught:
        logging.getLogger("hypervisor.observability.workers").info("stopped before starting")
    return 0


def ring_bounds(args: argparse.Namespace) -> RingBounds:
    """The ring-metrics worker's label limits and agent retirement from its options."""
    return RingBounds(
        max_agents=args.max_agents,
        max_sessions=args.max_sessions,
        max_tracked_agents=args.max_tracked_agents,
        agent_idle_s=args.agent_idle,
        clock_window=args.agent_clock_window,
    )


def span_sinks(args: argparse.Namespace) -> tuple[JsonLinesSpanSink | None, OTelSpanSink | None]:
    """The saga-spans worker's sinks from its options: the JSON-lines file and the OTLP
    exporter, each ``None`` when not asked for (a warning says so when neither is).

    Raises:
        CommandError: ``--otlp-endpoint`` without the ``otel`` extra installed.
    """
    if not (args.jsonl or args.otlp_endpoint):
        print(
            "hvobs worker saga-spans: warning: no span sink, so the spans are derived and "
            "counted but written nowhere; add --jsonl PATH or --otlp-endpoint URL",
            file=sys.stderr,
            flush=True,
        )
    otlp_sink = None
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
    return sink, otlp_sink


async def _serve(args: argparse.Namespace, stop: _SignalStop) -> None:
    from hypervisor.observability._backends.redis_log import RedisStreamLog
    from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix

    tls: dict[str, Any] = args.tls
    await check_redis(args.redis, timeout_s=args.connect_timeout, **tls)
    if args.partitions > 1:
        from hypervisor.observability.workers._pcli import serve_partitioned

        await serve_partitioned(args, stop)
        return
    sink, otlp_sink = span_sinks(args) if args.kind == SAGA_SPANS else (None, None)
    derivations: list[Derivation] = []
    store = RedisStateStore(args.redis, state_prefix(args.stream, args.group, args.kind), **tls)
    stores = [store]
    if args.kind == RING_METRICS:
        derivations.append(RingMetricsDerivation(store, bounds=ring_bounds(args)))
    else:
        sinks: list[SpanRecordSink] = [s for s in (sink, otlp_sink) if s is not None]
        derivations.append(SagaSpansDerivation(store, sinks))
        if args.agent_spans:
            # A second derivation of the same worker and group: its state keys are the group's,
            # so the worker role's ACL already covers them.
            agent_store = RedisStateStore(
                args.redis, state_prefix(args.stream, args.group, AGENT_SPANS), **tls
            )
            stores.append(agent_store)
            agent_sinks: list[AgentSpanSink] = [s for s in (sink, otlp_sink) if s is not None]
            derivations.append(
                AgentSpansDerivation(
                    agent_store,
                    agent_sinks,
                    genai_attributes=args.genai_attributes,
                    idle_timeout_s=args.agent_idle_timeout,
                )
            )
    try:
        if args.reset_state:
            for each in stores:
                await each.reset()
        async with (
            RedisStreamLog(args.redis, args.stream, max_block_s=args.block, **tls) as log,
            RedisStreamLog(args.redis, dlq_name(args.stream), **tls) as dlq,
            Worker(log, derivations, _config(args), dlq=dlq) as worker,
        ):
            stop.worker = worker
            await serve_worker(
                worker,
                metrics_port=args.metrics_port,
                metrics_host=args.metrics_host,
                handle_signals=False,
                session_label=getattr(args, "session_label", True),
            )
    finally:
        if sink is not None:
            sink.close()
        if otlp_sink is not None:
            otlp_sink.shutdown()
        for each in stores:
            await each.aclose()


def run_worker(args: argparse.Namespace) -> int:
    """Run ``hvobs worker ...`` until SIGTERM/SIGINT; returns the exit status.

    Raises:
        CommandError: no Redis URL, the metrics port in use, Redis unreachable at start.
    """
    args.redis = redis_url_or_env(args.redis)
    args.tls = tls_options(args)
    check_port_free(
        args.metrics_host,
        args.metrics_port,
        port_option="--metrics-port",
        host_option="--metrics-host",
    )
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return anyio.run(_run_worker, args)
