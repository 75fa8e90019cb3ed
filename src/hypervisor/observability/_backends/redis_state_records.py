"""The stored values of ``RedisStateStore`` (``redis_state``), parsed and checked: pure functions.

Every byte read back from Redis is hostile: the meta hash is checked field by field, an index
member must have the shape :func:`batch_member` writes and a staged batch's records must match
their member, or the item is skipped and counted (``StateErrors``). No Redis and no I/O here.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

import msgspec

from hypervisor.observability._backends.log import MIN_ID, parse_id
from hypervisor.observability._backends.state import StateMeta, sort_key
from hypervisor.observability._backends.state_errors import StateErrors
from hypervisor.observability.errors import WorkerStateError

__all__ = ["batch_member", "merge_batches"]

_KEY_WIDTH: Final = 41
"""Length of a sort key (``%020d-%020d``)."""

_records_encoder = msgspec.msgpack.Encoder()
_records_decoder = msgspec.msgpack.Decoder(list[tuple[str, bytes]])
_ids_decoder = msgspec.msgpack.Decoder(list[str])
_Records = list[tuple[str, bytes]]

_MAX_TEXT: Final = 80
"""Bytes of a bad value quoted in a report."""
_VERSION_LIMIT: Final = 2**53
"""Meta numbers stay below this (Lua compares them as doubles)."""
_ID: Final = r"(?:0|[1-9][0-9]{0,19})-(?:0|[1-9][0-9]{0,19})"
_ENTRY_ID: Final = re.compile(_ID)
_ENTRY_IDS: Final = re.compile(f"(?:{_ID}\n)*")
"""Newline-terminated entry ids: one match checks a whole batch's ids (cheap per record)."""
_SORT_KEY: Final = re.compile(rb"[0-9]{20}-[0-9]{20}")
_MEMBER: Final = re.compile(
    rb"([0-9]{20})-([0-9]{20})\|([0-9]{20})-([0-9]{20})\|([1-9][0-9]{0,8})\|[0-9a-f]{16}"
)
"""An index member: first and last sort keys, record count, digest (see batch_member)."""
_INTEGER: Final = re.compile(rb"-?(?:0|[1-9][0-9]{0,15})")
_EPOCH: Final = re.compile(rb"[0-9a-f]{16}")
"""A state epoch as ``new_epoch`` makes it."""


def _unsort_key(key: bytes) -> str:
    ms, _, seq = key.partition(b"-")
    return f"{int(ms)}-{int(seq)}"


def _key_tuple(key: bytes) -> tuple[int, int]:
    return int(key[:20]), int(key[21:41])


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


def _meta(raw: dict[bytes, bytes], key: str) -> StateMeta:
    """The meta hash ``key`` as read, checked field by field.

    Raises:
        WorkerStateError: a field is not what a commit writes (``key="meta"``).
    """
    if not raw:
        return StateMeta()

    def bad(name: bytes, why: str) -> WorkerStateError:
        return WorkerStateError(
            f"{key} field {name.decode(errors='replace')} = {_quote(raw.get(name))} {why}",
            key="meta",
        )

    def number(name: bytes, low: int) -> int:
        value = raw.get(name, b"0")
        if not _INTEGER.fullmatch(value) or not low <= int(value) < _VERSION_LIMIT:
            raise bad(name, "is not a number a commit writes")
        return int(value)

    def entry_id(name: bytes, key_name: bytes) -> str:
        value = raw.get(name, MIN_ID.encode())
        if not _ENTRY_ID.fullmatch(value.decode("latin-1")):
            raise bad(name, "is not a stream id")
        text = value.decode()
        if name in raw and raw.get(key_name) != sort_key(text):
            raise bad(key_name, f"does not match {name.decode()}")
        return text

    epoch = raw.get(b"epoch", b"")
    if epoch and not _EPOCH.fullmatch(epoch):
        raise bad(b"epoch", "is not an epoch a commit writes")
    meta = StateMeta(
        version=number(b"version", 0),
        applied_id=entry_id(b"applied", b"applied_key"),
        seen_gen=number(b"seen_gen", -_VERSION_LIMIT),
        seen_count=number(b"seen_count", 0),
        epoch=epoch.decode(),
    )
    entry_id(b"checkpoint", b"checkpoint_key")
    return meta


def _pairs(flat: list[Any]) -> dict[bytes, bytes]:
    return {bytes(flat[i]): bytes(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _short(member: bytes) -> str:
    return _quote(member[:83])


def batch_member(items: list[tuple[str, bytes]]) -> tuple[bytes, bytes]:
    """Return the index member and the packed records of one staged batch (sorted by id)."""
    keys = [parse_id(entry_id) for entry_id, _ in items]
    if any(keys[i] >= keys[i + 1] for i in range(len(keys) - 1)):
        merged = dict(zip(keys, items, strict=True))
        keys = sorted(merged)
        items = [merged[k] for k in keys]
    records = _records_encoder.encode(items)
    digest = hashlib.blake2b(records, digest_size=8).hexdigest().encode()
    first, last = keys[0], keys[-1]
    member = b"%020d-%020d|%020d-%020d|%d|%s" % (*first, *last, len(items), digest)
    return member, records


def _bad_member(member: bytes, errors: StateErrors) -> None:
    errors.skipped("idx", f"skipped index member {_short(member)}: not a staged batch")


def _batch_records(member: bytes, blob: Any, errors: StateErrors) -> _Records | None:
    """The records of a staged batch, checked against its index member; ``None`` (skipped and
    counted) for a member or a batch that no worker wrote."""
    header = _MEMBER.fullmatch(member)
    if header is None:
        _bad_member(member, errors)
        return None
    if not blob:
        errors.skipped("batches", f"skipped staged batch {_short(member)}: no records")
        return None
    try:
        records = _records_decoder.decode(blob)
    except Exception as exc:  # msgspec raises DecodeError, ValidationError, RecursionError...
        errors.skipped("batches", f"skipped staged batch {_short(member)}: {exc}")
        return None
    ids = "\n".join([entry_id for entry_id, _ in records])
    if (
        len(records) != int(header[5])
        or _ENTRY_IDS.fullmatch(ids + "\n") is None
        or parse_id(records[0][0]) != (int(header[1]), int(header[2]))
        or parse_id(records[-1][0]) != (int(header[3]), int(header[4]))
    ):
        errors.skipped("batches", f"skipped staged batch {_short(member)}: records do not match")
        return None
    return records


def merge_batches(
    flat: list[Any], low: tuple[int, int], high: tuple[int, int], errors: StateErrors
) -> list[tuple[str, bytes]]:
    """Merge fetched batches (``[member, records, ...]``, by first id) into the distinct
    records with ``low < id < high``, in id order; bad batches are skipped (``errors``)."""
    chunks: list[_Records] = []
    overlap = False
    reach: tuple[int, int] | None = None
    for i in range(0, len(flat) - 1, 2):
        member = bytes(flat[i])
        records = _batch_records(member, flat[i + 1], errors)
        if records is None:
            continue
        first = _key_tuple(member)
        last = _key_tuple(member[_KEY_WIDTH + 1 :])
        if reach is not None and first <= reach:
            overlap = True
        if reach is None or last > reach:
            reach = last
        if not (low < first and last < high):
            records = [r for r in records if low < parse_id(r[0]) < high]
        chunks.append(records)
    if not overlap:
        return [record for chunk in chunks for record in chunk]
    merged: dict[str, bytes] = {}
    for chunk in chunks:
        merged.update(chunk)
    return sorted(merged.items(), key=lambda record: parse_id(record[0]))
