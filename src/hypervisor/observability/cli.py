"""The ``hvobs`` console script.

Each subcommand is one ``add_<name>_command(subparsers)`` function that declares its options and
sets ``handler`` to a ``run_<name>(args) -> int`` function; :data:`COMMANDS` lists them, so a
new subcommand is one function pair and one entry. Handlers import what they need lazily, so
``hvobs --help`` stays fast and never loads a backend client.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from hypervisor.observability._util.cli import (
    DEFAULT_STREAM,
    CommandParser,
    add_tls_options,
    redis_url,
    seconds,
    stream_name,
    tls_options,
    whole_number,
)

__all__ = ["COMMANDS", "build_parser", "main"]


def add_demo_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs demo``."""
    from hypervisor.observability.demo import DEFAULT_AGENTS, DEFAULT_SAGAS, DEFAULT_SEED

    parser = subparsers.add_parser(
        "demo",
        help="run a simulated agent fleet and print what observability sees",
        description=(
            "Simulate an orchestrator spawning agents, ring changes, breaches and sagas (the "
            "second fails and is rolled back, the third is escalated) on a deterministic "
            "clock, and print the ring metrics, a timeline of the saga spans and the causal "
            "spawn tree."
        ),
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed of the simulation (default: %(default)s)",
    )
    parser.add_argument(
        "--agents",
        type=whole_number(1, 10_000, "agents"),
        default=DEFAULT_AGENTS,
        metavar="N",
        help="agents the orchestrator and its delegates spawn, the orchestrator not counted "
        "(default: %(default)s agents)",
    )
    parser.add_argument(
        "--sagas",
        type=whole_number(0, 10_000, "sagas"),
        default=DEFAULT_SAGAS,
        metavar="N",
        help="sagas run (default: %(default)s sagas)",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        type=redis_url,
        default=None,
        help=(
            "run every agent as its own process on a RedisEventBus at URL, such as "
            "redis://localhost:6379/0, observed from the shared stream (default: none, the "
            "in-process bus)"
        ),
    )
    parser.add_argument(
        "--stream",
        type=stream_name,
        default=DEFAULT_STREAM,
        metavar="NAME",
        help="with --redis: the stream the agents append to (default: %(default)s, the "
        "workers' and hvobs serve's)",
    )
    parser.add_argument(
        "--keep-stream",
        action="store_true",
        help="with --redis: keep the stream when the demo made it, for workers or hvobs serve "
        "to read (default: off: a stream the demo made is deleted at the end; one that "
        "existed before is always kept)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=seconds(3600),
        default=5.0,
        metavar="SECONDS",
        help="with --redis: wait this long for Redis to answer (default: %(default)g seconds)",
    )
    add_tls_options(parser)
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Run ``hvobs demo``."""
    from hypervisor.observability.demo import feed_in_process, generate_fleet, render_report

    fleet = generate_fleet(seed=args.seed, agents=args.agents, sagas=args.sagas)
    # Other backends plug in here: a feeder that emits the fleet's events on that bus and
    # returns a DemoResult.
    if args.redis:
        from hypervisor.observability.demo.over_redis import feed_redis

        result = feed_redis(
            fleet,
            args.redis,
            sagas=args.sagas,
            stream=args.stream,
            keep_stream=args.keep_stream,
            connect_timeout_s=args.connect_timeout,
            tls=tls_options(args),
        )
    else:
        result = feed_in_process(fleet)
    print(render_report(fleet, result))
    if "stream" in result.extra:
        print(f"\n{result.extra['stream']}")
    return 0


def add_worker_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs worker`` (ring-metrics and saga-spans consumer-group workers)."""
    from hypervisor.observability.workers._cli import add_worker_command as add

    add(subparsers)


def add_dlq_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs dlq`` (list and replay dead-lettered entries)."""
    from hypervisor.observability.workers._dlq_cli import add_dlq_command as add

    add(subparsers)


def add_acl_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs acl`` (least-privilege Redis users for a stream)."""
    from hypervisor.observability.acl import FORMATS, ROLES

    parser = subparsers.add_parser(
        "acl",
        help="print the Redis ACL user for a role on a stream",
        description=(
            "Print the line that creates (or replaces) a Redis user confined to one stream's "
            "keys and to the commands its role runs: producer (append only), reader (read "
            "only), worker (the consumer-group workers) or admin (plus trimming, deleting, "
            "resetting state and replaying dead letters). Pipe it into redis-cli, or write the "
            "aclfile form into the file named by redis.conf's aclfile."
        ),
    )
    parser.add_argument(
        "--role", required=True, choices=ROLES, help=f"{', '.join(ROLES)} (required)"
    )
    parser.add_argument(
        "--stream",
        type=stream_name,
        default=DEFAULT_STREAM,
        metavar="NAME",
        help="the bus stream key (default: %(default)s)",
    )
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="GROUP",
        help="a consumer group whose worker state the role may use (worker and admin; repeat "
        "for several; default: none)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=1,
        metavar="N",
        help="the stream's partition count: above 1 the user gets every partition's keys, the "
        "layout record and the cluster commands a partitioned bus runs (default: 1)",
    )
    parser.add_argument("--user", required=True, help="the Redis user name (required)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--password",
        metavar="P",
        help="the password (visible to other local users in the process list: prefer the next "
        "two); one of the three is required",
    )
    source.add_argument(
        "--password-env", metavar="VAR", help="read the password from environment variable VAR"
    )
    source.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin (a prompt on a terminal)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="setuser",
        help="setuser: an ACL SETUSER command; aclfile: a line of an ACL file (default: setuser)",
    )
    parser.add_argument(
        "--plaintext",
        action="store_true",
        help="write the password as >password instead of its SHA-256 #hash (default: off)",
    )
    parser.set_defaults(handler=run_acl)


def _read_password(args: argparse.Namespace) -> str:
    import os

    if args.password is not None:
        password: str = args.password
        return password
    if args.password_env is not None:
        value = os.environ.get(args.password_env)
        if value is None:
            raise ValueError(f"environment variable {args.password_env} is not set")
        return value
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"password for {args.user}: ")
    return sys.stdin.readline().rstrip("\r\n")


def run_acl(args: argparse.Namespace) -> int:
    """Run ``hvobs acl``: print one line, or a one-line error (exit status 2)."""
    from hypervisor.observability.acl import acl_line
    from hypervisor.observability.errors import AclArgumentError

    try:
        line = acl_line(
            args.role,
            args.stream,
            args.user,
            _read_password(args),
            groups=args.group,
            form=args.format,
            plaintext=args.plaintext,
            partitions=args.partitions,
        )
    except (AclArgumentError, ValueError) as exc:
        print(f"hvobs acl: {exc}", file=sys.stderr)
        return 2
    print(line)
    return 0


def add_serve_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs serve`` (the live web view and the HTTP query API)."""
    from hypervisor.observability.web.cli import add_serve_command as add

    add(subparsers)


def add_doctor_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs doctor`` (is the installation whole, and beside agent-hypervisor?)."""
    parser = subparsers.add_parser(
        "doctor",
        help="check the installation (beside agent-hypervisor, which ships the same files)",
        description=(
            "Check that import hypervisor.observability loads this distribution's files, that "
            "none of them was overwritten or removed by another package (agent-hypervisor "
            "ships the same module paths), and say what to do. Exit status 1 when something "
            "is wrong. If hvobs itself cannot start, run python "
            "<site-packages>/hypervisor/observability/doctor.py."
        ),
    )
    parser.set_defaults(handler=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    """Run ``hvobs doctor``."""
    from hypervisor.observability.doctor import main as doctor

    return doctor([])


COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    add_demo_command,
    add_worker_command,
    add_dlq_command,
    add_acl_command,
    add_serve_command,
    add_doctor_command,
]
"""The subcommand declarations, in ``--help`` order."""


def build_parser() -> argparse.ArgumentParser:
    """Return the ``hvobs`` argument parser with every subcommand of :data:`COMMANDS`."""
    parser: argparse.ArgumentParser = CommandParser(
        prog="hvobs",
        description="Observability for fleets of AI agents: events, ring metrics, saga spans.",
    )
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    subparsers.required = True
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def _found(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The error of type ``kind`` in ``exc`` (itself, or inside task-group exception groups)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _found(inner, kind)
            if found is not None:
                return found
    return None


def _refusal(exc: BaseException) -> BaseException | None:
    """The ACL refusal in ``exc`` (itself, or inside task-group exception groups), if any."""
    from hypervisor.observability.errors import PermissionDeniedError

    return _found(exc, PermissionDeniedError)


def _warn_if_mixed(command: str) -> None:
    """Print one warning line when a shared module file is another distribution's."""
    if command == "doctor":
        return
    try:
        from hypervisor.observability.doctor import quick_check

        warning = quick_check()
    except Exception:  # a check of the installation must never stop the command itself
        return
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hvobs`` console script; returns the exit status.

    An operator's mistake ends the command with one line on stderr and a non-zero status,
    never a traceback: a usage mistake (status 2, from the parser), Redis unreachable, a port
    in use (:class:`~hypervisor.observability.errors.CommandError`, its status), a refusal that
    retrying cannot fix (status 78,
    :data:`~hypervisor.observability.errors.PERMANENT_EXIT_STATUS`): wrong credentials, an
    unknown database, a TLS verification failure, a command the Redis server refuses to the
    configured user (one line naming the user, the command and the roles that grant it).
    Ctrl-C ends it with status 130.
    """
    from hypervisor.observability.errors import (
        PERMANENT_EXIT_STATUS,
        CommandError,
        LogPermanentError,
    )

    args = build_parser().parse_args(argv)
    words = [args.command, *(getattr(args, key, None) for key in ("kind", "action"))]
    prefix = " ".join(["hvobs", *(word for word in words if word)])
    _warn_if_mixed(args.command)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except BrokenPipeError:
        # Output piped into a pager or head that quit early: not an error of ours.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        mistake = _found(exc, CommandError)
        if isinstance(mistake, CommandError):
            print(f"{prefix}: {mistake}", file=sys.stderr)
            return mistake.exit_status
        permanent = _found(exc, LogPermanentError)
        if isinstance(permanent, LogPermanentError):
            print(f"{prefix}: {permanent.detail}", file=sys.stderr)
            return PERMANENT_EXIT_STATUS
        refusal = _refusal(exc)
        if refusal is None:
            raise
        print(f"hvobs: {refusal}", file=sys.stderr)
        return PERMANENT_EXIT_STATUS


if __name__ == "__main__":
    sys.exit(main())
