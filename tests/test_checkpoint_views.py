"""Views that follow checkpoints (a partitioned worker's view of a partition another worker
applies), on both state stores: ``StateStore.checkpoint`` sends a snapshot only when it is newer
than the reader's copy; the view restores the exact committed state once, then folds nothing
and takes each newer checkpoint whole; it never serves an older state than it served, also
when the partition's applier in this process stops (the partition was handed over)."""

from __future__ import annotations

from typing import Any

import pytest

from hypervisor.observability._backends.memory_log import MemoryStreamLog
from hypervisor.observability._backends.state import Checkpoint
from hypervisor.observability._core.ring import RingMetricsState
from hypervisor.observability.errors import LogUnavailableError
from hypervisor.observability.workers import (
    Applier,
    Commit,
    RingMetricsDerivation,
    StateMeta,
    StateStore,
)
from hypervisor.observability.workers._snapshot import load_state
from hypervisor.observability.workers._view import SnapshotView
from manual_clock import ManualClock
from workers_support import apply_all, feed, reference, ring_events

pytestmark = pytest.mark.anyio

_EPOCH = "0123456789abcdef"


class Counting:
    """A store that counts the calls that fold or rebuild (a view following checkpoints must
    not replay redo records)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def restore(self) -> Any:
        self._count("restore")
        return await self.store.restore()

    async def replay(self, *args: Any) -> Any:
        self._count("replay")
        return await self.store.replay(*args)

    async def checkpoint(self, *args: Any) -> Checkpoint:
        found = await self.store.checkpoint(*args)
        if found.snapshot is not None:
            self._count("snapshot")
        return found


async def test_checkpoint_sends_the_snapshot_only_when_newer(store: StateStore) -> None:
    """Nothing committed: no checkpoint. A commit with a snapshot moves the checkpoint to its
    applied id; asked again with that id and epoch, the store leaves the snapshot out; a commit
    without one leaves the checkpoint where it was; another epoch gets the snapshot again."""
    empty = await store.checkpoint()
    assert (empty.meta, empty.checkpoint_id, empty.snapshot) == (StateMeta(), "0-0", None)
    await store.stage([("1-0", b"a"), ("2-0", b"b"), ("3-0", b"c")])
    assert await store.commit(Commit(0, b"snap-1", StateMeta(1, "2-0", epoch=_EPOCH)))
    first = await store.checkpoint()
    assert (first.meta.version, first.checkpoint_id, first.snapshot) == (1, "2-0", b"snap-1")
    again = await store.checkpoint("2-0", _EPOCH)
    assert (again.meta, again.checkpoint_id, again.snapshot) == (first.meta, "2-0", None)
    assert (await store.checkpoint("1-5", _EPOCH)).snapshot == b"snap-1"
    assert (await store.checkpoint("2-0", "fedcba9876543210")).snapshot == b"snap-1"
    commit = Commit(1, None, StateMeta(2, "3-0", epoch=_EPOCH), expected_epoch=_EPOCH)
    assert await store.commit(commit)
    later = await store.checkpoint("2-0", _EPOCH)
    assert (later.meta.applied_id, later.checkpoint_id, later.snapshot) == ("3-0", "2-0", None)


async def test_a_checkpoint_view_restores_once_then_takes_checkpoints_whole(
    store: StateStore,
) -> None:
    """The first refresh restores the exact committed state (checkpoint and redo records);
    commits without a checkpoint change nothing the view serves (it folds nothing: no replay,
    no snapshot sent); a newer checkpoint is taken whole, and then equals the reference."""
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    clock = ManualClock()
    applier = Applier(
        log, "g", RingMetricsDerivation(store), checkpoint_interval_s=1.0, clock=clock
    )
    events = ring_events(11, 120)
    counting = Counting(store)
    view = SnapshotView(RingMetricsDerivation(counting), checkpoints_only=True)
    clock.advance(1.0)
    await feed(log, store, events[:40])
    await apply_all(applier)  # checkpointed at 40
    await feed(log, store, events[40:60])
    await apply_all(applier)  # not checkpointed: the clock stands still
    await view.refresh()
    assert view.state.snapshot() == reference(events[:60]).ring  # exact at the start
    assert counting.calls == {"restore": 1}
    served = view.state
    for start in range(60, 100, 20):
        await feed(log, store, events[start : start + 20])
        await apply_all(applier)
        await view.refresh()
        assert view.state is served  # nothing folded, nothing fetched
        assert view.state.snapshot() == reference(events[:60]).ring
    assert view.meta == await store.meta()  # the committed meta is followed all the same
    assert counting.calls == {"restore": 1}
    clock.advance(1.0)
    await feed(log, store, events[100:])
    await apply_all(applier)  # a checkpoint at 120
    await view.refresh()
    assert view.state.snapshot() == reference(events).ring
    assert view.applied_id == (await store.meta()).applied_id
    assert counting.calls == {"restore": 1, "snapshot": 1}
    assert view.checkpoint_loads == 1
    await view.refresh()  # the same checkpoint is not sent again
    assert counting.calls == {"restore": 1, "snapshot": 1}


async def test_a_checkpoint_view_never_goes_back_after_its_applier_stops(
    store: StateStore,
) -> None:
    """While this worker applies the partition the view shares its applier's state (newer
    than the last checkpoint); when that run ends (the partition handed over) the view keeps
    that committed state as its copy instead of the older checkpoint, and takes the new
    owner's checkpoints once they are newer."""
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    clock = ManualClock()
    events = ring_events(12, 120)
    mine = Applier(
        log, "g", RingMetricsDerivation(store), token="a", checkpoint_interval_s=1.0, clock=clock
    )
    counting = Counting(store)
    view = SnapshotView(RingMetricsDerivation(counting), mine, checkpoints_only=True)
    clock.advance(1.0)
    await feed(log, store, events[:30])
    await apply_all(mine)  # checkpointed at 30
    await feed(log, store, events[30:60])
    await apply_all(mine)  # committed, not checkpointed
    await view.refresh()
    assert view.shared_refreshes == 1
    assert view.state.snapshot() == reference(events[:60]).ring
    await mine.release()
    view.follow(None)  # the run ended: handed over
    await view.refresh()
    assert view.state.snapshot() == reference(events[:60]).ring  # not the checkpoint at 30
    assert counting.calls == {}  # the applier's last committed state became the copy
    theirs = Applier(
        log, "g", RingMetricsDerivation(store), token="b", checkpoint_interval_s=1.0, clock=clock
    )
    await feed(log, store, events[60:75])
    await apply_all(theirs)  # committed, not checkpointed
    await view.refresh()
    assert view.state.snapshot() == reference(events[:60]).ring
    clock.advance(1.0)
    await feed(log, store, events[75:90])
    await apply_all(theirs)  # checkpointed at 90
    await view.refresh()
    assert view.state.snapshot() == reference(events[:90]).ring
    assert (view.checkpoint_loads, counting.calls) == (1, {"snapshot": 1})
    snapshot = (await store.checkpoint()).snapshot
    assert snapshot is not None
    loaded = load_state(snapshot)
    assert isinstance(loaded, RingMetricsState)
    assert loaded.snapshot() == reference(events[:90]).ring


async def test_a_checkpoint_view_of_a_lost_state_rebuilds(store: StateStore) -> None:
    """The state lost (a reset): the copy is void; the view restores what is stored now."""
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    applier = Applier(log, "g", RingMetricsDerivation(store), clock=ManualClock())
    await feed(log, store, ring_events(5, 30))
    await apply_all(applier)
    view = SnapshotView(RingMetricsDerivation(store), checkpoints_only=True)
    await view.refresh()
    assert view.state.snapshot() == reference(ring_events(5, 30)).ring
    await store.reset()
    await view.refresh()
    assert (view.meta, view.state_resets, view.applied_id) == (StateMeta(), 1, "0-0")
    assert view.state.snapshot() == reference([]).ring


class FailingCommits:
    """A store whose commits can be made to fail (the backend lost mid-round)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.failing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def commit(self, commit: Commit) -> bool:
        if self.failing:
            raise LogUnavailableError("commit: redis unreachable: connection closed")
        return await self.store.commit(commit)


async def test_a_checkpoint_view_waits_out_its_applier_mid_round(store: StateStore) -> None:
    """While this worker's applier holds the lease but its state is not a committed one (a
    round failed before its commit), the view restores nothing (a copy would replay the redo
    records at every busy scrape): nothing is servable meanwhile, so the last exposition is
    served; after the applier's next commit the view shares its state again."""
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    failing = FailingCommits(store)
    counting = Counting(failing)
    applier = Applier(log, "g", RingMetricsDerivation(failing), clock=ManualClock())
    view = SnapshotView(RingMetricsDerivation(counting), applier, checkpoints_only=True)
    events = ring_events(13, 60)
    await feed(log, store, events[:30])
    await apply_all(applier)
    await view.refresh()
    assert view.servable() is not None
    failing.failing = True
    await feed(log, store, events[30:])
    with pytest.raises(LogUnavailableError):
        await applier.round()
    assert applier.leader
    await view.refresh()
    assert view.servable() is None
    assert counting.calls == {}
    failing.failing = False
    await apply_all(applier)
    await view.refresh()
    assert view.servable().snapshot() == reference(events).ring
    assert counting.calls == {}


async def test_a_checkpoint_view_from_before_the_first_commit_is_not_rebuilt(
    store: StateStore,
) -> None:
    """A view that loaded the state before anything was committed (no epoch yet) keeps that
    empty copy when the first commit writes the epoch (it begins no new state: restoring
    would fold every record committed so far), and takes the first checkpoint whole."""
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    clock = ManualClock()
    applier = Applier(
        log, "g", RingMetricsDerivation(store), checkpoint_interval_s=1.0, clock=clock
    )
    counting = Counting(store)
    view = SnapshotView(RingMetricsDerivation(counting), checkpoints_only=True)
    await view.refresh()
    assert counting.calls == {"restore": 1}
    events = ring_events(14, 80)
    await feed(log, store, events[:40])
    await apply_all(applier)  # the first commit: the epoch appears, no checkpoint yet
    await view.refresh()
    assert (await store.meta()).epoch
    assert view.state.snapshot() == reference([]).ring
    assert counting.calls == {"restore": 1}
    clock.advance(1.0)
    await feed(log, store, events[40:])
    await apply_all(applier)
    await view.refresh()
    assert view.state.snapshot() == reference(events).ring
    assert counting.calls == {"restore": 1, "snapshot": 1}
