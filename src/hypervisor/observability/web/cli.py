"""``hvobs serve``: the live web view and HTTP query API, over Redis or the demo fleet.

Operator mistakes get one line and a non-zero exit: a Redis URL without a scheme, a port out
of range or already in use (naming it), Redis unreachable (naming its host and port).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Final

from hypervisor.observability._util.cli import (
    DEFAULT_STREAM,
    add_tls_options,
    listen_error,
    port,
    redis_location,
    redis_url,
    stream_name,
    tls_options,
)
from hypervisor.observability.errors import ServeError

if TYPE_CHECKING:
    from hypervisor.observability.web.runtime import ServeRuntime

__all__ = ["add_serve_command", "bind_socket", "redis_location", "run_serve"]

DEFAULT_PORT: Final = 8765
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_MAX_EVENTS: Final = 100_000
TOKEN_ENV: Final = "HVOBS_TOKEN"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_serve_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs serve``."""
    from hypervisor.observability.demo import DEFAULT_AGENTS, DEFAULT_SAGAS, DEFAULT_SEED

    parser = subparsers.add_parser(
        "serve",
        help="serve the live web view and the HTTP query API",
        description=(
            "Serve a live view of the fleet (events, agents with their rings, saga timelines, "
            "causal spawn trees, breaches) and its HTTP query API (/openapi.json), over a "
            "Redis stream's events or over the demo fleet."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--redis",
        metavar="URL",
        type=redis_url,
        help="serve the events of a RedisEventBus stream at URL (redis://, rediss:// or unix://)",
    )
    source.add_argument(
        "--demo",
        action="store_true",
        help="serve the demo fleet, in process, kept emitting every few seconds",
    )
    parser.add_argument(
        "--stream",
        type=stream_name,
        default=DEFAULT_STREAM,
        metavar="NAME",
        help="stream key of the bus with --redis (default: %(default)s)",
    )
    add_tls_options(parser)
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=(
            "address to listen on (default: %(default)s, this machine only; 0.0.0.0 for every "
            "interface, then set a token)"
        ),
    )
    parser.add_argument(
        "--port",
        type=port,
        default=DEFAULT_PORT,
        help="TCP port to listen on (default: %(default)s; 0 picks a free one)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help=(
            f"bearer token every /api request must carry (default: the {TOKEN_ENV} "
            "environment variable; none when unset)"
        ),
    )
    parser.add_argument(
        "--max-events",
        type=_positive,
        default=DEFAULT_MAX_EVENTS,
        metavar="N",
        help="events kept in the server's index, newest first (default: %(default)s events)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="with --demo: seed of the simulated fleet (default: %(default)s)",
    )
    parser.add_argument(
        "--agents",
        type=_positive,
        default=DEFAULT_AGENTS,
        metavar="N",
        help="with --demo: agents spawned at start (default: %(default)s agents)",
    )
    parser.add_argument(
        "--sagas",
        type=_positive,
        default=DEFAULT_SAGAS,
        metavar="N",
        help="with --demo: sagas in the history at start (default: %(default)s sagas)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="warning",
        help="log level of the server (default: %(default)s)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log every request (default: off)",
    )
    parser.set_defaults(handler=run_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``.

    Raises:
        ServeError: the port is in use, not allowed, or the host is not an address here.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on --host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        error = listen_error(exc, host, port, port_option="--port", host_option="--host")
        raise ServeError(str(error)) from None
    sock.setblocking(False)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def run_serve(args: argparse.Namespace) -> int:
    """Run ``hvobs serve`` until interrupted; return the exit status."""
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None and (len(token) < 8 or not token.isprintable() or " " in token):
        print(
            "hvobs serve: the token must be at least 8 printable characters without spaces",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    tls_options(args)  # a usage mistake is found before the port is bound
    try:
        sock = bind_socket(args.host, args.port)
    except ServeError as exc:
        print(f"hvobs serve: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_serve(args, sock, token))
    except ServeError as exc:
        print(f"hvobs serve: {exc}", file=sys.stderr)
        return 1
    finally:
        sock.close()


def _runtime(args: argparse.Namespace) -> ServeRuntime:
    from hypervisor.observability._bus.bus import RedisEventBus
    from hypervisor.observability.web.runtime import ServeRuntime

    if args.demo:
        from hypervisor.observability.demo import generate_fleet
        from hypervisor.observability.demo.live import LiveFleet, drive

        fleet = generate_fleet(seed=args.seed, agents=args.agents, sagas=args.sagas)
        live = LiveFleet(fleet, seed=args.seed)
        bus = RedisEventBus.in_memory(max_len=args.max_events, max_events=args.max_events)

        async def driver(bus: RedisEventBus) -> None:
            await drive(bus, live)

        return ServeRuntime(bus, source="demo fleet (in process)", driver=driver)
    bus = RedisEventBus.from_url(
        args.redis,
        stream=args.stream,
        max_events=args.max_events,
        retry_deadline_s=5.0,
        log_options=tls_options(args),
    )
    source = f"Redis stream {args.stream!r} at {redis_location(args.redis)}"
    return ServeRuntime(bus, source=source)


async def _serve(args: argparse.Namespace, sock: socket.socket, token: str | None) -> int:
    from hypervisor.observability.errors import (
        PERMANENT_EXIT_STATUS,
        BusUnavailableError,
        CommandError,
        LogPermanentError,
        PermissionDeniedError,
    )
    from hypervisor.observability.web.app import LOOPBACK_NAMES
    from hypervisor.observability.web.server import make_server

    runtime = _runtime(args)
    # A failed start is reported in one line below: the bus's retry warnings would repeat it.
    bus_log = logging.getLogger("hypervisor.observability.redis_bus")
    level = bus_log.level
    bus_log.setLevel(max(level, logging.ERROR))
    try:
        await runtime.start()
    except BusUnavailableError as exc:
        await runtime.aclose()
        cause: BaseException = exc
        while cause.__cause__ is not None:
            # Retrying cannot help: say why, exit 78.
            if isinstance(cause, LogPermanentError):
                raise CommandError(cause.detail, exit_status=PERMANENT_EXIT_STATUS) from None
            if isinstance(cause, PermissionDeniedError):
                raise CommandError(str(cause), exit_status=PERMANENT_EXIT_STATUS) from None
            cause = cause.__cause__
        raise ServeError(
            f"cannot reach Redis at {redis_location(args.redis)} ({_reason(cause)}); start "
            "redis-server there or fix --redis"
        ) from None
    finally:
        bus_log.setLevel(level)
    # The backfilled index is long-lived: keep the collector from rescanning it on every full
    # collection (a pause of tens of milliseconds per 100k events, in the tail of every
    # request's latency).
    gc.freeze()
    try:
        loopback = _is_loopback(args.host)
        allowed = (LOOPBACK_NAMES | {args.host.strip("[]").lower()}) if loopback else None
        server = make_server(
            runtime,
            token=token,
            allowed_hosts=allowed,
            log_level=args.log_level,
            access_log=args.access_log,
        )
        url = _url(sock)
        guard = "bearer token required on /api" if token else "no token"
        print(f"hvobs serve: {runtime.source} on {url} ({guard}; Ctrl-C to stop)", flush=True)
        if not loopback and token is None:
            print(
                f"hvobs serve: warning: listening on {args.host} without a token: anyone who "
                f"can reach this port can read the fleet's events (set --token or {TOKEN_ENV})",
                file=sys.stderr,
                flush=True,
            )
        await server.serve(sockets=[sock])
    finally:
        await runtime.aclose()
    return 0


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
