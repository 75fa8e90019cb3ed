"""Partition routing, pure: which partition of a stream an event belongs to, and its key names.

A stream ``S`` split into ``N`` partitions is ``N`` stream keys, one hash tag each:
``{S:p<i>}``, or ``{S:p<i>.<k>}`` with the smallest ``k`` that puts partition ``i``'s slot in
the ``i``-th of ``N`` equal ranges of the 16384 slots. A cluster created by ``redis-cli
--cluster create`` (or rebalanced) gives each master one contiguous, equal range of slots, so
the partitions spread over the masters as evenly as they can (N=12 over 3 masters: 4/4/4; the
plain tags ``{S:p<i>}`` gave 4/6/2 and 6/3/3 for two stream names, measured). Every key of
partition ``i`` carries its tag (its dead letters, the workers' state), so on a Redis Cluster
they share one slot and each script or transaction stays single-slot. The layout record, which
holds ``N``, has a tag of its own (``{S}``).

An event's partition is a stable hash (CRC-32, not Python's per-process ``hash``) of its
*partition key*, modulo ``N``. The default key follows the event family, so that each
derivation sees its events in order:

* saga events (every ``saga.*`` type and ``security.saga_handoff``, which moves a saga between
  agents): the saga id, read as the saga span state reads it (``payload["saga_id"]``, else
  ``causal_trace_id``, else ``"unknown"``), so a saga's creation, steps, hand-offs and
  compensation land in one partition;
* ring events (``ring.*``): the ``agent_did`` (``"unknown"`` without one, as the ring state
  counts it), so one agent's ring state is folded in order;
* session events (``session.*``): the ``session_id``, else the agent, else the event id;
* any other event: the ``agent_did``, else the ``session_id``, else the event id.

Order is kept per key (per partition), never across partitions. A caller may pass its own
``(event) -> str`` key function instead.

Nothing here does I/O; the Redis side (cluster detection, the layout record in Redis) is in
:mod:`hypervisor.observability._backends.redis_cluster`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final

import msgspec

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.span_sagas import _saga_keys

__all__ = [
    "HASH_NAME",
    "MAX_PARTITIONS",
    "SAGA_FAMILY",
    "TAGS_NAME",
    "LayoutRecord",
    "PartitionKey",
    "PartitionLayout",
    "decode_layout_record",
    "default_partition_key",
    "encode_layout_record",
    "key_hash_slot",
    "partition_index",
    "partition_tags",
    "registry_key",
    "single_slot",
]

PartitionKey = Callable[[HypervisorEvent], str]
"""A function from an event to its partition key (events with equal keys share a partition)."""

MAX_PARTITIONS: Final = 256
"""The most partitions a stream may have (each one costs a reader and a lease per group, and
choosing the tags costs about N² CRC16 steps: 70 ms for 256)."""

HASH_NAME: Final = "crc32"
"""The name of the key hash, recorded in the layout record so that a change is detected."""

TAGS_NAME: Final = "spread1"
"""The name of the scheme that chooses the partitions' hash tags, recorded likewise."""

LAYOUT_VERSION: Final = 1
"""The version of the layout record's format."""

SAGA_FAMILY: Final = frozenset(
    {t.value for t in EventType if t.value.startswith("saga.")} | {EventType.SAGA_HANDOFF.value}
)
"""The event type values routed by saga id: every ``saga.*`` type and the saga hand-off."""

_SLOTS: Final = 16384


def default_partition_key(event: HypervisorEvent) -> str:
    """The partition key of ``event`` by its family (see the module docstring)."""
    kind = event.event_type
    value: str = kind.value if isinstance(kind, EventType) else str(kind)
    if value in SAGA_FAMILY:
        return _saga_keys(event)[0]
    if value.startswith("ring."):
        return event.agent_did or "unknown"
    if value.startswith("session."):
        return event.session_id or event.agent_did or event.event_id
    return event.agent_did or event.session_id or event.event_id


def partition_index(key: str, partitions: int) -> int:
    """The partition (``0 .. partitions-1``) of a partition key: CRC-32 of its UTF-8 bytes
    modulo ``partitions``; the same in every process and Python version."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % partitions


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC16: Final = _crc16_table()


def _crc16(data: bytes, crc: int = 0) -> int:
    table = _CRC16
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_hash_slot(key: str | bytes) -> int:
    """The Redis Cluster hash slot of ``key``: CRC16 (XMODEM) modulo 16384 of the key, or of
    its hash tag (the text between the first ``{`` and the next ``}``, when not empty)."""
    data = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return _crc16(data) % _SLOTS


@lru_cache(maxsize=64)
def partition_tags(stream: str, partitions: int) -> tuple[str, ...]:
    """The hash tags (without braces) of ``stream``'s partitions: partition ``i``'s is
    ``<stream>:p<i>``, or ``<stream>:p<i>.<k>`` with the smallest ``k`` that puts its slot in
    ``[i * 16384 // N, (i + 1) * 16384 // N)``.

    Raises:
        ValueError: a stream name with braces, or a partition count out of range.
    """
    _check_stream(stream)
    _check_count(partitions)
    tags = []
    for index in range(partitions):
        low = index * _SLOTS // partitions
        high = (index + 1) * _SLOTS // partitions
        base = f"{stream}:p{index}"
        state = _crc16(base.encode("utf-8", "surrogatepass"))
        salt = 0
        # About N tries each (a range holds 1/N of the slots); the CRC of the name is
        # computed once and only the suffix is fed per try.
        while not low <= _crc16(b".%d" % salt if salt else b"", state) % _SLOTS < high:
            salt += 1
        tags.append(f"{base}.{salt}" if salt else base)
    return tuple(tags)


def single_slot(keys: Iterable[str]) -> int:
    """The one hash slot every key of ``keys`` maps to.

    Raises:
        ValueError: ``keys`` is empty, or its keys map to more than one slot (a script or
            transaction over them would fail with ``CROSSSLOT`` on a cluster).
    """
    slots = {key: key_hash_slot(key) for key in keys}
    if not slots:
        raise ValueError("no keys")
    if len(set(slots.values())) > 1:
        raise ValueError(f"keys map to several slots: {slots}")
    return next(iter(slots.values()))


class LayoutRecord(msgspec.Struct, frozen=True):
    """What Redis records of a partitioned stream's layout (JSON at its layout key).

    Attributes:
        partitions: the partition count.
        hash: the key hash's name (:data:`HASH_NAME`).
        tags: the tag scheme's name (:data:`TAGS_NAME`).
        version: the record's format version.
    """

    partitions: int
    hash: str = HASH_NAME
    tags: str = TAGS_NAME
    version: int = LAYOUT_VERSION


def encode_layout_record(record: LayoutRecord) -> bytes:
    """The stored form of a layout record (JSON)."""
    return msgspec.json.encode(record)


def decode_layout_record(data: bytes) -> LayoutRecord:
    """Read a stored layout record; it comes from Redis, so it is checked, not trusted.

    Raises:
        ValueError: ``data`` is not a layout record this version reads (not JSON, a missing or
            mistyped field, a partition count out of range, a newer format).
    """
    if len(data) > 4096:
        raise ValueError(f"a layout record of {len(data)} bytes")
    try:
        record = msgspec.json.decode(data, type=LayoutRecord)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a layout record: {exc}") from None
    if record.version != LAYOUT_VERSION:
        raise ValueError(f"layout record version {record.version} (this release reads 1)")
    if not 1 <= record.partitions <= MAX_PARTITIONS:
        raise ValueError(f"layout record with {record.partitions} partitions")
    return record


def registry_key(stream: str, group: str) -> str:
    """The key of the live-worker registry of ``group`` on the partitioned ``stream``
    (``hvobs:workers:{<stream>}:<group>``, the layout record's hash tag)."""
    return f"hvobs:workers:{{{stream}}}:{group}"


def _check_stream(stream: str) -> None:
    if not isinstance(stream, str) or not stream or "{" in stream or "}" in stream:
        raise ValueError(f"stream name {stream!r} must be non-empty and contain no braces")


def _check_count(partitions: int) -> None:
    if isinstance(partitions, bool) or not isinstance(partitions, int):
        raise ValueError(f"partitions must be an int, not {partitions!r}")
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be 1 .. {MAX_PARTITIONS}, not {partitions}")


@dataclass(frozen=True, slots=True)
class PartitionLayout:
    """The partitions of one stream: routing of events and the key names of each partition.

    Args:
        stream: the stream's name (no ``{`` or ``}``: they would change the hash tags).
        partitions: how many partitions (``1 .. MAX_PARTITIONS``).
        key: the partition key function; :func:`default_partition_key` by default.

    Raises:
        ValueError: a stream name with braces, or a partition count out of range.
    """

    stream: str
    partitions: int
    key: PartitionKey = field(default=default_partition_key, compare=False)

    def __post_init__(self) -> None:
        partition_tags(self.stream, self.partitions)  # checks both, and computes the tags once

    def partition(self, event: HypervisorEvent) -> int:
        """The partition of ``event``."""
        return partition_index(self.key(event), self.partitions)

    def split(self, events: Iterable[HypervisorEvent]) -> dict[int, list[HypervisorEvent]]:
        """Group ``events`` by partition, each group in the order given (what a producer sends
        to each partition of one flush)."""
        groups: dict[int, list[HypervisorEvent]] = {}
        for event in events:
            groups.setdefault(self.partition(event), []).append(event)
        return groups

    def _tag(self, index: int) -> str:
        if not 0 <= index < self.partitions:
            raise IndexError(f"partition {index} of {self.partitions}")
        return f"{{{partition_tags(self.stream, self.partitions)[index]}}}"

    def stream_key(self, index: int) -> str:
        """The stream key of partition ``index``: its tag in braces, ``{<stream>:p<index>}``
        or ``{<stream>:p<index>.<k>}`` (see :func:`partition_tags`)."""
        return self._tag(index)

    def dead_letter_key(self, index: int) -> str:
        """The dead-letter stream of partition ``index`` (``<stream key>:dlq``, the workers'
        dead-letter name of that stream key)."""
        return f"{self._tag(index)}:dlq"

    def state_prefix(self, index: int, group: str, derivation: str) -> str:
        """The prefix of a derivation's state keys on partition ``index`` (staging, lease,
        snapshot, ...): ``hvobs:worker:<stream key>:<group>:<derivation>``."""
        return f"hvobs:worker:{self._tag(index)}:{group}:{derivation}"

    def keys(self, index: int, states: Iterable[tuple[str, str]] = ()) -> tuple[str, ...]:
        """The key names of partition ``index``: its stream, its dead letters and, for each
        ``(group, derivation)`` of ``states``, that state's prefix; all in one slot."""
        names = [self.stream_key(index), self.dead_letter_key(index)]
        names.extend(self.state_prefix(index, group, name) for group, name in states)
        return tuple(names)

    @property
    def layout_key(self) -> str:
        """The key of the layout record: ``hvobs:layout:{<stream>}`` (a tag of its own)."""
        return f"hvobs:layout:{{{self.stream}}}"

    def registry_key(self, group: str) -> str:
        """The key of ``group``'s live-worker registry: ``hvobs:workers:{<stream>}:<group>``
        (the layout record's tag)."""
        return registry_key(self.stream, group)

    def slot(self, index: int) -> int:
        """The hash slot of partition ``index`` (of all its keys)."""
        return key_hash_slot(self.stream_key(index))

    def record(self) -> LayoutRecord:
        """The layout record of this layout."""
        return LayoutRecord(partitions=self.partitions)
