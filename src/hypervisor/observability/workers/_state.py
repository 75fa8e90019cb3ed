"""Where a derivation's shared state lives: the ``StateStore`` seam and its in-memory version.

A store holds, for one derivation of one consumer group:

* the **staged** entries: ``(stream id, entry bytes)`` that workers acknowledged and the applier
  has not applied yet, ordered by id; staging the same id twice is a no-op;
* the **snapshot** of the state, its **version** and the **applied id** (every staged entry up
  to it is folded into the snapshot), changed together by one atomic :meth:`StateStore.commit`
  that succeeds only if the version is still the one the applier loaded;
* the **seen** event ids, a bounded window in two generations, so an event appended twice (two
  stream ids, one ``event_id``) is applied once;
* the **lease** that elects one applier at a time (an optimisation; correctness rests on the
  version check of ``commit``).

``MemoryStateStore`` keeps all of it in process (tests, embedded use); ``RedisStateStore`` (in
``_redis_state``) in Redis keys.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import anyio

from hypervisor.observability._log.base import MIN_ID, parse_id

__all__ = ["Commit", "MemoryStateStore", "StateMeta", "StateStore", "sort_key"]


def sort_key(entry_id: str) -> bytes:
    """Return the fixed-width byte key of a stream id: byte order is id order."""
    ms, seq = parse_id(entry_id)
    return b"%020d-%020d" % (ms, seq)


@dataclass(frozen=True, slots=True)
class StateMeta:
    """The committed position of a derivation.

    Attributes:
        version: increases by one with every commit (0: nothing committed yet).
        applied_id: the highest stream id folded into the snapshot (``"0-0"`` if none).
        seen_gen: the current generation of the seen-event-id window.
        seen_count: ids added to the current generation so far.
    """

    version: int = 0
    applied_id: str = MIN_ID
    seen_gen: int = 0
    seen_count: int = 0


@dataclass(frozen=True, slots=True)
class Commit:
    """One atomic update of a derivation's state.

    Attributes:
        expected_version: the version the applier loaded; the commit fails if it changed.
        snapshot: the new state snapshot.
        meta: the new meta (version ``expected_version + 1``).
        seen_add: event ids applied in this round (added to ``meta.seen_gen``).
        seen_drop_gen: a generation to delete (the window rotated), or ``None``.
    """

    expected_version: int
    snapshot: bytes
    meta: StateMeta
    seen_add: list[str] = field(default_factory=list)
    seen_drop_gen: int | None = None


@runtime_checkable
class StateStore(Protocol):
    """Shared state of one derivation of one consumer group (see the module docstring).

    Backend failures raise ``LogUnavailableError`` (transient) or ``LogError``.
    """

    @property
    def name(self) -> str:
        """A name for logs and metrics (the Redis key prefix)."""
        ...

    async def stage(self, items: list[tuple[str, bytes]]) -> None:
        """Stage ``(stream id, entry bytes)`` pairs; re-staging an id changes nothing."""
        ...

    async def staged(self, after_id: str, before_id: str, limit: int) -> list[tuple[str, bytes]]:
        """Return up to ``limit`` staged pairs with ``after_id < id < before_id``, in id order."""
        ...

    async def backlog(self) -> int:
        """Return how many entries are staged (applied ones are removed at commit)."""
        ...

    async def meta(self) -> StateMeta:
        """Return the committed meta."""
        ...

    async def load(self) -> tuple[StateMeta, bytes | None]:
        """Return the committed meta and snapshot, read consistently (``None``: no snapshot)."""
        ...

    async def seen(self, meta: StateMeta) -> tuple[set[str], set[str]]:
        """Return the seen ids of generations ``meta.seen_gen - 1`` and ``meta.seen_gen``."""
        ...

    async def commit(self, commit: Commit) -> bool:
        """Apply ``commit`` atomically if the version is still ``expected_version``.

        Removes staged entries with ids up to ``commit.meta.applied_id``. Returns whether it
        was applied.
        """
        ...

    async def acquire_lease(self, token: str, ttl_s: float) -> bool:
        """Take the applier lease for ``token`` or extend it if ``token`` holds it."""
        ...

    async def release_lease(self, token: str) -> None:
        """Give the lease up if ``token`` holds it."""
        ...

    async def reset(self) -> None:
        """Delete everything (staged entries, snapshot, meta, seen ids, lease)."""
        ...

    async def aclose(self) -> None:
        """Release connections. Idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class MemoryStateStore:
    """A ``StateStore`` in process; every method is atomic (one event loop, no awaits inside).

    Args:
        name: a name for logs and metrics.
    """

    def __init__(self, name: str = "memory") -> None:
        self._name = name
        self._staged: dict[bytes, tuple[str, bytes]] = {}
        self._meta = StateMeta()
        self._snapshot: bytes | None = None
        self._seen: dict[int, set[str]] = {}
        self._lease: tuple[str, float] | None = None
        self.commits = 0
        """Successful commits so far."""

    @property
    def name(self) -> str:
        """The store's name."""
        return self._name

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing to release."""

    async def stage(self, items: list[tuple[str, bytes]]) -> None:
        """Stage pairs; see ``StateStore.stage``."""
        await anyio.lowlevel.checkpoint()
        for entry_id, data in items:
            self._staged[sort_key(entry_id)] = (entry_id, data)

    async def staged(self, after_id: str, before_id: str, limit: int) -> list[tuple[str, bytes]]:
        """Return staged pairs in a range; see ``StateStore.staged``."""
        await anyio.lowlevel.checkpoint()
        low, high = sort_key(after_id), sort_key(before_id)
        keys = sorted(k for k in self._staged if low < k < high)[:limit]
        return [self._staged[k] for k in keys]

    async def backlog(self) -> int:
        """Return the number of staged entries."""
        await anyio.lowlevel.checkpoint()
        return len(self._staged)

    async def meta(self) -> StateMeta:
        """Return the committed meta."""
        await anyio.lowlevel.checkpoint()
        return self._meta

    async def load(self) -> tuple[StateMeta, bytes | None]:
        """Return meta and snapshot."""
        await anyio.lowlevel.checkpoint()
        return self._meta, self._snapshot

    async def seen(self, meta: StateMeta) -> tuple[set[str], set[str]]:
        """Return the two seen generations."""
        await anyio.lowlevel.checkpoint()
        return (
            set(self._seen.get(meta.seen_gen - 1, ())),
            set(self._seen.get(meta.seen_gen, ())),
        )

    async def commit(self, commit: Commit) -> bool:
        """Commit atomically; see ``StateStore.commit``."""
        await anyio.lowlevel.checkpoint()
        if self._meta.version != commit.expected_version:
            return False
        self._snapshot = commit.snapshot
        self._meta = commit.meta
        self._seen.setdefault(commit.meta.seen_gen, set()).update(commit.seen_add)
        if commit.seen_drop_gen is not None:
            self._seen.pop(commit.seen_drop_gen, None)
        limit = sort_key(commit.meta.applied_id)
        for key in [k for k in self._staged if k <= limit]:
            del self._staged[key]
        self.commits += 1
        return True

    async def acquire_lease(self, token: str, ttl_s: float) -> bool:
        """Take or extend the lease."""
        await anyio.lowlevel.checkpoint()
        now = time.monotonic()
        lease = self._lease
        if lease is None or lease[1] <= now or lease[0] == token:
            self._lease = (token, now + ttl_s)
            return True
        return False

    async def release_lease(self, token: str) -> None:
        """Release the lease if held by ``token``."""
        await anyio.lowlevel.checkpoint()
        if self._lease is not None and self._lease[0] == token:
            self._lease = None

    async def reset(self) -> None:
        """Forget everything."""
        await anyio.lowlevel.checkpoint()
        self._staged.clear()
        self._meta = StateMeta()
        self._snapshot = None
        self._seen.clear()
        self._lease = None
