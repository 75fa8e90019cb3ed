"""``hvobs dlq list|replay``: argument declarations and handler."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio

from hypervisor.observability._util.cli import (
    add_redis_options,
    check_redis,
    redis_url_or_env,
    tls_options,
    whole_number,
)
from hypervisor.observability.workers._dlq import REASONS, dlq_name

__all__ = ["add_dlq_command", "run_dlq"]


def add_dlq_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``hvobs dlq list|replay``."""
    parser = subparsers.add_parser(
        "dlq",
        help="inspect or replay dead-lettered entries",
        description=(
            "Dead letters are the entries workers gave up on, kept whole with the reason in "
            "the stream's dead-letter stream (<stream>:dlq)."
        ),
    )
    actions = parser.add_subparsers(title="actions", dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser(
        "list",
        help="print dead letters as JSON lines",
        description="Print dead letters as "
        "JSON lines, oldest first; data is the original entry, whole, in hex.",
    )
    add_redis_options(listing)
    listing.add_argument(
        "--limit",
        type=whole_number(1, 10_000_000, "letters"),
        default=1000,
        metavar="N",
        help="print at most N letters (default: %(default)s letters)",
    )
    listing.set_defaults(handler=run_dlq)
    replay = actions.add_parser(
        "replay",
        help="append dead letters' entries to the stream again (once per entry)",
        description=(
            "Append the original entry of each dead letter not replayed yet to the stream, "
            "which every group reads. An entry dead-lettered several times (by several groups) "
            "is replayed once; a replayed letter is never replayed again. Needs the admin role."
        ),
    )
    add_redis_options(replay)
    replay.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="GROUP",
        help="replay only letters dead-lettered by this consumer group; repeat for several "
        "(default: every group)",
    )
    replay.add_argument(
        "--reason",
        action="append",
        default=[],
        choices=REASONS,
        metavar="REASON",
        help=f"replay only letters with this reason ({', '.join(REASONS)}); repeat for several "
        "(default: every reason)",
    )
    replay.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be replayed; change nothing (default: off)",
    )
    replay.add_argument(
        "--limit",
        type=whole_number(1, 10_000_000, "letters"),
        default=None,
        metavar="N",
        help="replay at most N letters (default: all)",
    )
    replay.set_defaults(handler=run_dlq)


async def _run_dlq(args: argparse.Namespace) -> int:
    import msgspec

    from hypervisor.observability._backends.redis_log import RedisStreamLog
    from hypervisor.observability.workers._dlq import list_dead_letters, replay

    await check_redis(args.redis, timeout_s=args.connect_timeout, **args.tls)
    async with (
        RedisStreamLog(args.redis, args.stream, **args.tls) as log,
        RedisStreamLog(args.redis, dlq_name(args.stream), **args.tls) as dlq,
    ):
        if args.action == "list":
            encoder = msgspec.json.Encoder()
            for dlq_id, letter in await list_dead_letters(dlq, args.limit):
                document: dict[str, Any] = msgspec.structs.asdict(letter)
                document["data"] = letter.data.hex()
                document["dlq_id"] = dlq_id
                sys.stdout.write(encoder.encode(document).decode() + "\n")
            return 0
        report = await replay(
            dlq,
            log,
            groups=args.group,
            reasons=args.reason,
            limit=args.limit,
            dry_run=args.dry_run,
        )
    for item in report.replayed:
        letter = item.letter
        where = "(dry run)" if item.new_id is None else item.new_id
        print(
            f"{item.dlq_id} -> {where}  entry {letter.original_id}, {letter.reason}, "
            f"group {letter.group}"
        )
    for dlq_id, original_id in report.duplicates:
        print(f"{dlq_id} == entry {original_id} replayed once already (duplicate, settled)")
    verb = "would replay" if args.dry_run else "replayed"
    notes = []
    if report.duplicates:
        notes.append(f"{len(report.duplicates)} duplicate letters of entries replayed once")
    if report.skipped:
        notes.append(f"{report.skipped} left by --group/--reason")
    if report.left:
        notes.append(f"{report.left} left by --limit")
    if report.unreadable:
        notes.append(f"{report.unreadable} unreadable entries settled")
    detail = f" ({'; '.join(notes)})" if notes else ""
    print(f"{verb} {len(report.replayed)} dead letters{detail}", file=sys.stderr)
    return 0


def run_dlq(args: argparse.Namespace) -> int:
    """Run ``hvobs dlq list|replay``.

    Raises:
        CommandError: no Redis URL, or Redis unreachable.
    """
    args.redis = redis_url_or_env(args.redis)
    args.tls = tls_options(args)
    return anyio.run(_run_dlq, args)
