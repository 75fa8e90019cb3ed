"""The state epoch, on both state stores: the first commit of a state writes a random epoch, a
commit or replay of another epoch is refused, and an applier or metrics view holding a copy of
a state Redis has lost rebuilds from scratch instead of comparing versions across epochs. And
a view never lets a failed refresh replace its last good copy."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from hypervisor.observability._backends.memory_log import MemoryStreamLog
from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
from hypervisor.observability._backends.state import Restored
from hypervisor.observability.errors import LogUnavailableError, WorkerStateError
from hypervisor.observability.workers import (
    Applier,
    Commit,
    RingMetricsDerivation,
    StateMeta,
    StateStore,
)
from hypervisor.observability.workers._view import SnapshotView
from manual_clock import ManualClock
from redis_server import RedisServer
from workers_support import apply_all, feed, reference, ring_events

pytestmark = pytest.mark.anyio

_EPOCH = "0123456789abcdef"


# Every applier here runs on a clock that does not move, so when checkpoints are due (and how
# many commits a round makes) never depends on the machine's speed.


async def test_the_first_commit_writes_the_epoch_and_later_ones_must_match(
    store: StateStore,
) -> None:
    """A fresh store has no epoch; the first commit writes its meta's; a commit expecting
    another epoch is refused even at the right version; lease rounds and the meta report it;
    a reset forgets it (version 0, no epoch)."""
    assert (await store.meta()).epoch == ""
    await store.stage([("1-0", b"a"), ("2-0", b"b")])
    assert await store.commit(Commit(0, None, StateMeta(1, "1-0", epoch=_EPOCH)))
    assert (await store.meta()).epoch == _EPOCH
    assert await store.lease_round("t", 5.0) == StateMeta(1, "1-0", epoch=_EPOCH)
    other = "fedcba9876543210"
    assert not await store.commit(
        Commit(1, None, StateMeta(2, "2-0", epoch=other), expected_epoch=other)
    )
    assert not await store.commit(Commit(1, None, StateMeta(2, "2-0", epoch=other)))
    assert await store.commit(
        Commit(1, b"snap", StateMeta(2, "2-0", epoch=_EPOCH), expected_epoch=_EPOCH)
    )
    assert await store.load() == (StateMeta(2, "2-0", epoch=_EPOCH), b"snap")
    await store.reset()
    assert await store.meta() == StateMeta()
    assert await store.lease_round("t", 5.0) == StateMeta()


async def test_replay_of_another_epoch_is_refused(store: StateStore) -> None:
    """A replay asked for an epoch that is not the stored one returns ``None`` (rebuild),
    so records of a new state are never folded into a copy of a lost one."""
    await store.stage([("1-0", b"a"), ("2-0", b"b")])
    assert await store.commit(Commit(0, None, StateMeta(1, "2-0", epoch=_EPOCH)))
    assert await store.replay("1-0", "2-0", _EPOCH) == ([("2-0", b"b")], frozenset())
    assert await store.replay("1-0", "2-0") == ([("2-0", b"b")], frozenset())
    assert await store.replay("1-0", "2-0", "fedcba9876543210") is None
    assert await store.replay("1-0", "2-0", "") is None


async def test_a_lost_state_at_the_same_version_is_never_taken_for_current(
    store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    """An applier and a view hold a copy at version 3 of one epoch; the state is lost and
    another applier commits a new state up to version 3 again. Both rebuild (they compare
    epochs, not versions), equal the reference over the events after the loss, count the reset
    and log it at WARNING."""
    caplog.set_level(logging.WARNING, logger="hypervisor.observability.workers")
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    before, after = ring_events(3, 60), ring_events(4, 60)
    first = Applier(
        log,
        "g",
        RingMetricsDerivation(store),
        token="a",
        checkpoint_interval_s=0,
        clock=ManualClock(),
    )
    view = SnapshotView(RingMetricsDerivation(store))
    for start in range(0, 60, 20):
        await feed(log, store, before[start : start + 20])
        await apply_all(first)
    await view.refresh()
    old = await store.meta()
    assert (old.version, view.meta) == (3, old)
    assert old.epoch
    await store.reset()  # what FLUSHALL, a restart without persistence or --reset-state do
    second = Applier(
        log,
        "g",
        RingMetricsDerivation(store),
        token="b",
        checkpoint_interval_s=0,
        clock=ManualClock(),
    )
    for start in range(0, 60, 20):
        await feed(log, store, after[start : start + 20])
        await apply_all(second)
    new = await store.meta()
    assert new.version == old.version
    assert new.epoch not in ("", old.epoch)
    await view.refresh()
    assert view.meta == new
    assert view.state.snapshot() == reference(after).ring
    assert view.state_resets == 1
    await second.release()
    assert await first.round() == 0  # takes the lease, rebuilds, nothing left to apply
    assert first.state.snapshot() == reference(after).ring
    assert first.state_resets == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("state epoch changed" in m for m in warned) == 2


async def test_a_view_of_a_vanished_meta_rebuilds_empty(store: StateStore) -> None:
    """A view whose state's meta is gone (nothing committed since the loss) drops its copy:
    it serves the empty state that is now stored, not the old numbers as current."""
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    applier = Applier(log, "g", RingMetricsDerivation(store), clock=ManualClock())
    await feed(log, store, ring_events(5, 30))
    await apply_all(applier)
    view = SnapshotView(RingMetricsDerivation(store))
    await view.refresh()
    assert view.state.snapshot() == reference(ring_events(5, 30)).ring
    await store.reset()
    await view.refresh()
    assert (view.meta, view.state_resets) == (StateMeta(), 1)
    assert view.state.snapshot() == reference([]).ring


class _Failing:
    """A store whose restore and replay fail (the backend went away mid-rebuild)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.failing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def restore(self) -> Restored:
        if self.failing:
            raise LogUnavailableError("restore state: redis unreachable")
        return await self.store.restore()

    async def replay(self, *args: Any) -> Any:
        if self.failing:
            raise LogUnavailableError("replay state: redis unreachable")
        return await self.store.replay(*args)


async def test_a_failed_rebuild_keeps_the_last_good_copy(store: StateStore) -> None:
    """A refresh that fails after the meta read (the rebuild's restore) leaves the last good
    copy and its meta in place, servable, and the view stale; the next refresh that succeeds
    brings it up to date and clears the staleness."""
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    events = ring_events(6, 80)
    applier = Applier(
        log, "g", RingMetricsDerivation(store), checkpoint_interval_s=0, clock=ManualClock()
    )
    failing = _Failing(store)
    view = SnapshotView(RingMetricsDerivation(failing))
    await feed(log, store, events[:40])
    await apply_all(applier)
    await view.refresh()
    good, meta = view.state.snapshot(), view.meta
    await feed(log, store, events[40:])
    await apply_all(applier)
    failing.failing = True
    for _ in range(2):
        with pytest.raises(LogUnavailableError):
            await view.refresh()
    assert (view.stale, view.refresh_failures, view.meta) == (True, 2, meta)
    assert view.servable() is view.state
    assert view.state.snapshot() == good == reference(events[:40]).ring
    failing.failing = False
    await view.refresh()
    assert not view.stale
    assert view.state.snapshot() == reference(events).ring


@pytest.mark.redis
async def test_a_meta_written_before_epochs_gets_one_without_a_reset(
    redis_server: RedisServer,
) -> None:
    """A meta without an epoch (written before epochs existed) reads as epoch ``""``; the next
    commit of an applier writes one, and a view of the old meta rebuilds once without counting
    a reset. An epoch field that no commit wrote is unreadable state."""
    prefix = state_prefix(f"t{uuid.uuid4().hex[:8]}", "g", "ring")
    events = ring_events(7, 40)
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    async with (
        RedisStateStore(redis_server.url, prefix) as store,
        aioredis.Redis.from_url(redis_server.url) as client,
    ):
        applier = Applier(log, "g", RingMetricsDerivation(store), clock=ManualClock())
        await feed(log, store, events[:20])
        await apply_all(applier)
        await client.hdel(f"{prefix}:meta", "epoch")
        view = SnapshotView(RingMetricsDerivation(store))
        await view.refresh()
        assert view.meta.epoch == ""
        applier.invalidate()
        await feed(log, store, events[20:])
        await apply_all(applier)
        assert (await store.meta()).epoch != ""
        await view.refresh()
        assert (view.state_resets, view.meta) == (0, await store.meta())
        assert view.state.snapshot() == reference(events).ring
        await client.hset(f"{prefix}:meta", "epoch", "not-an-epoch")
        with pytest.raises(WorkerStateError, match="epoch"):
            await store.meta()
        await store.reset()


async def _keys(client: aioredis.Redis, prefix: str) -> dict[bytes, bytes]:
    """A copy of a derivation's keys (not the lease), as an append-only file would hold."""
    dumped: dict[bytes, bytes] = {}
    async for key in client.scan_iter(match=f"{prefix}:*"):
        value = await client.dump(key)
        if value is not None and not key.endswith(b":lease"):
            dumped[key] = value
    return dumped


async def _put_back(client: aioredis.Redis, prefix: str, dumped: dict[bytes, bytes]) -> None:
    """Replace a derivation's keys by an older copy (Redis restarted from an older file)."""
    async for key in client.scan_iter(match=f"{prefix}:*"):
        await client.delete(key)
    for key, value in dumped.items():
        await client.restore(key, 0, value)


@pytest.mark.redis
async def test_a_state_that_went_back_to_an_older_copy_is_rebuilt(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarts from an older copy of the state (same epoch, version 1) after a view and
    an applier held version 2; another applier commits other records up to version 2 again.
    The view and the applier see the same version at another applied id, rebuild (counted,
    logged), and equal the reference over what the stored state now holds."""
    caplog.set_level(logging.WARNING, logger="hypervisor.observability.workers")
    prefix = state_prefix(f"t{uuid.uuid4().hex[:8]}", "g", "ring")
    first, lost, other = ring_events(8, 30), ring_events(9, 30), ring_events(10, 40)
    log = MemoryStreamLog("events")
    await log.ensure_group("g", "0")
    async with (
        RedisStateStore(redis_server.url, prefix) as store,
        aioredis.Redis.from_url(redis_server.url) as client,
    ):
        applier = Applier(log, "g", RingMetricsDerivation(store), token="a", clock=ManualClock())
        view = SnapshotView(RingMetricsDerivation(store))
        await feed(log, store, first)
        await apply_all(applier)
        older = await _keys(client, prefix)
        await feed(log, store, lost)
        await apply_all(applier)
        await view.refresh()
        held = view.meta
        assert held.version == 2
        await _put_back(client, prefix, older)
        await applier.release()
        another = Applier(log, "g", RingMetricsDerivation(store), token="b", clock=ManualClock())
        await feed(log, store, other)
        await apply_all(another)
        now = await store.meta()
        assert (now.version, now.epoch) == (held.version, held.epoch)
        assert now.applied_id != held.applied_id
        await view.refresh()
        assert (view.meta, view.state_resets) == (now, 1)
        assert view.state.snapshot() == reference(first + other).ring
        await another.release()
        assert await applier.round() == 0
        assert applier.state.snapshot() == reference(first + other).ring
        assert applier.state_resets == 1
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("went back from version 2" in m for m in warned) == 2
        await store.reset()
