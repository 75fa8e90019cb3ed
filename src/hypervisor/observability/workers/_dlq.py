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
  what the event changed before the error stays, as in the in-process collectors. Replaying
appends the original bytes to the event log again; a consumer group on the dead-letter log
records what was replayed, so a replay never repeats.
"""

from __future__ import annotations

import time
from typing import Final

import msgspec

from hypervisor.observability._backends.log import MIN_ID, StreamLog, parse_id
from hypervisor.observability._core.codec import error_text

__all__ = [
    "REASON_APPLY_ERROR",
    "REASON_MAX_DELIVERIES",
    "REASON_OVERSIZED",
    "REASON_UNDECODABLE",
    "REPLAY_GROUP",
    "DeadLetter",
    "decode_dead_letter",
    "dlq_name",
    "encode_dead_letter",
    "list_dead_letters",
    "replay_dead_letters",
]

REASON_UNDECODABLE: Final = "undecodable"
REASON_MAX_DELIVERIES: Final = "max_deliveries"
REASON_OVERSIZED: Final = "oversized"
REASON_APPLY_ERROR: Final = "apply_error"
REPLAY_GROUP: Final = "hvobs-replay"
"""The consumer group on the dead-letter log that tracks replayed letters."""


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


async def replay_dead_letters(
    dlq: StreamLog, log: StreamLog, *, consumer: str = "replay", limit: int | None = None
) -> list[tuple[str, str]]:
    """Append not-yet-replayed dead letters' bytes to ``log``; return ``(dlq id, new id)`` pairs.

    Progress is kept by the ``hvobs-replay`` group on the dead-letter log: a letter is
    acknowledged there once its bytes are appended, so running replay twice replays nothing the
    second time (a crash in between may replay one batch twice; workers drop the duplicate
    events by event id).
    """
    await dlq.ensure_group(REPLAY_GROUP, "0")
    # Letters written while replaying (a replayed entry dead-lettered again) wait for the next
    # replay: without this bound a live worker and the replay could feed each other forever.
    stop_at = parse_id(await dlq.head_id())
    done: list[tuple[str, str]] = []
    for pending in (True, False):
        while limit is None or len(done) < limit:
            want = 500 if limit is None else min(500, limit - len(done))
            entries = await dlq.read_group(REPLAY_GROUP, consumer, want, pending=pending)
            mine = [entry for entry in entries if parse_id(entry.id) <= stop_at]
            if not mine:
                break
            letters: list[tuple[str, bytes]] = []
            for entry in mine:
                if entry.data is None:
                    continue
                try:
                    letters.append((entry.id, decode_dead_letter(entry.data).data))
                except msgspec.DecodeError:
                    continue
            new_ids = await log.append_many([data for _, data in letters]) if letters else []
            await dlq.ack(REPLAY_GROUP, [entry.id for entry in mine])
            done.extend(zip([dlq_id for dlq_id, _ in letters], new_ids, strict=True))
            if len(mine) < len(entries):
                break
    return done
