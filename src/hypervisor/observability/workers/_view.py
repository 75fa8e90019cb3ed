"""A worker's view of a derivation's committed state: what ``/metrics`` serves.

The view follows the committed state (a meta read; the redo records committed since, or the
checkpoint and its redo records) and never serves a wrong one:

* a refresh builds the new copy aside and swaps it in only when it is complete, so a failure
  mid-rebuild leaves the last good copy in place (never an empty or partial one);
* a refresh that fails leaves the view **stale**: the last good copy (or the last exposition
  rendered from one) is served, and the staleness is counted, logged once per outage and
  reported (``hvobs_worker_view_stale``, ``hvobs_worker_view_age_seconds``);
* a copy of a state Redis has since lost (its **epoch** changed, or the meta is gone) is void:
  it is dropped, with everything rendered from it, and the state is rebuilt from scratch
  (versions of two epochs are never compared); so is a copy newer than the stored state of its
  epoch (Redis restarted from an older copy of its data), or at its version with another
  applied id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from hypervisor.observability._backends.log import MIN_ID, LogError, parse_id
from hypervisor.observability._backends.state import Restored, StateMeta
from hypervisor.observability.errors import WorkerStateError
from hypervisor.observability.workers._apply import (
    Applier,
    epoch_lost,
    fold,
    log_state_reset,
    restore_state,
    went_back,
)
from hypervisor.observability.workers._derivations import Derivation

__all__ = ["SnapshotView"]

_log = logging.getLogger("hypervisor.observability.workers")
# Milliseconds a refresh waits for the applier's commit in flight before building its own copy.
_SHARE_WAITS = 50


class SnapshotView:
    """A local copy of a derivation's committed state, refreshed on demand.

    A refresh reads the meta; when the version changed it folds in the redo records committed
    since the copy's applied id (the staged entries, as the applier folded them), or rebuilds
    from the checkpoint when a checkpoint dropped some of them meanwhile, or when the state's
    epoch changed (Redis lost the state: the copy is void).

    While this worker's own applier holds the lease and its state is the committed state (no
    round in flight), the view uses that state instead of a copy of its own: one copy of the
    state per worker, and a scrape has nothing to fold.

    Refreshes are serialised (a scrape and a health check at once must not fold the same
    records twice). :attr:`state` is ``None`` until the first refresh succeeds; a rebuild
    builds the new copy before it lets the old one go (two copies meanwhile), so a failed
    rebuild leaves the last good one. Use :meth:`servable` for what may be served.

    With ``checkpoints_only`` (a partitioned worker's view of a partition another worker
    applies) the view folds nothing after its first load: it follows the state's
    **checkpoints** (the applier writes one about every ``checkpoint_interval_s``, and when it
    goes idle), taking each newer one whole. Its copy is then an earlier committed state, at
    most a checkpoint interval and a refresh behind, never a wrong one and never older than
    the copy it replaces (a counter served from it never goes back). So a worker's view costs
    a small read per refresh and a snapshot decode per checkpoint, whatever the partition's
    event rate, instead of folding every event the partition's applier folds. The first load
    (and one after the state was lost or the copy dropped) restores the exact committed state.

    Args:
        derivation: the derivation whose committed state is shown (its ``store``).
        applier: this worker's applier of that derivation, whose state the view may share.
        clock: seconds on a monotonic clock (the view's age).
        checkpoints_only: follow the checkpoints rather than fold the redo records.
    """

    def __init__(
        self,
        derivation: Derivation,
        applier: Applier | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        checkpoints_only: bool = False,
    ) -> None:
        self._derivation = derivation
        self._store = derivation.store
        self._applier = applier
        self._clock = clock
        self._checkpoints_only = checkpoints_only
        self.meta = StateMeta()
        """The committed meta read last (the copy may be an earlier state: :attr:`applied_id`)."""
        self.applied_id = MIN_ID
        """The stream id the copy folds up to."""
        self.state: Any = None
        self._loaded_version = -1
        self._shared = False
        self._lock = anyio.Lock()
        self._rendered: dict[str, bytes] = {}
        self.rebuilds = 0
        """Rebuilds from the checkpoint (first refresh, records dropped, epoch changed)."""
        self.checkpoint_loads = 0
        """Newer checkpoints taken whole (``checkpoints_only``)."""
        self.shared_refreshes = 0
        """Refreshes that took the applier's state."""
        self.error: WorkerStateError | None = None
        """Why the last refresh could not read the committed state (``None``: it could)."""
        self.refresh_failures = 0
        """Refreshes that could not reach the committed state (the backend failed)."""
        self.state_resets = 0
        """Times the state's epoch changed under the view (Redis lost the state)."""
        self.stale_error = ""
        """Why the view is stale (the last refresh's backend error), ``""`` while current."""
        self.updated_at: float | None = None
        """When a refresh last brought the view up to date (``clock`` seconds), if ever."""
        self._stale_since: float | None = None

    def follow(self, applier: Applier | None) -> None:
        """Share the state of ``applier`` from now on (``None``: of none), for a worker whose
        applier of the derivation changes (a partitioned worker's run of a partition)."""
        if applier is not self._applier:
            old, self._applier = self._applier, applier
            if self._shared:  # the old applier's state moves on without us: load a copy
                self._shared = False
                found = None if old is None else old.committed_state()
                if (
                    self._checkpoints_only
                    and applier is None
                    and found is not None
                    and found[1] is self.state
                    and found[0] == self.meta
                ):
                    # Its run ended (the partition was handed over): nothing changes the
                    # state any more, and it is exactly a committed state: keep it as the copy
                    # (a checkpoint would be older).
                    return
                self.state = None
                self._loaded_version = -1

    @property
    def stale(self) -> bool:
        """Whether the last refresh failed, so what is served is the last good view."""
        return self._stale_since is not None

    def age_s(self) -> float | None:
        """Seconds since a refresh last brought the view up to date (``None``: never)."""
        return None if self.updated_at is None else max(0.0, self._clock() - self.updated_at)

    async def refresh(self) -> None:
        """Bring the copy up to the committed state if the committed version changed.

        Raises:
            WorkerStateError: the committed state is unreadable (also kept in :attr:`error`
                until a refresh succeeds: the copy is not served meanwhile).
            LogError: the backend failed; the view is stale until a refresh succeeds.
        """
        async with self._lock:
            try:
                await self._refresh()
            except WorkerStateError as error:
                self.error = error
                raise
            except LogError as error:
                self._failed(error)
                raise
            self.error = None
            self._succeeded()

    def _failed(self, error: LogError) -> None:
        self.refresh_failures += 1
        self.stale_error = str(error)
        if self._stale_since is None:
            self._stale_since = self._clock()
            _log.warning(
                "%s: the metrics view cannot be brought up to date (%s); serving the last "
                "good view while this lasts (503 without one)",
                self._derivation.name,
                error,
            )

    def _succeeded(self) -> None:
        now = self._clock()
        if self._stale_since is not None:
            _log.warning(
                "%s: the metrics view is up to date again after %.1f s stale",
                self._derivation.name,
                now - self._stale_since,
            )
        self._stale_since = None
        self.stale_error = ""
        self.updated_at = now

    @property
    def unreadable(self) -> bool:
        """Whether the derivation's stored state is unreadable now (then it is not served)."""
        return self.error is not None or bool(self._store.errors.current)

    def servable(self) -> Any:
        """The copy, if it is still exactly the committed state of :attr:`meta`; else ``None``.

        A state shared with the applier is that only while the applier has not folded records
        into it since (a round that failed before its commit leaves it ahead of the committed
        state): then the last exposition rendered (:meth:`rendered`) is what may be served.
        """
        if self.state is None:
            return None
        if self._shared:
            applier = self._applier
            found = None if applier is None else applier.committed_state()
            if found is None or found[1] is not self.state or found[0] != self.meta:
                return None
        return self.state

    def remember(self, kind: str, body: bytes) -> None:
        """Keep ``body``, rendered from :meth:`servable` in format ``kind``, as the last good
        exposition of that format (served while the copy cannot be)."""
        self._rendered[kind] = body

    def rendered(self, kind: str) -> bytes | None:
        """The last good exposition of format ``kind`` (``None``: none of this epoch)."""
        return self._rendered.get(kind)

    def _void(self, meta: StateMeta) -> None:
        """Drop a copy of a state Redis lost (or that went back to an older copy), and
        everything rendered from it."""
        self.state_resets += 1
        log_state_reset(self._derivation.name, self.meta, meta)
        self.state = None
        self.meta = StateMeta()
        self.applied_id = MIN_ID
        self._rendered.clear()
        self._shared = False
        self._loaded_version = -1

    async def _refresh(self) -> None:
        if self._checkpoints_only:
            await self._refresh_checkpointed()
            return
        meta = await self._store.meta()
        if self._loaded_version >= 0 and (
            epoch_lost(self.meta, meta) or went_back(self.meta, meta)
        ):
            self._void(meta)
        if await self._share(meta):
            return
        if self._shared:
            # The state was the applier's, which moves on without us: build a copy of our own.
            self._shared = False
            self._loaded_version = -1
        same_epoch = meta.epoch == self.meta.epoch
        if meta.version == self._loaded_version and same_epoch:
            return
        if (
            self._loaded_version >= 0
            and same_epoch
            and parse_id(meta.applied_id) >= parse_id(self.meta.applied_id)
        ):
            replay = await self._store.replay(self.meta.applied_id, meta.applied_id, meta.epoch)
            if replay is not None:
                fold(self._derivation, self.state, *replay)
                self.meta = meta
                self.applied_id = meta.applied_id
                self._loaded_version = meta.version
                return
        await self._rebuild()

    async def _rebuild(self) -> None:
        """Restore the exact committed state (checkpoint and redo records)."""
        # Built aside and swapped in whole: a failure before the swap leaves the last good copy.
        restored = await self._store.restore()
        state = restore_state(self._derivation, restored)
        self.rebuilds += 1
        if restored.meta.epoch != self.meta.epoch:
            self._rendered.clear()  # rendered from another epoch's state
        self.state, self.meta = state, restored.meta
        self.applied_id = restored.meta.applied_id
        self._loaded_version = restored.meta.version

    async def _refresh_checkpointed(self) -> None:
        """``checkpoints_only``: take a newer checkpoint whole, or the applier's state."""
        found = None
        if self._loaded_version < 0 or self.state is None:
            meta = await self._store.meta()  # a copy is restored (or shared) below
        else:
            found = await self._store.checkpoint(self.applied_id, self.meta.epoch)
            meta = found.meta
            if epoch_lost(self.meta, meta) or went_back(self.meta, meta):
                self._void(meta)
        if await self._share(meta):
            return
        if self._shared:
            applier = self._applier
            same = meta.epoch == self.meta.epoch or not self.meta.epoch  # see `born` below
            if applier is not None and applier.leader and same:
                # Mid-round (its state is ahead of its commit): what was rendered last is
                # served meanwhile (``servable``); a copy would cost a replay per busy scrape.
                return
            self._shared = False
            self._loaded_version = -1
        # A copy without an epoch is of the state before its first commit (or of one written
        # before epochs): the epoch that appears begins no new state, so the copy stays an
        # earlier committed state of it, and only a newer checkpoint replaces it.
        born = not self.meta.epoch and meta.version >= self.meta.version
        if (
            self._loaded_version < 0
            or self.state is None
            or not (meta.epoch == self.meta.epoch or born)
        ):
            await self._rebuild()
            return
        if (
            found is not None
            and found.snapshot is not None
            and parse_id(found.checkpoint_id) > parse_id(self.applied_id)
        ):
            restored = Restored(meta, found.snapshot, found.checkpoint_id, [], frozenset())
            self.state = restore_state(self._derivation, restored)
            self.applied_id = found.checkpoint_id
            self.checkpoint_loads += 1
        self.meta = meta
        self._loaded_version = meta.version

    async def _share(self, meta: StateMeta) -> bool:
        """Take the applier's state if it is the committed state of ``meta``'s version or a
        later one of the same epoch (waiting a little for a commit in flight)."""
        applier = self._applier
        if applier is None or not applier.leader:
            return False
        found = applier.committed_state()
        for _ in range(_SHARE_WAITS):
            if found is not None:
                break
            await anyio.sleep(0.001)
            found = applier.committed_state()
        if found is None or found[0].epoch != meta.epoch or found[0].version < meta.version:
            return False
        # Nothing awaits between here and the export, so the applier cannot change it meanwhile.
        if found[0].epoch != self.meta.epoch:
            self._rendered.clear()
        self.meta, self.state = found
        self.applied_id = found[0].applied_id
        self._loaded_version = found[0].version
        self._shared = True
        self.shared_refreshes += 1
        return True
