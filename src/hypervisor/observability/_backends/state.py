"""Where a derivation's shared state lives: the ``StateStore`` seam and its in-memory version.

A store holds, for one derivation of one consumer group:

* the **staged** entries: ``(stream id, entry bytes)`` that workers acknowledged, ordered by id;
  staging the same id twice is a no-op. They stay staged after they are applied, up to the next
  checkpoint: together with the checkpoint they *are* the committed state (a redo log);
* the **checkpoint**: a snapshot of the state folded up to some id (the checkpoint id);
* the **meta**: version, **applied id** and **epoch**, changed by one atomic
  :meth:`StateStore.commit` that succeeds only if the version and the epoch are still the ones
  the applier loaded. The epoch is a random id the first commit of a state writes: when Redis
  loses the state (a flush, a restart without persistence, ``--reset-state``) the next first
  commit writes another, so a copy of the old state is never taken for the new one, whose
  versions start again from 0. The committed state is the
  checkpoint plus the staged entries in ``(checkpoint id, applied id]``, in id order, minus the
  ones the applier **skipped** (duplicate event ids, dead-lettered unread ones; recorded with the
  commit that skipped them); a commit that carries a snapshot moves the checkpoint to its
  applied id and drops what the snapshot now holds;
* the **seen** event ids, a bounded window in two generations, so an event appended twice (two
  stream ids, one ``event_id``) is applied once;
* the **lease** that elects one applier at a time (an optimisation; correctness rests on the
  version check of ``commit``).

``MemoryStateStore`` keeps all of it in process (tests, embedded use); ``RedisStateStore`` (in
``redis_state``) in Redis keys.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import anyio

from hypervisor.observability._backends.log import MIN_ID, parse_id
from hypervisor.observability._backends.state_errors import StateErrors
from hypervisor.observability._util.aio import AsyncResource

__all__ = [
    "Checkpoint",
    "Commit",
    "MemoryStateStore",
    "Restored",
    "StateMeta",
    "StateStore",
    "checkpoint_newer",
    "new_epoch",
    "sort_key",
    "state_prefix",
]


def state_prefix(stream: str, group: str, derivation: str) -> str:
    """Return the key prefix of a derivation's state (hash-tagged by stream and group).

    Every Redis key of the state is ``<prefix>:<name>``; ``hvobs acl`` derives the worker's key
    patterns from this function, so the two cannot drift apart.
    """
    return f"hvobs:worker:{{{stream}:{group}}}:{derivation}"


def sort_key(entry_id: str) -> bytes:
    """Return the fixed-width byte key of a stream id: byte order is id order."""
    ms, seq = parse_id(entry_id)
    return b"%020d-%020d" % (ms, seq)


def new_epoch() -> str:
    """Return a fresh state epoch: 16 lowercase hex characters from the OS random source."""
    return os.urandom(8).hex()


@dataclass(frozen=True, slots=True)
class StateMeta:
    """The committed position of a derivation.

    Attributes:
        version: increases by one with every commit (0: nothing committed yet).
        applied_id: the highest stream id folded into the committed state (``"0-0"`` if none).
        seen_gen: the current generation of the seen-event-id window.
        seen_count: ids added to the current generation so far.
        epoch: the state's epoch (see :func:`new_epoch`), written by its first commit; ``""``
            while nothing is committed (and in a meta written before epochs existed).
    """

    version: int = 0
    applied_id: str = MIN_ID
    seen_gen: int = 0
    seen_count: int = 0
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Commit:
    """One atomic update of a derivation's state.

    Attributes:
        expected_version: the version the applier loaded; the commit fails if it changed.
        snapshot: a checkpoint of the state at ``meta.applied_id``, or ``None`` (the staged
            entries up to ``meta.applied_id`` then stay, as the redo log of this commit).
        meta: the new meta (version ``expected_version + 1``).
        seen_add: event ids applied in this round (added to ``meta.seen_gen``).
        seen_drop_gen: a generation to delete (the window rotated), or ``None``.
        skipped: stream ids of this round that were not folded in (duplicate event ids, and
            entries dead-lettered unread: too long or undecodable), so a replay of the staged
            entries skips them too.
        expected_epoch: the epoch the applier loaded (``""``: none); the commit fails if the
            stored epoch differs (the state was lost and begun again meanwhile). The commit
            writes ``meta.epoch``, which is the same unless the loaded state had none.
    """

    expected_version: int
    snapshot: bytes | None
    meta: StateMeta
    seen_add: list[str] = field(default_factory=list)
    seen_drop_gen: int | None = None
    skipped: list[str] = field(default_factory=list)
    expected_epoch: str = ""


@dataclass(frozen=True, slots=True)
class Restored:
    """The committed state of a derivation as stored, read consistently.

    The state is ``snapshot`` (``None``: an empty state) with ``records`` folded in, in order,
    except the ids in ``skipped``.

    Attributes:
        meta: the committed meta.
        snapshot: the checkpoint, or ``None``.
        checkpoint_id: the id the checkpoint folds up to (``"0-0"`` without one).
        records: staged ``(id, bytes)`` pairs in ``(checkpoint_id, meta.applied_id]``, id order.
        skipped: ids among ``records`` that the applier did not fold in.
    """

    meta: StateMeta
    snapshot: bytes | None
    checkpoint_id: str
    records: list[tuple[str, bytes]]
    skipped: frozenset[str]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A derivation's last checkpoint, read with the committed meta (see
    :meth:`StateStore.checkpoint`).

    Attributes:
        meta: the committed meta, read together with the checkpoint.
        checkpoint_id: the id the checkpoint folds up to (``"0-0"``: none yet).
        snapshot: the checkpoint; ``None`` when there is none, or when it is the one the
            caller said it holds (not sent again).
    """

    meta: StateMeta
    checkpoint_id: str
    snapshot: bytes | None


def checkpoint_newer(meta: StateMeta, checkpoint_id: str, newer_than: str, epoch: str) -> bool:
    """Whether a checkpoint at ``checkpoint_id`` of ``meta``'s state is one a reader holding a
    copy up to ``newer_than`` of ``epoch`` lacks (see :meth:`StateStore.checkpoint`)."""
    return meta.epoch != epoch or parse_id(checkpoint_id) > parse_id(newer_than)


@runtime_checkable
class StateStore(Protocol):
    """Shared state of one derivation of one consumer group (see the module docstring).

    Backend failures raise ``LogUnavailableError`` (transient) or ``LogError``; stored state
    that is unreadable raises ``WorkerStateError`` and is reported to :attr:`errors`.
    """

    @property
    def name(self) -> str:
        """A name for logs and metrics (the Redis key prefix)."""
        ...

    @property
    def errors(self) -> StateErrors:
        """The unreadable state this store met (see ``state_errors``)."""
        ...

    async def stage(self, items: list[tuple[str, bytes]]) -> None:
        """Stage ``(stream id, entry bytes)`` pairs; re-staging an id changes nothing."""
        ...

    async def staged(self, after_id: str, before_id: str, limit: int) -> list[tuple[str, bytes]]:
        """Return staged pairs not applied yet with ``after_id < id < before_id``, in id order.

        Ids at or below the applied id are left out (they are the redo log: see
        :meth:`restore` and :meth:`replay`). At most ``limit``, and always a prefix of the
        range: every such id between ``after_id`` and the last one returned is returned
        (possibly fewer than ``limit``).
        """
        ...

    async def backlog(self) -> int:
        """Return how many staged entries have ids above the applied id (not applied yet)."""
        ...

    async def meta(self) -> StateMeta:
        """Return the committed meta."""
        ...

    async def load(self) -> tuple[StateMeta, bytes | None]:
        """Return the committed meta and the checkpoint snapshot (``None``: no snapshot)."""
        ...

    async def restore(self) -> Restored:
        """Return everything needed to rebuild the committed state, read atomically."""
        ...

    async def checkpoint(self, newer_than: str = MIN_ID, epoch: str = "") -> Checkpoint:
        """Return the committed meta with the last checkpoint, read atomically.

        The snapshot is sent only if the checkpoint folds past ``newer_than`` or the state's
        epoch is not ``epoch`` (else ``None``: a reader holding a copy at least that new does
        not fetch it again), so polling costs one small read until a newer checkpoint exists.
        """
        ...

    async def replay(
        self, after_id: str, upto_id: str, epoch: str | None = None
    ) -> tuple[list[tuple[str, bytes]], frozenset[str]] | None:
        """Return the staged pairs in ``(after_id, upto_id]`` and the skipped ids among them.

        ``upto_id`` must not exceed the committed applied id. The records since the checkpoint
        before the last one are kept, so a reader at most one checkpoint interval behind can
        always replay. Returns ``None`` when some of them were dropped, or when ``epoch`` is
        given and is not the stored epoch (rebuild with :meth:`restore` instead).
        """
        ...

    async def seen(self, meta: StateMeta) -> tuple[list[str], list[str]]:
        """Return the seen ids of generations ``meta.seen_gen - 1`` and ``meta.seen_gen``, each
        in the order they were committed."""
        ...

    async def commit(self, commit: Commit) -> bool:
        """Apply ``commit`` atomically if the version is still ``expected_version`` and the
        epoch still ``expected_epoch``.

        With a snapshot, also moves the checkpoint to ``commit.meta.applied_id`` and removes
        the staged entries (and skipped ids) up to the previous checkpoint (those since it stay
        one more interval, for :meth:`replay`). Returns whether it was applied.
        """
        ...

    async def acquire_lease(self, token: str, ttl_s: float) -> bool:
        """Take the applier lease for ``token`` or extend it if ``token`` holds it."""
        ...

    async def lease_round(self, token: str, ttl_s: float) -> StateMeta | None:
        """Take or extend the lease; return the committed meta's version, epoch and applied
        id (the other fields at their defaults) if ``token`` now holds it, ``None`` if another
        token does (one backend call: the start of an apply round)."""
        ...

    async def release_lease(self, token: str) -> None:
        """Give the lease up if ``token`` holds it."""
        ...

    async def notify(self) -> None:
        """Tell the applier that entries were staged and acknowledged (wakes its wait)."""
        ...

    async def wait_notified(self, timeout_s: float) -> bool:
        """Wait until :meth:`notify` was called since the last wait, at most ``timeout_s``;
        return whether it was."""
        ...

    async def reset(self) -> None:
        """Delete everything (staged entries, snapshot, meta, seen ids, lease); the next
        commit begins a new epoch."""
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


class MemoryStateStore(AsyncResource):
    """A ``StateStore`` in process; every method is atomic (one event loop, no awaits inside).

    Args:
        name: a name for logs and metrics.
        clock: seconds on a monotonic clock, for the lease's time to live.
    """

    def __init__(
        self, name: str = "memory", *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._name = name
        self._clock = clock
        self._staged: dict[tuple[int, int], tuple[str, bytes]] = {}
        self._skipped: dict[tuple[int, int], str] = {}
        self._meta = StateMeta()
        self._snapshot: bytes | None = None
        self._checkpoint = MIN_ID
        # The oldest point a replay can start from: the checkpoint before the last one.
        self._retained = MIN_ID
        self._seen: dict[int, list[str]] = {}
        self._lease: tuple[str, float] | None = None
        self._notified = anyio.Event()
        self._errors = StateErrors(name)
        self.commits = 0
        """Successful commits so far."""
        self.checkpoints = 0
        """Successful commits that carried a snapshot."""

    @property
    def name(self) -> str:
        """The store's name."""
        return self._name

    @property
    def errors(self) -> StateErrors:
        """The unreadable state met (only ever a snapshot: the rest is held in process)."""
        return self._errors

    async def aclose(self) -> None:
        """Nothing to release."""

    async def stage(self, items: list[tuple[str, bytes]]) -> None:
        """Stage pairs; see ``StateStore.stage``."""
        await anyio.lowlevel.checkpoint()
        for entry_id, data in items:
            self._staged[parse_id(entry_id)] = (entry_id, data)

    def _range(self, low: tuple[int, int], high: tuple[int, int]) -> list[tuple[str, bytes]]:
        """Staged pairs with ``low < id <= high``, in id order."""
        return [self._staged[k] for k in sorted(k for k in self._staged if low < k <= high)]

    async def staged(self, after_id: str, before_id: str, limit: int) -> list[tuple[str, bytes]]:
        """Return staged pairs in a range; see ``StateStore.staged``."""
        await anyio.lowlevel.checkpoint()
        low = max(parse_id(after_id), parse_id(self._meta.applied_id))
        high = parse_id(before_id)
        keys = sorted(k for k in self._staged if low < k < high)[:limit]
        return [self._staged[k] for k in keys]

    async def backlog(self) -> int:
        """Return the number of staged entries above the applied id."""
        await anyio.lowlevel.checkpoint()
        applied = parse_id(self._meta.applied_id)
        return sum(1 for k in self._staged if k > applied)

    async def meta(self) -> StateMeta:
        """Return the committed meta."""
        await anyio.lowlevel.checkpoint()
        return self._meta

    async def load(self) -> tuple[StateMeta, bytes | None]:
        """Return meta and checkpoint snapshot."""
        await anyio.lowlevel.checkpoint()
        return self._meta, self._snapshot

    async def checkpoint(self, newer_than: str = MIN_ID, epoch: str = "") -> Checkpoint:
        """Return meta and checkpoint; see ``StateStore.checkpoint``."""
        await anyio.lowlevel.checkpoint()
        meta, checkpoint_id = self._meta, self._checkpoint
        if not checkpoint_newer(meta, checkpoint_id, newer_than, epoch):
            return Checkpoint(meta, checkpoint_id, None)
        return Checkpoint(meta, checkpoint_id, self._snapshot)

    def _skipped_in(self, low: tuple[int, int], high: tuple[int, int]) -> frozenset[str]:
        return frozenset(i for k, i in self._skipped.items() if low < k <= high)

    async def restore(self) -> Restored:
        """Return checkpoint, redo records and skipped ids; see ``StateStore.restore``."""
        await anyio.lowlevel.checkpoint()
        low, high = parse_id(self._checkpoint), parse_id(self._meta.applied_id)
        return Restored(
            self._meta,
            self._snapshot,
            self._checkpoint,
            self._range(low, high),
            self._skipped_in(low, high),
        )

    async def replay(
        self, after_id: str, upto_id: str, epoch: str | None = None
    ) -> tuple[list[tuple[str, bytes]], frozenset[str]] | None:
        """Return redo records after ``after_id``; see ``StateStore.replay``."""
        await anyio.lowlevel.checkpoint()
        low, high = parse_id(after_id), parse_id(upto_id)
        if parse_id(self._retained) > low or (epoch is not None and epoch != self._meta.epoch):
            return None
        return self._range(low, high), self._skipped_in(low, high)

    async def seen(self, meta: StateMeta) -> tuple[list[str], list[str]]:
        """Return the two seen generations, in commit order."""
        await anyio.lowlevel.checkpoint()
        return (
            list(self._seen.get(meta.seen_gen - 1, ())),
            list(self._seen.get(meta.seen_gen, ())),
        )

    async def commit(self, commit: Commit) -> bool:
        """Commit atomically; see ``StateStore.commit``."""
        await anyio.lowlevel.checkpoint()
        if (
            self._meta.version != commit.expected_version
            or self._meta.epoch != commit.expected_epoch
        ):
            return False
        self._meta = commit.meta
        self._seen.setdefault(commit.meta.seen_gen, []).extend(commit.seen_add)
        if commit.seen_drop_gen is not None:
            self._seen.pop(commit.seen_drop_gen, None)
        for entry_id in commit.skipped:
            self._skipped[parse_id(entry_id)] = entry_id
        if commit.snapshot is not None:
            self._snapshot = commit.snapshot
            # What the previous checkpoint holds goes; the records since it stay one more
            # interval, for views that are behind (see StateStore.replay).
            self._retained, self._checkpoint = self._checkpoint, commit.meta.applied_id
            limit = parse_id(self._retained)
            for key in [k for k in self._staged if k <= limit]:
                del self._staged[key]
            for key in [k for k in self._skipped if k <= limit]:
                del self._skipped[key]
            self.checkpoints += 1
        self.commits += 1
        return True

    async def acquire_lease(self, token: str, ttl_s: float) -> bool:
        """Take or extend the lease."""
        await anyio.lowlevel.checkpoint()
        now = self._clock()
        lease = self._lease
        if lease is None or lease[1] <= now or lease[0] == token:
            self._lease = (token, now + ttl_s)
            return True
        return False

    async def lease_round(self, token: str, ttl_s: float) -> StateMeta | None:
        """Take or extend the lease; return the version, epoch and applied id if held."""
        if await self.acquire_lease(token, ttl_s):
            meta = self._meta
            return StateMeta(meta.version, meta.applied_id, epoch=meta.epoch)
        return None

    async def notify(self) -> None:
        """Wake a waiting applier."""
        await anyio.lowlevel.checkpoint()
        self._notified.set()

    async def wait_notified(self, timeout_s: float) -> bool:
        """Wait for a notification (consumed by the wait)."""
        with anyio.move_on_after(timeout_s):
            await self._notified.wait()
        if self._notified.is_set():
            self._notified = anyio.Event()
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
        self._skipped.clear()
        self._meta = StateMeta()
        self._snapshot = None
        self._checkpoint = MIN_ID
        self._retained = MIN_ID
        self._seen.clear()
        self._lease = None
