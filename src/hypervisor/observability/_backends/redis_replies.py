"""What the stream commands reply, read into the log's types (pure: no client here).

The replies come from a server that producers share, so nothing in them is trusted beyond
its shape: an entry without the expected field gets an empty body (the consumer counts it as
undecodable), RESP2 lists and RESP3 maps are both read, and counters a server version lacks
come back as ``None``.
"""

from __future__ import annotations

from typing import Any

from hypervisor.observability._backends.log import Entry, StreamInfo

__all__ = ["EMPTY_INFO", "entries", "int_or_none", "pairs", "stream_entries", "stream_info", "text"]


def text(value: Any) -> str:
    """A reply's bytes as text (already text under ``decode_responses``)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def entries(raw: Any, field: bytes) -> list[Entry]:
    """Turn ``[[id, [field, value, ...]] | [id, nil], ...]`` into entries.

    An entry without the expected field (written by something else) gets an empty body so the
    consumer counts it as undecodable; a nil body means the entry was deleted.
    """
    found: list[Entry] = []
    for item in raw or ():
        if item is None:
            continue
        entry_id = text(item[0])
        fields = item[1] if len(item) > 1 else None
        if fields is None:
            found.append(Entry(entry_id, None))
            continue
        data = b""
        for i in range(0, len(fields) - 1, 2):
            if fields[i] == field:
                data = fields[i + 1]
                break
        found.append(Entry(entry_id, data))
    return found


def stream_entries(raw: Any, field: bytes) -> list[Entry]:
    # XREAD / XREADGROUP: [[stream, entries]] (RESP2), or nil when nothing arrived.
    if not raw:
        return []
    if isinstance(raw, dict):
        return entries(next(iter(raw.values())), field)
    return entries(raw[0][1], field)


def int_or_none(value: Any) -> int | None:
    """An optional counter of a reply."""
    return None if value is None else int(value)


def stream_info(raw: Any) -> StreamInfo:
    """``XINFO STREAM``'s reply as counters (Redis 6.2 lacks the 7.0 ones: ``None``)."""
    fields = pairs(raw)
    first = fields.get("recorded-first-entry-id")
    if first is None:  # before 7.0: the first entry itself
        entry = fields.get("first-entry")
        first = entry[0] if entry else None
    length = int(fields["length"])
    deleted = fields.get("max-deleted-entry-id")
    return StreamInfo(
        length=length,
        head_id=text(fields["last-generated-id"]),
        first_id=text(first) if first is not None and length else None,
        entries_added=int_or_none(fields.get("entries-added")),
        max_deleted_id=None if deleted is None else text(deleted),
    )


EMPTY_INFO = StreamInfo(0, "0-0", None, 0, "0-0")


def pairs(raw: Any) -> dict[str, Any]:
    """A flat ``[name, value, ...]`` reply (or a RESP3 map) as a dict by name."""
    if isinstance(raw, dict):
        return {text(k): v for k, v in raw.items()}
    return {text(raw[i]): raw[i + 1] for i in range(0, len(raw) - 1, 2)}
