"""Dead letters: entries a worker gives up on, kept in a sibling log with the reason.

A dead letter is a msgpack map on the dead-letter log (``<stream>:dlq`` by default): the reason,
the original id, the group and consumer that gave up (and the derivation, when its applier did),
the delivery count, the error text (at most ``MAX_ERROR_TEXT`` characters), the time (epoch
seconds) and the original bytes, whole. Reasons:

* ``oversized``: longer than the worker's ``max_event_bytes``; never decoded;
* ``undecodable``: not an event this release reads (garbage, a wrong type, a payload nested
  deeper than ``MAX_PAYLOAD_DEPTH``, no ``event_id`` or ``timestamp`` of its own);
* ``max_deliveries``: delivered more than ``max_deliveries`` times (a derivation's ``prepare``
  kept failing, or workers kept dying on it); the error is the last one seen;
* ``apply_error``: the state machine raised on it; the applier went on with the next entry, and
  what the event changed before the error stays, as in the in-process collectors.

Replaying (:func:`replay`) appends a letter's original bytes to the event log again, which every
group reads. The same original entry can be dead-lettered several times (by several groups, or
by one group twice); it is replayed once: a letter whose original entry was replayed before is
settled as a duplicate. The ``hvobs-replay`` consumer group on the dead-letter log records
which letters are settled (acknowledged there); letters left out by a filter (``groups``,
``reasons``) stay unsettled for a later replay.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Final

import msgspec

from hypervisor.observability._backends.log import MIN_ID, Entry, StreamLog, parse_id
from hypervisor.observability._core.codec import error_text

__all__ = [
    "REASON_APPLY_ERROR",
    "REASON_MAX_DELIVERIES",
    "REASON_OVERSIZED",
    "REASON_UNDECODABLE",
    "REPLAY_GROUP",
    "DeadLetter",
    "ReplayReport",
    "ReplayedLetter",
    "decode_dead_letter",
    "dlq_name",
    "encode_dead_letter",
    "list_dead_letters",
    "replay",
    "replay_dead_letters",
]

REASON_UNDECODABLE: Final = "undecodable"
REASON_MAX_DELIVERIES: Final = "max_deliveries"
REASON_OVERSIZED: Final = "oversized"
REASON_APPLY_ERROR: Final = "apply_error"
REASONS: Final = (REASON_OVERSIZED, REASON_UNDECODABLE, REASON_MAX_DELIVERIES, REASON_APPLY_ERROR)
"""Every reason a worker gives."""
REPLAY_GROUP: Final = "hvobs-replay"
"""The consumer group on the dead-letter log that tracks replayed letters."""
_PAGE: Final = 100
"""Letters read per round trip: a letter holds its original entry whole (an oversized one is
over ``max_event_bytes``), so pages stay small."""


def dlq_name(stream: str) -> str:
    """Return the dead-letter log name for an event log name."""
    return f"{stream}:dlq"


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """One entry a worker gave up on.

    Attributes:
        reason: ``"oversized"``, ``"undecodable"``, ``"max_deliveries"`` or ``"apply_error"``.
        original_id: the entry's id in the event log.
        group: the consumer group.
        consumer: the consumer that dead-lettered it.
        deliveries: how many times it had been delivered (0 when an applier dead-lettered it).
        error: the last error seen for it (``""`` if none was seen by this consumer).
        at: when it was dead-lettered (epoch seconds).
        data: the original entry bytes.
        derivation: the derivation whose applier dead-lettered it (``""`` for the worker's
            reading side).
    """

    reason: str
    original_id: str
    group: str
    consumer: str
    deliveries: int
    error: str
    at: float = msgspec.field(default_factory=time.time)
    data: bytes = b""
    derivation: str = ""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(DeadLetter)


def encode_dead_letter(letter: DeadLetter) -> bytes:
    """Encode a dead letter for the dead-letter log."""
    return _encoder.encode(letter)


def decode_dead_letter(data: bytes) -> DeadLetter:
    """Decode a dead letter.

    Raises:
        msgspec.DecodeError: not a dead letter (whatever the bytes: the dead-letter log is as
            writable as the stream).
    """
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError:
        raise
    except Exception as exc:  # e.g. RecursionError on an unknown field nested very deep
        raise msgspec.DecodeError(f"not a dead letter: {error_text(exc)}") from None


async def list_dead_letters(dlq: StreamLog, limit: int = 1000) -> list[tuple[str, DeadLetter]]:
    """Return up to ``limit`` dead letters (``(dead-letter id, letter)``), oldest first."""
    out: list[tuple[str, DeadLetter]] = []
    after = MIN_ID
    while len(out) < limit:
        entries = await dlq.read(after, min(500, limit - len(out)))
        if not entries:
            break
        for entry in entries:
            after = entry.id
            if entry.data is not None:
                try:
                    out.append((entry.id, decode_dead_letter(entry.data)))
                except msgspec.DecodeError:
                    continue
    return out


@dataclass(frozen=True, slots=True)
class ReplayedLetter:
    """A letter whose original entry a replay appended to the event log again.

    Attributes:
        dlq_id: the letter's id in the dead-letter log.
        letter: the letter (its ``data`` is the original entry, whole).
        new_id: the entry's new id in the event log; ``None`` on a dry run.
    """

    dlq_id: str
    letter: DeadLetter
    new_id: str | None


@dataclass(slots=True)
class ReplayReport:
    """What a replay did (or, on a dry run, would do).

    Attributes:
        replayed: the letters replayed, one per original entry, in dead-letter order.
        duplicates: ``(dlq id, original id)`` of letters settled without appending, because
            their original entry was replayed before or in this replay.
        skipped: unsettled letters the ``groups``/``reasons`` filter left for later.
        left: letters that matched but were left because ``limit`` was reached.
        unreadable: entries of the dead-letter log that are not dead letters (settled, never
            replayed, by a replay without filters).
        dry_run: nothing was appended or settled.
    """

    replayed: list[ReplayedLetter] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    skipped: int = 0
    left: int = 0
    unreadable: int = 0
    dry_run: bool = False


async def _settled_after(dlq: StreamLog) -> str | None:
    """The replay group's last-delivered id (``None`` if it has no group yet)."""
    for info in await dlq.group_info():
        if info.name == REPLAY_GROUP:
            return info.last_delivered_id
    return None


async def _pages(dlq: StreamLog, stop_at: tuple[int, int]) -> AsyncIterator[list[Entry]]:
    """The dead-letter log up to ``stop_at``, a page at a time, oldest first."""
    after = MIN_ID
    while True:
        entries = [e for e in await dlq.read(after, _PAGE) if parse_id(e.id) <= stop_at]
        if not entries:
            return
        after = entries[-1].id
        yield entries


async def _unsettled(dlq: StreamLog, entries: list[Entry], delivered: str | None) -> set[str]:
    """The ids among ``entries`` the replay group has not settled (acknowledged)."""
    if delivered is None:
        return {entry.id for entry in entries}
    limit = parse_id(delivered)
    seen = [entry.id for entry in entries if parse_id(entry.id) <= limit]
    pending = await dlq.delivery_counts(REPLAY_GROUP, seen) if seen else {}
    return {entry.id for entry in entries if parse_id(entry.id) > limit or entry.id in pending}


def _letter(entry: Entry) -> DeadLetter | None:
    if entry.data is None:
        return None
    try:
        return decode_dead_letter(entry.data)
    except msgspec.DecodeError:
        return None


async def replay(
    dlq: StreamLog,
    log: StreamLog,
    *,
    groups: Collection[str] = (),
    reasons: Collection[str] = (),
    limit: int | None = None,
    dry_run: bool = False,
    consumer: str = "replay",
) -> ReplayReport:
    """Append the original entries of unsettled dead letters to ``log``, once per entry.

    Two passes over the dead-letter log (as it was when the replay started; letters written
    meanwhile, such as a replayed entry dead-lettered again, wait for the next replay): the
    first finds the original entries replayed before and the unsettled letters, the second
    appends the chosen letters' bytes and settles them in the ``hvobs-replay`` group. Memory
    holds ids and a page of letters, never the whole log. A crash between appending and
    settling may replay that page again (workers drop the copies by event id). Run one replay
    at a time.

    Args:
        dlq: the dead-letter log.
        log: the event log the letters came from.
        groups: replay only letters of these consumer groups (all when empty).
        reasons: replay only letters with these reasons (all when empty).
        limit: replay at most this many letters (all when ``None``).
        dry_run: change nothing; report what a replay would do.
        consumer: the replay group's consumer name.

    Returns:
        What was replayed, settled as a duplicate, skipped by the filters or left by ``limit``.
    """
    report = ReplayReport(dry_run=dry_run)
    filtered = bool(groups or reasons)
    if not dry_run:
        # First: a user who may not replay is refused on the command that needs the admin role.
        await dlq.ensure_group(REPLAY_GROUP, "0")
    stop_at = parse_id(await dlq.head_id())
    if not dry_run:
        # Deliver every letter up to stop_at to the replay group, so that settling one is an
        # acknowledgement; a delivered letter stays pending (unsettled) until then.
        while True:
            delivered = await dlq.read_group(REPLAY_GROUP, consumer, _PAGE)
            if not delivered or parse_id(delivered[-1].id) >= stop_at:
                break
    delivered_to = await _settled_after(dlq)
    # Pass 1: the original entries already replayed, and the plan for the unsettled letters.
    replayed_before: set[str] = set()
    plan: dict[str, str] = {}  # dlq id -> "replay" | "unreadable"
    originals: dict[str, str] = {}  # original id -> dlq id of the letter replayed for it now
    chosen = 0
    async for entries in _pages(dlq, stop_at):
        unsettled = await _unsettled(dlq, entries, delivered_to)
        for entry in entries:
            letter = _letter(entry)
            if entry.id not in unsettled:
                if letter is not None:
                    replayed_before.add(letter.original_id)
                continue
            if letter is None:
                if not filtered:
                    plan[entry.id] = "unreadable"
                continue
            if (groups and letter.group not in groups) or (
                reasons and letter.reason not in reasons
            ):
                report.skipped += 1
                continue
            plan[entry.id] = "replay"
    # Pass 2: append and settle. A letter is a duplicate when its original entry was replayed
    # before (possibly through a later letter, settled by an earlier filtered replay) or
    # earlier in this pass.
    async for entries in _pages(dlq, stop_at):
        to_append: list[tuple[str, DeadLetter]] = []
        to_settle: list[str] = []
        for entry in entries:
            action = plan.get(entry.id)
            if action is None:
                continue
            if action == "unreadable":
                report.unreadable += 1
                to_settle.append(entry.id)
                continue
            letter = _letter(entry)
            if letter is None:  # deleted or rewritten since pass 1: leave it for later
                continue
            if letter.original_id in replayed_before or letter.original_id in originals:
                report.duplicates.append((entry.id, letter.original_id))
                to_settle.append(entry.id)
                continue
            if limit is not None and chosen >= limit:
                report.left += 1
                continue
            chosen += 1
            originals[letter.original_id] = entry.id
            to_append.append((entry.id, letter))
            to_settle.append(entry.id)
        new_ids: list[str | None] = [None] * len(to_append)
        if not dry_run:
            if to_append:
                new_ids = list(await log.append_many([letter.data for _, letter in to_append]))
            if to_settle:
                await dlq.ack(REPLAY_GROUP, to_settle)
        report.replayed.extend(
            ReplayedLetter(dlq_id, letter, new_id)
            for (dlq_id, letter), new_id in zip(to_append, new_ids, strict=True)
        )
    return report


async def replay_dead_letters(
    dlq: StreamLog, log: StreamLog, *, consumer: str = "replay", limit: int | None = None
) -> list[tuple[str, str]]:
    """Replay every unsettled dead letter (see :func:`replay`); return ``(dlq id, new id)``
    pairs of the letters replayed. Running it twice replays nothing the second time."""
    report = await replay(dlq, log, consumer=consumer, limit=limit)
    return [(item.dlq_id, item.new_id) for item in report.replayed if item.new_id is not None]
