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


def add_serve_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs serve`` (the live web view and the HTTP query API)."""
    from hypervisor.observability.web.cli import add_serve_command as add

    add(subparsers)


COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    add_demo_command,
    add_worker_command,
    add_dlq_command,
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hvobs`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except BrokenPipeError:
        # Output piped into a pager or head that quit early: not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
