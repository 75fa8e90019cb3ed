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

__all__ = ["COMMANDS", "build_parser", "main"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def add_demo_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs demo``."""
    from hypervisor.observability.demo import DEFAULT_AGENTS, DEFAULT_SAGAS, DEFAULT_SEED

    parser = subparsers.add_parser(
        "demo",
        help="run a simulated agent fleet and print what observability sees",
        description=(
            "Simulate an orchestrator spawning agents, ring changes, breaches and sagas (one "
            "failing and compensated, one escalated) on a deterministic clock, and print the "
            "ring metrics, a timeline of the saga spans and the causal spawn tree."
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
        type=_positive,
        default=DEFAULT_AGENTS,
        metavar="N",
        help="agents spawned (default: %(default)s)",
    )
    parser.add_argument(
        "--sagas",
        type=_non_negative,
        default=DEFAULT_SAGAS,
        metavar="N",
        help="sagas run (default: %(default)s)",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help=(
            "run every agent as its own process on a RedisEventBus at URL (redis:// or "
            "rediss://), observed from the shared stream"
        ),
    )
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Run ``hvobs demo``."""
    from hypervisor.observability.demo import feed_in_process, generate_fleet, render_report

    fleet = generate_fleet(seed=args.seed, agents=args.agents, sagas=args.sagas)
    # Other backends plug in here: a feeder that emits the fleet's events on that bus and
    # returns a DemoResult.
    if args.redis:
        from hypervisor.observability.demo.over_redis import feed_redis

        result = feed_redis(fleet, args.redis, sagas=args.sagas)
    else:
        result = feed_in_process(fleet)
    print(render_report(fleet, result))
    return 0


def add_worker_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs worker`` (ring-metrics and saga-spans consumer-group workers)."""
    from hypervisor.observability.workers._cli import add_worker_command as add

    add(subparsers)


def add_dlq_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs dlq`` (list and replay dead-lettered entries)."""
    from hypervisor.observability.workers._cli import add_dlq_command as add

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
    parser.add_argument("--role", required=True, choices=ROLES)
    parser.add_argument("--stream", required=True, help="the bus stream key")
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="GROUP",
        help="a consumer group whose worker state the role may use (worker and admin; repeat)",
    )
    parser.add_argument("--user", required=True, help="the Redis user name")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--password",
        metavar="P",
        help="the password (visible to other local users in the process list: prefer the next two)",
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
        help="write the password as >password instead of its SHA-256 #hash",
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


COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    add_demo_command,
    add_worker_command,
    add_dlq_command,
    add_acl_command,
    add_serve_command,
]
"""The subcommand declarations, in ``--help`` order."""


def build_parser() -> argparse.ArgumentParser:
    """Return the ``hvobs`` argument parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="hvobs",
        description="Observability for fleets of AI agents: events, ring metrics, saga spans.",
    )
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    subparsers.required = True
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def _refusal(exc: BaseException) -> BaseException | None:
    """The ACL refusal in ``exc`` (itself, or inside task-group exception groups), if any."""
    from hypervisor.observability.errors import PermissionDeniedError

    if isinstance(exc, PermissionDeniedError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _refusal(inner)
            if found is not None:
                return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hvobs`` console script; returns the exit status.

    A command the Redis server refuses to the configured user (an ACL) ends it with one line
    naming the user, the command and the roles that grant it, and exit status 1.
    """
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except BrokenPipeError:
        # Output piped into a pager or head that quit early: not an error of ours.
        sys.stderr.close()
        return 0
    except Exception as exc:
        refusal = _refusal(exc)
        if refusal is None:
            raise
        print(f"hvobs: {refusal}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
