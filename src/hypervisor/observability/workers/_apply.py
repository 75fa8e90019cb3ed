"""The applier: folds staged entries into a derivation's state in stream order, atomically.

One applier per derivation and worker; the store's lease lets one of them work at a time. A
round: take or extend the lease; rebuild the state only if another applier committed since this
one last did; compute the watermark below which every entry of the group is acknowledged (hence
staged or dead-lettered); apply the staged entries below it in id order, skipping event ids
already applied; export what the round produced; commit the applied id, seen ids and skipped
ids in one atomic, version-checked step. The state itself is checkpointed (a snapshot in the
same commit) only every ``checkpoint_interval_s``: in between, the committed state is the last
checkpoint plus the staged entries up to the applied id, which stay staged until the next
checkpoint. :func:`fold` replays them, here on a takeover and in every worker's metrics view.

Any single entry is survivable: one that is too long or does not decode (strictly: see
``decode_event``) is dead-lettered and recorded as skipped, so replays skip it too; one whose
state-machine call raises is dead-lettered with the error and the round goes on (what it changed
before raising stays, as in the in-process collectors, and replays do the same).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

from hypervisor.observability._backends.log import (
    StreamLog,
    next_id,
    parse_id,
)
from hypervisor.observability._backends.state import Commit, Restored, StateMeta, new_epoch
from hypervisor.observability._core.codec import DEFAULT_MAX_EVENT_BYTES, decode_event, error_text
from hypervisor.observability._core.recent import RecentIds
from hypervisor.observability._core.trace_context import decode_context
from hypervisor.observability.errors import EventDecodeError, WorkerStateError
from hypervisor.observability.workers._derivations import Derivation
from hypervisor.observability.workers._dlq import (
    REASON_APPLY_ERROR,
    REASON_OVERSIZED,
    REASON_UNDECODABLE,
    DeadLetter,
    encode_dead_letter,
)
from hypervisor.observability.workers._snapshot import dump_state, load_state

__all__ = [
    "Applier",
    "epoch_lost",
    "fold",
    "log_state_reset",
    "restore_state",
    "watermark",
    "went_back",
]

_log = logging.getLogger("hypervisor.observability.workers")


def epoch_lost(held: StateMeta, found: StateMeta) -> bool:
    """Whether a copy of the state as of ``held`` belongs to a state Redis has since lost.

    It does when ``held`` has an epoch and ``found`` (the meta read now) has another one or
    none (the meta is gone). Versions of two epochs are never compared: the new state counts
    from 0 again. A copy without an epoch (nothing committed yet, or written before epochs)
    is not "lost" but is rebuilt when an epoch appears (see ``SnapshotView``).
    """
    return bool(held.epoch) and found.epoch != held.epoch


def went_back(held: StateMeta, found: StateMeta) -> bool:
    """Whether the stored state of ``held``'s epoch is no longer the one a copy as of ``held``
    was taken from: an older version, or the same version at another applied id.

    Versions only grow, so this means Redis restarted from an older copy of its data (an
    append-only file or snapshot without the last writes) and commits may have gone on from
    there: a copy at the same version may hold other records.
    """
    if found.epoch != held.epoch:
        return False
    return found.version < held.version or (
        found.version == held.version and found.applied_id != held.applied_id
    )


def log_state_reset(name: str, held: StateMeta, found: StateMeta) -> None:
    """Say once, at WARNING, that a derivation's stored state was lost and begun again (or
    went back to an older copy)."""
    if found.epoch and found.epoch == held.epoch:
        _log.warning(
            "%s: the stored state went back from version %d (applied %s) to version %d "
            "(applied %s) of epoch %s: Redis restarted from an older copy of its data; "
            "rebuilding from it",
            name,
            held.version,
            held.applied_id,
            found.version,
            found.applied_id,
            found.epoch,
        )
        return
    _log.warning(
        "%s: state epoch changed (%s at version %d, now %s at version %d): Redis lost the "
        "state (flushed, restarted without persistence, or --reset-state); rebuilding from "
        "the stored state, and events before it may be missing",
        name,
        held.epoch,
        held.version,
        found.epoch or "none",
        found.version,
    )


def fold(
    derivation: Derivation,
    state: Any,
    records: list[tuple[str, bytes]],
    skipped: Collection[str] = (),
) -> int:
    """Replay committed records into ``state`` exactly as the applier folded them.

    Skips the ids the applier skipped (duplicates, entries too long or undecodable, all
    recorded with the commit) and, as it did, records that do not decode (committed before
    such records were recorded); a record whose state-machine call raises is folded in up to
    the error, as the applier did. Spans produced are discarded: they were exported before the
    commit that covers them. Returns the records folded in.
    """
    apply = derivation.apply
    traced = derivation.uses_trace_context
    folded = 0
    for entry_id, data in records:
        if entry_id in skipped:
            continue
        try:
            event = decode_event(data, strict=True)
        except EventDecodeError:
            continue
        try:
            if traced:
                derivation.apply_traced(state, event, decode_context(data))
            else:
                apply(state, event)
        except Exception:  # the applier logged it when it first happened
            _log.debug("%s: replaying %s failed", derivation.name, entry_id, exc_info=True)
        folded += 1
    return folded


def restore_state(derivation: Derivation, restored: Restored) -> Any:
    """Rebuild the committed state: the checkpoint with the redo records folded in.

    Raises:
        WorkerStateError: the checkpoint is unreadable, or the state of another derivation.
    """
    snapshot = restored.snapshot
    state = derivation.new_state()
    errors = derivation.store.errors
    if snapshot is not None:
        expected = type(state)
        try:
            loaded = load_state(snapshot)
            if type(loaded) is not expected:
                raise WorkerStateError(
                    f"the snapshot holds a {type(loaded).__name__}, not the "
                    f"{expected.__name__} of {derivation.name}"
                )
            state = derivation.restored(loaded)
        except WorkerStateError as error:
            named = WorkerStateError(f"{derivation.store.name}:snap: {error}")
            errors.fail("snapshot", named)
            raise named from error
    errors.ok("snapshot")
    fold(derivation, state, restored.records, restored.skipped)
    return state


async def watermark(log: StreamLog, group: str) -> str:
    """Return the lowest id that may not be acknowledged yet by ``group``.

    Every entry below it was delivered and acknowledged. The last-delivered id is read before
    the pending list (one request, ``StreamLog.group_position``): an entry delivered between
    the two reads is then above the first and cannot be missed by the second.

    Raises:
        LogGroupMissingError: the group does not exist.
    """
    position = await log.group_position(group)
    mark = next_id(position.last_delivered_id)
    oldest = position.oldest_pending_id
    if oldest is not None and parse_id(oldest) < parse_id(mark):
        mark = oldest
    return mark


class Applier:
    """Applies one derivation's staged entries for one consumer group.

    Args:
        log: the event log (for the watermark).
        group: the consumer group whose acknowledged entries are applied.
        derivation: what to apply (its ``store`` holds the shared state).
        token: this applier's lease token (unique per process).
        lease_ttl_s: lease time to live; another applier takes over after it.
        max_batch: staged entries applied per round at most.
        dedup_window: how many of the newest applied event ids are remembered to drop copies
            (exactly, as the bus reader's window of the same name).
        checkpoint_interval_s: shortest time between two checkpoints (snapshots) of the state;
            stretched to 20 times the last snapshot's cost, so a large state costs at most 5 %.
        checkpoint_max_records: records applied after which a checkpoint is due anyway (bounds
            the redo log a restore replays).
        clock: seconds on a monotonic clock, for the checkpoint interval.
        checkpoint_max_bytes: bytes of records applied after which a checkpoint is due anyway
            (bounds the memory of a restore whatever the size of the events).
        dlq: where entries this applier gives up on go (``None``: only counted and logged).
        consumer: the worker's consumer name, recorded in its dead letters.
        max_event_bytes: a longer staged record is dead-lettered without being decoded.
        dead_lettered: a ``reason -> count`` dict to count this applier's dead letters in (the
            worker's own, so one metric shows them all); a new one by default.
    """

    def __init__(
        self,
        log: StreamLog,
        group: str,
        derivation: Derivation,
        *,
        token: str | None = None,
        lease_ttl_s: float = 5.0,
        max_batch: int = 20_000,
        dedup_window: int = 100_000,
        checkpoint_interval_s: float = 1.0,
        checkpoint_max_records: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
        checkpoint_max_bytes: int = 64 << 20,
        dlq: StreamLog | None = None,
        consumer: str = "",
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        dead_lettered: dict[str, int] | None = None,
    ) -> None:
        self.log = log
        self.group = group
        self.derivation = derivation
        self.store = derivation.store
        self.token = token or os.urandom(8).hex()
        self.lease_ttl_s = lease_ttl_s
        self.max_batch = max_batch
        self.dedup_window = max(2, dedup_window)
        self.checkpoint_interval_s = checkpoint_interval_s
        self.checkpoint_max_records = checkpoint_max_records
        self.checkpoint_max_bytes = checkpoint_max_bytes
        self.dlq = dlq
        self.consumer = consumer
        self.max_event_bytes = max_event_bytes
        self._bytes_since_checkpoint = 0
        self._reported: set[tuple[str, type[BaseException]]] = set()
        self._state: Any = None
        self._meta = StateMeta()
        # The newest applied event ids (exactly dedup_window of them); the store keeps two
        # generations of between dedup_window and twice as many, so a load can refill it.
        self._recent = RecentIds(self.dedup_window)
        self._since_checkpoint = 0
        self._clock = clock
        # Set while the local state holds records folded in but not committed yet.
        self._dirty = False
        self._next_checkpoint = clock() + checkpoint_interval_s
        self.final = False
        """Checkpoint at every commit (set while the worker drains, so a stopped group leaves
        a snapshot of everything it applied)."""
        self.leader = False
        """Whether the last round held the lease."""
        self.applied_events = 0
        """Staged entries this applier folded in and committed."""
        self.duplicates = 0
        """Entries skipped because their event id was applied before."""
        self.apply_errors = 0
        """Events whose state-machine call raised (dead-lettered, as ``apply_error``)."""
        self.rejected = 0
        """Staged records dead-lettered unapplied (too long or undecodable)."""
        self.dead_lettered: dict[str, int] = {} if dead_lettered is None else dead_lettered
        """Records dead-lettered by this applier, per reason."""
        self.snapshot_errors = 0
        """Checkpoints that failed to serialise the state (the commit went on without one)."""
        self.commits = 0
        self.checkpoints = 0
        """Commits that carried a snapshot."""
        self.conflicts = 0
        """Commits refused because another applier had committed."""
        self.reloads = 0
        """State rebuilds (start, or after another applier committed)."""
        self.state_resets = 0
        """Times the stored state's epoch changed under this applier (Redis lost it)."""

    @property
    def applied_id(self) -> str:
        """The applied id as of this applier's last load or commit."""
        return self._meta.applied_id

    @property
    def state(self) -> Any:
        """The applier's local state (``None`` until loaded); read-only use."""
        return self._state

    def committed_state(self) -> tuple[StateMeta, Any] | None:
        """The local state with the meta whose committed state it is exactly, or ``None`` (no
        local state, or a round has folded records it has not committed yet). Read-only use;
        a later round changes it."""
        if self._state is None or self._dirty:
            return None
        return self._meta, self._state

    def invalidate(self) -> None:
        """Drop the local state: the next round rebuilds it from the store."""
        self._state = None

    async def _load(self) -> None:
        restored = await self.store.restore()
        state = restore_state(self.derivation, restored)
        prev, cur = await self.store.seen(restored.meta)
        recent = RecentIds(self.dedup_window)
        recent.extend(prev)
        recent.extend(cur)
        self._state, self._meta, self._recent = state, restored.meta, recent
        self._since_checkpoint = len(restored.records)
        self._bytes_since_checkpoint = sum(len(data) for _, data in restored.records)
        self._dirty = False
        self.reloads += 1

    async def round(self) -> int:
        """Run one round; return how many staged entries it applied and committed.

        Raises:
            LogUnavailableError: the backend is unreachable (nothing was committed).
            WorkerStateError: the stored snapshot cannot be read.
            Exception: a sink failed (nothing was committed; the spans will be exported again).
        """
        found = await self.store.lease_round(self.token, self.lease_ttl_s)
        if found is None:
            self.leader = False
            self._state = None  # another applier moves on: a copy here would only go stale
            return 0
        self.leader = True
        try:
            return await self._round(found)
        except BaseException:
            self._state = None
            raise

    def _checkpoint_due(self) -> bool:
        return (
            self.final
            or self._since_checkpoint >= self.checkpoint_max_records
            or self._bytes_since_checkpoint >= self.checkpoint_max_bytes
            or self._clock() >= self._next_checkpoint
        )

    def _snapshot(self) -> bytes:
        started = self._clock()
        snapshot = dump_state(self._state)
        cost = self._clock() - started
        self._next_checkpoint = self._clock() + max(self.checkpoint_interval_s, 20 * cost)
        return snapshot

    def _try_snapshot(self) -> bytes | None:
        """A checkpoint of the state, or ``None`` if it cannot be serialised: the commit then
        goes on without one (the redo log keeps the state) rather than failing every round."""
        try:
            return self._snapshot()
        except Exception as exc:
            self.snapshot_errors += 1
            self._next_checkpoint = time.monotonic() + self.checkpoint_interval_s
            self._report("snapshot", exc, "checkpointing the state failed; committing without")
            return None

    def _report(self, what: str, exc: BaseException, message: str) -> None:
        """Log an error with its traceback the first time per kind, briefly afterwards."""
        key = (what, type(exc))
        if key in self._reported:
            _log.debug("%s: %s: %s", self.derivation.name, message, error_text(exc))
            return
        self._reported.add(key)
        _log.error(
            "%s: %s: %s (further %s errors are logged at debug level)",
            self.derivation.name,
            message,
            error_text(exc),
            type(exc).__name__,
            exc_info=exc,
        )

    def _letter(self, reason: str, entry_id: str, data: bytes, error: str) -> DeadLetter:
        self.dead_lettered[reason] = self.dead_lettered.get(reason, 0) + 1
        return DeadLetter(
            reason=reason,
            original_id=entry_id,
            group=self.group,
            consumer=self.consumer,
            deliveries=0,
            error=error,
            data=data,
            derivation=self.derivation.name,
        )

    async def _round(self, found: StateMeta) -> int:
        held = self._meta
        if (
            self._state is None
            or found.version != held.version
            or found.epoch != held.epoch
            or found.applied_id != held.applied_id
        ):
            if self._state is not None and (epoch_lost(held, found) or went_back(held, found)):
                self.state_resets += 1
                log_state_reset(self.derivation.name, held, found)
            await self._load()
        meta = self._meta
        mark = await watermark(self.log, self.group)
        items = await self.store.staged(meta.applied_id, mark, self.max_batch)
        if not items:
            if self._since_checkpoint and self._checkpoint_due():
                snapshot = self._try_snapshot()
                if snapshot is not None:
                    same = replace(meta, version=meta.version + 1, epoch=meta.epoch or new_epoch())
                    await self._commit(
                        Commit(meta.version, snapshot, same, expected_epoch=meta.epoch), 0
                    )
            return 0
        state = self._state
        derivation = self.derivation
        apply = derivation.apply
        remember = self._recent.add
        traced = derivation.uses_trace_context
        produced: list[Any] = []
        seen_add: list[str] = []
        skipped: list[str] = []
        letters: list[DeadLetter] = []
        max_bytes = self.max_event_bytes
        size = 0
        self._dirty = True
        for entry_id, data in items:
            size += len(data)
            # Workers stage only entries that pass both checks; these catch bytes staged by
            # anything else. Recorded as skipped, so that replays never decode them.
            if len(data) > max_bytes:
                self.rejected += 1
                skipped.append(entry_id)
                error = f"{len(data)} bytes, over the limit of {max_bytes} (--max-event-bytes)"
                letters.append(self._letter(REASON_OVERSIZED, entry_id, data, error))
                continue
            try:
                event = decode_event(data, strict=True)
            except EventDecodeError as exc:
                self.rejected += 1
                skipped.append(entry_id)
                letters.append(self._letter(REASON_UNDECODABLE, entry_id, data, str(exc)))
                continue
            event_id = event.event_id
            if not remember(event_id):
                self.duplicates += 1
                skipped.append(entry_id)
                continue
            seen_add.append(event_id)
            try:
                if traced:
                    spans = derivation.apply_traced(state, event, decode_context(data))
                else:
                    spans = apply(state, event)
            except Exception as exc:  # anything the state machine raises on one event
                self.apply_errors += 1
                self._report("apply", exc, f"applying event {event_id} ({entry_id}) failed")
                letters.append(self._letter(REASON_APPLY_ERROR, entry_id, data, error_text(exc)))
                continue
            if spans:
                produced.extend(spans)
        derivation.export(produced)
        if letters:
            # Before the commit: a crash in between letters them again (at least once), never
            # loses one.
            if self.dlq is not None:
                await self.dlq.append_many([encode_dead_letter(letter) for letter in letters])
            _log.warning(
                "%s: dead-lettered %d staged entries (%s)",
                derivation.name,
                len(letters),
                ", ".join(sorted({letter.reason for letter in letters})),
            )
        gen, count = meta.seen_gen, meta.seen_count + len(seen_add)
        drop: int | None = None
        if count >= self.dedup_window:
            drop, gen, count = gen - 1, gen + 1, len(seen_add)
        # The first commit of a state (or of one written before epochs) begins its epoch.
        new_meta = StateMeta(meta.version + 1, items[-1][0], gen, count, meta.epoch or new_epoch())
        self._since_checkpoint += len(items)
        self._bytes_since_checkpoint += size
        snapshot = self._try_snapshot() if self._checkpoint_due() else None
        commit = Commit(meta.version, snapshot, new_meta, seen_add, drop, skipped, meta.epoch)
        if not await self._commit(commit, len(items)):
            return 0
        return len(items)

    async def _commit(self, commit: Commit, applied: int) -> bool:
        if not await self.store.commit(commit):
            self.conflicts += 1
            self._state = None
            return False
        self._meta = commit.meta
        self._dirty = False
        self.commits += 1
        if commit.snapshot is not None:
            self.checkpoints += 1
            self._since_checkpoint = 0
            self._bytes_since_checkpoint = 0
        self.applied_events += applied
        return True

    async def release(self) -> None:
        """Give the lease up (shutdown)."""
        await self.store.release_lease(self.token)
        self.leader = False
