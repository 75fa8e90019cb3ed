"""``hvobs worker ...`` and ``hvobs dlq ...``: argument declarations and handlers."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

import anyio

from hypervisor.observability._core.agent_spans import DEFAULT_IDLE_TIMEOUT_S, AgentSpanSink
from hypervisor.observability._core.codec import DEFAULT_MAX_EVENT_BYTES
from hypervisor.observability._core.spans import SpanRecordSink
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
from hypervisor.observability.workers._runtime import Worker, WorkerConfig, default_consumer_name

__all__ = ["add_dlq_command", "add_worker_command", "run_dlq", "run_worker", "serve_worker"]

_DEFAULT_STREAM = "hvobs:events"
GENAI_OPT_IN_ENV = "OTEL_SEMCONV_STABILITY_OPT_IN"
"""OpenTelemetry's opt-in variable: ``gen_ai_latest_experimental`` in it turns
``--genai-attributes`` on by default."""
REDIS_URL_ENV = "HVOBS_REDIS_URL"
"""The environment variable that supplies ``--redis`` when it is not given (it keeps the
password of the URL out of the process list)."""


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _genai_default() -> bool:
    values = os.environ.get(GENAI_OPT_IN_ENV, "")
    return "gen_ai_latest_experimental" in {value.strip() for value in values.split(",")}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help=f"Redis URL of the bus, with user and password (default: ${REDIS_URL_ENV})",
    )
    parser.add_argument(
        "--stream", default=_DEFAULT_STREAM, help="stream key of the bus (default: %(default)s)"
    )


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
        (SAGA_SPANS, "saga spans, written to the span sinks"),
    ):
        sub = kinds.add_parser(kind, help=text, description=text)
        _common(sub)
        sub.add_argument("--group", required=True, help="consumer group")
        sub.add_argument(
            "--consumer",
            default=default_consumer_name(),
            help="consumer name, stable across restarts (default: the host name)",
        )
        sub.add_argument(
            "--metrics-port",
            type=int,
            default=None if kind == SAGA_SPANS else 9101,
            help="port of /metrics and /healthz (ring default 9101; 0: any free port)",
        )
        sub.add_argument("--metrics-host", default="127.0.0.1", help="address to bind")
        if kind == SAGA_SPANS:
            sub.add_argument("--jsonl", metavar="PATH", help="append spans to this JSON-lines file")
            sub.add_argument("--fsync", action="store_true", help="fsync the span file on flush")
            sub.add_argument(
                "--otlp-endpoint",
                metavar="URL",
                help="also export spans over OTLP/HTTP to this collector (needs the otel extra)",
            )
            sub.add_argument(
                "--agent-spans",
                action="store_true",
                help="also export the causal spawn tree: one span per agent, with its ring "
                "transitions and breaches as span events (same group, state of its own)",
            )
            sub.add_argument(
                "--agent-idle-timeout",
                type=_positive_float,
                default=DEFAULT_IDLE_TIMEOUT_S,
                metavar="SECONDS",
                help="an agent span closes after this long without an event, in event time "
                "(default: %(default)s)",
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
        sub.add_argument("--batch-size", type=int, default=500, help="entries per read")
        sub.add_argument("--block", type=_positive_float, default=2.0, help="read BLOCK seconds")
        sub.add_argument("--claim-interval", type=_positive_float, default=5.0)
        sub.add_argument("--claim-min-idle", type=_positive_float, default=30.0)
        sub.add_argument("--max-deliveries", type=int, default=5)
        sub.add_argument(
            "--max-event-bytes",
            type=_positive_int,
            default=DEFAULT_MAX_EVENT_BYTES,
            help="longer entries are dead-lettered without being decoded (default: 1 MiB; "
            "the same on every worker of a group)",
        )
        sub.add_argument("--apply-interval", type=_positive_float, default=0.005)
        sub.add_argument("--max-pending-age", type=_positive_float, default=60.0)
        sub.add_argument("--max-agents", type=int, default=1000, help="agent label cap")
        sub.add_argument("--max-sessions", type=int, default=1000, help="session label cap")
        sub.add_argument(
            "--reset-state",
            action="store_true",
            help="delete the derivation's shared state before starting (after a lost stream)",
        )
        sub.add_argument("--log-level", default="INFO")
        sub.set_defaults(handler=run_worker)


def add_dlq_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs dlq list|replay``."""
    parser = subparsers.add_parser("dlq", help="inspect or replay dead-lettered entries")
    actions = parser.add_subparsers(title="actions", dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", help="print dead letters as JSON lines")
    _common(listing)
    listing.add_argument("--limit", type=int, default=1000)
    listing.set_defaults(handler=run_dlq)
    replay = actions.add_parser("replay", help="append dead letters to the stream again (once)")
    _common(replay)
    replay.add_argument("--limit", type=int, default=None)
    replay.set_defaults(handler=run_dlq)


def _redis_url(args: argparse.Namespace) -> str | None:
    """``--redis``, else ``$HVOBS_REDIS_URL``; ``None`` (and a one-line error) without either."""
    url: str | None = args.redis or os.environ.get(REDIS_URL_ENV)
    if not url:
        print(f"hvobs: pass --redis URL or set {REDIS_URL_ENV}", file=sys.stderr)
    return url


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
        max_pending_age_s=args.max_pending_age,
    )


async def serve_worker(
    worker: Worker,
    *,
    metrics_port: int | None,
    metrics_host: str = "127.0.0.1",
    max_agents: int = 1000,
    max_sessions: int = 1000,
    handle_signals: bool = True,
    session_label: bool = True,
) -> None:
    """Run ``worker`` with its HTTP endpoints until SIGTERM/SIGINT (or ``worker.stop()``).

    The bound port is printed as ``metrics-port=<n>`` on stdout when ``metrics_port`` is 0.
    ``session_label=False`` sums the ring counters over sessions (no ``session_id`` label).
    """
    async with anyio.create_task_group() as tg:
        if metrics_port is not None:
            from hypervisor.observability.workers._http import WorkerHttpServer

            server = WorkerHttpServer(
                worker,
                host=metrics_host,
                port=metrics_port,
                max_agents=max_agents,
                max_sessions=max_sessions,
                session_label=session_label,
            )
            port = await tg.start(server.serve)
            print(f"metrics-port={port}", flush=True)
        if handle_signals:
            tg.start_soon(_stop_on_signal, worker)
        await worker.run()
        tg.cancel_scope.cancel()


async def _stop_on_signal(worker: Worker) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logging.getLogger("hypervisor.observability.workers").info(
                "signal %s: draining", signal.Signals(signum).name
            )
            worker.stop()
            return


async def _run_worker(args: argparse.Namespace) -> int:
    from hypervisor.observability._backends.redis_log import RedisStreamLog
    from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
    from hypervisor.observability.workers._sinks import JsonLinesSpanSink

    sink = None
    otlp_sink = None
    derivations: list[Derivation] = []
    if args.kind == SAGA_SPANS and args.otlp_endpoint:
        try:
            from hypervisor.observability.exporters.otel import otlp_http_span_sink
        except ImportError as exc:
            print(
                f"hvobs: --otlp-endpoint needs the otel extra "
                f"(pip install 'hypervisor-observability[otel]'): {exc}",
                file=sys.stderr,
            )
            return 2
        otlp_sink = otlp_http_span_sink(args.otlp_endpoint, service_name="agent-hypervisor")
    store = RedisStateStore(args.redis, state_prefix(args.stream, args.group, args.kind))
    stores = [store]
    if args.kind == RING_METRICS:
        derivations.append(RingMetricsDerivation(store))
    else:
        sink = JsonLinesSpanSink(args.jsonl, fsync=args.fsync) if args.jsonl else None
        sinks: list[SpanRecordSink] = [s for s in (sink, otlp_sink) if s is not None]
        derivations.append(SagaSpansDerivation(store, sinks))
        if args.agent_spans:
            # A second derivation of the same worker and group: its state keys are the group's,
            # so the worker role's ACL already covers them.
            agent_store = RedisStateStore(
                args.redis, state_prefix(args.stream, args.group, AGENT_SPANS)
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
            RedisStreamLog(args.redis, args.stream, max_block_s=args.block) as log,
            RedisStreamLog(args.redis, dlq_name(args.stream)) as dlq,
            Worker(log, derivations, _config(args), dlq=dlq) as worker,
        ):
            await serve_worker(
                worker,
                metrics_port=args.metrics_port,
                metrics_host=args.metrics_host,
                max_agents=args.max_agents,
                max_sessions=args.max_sessions,
                session_label=getattr(args, "session_label", True),
            )
    finally:
        if sink is not None:
            sink.close()
        if otlp_sink is not None:
            otlp_sink.shutdown()
        for each in stores:
            await each.aclose()
    return 0


def run_worker(args: argparse.Namespace) -> int:
    """Run ``hvobs worker ...`` until SIGTERM/SIGINT; returns the exit status."""
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    args.redis = _redis_url(args)
    if args.redis is None:
        return 2
    return anyio.run(_run_worker, args)


async def _run_dlq(args: argparse.Namespace) -> int:
    import msgspec

    from hypervisor.observability._backends.redis_log import RedisStreamLog
    from hypervisor.observability.workers._dlq import list_dead_letters, replay_dead_letters

    async with (
        RedisStreamLog(args.redis, args.stream) as log,
        RedisStreamLog(args.redis, dlq_name(args.stream)) as dlq,
    ):
        if args.action == "list":
            encoder = msgspec.json.Encoder()
            for dlq_id, letter in await list_dead_letters(dlq, args.limit):
                document: dict[str, Any] = msgspec.structs.asdict(letter)
                document["data"] = letter.data.hex()
                document["dlq_id"] = dlq_id
                sys.stdout.write(encoder.encode(document).decode() + "\n")
        else:
            replayed = await replay_dead_letters(dlq, log, limit=args.limit)
            for dlq_id, new_id in replayed:
                print(f"{dlq_id} -> {new_id}")
            print(f"replayed {len(replayed)} dead letters", file=sys.stderr)
    return 0


def run_dlq(args: argparse.Namespace) -> int:
    """Run ``hvobs dlq list|replay``."""
    args.redis = _redis_url(args)
    if args.redis is None:
        return 2
    return anyio.run(_run_dlq, args)
