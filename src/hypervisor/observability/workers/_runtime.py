"""The worker runtime: consumer-group reading, staging, acknowledging, claiming, dead letters.

A :class:`Worker` runs on any ``StreamLog`` (Redis or in memory) and hosts one or more
derivations on one consumer group. Tasks: the consume loop (own pending entries first, then new
ones), the claim sweep (XAUTOCLAIM of entries idle on dead consumers), and one apply loop per
derivation (see ``_apply``). ``stop()`` drains: no new read, the batch in hand is finished and
acknowledged, a last apply round runs, the lease is released; all of it within
``drain_timeout_s`` (every shielded section gets that deadline at the stop), so a stop ends the
worker whatever the backend does. A refusal that retrying cannot fix (``LogPermanentError``,
``PermissionDeniedError``) is never retried: it stops the worker and leaves :meth:`Worker.run`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager

import anyio

from hypervisor.observability._backends.log import (
    MIN_ID,
    Entry,
    LogError,
    LogGroupMissingError,
    StreamLog,
)
from hypervisor.observability._core.events import EventType
from hypervisor.observability._util.aio import AsyncResource
from hypervisor.observability._util.retry import Backoff
from hypervisor.observability.errors import (
    LogPermanentError,
    PermissionDeniedError,
    WorkerStateError,
)
from hypervisor.observability.workers._apply import Applier
from hypervisor.observability.workers._batch import BatchProcessor
from hypervisor.observability.workers._config import (
    BATCH_BUCKETS,
    WorkerConfig,
    WorkerStats,
    default_consumer_name,
)
from hypervisor.observability.workers._derivations import Derivation
from hypervisor.observability.workers._dlq import (
    dlq_name,
)
from hypervisor.observability.workers._gaps import GroupGaps

__all__ = ["BATCH_BUCKETS", "Worker", "WorkerConfig", "WorkerStats", "default_consumer_name"]

_log = logging.getLogger("hypervisor.observability.workers")

_RETRY_BASE_S = 0.05
"""Upper bound of the first backoff after a backend error; doubles up to ``retry_max_s``."""
_IDLE_APPLY_MAX_S = 1.0
"""The longest fallback poll of an idle applier (wake-ups end every wait at once; a quarter
of the lease time at most)."""
_LISTEN_IDLE_S = 0.1
"""How often a listener checks whether its applier took the lease."""
_LISTEN_BLOCK_S = 1.0
"""A listener's blocking pop (a notification ends it at once; an idle one costs a round trip
a second)."""
_QUIET_S = 0.25
"""A read that waited this long for its entries ends a quiet spell: no coalescing after it."""

_PERMANENT = (LogPermanentError, PermissionDeniedError)
"""Refusals no loop retries: they stop the worker (the CLI exits with status 78)."""


class Worker(AsyncResource, BatchProcessor):
    """Runs derivations on a consumer group of a ``StreamLog``.

    Args:
        log: the event log.
        derivations: what to compute; each has its own state store.
        config: group, consumer name and tuning.
        dlq: the dead-letter log (``<log name>:dlq`` in memory by default; pass a Redis log
            for a Redis deployment).
        stats: where to count (a new ``WorkerStats`` by default; a partitioned worker passes
            one per partition that outlives the partition's successive runs).

    Use as an async context manager and ``await run()``; call :meth:`stop` (or send SIGTERM to
    the CLI) to drain and return.
    """

    def __init__(
        self,
        log: StreamLog,
        derivations: Sequence[Derivation],
        config: WorkerConfig,
        *,
        dlq: StreamLog | None = None,
        stats: WorkerStats | None = None,
    ) -> None:
        if not derivations:
            raise ValueError("a worker needs at least one derivation")
        self.log = log
        self.derivations = list(derivations)
        self.config = config
        if dlq is None:
            from hypervisor.observability._backends.memory_log import MemoryStreamLog

            dlq = MemoryStreamLog(dlq_name(log.name))
        self.dlq = dlq
        token = f"{config.consumer}:{os.getpid()}:{os.urandom(4).hex()}"
        self.stats = WorkerStats() if stats is None else stats
        self.gaps = GroupGaps(log, config.group)
        """Entries trimmed before the group read them (``_gaps.py``)."""
        self.appliers = [
            Applier(
                log,
                config.group,
                derivation,
                token=f"{token}:{derivation.name}",
                lease_ttl_s=config.lease_ttl_s,
                max_batch=config.max_apply_batch,
                dedup_window=config.dedup_window,
                checkpoint_interval_s=config.checkpoint_interval_s,
                dlq=dlq,
                consumer=config.consumer,
                max_event_bytes=config.max_event_bytes,
                dead_lettered=self.stats.dead_lettered,
            )
            for derivation in self.derivations
        ]
        self._users_by_type: dict[EventType, tuple[int, ...]] = {}
        self._custom_users: list[int] = []
        for index, derivation in enumerate(self.derivations):
            kind = type(derivation)
            if kind.uses is Derivation.uses and kind.prepare is Derivation.prepare:
                for event_type in derivation.event_types:
                    found = self._users_by_type.get(event_type, ())
                    self._users_by_type[event_type] = (*found, index)
            else:
                self._custom_users.append(index)
        self.connected = False
        """Whether the last backend call succeeded."""
        self.server_version: tuple[int, int, int] | None = None
        self.ready = anyio.Event()
        """Set once the group exists and the worker's own pending entries were re-read."""
        self.stopped = anyio.Event()
        """Set when :meth:`run` has drained and returned."""
        self._stop = anyio.Event()
        self._retry_backoff = Backoff(_RETRY_BASE_S, config.retry_max_s)
        self._consume_done = anyio.Event()
        self._wakes = [anyio.Event() for _ in self.appliers]
        self._read_scope: anyio.CancelScope | None = None
        self._reread_own = True
        self._backlog = False
        """Whether the last read was a full batch (no coalescing then)."""
        self._errors: dict[str, str] = {}
        self._deadline = math.inf
        """When the drain must end (``anyio.current_time()`` clock); set by :meth:`stop`."""
        self._run_scope: anyio.CancelScope | None = None
        self._shields: set[anyio.CancelScope] = set()

    async def aclose(self) -> None:
        """Stop (if running) and release the leases, within ``drain_timeout_s`` of the stop.
        Does not close the logs or stores."""
        self.stop()
        with self._shielded():
            for applier in self.appliers:
                try:
                    await applier.release()
                except (LogError, WorkerStateError, PermissionDeniedError) as exc:
                    _log.debug("releasing the applier lease: %s", exc)

    def stop(self) -> None:
        """Ask the worker to drain and return from :meth:`run` within ``drain_timeout_s``;
        safe to call many times (the first call sets the deadline). Call it from the worker's
        event loop."""
        self._stop.set()
        if self._read_scope is not None:
            # Only the blocking read is cancelled: anything it had delivered stays pending on
            # this consumer and is re-read on the next start.
            self._read_scope.cancel()
        if self._deadline == math.inf:
            try:
                now = anyio.current_time()
            except RuntimeError:  # not in an event loop: run() never started, nothing to bound
                return
            self._deadline = now + self.config.drain_timeout_s
            # Shielded sections (a batch, the drain, the lease release) ignore the cancellation
            # of the run but not a deadline of their own: a hung backend cannot hold them.
            for scope in (*self._shields, self._run_scope):
                if scope is not None:
                    scope.deadline = min(scope.deadline, self._deadline)

    @contextmanager
    def _shielded(self) -> Iterator[anyio.CancelScope]:
        """A shielded cancel scope that still ends at the stop's drain deadline."""
        scope = anyio.CancelScope(shield=True, deadline=self._deadline)
        self._shields.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._shields.discard(scope)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    async def _backoff(self, attempt: int) -> None:
        await self._retry_backoff.wait(attempt, stop=self._stop)

    async def _ensure_group(self) -> None:
        if await self.log.ensure_group(self.config.group, self.config.start_id):
            _log.info("created consumer group %r on %r", self.config.group, self.log.name)

    async def _start(self) -> None:
        attempt = 0
        while not self.stopping:
            try:
                self.server_version = await self.log.server_version()
                await self._ensure_group()
                await self.check_gaps()
            except _PERMANENT:
                raise
            except LogError as exc:
                self.stats.backend_errors += 1
                _log.warning("worker start: %s; retrying", exc)
                await self._backoff(attempt)
                attempt += 1
                continue
            self.connected = True
            _log.info(
                "worker %s on %s/%s, server %s",
                self.config.consumer,
                self.log.name,
                self.config.group,
                ".".join(map(str, self.server_version)),
            )
            return

    async def run(self) -> None:
        """Consume, stage, acknowledge and apply until :meth:`stop`; then drain and return.

        The drain takes at most ``config.drain_timeout_s``: what it could not finish stays
        pending in the group (logged) and is taken up at the next start.

        Raises:
            LogPermanentError: the backend refused for good (credentials, database, TLS).
            PermissionDeniedError: an ACL refused a command to the worker's user.
        """
        try:
            with anyio.CancelScope(deadline=self._deadline) as scope:
                self._run_scope = scope
                try:
                    await self._start()
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._guarded, self._consume_loop)
                        tg.start_soon(self._guarded, self._sweep_loop)
                        for index in range(len(self.appliers)):
                            tg.start_soon(self._guarded, self._apply_loop, index)
                except BaseException:
                    self.stop()  # a failure ends the run as a stop does: drained, bounded
                    raise
            if scope.cancelled_caught and self.server_version is None:
                _log.info("worker %s stopped before it reached Redis", self.config.consumer)
            elif scope.cancelled_caught:
                _log.warning(
                    "worker %s: the drain took longer than %g s and was cut short; what it "
                    "had not acknowledged stays pending and is taken up at the next start",
                    self.config.consumer,
                    self.config.drain_timeout_s,
                )
        finally:
            self._run_scope = None
            self.stopped.set()

    async def _guarded(self, loop: Callable[..., Awaitable[None]], *args: int) -> None:
        """Run one of the worker's loops; its failure stops the others (bounded drain)."""
        try:
            await loop(*args)
        except BaseException:
            # Before the task group cancels the other loops: their shielded sections (a
            # batch, the lease release) then get the drain deadline when they start.
            self.stop()
            raise

    # -- consuming -----------------------------------------------------------------------------

    async def _recreate_group(self) -> None:
        self.stats.group_recreated += 1
        _log.warning(
            "consumer group %r of %r is gone (stream flushed, evicted or lost); recreating it: "
            "entries appended meanwhile may be lost",
            self.config.group,
            self.log.name,
        )
        await self._ensure_group()

    async def _consume_loop(self) -> None:
        config = self.config
        attempt = 0
        try:
            while not self.stopping:
                try:
                    if self._reread_own:
                        entries = await self.log.read_group(
                            config.group, config.consumer, config.batch_size, pending=True
                        )
                        if not entries:
                            self._reread_own = False
                            self.ready.set()
                            continue
                        await self._process(entries, redelivered=True)
                    else:
                        entries = []
                        asked = anyio.current_time()
                        with anyio.CancelScope() as scope:
                            self._read_scope = scope
                            if not self.stopping:
                                entries = await self.log.read_group(
                                    config.group, config.consumer, config.batch_size, config.block_s
                                )
                        self._read_scope = None
                        waited = anyio.current_time() - asked
                        # A full read: a backlog, which is read and applied without waits.
                        self._backlog = len(entries) >= config.batch_size
                        if entries:
                            await self._process(entries, redelivered=False)
                            if self._trickle(len(entries), waited):
                                # Let entries gather into the next read (a round trip per few
                                # entries costs more than the wait).
                                with anyio.move_on_after(config.coalesce_s):
                                    await self._stop.wait()
                    self.connected = True
                    attempt = 0
                except LogGroupMissingError:
                    await self._recovering(self._recreate_group)
                    self._reread_own = True
                except _PERMANENT:
                    raise
                except WorkerStateError:
                    # A state key of the wrong type refused the batch (the store reported it):
                    # the batch stays pending and is retried after a back-off.
                    self._read_scope = None
                    self._reread_own = True
                    await self._backoff(attempt)
                    attempt += 1
                except LogError as exc:
                    self._read_scope = None
                    self.connected = False
                    self.stats.backend_errors += 1
                    self._reread_own = True
                    _log.warning("worker %s: %s; backing off", config.consumer, exc)
                    await self._backoff(attempt)
                    attempt += 1
            if self.stopping:
                await self._drain_own()
        finally:
            self._consume_done.set()
            self._wake_appliers()

    def _trickle(self, count: int, seconds: float) -> bool:
        """Whether a read of ``count`` entries that took ``seconds`` is part of a trickle
        worth coalescing: a small read that did not wait long for its entries (the first
        entries after a quiet spell of ``_QUIET_S`` or more come back from a long block, and
        the rest of their burst is read at once)."""
        if not self.config.coalesce_s or count >= self.config.batch_size // 4:
            return False
        return seconds < _QUIET_S

    async def _drain_own(self) -> None:
        """Process what the cancelled read had delivered, so nothing stays pending here (until
        the drain deadline: then the rest stays pending for the next start)."""
        with self._shielded():
            for _ in range(self.config.max_deliveries + 1):
                try:
                    entries = await self.log.read_group(
                        self.config.group,
                        self.config.consumer,
                        self.config.batch_size,
                        pending=True,
                    )
                    if not entries:
                        return
                    await self._process(entries, redelivered=True)
                except (LogError, WorkerStateError, PermissionDeniedError) as exc:
                    _log.warning("draining own pending entries: %s", exc)
                    return

    async def _recovering(self, action: Callable[[], Awaitable[None]]) -> None:
        try:
            await action()
        except _PERMANENT:
            raise
        except LogError as exc:
            self.connected = False
            self.stats.backend_errors += 1
            _log.warning("worker %s: %s", self.config.consumer, exc)
            await self._backoff(3)

    async def _process(self, entries: list[Entry], *, redelivered: bool) -> None:
        """Stage, dead-letter and acknowledge one batch (shielded: a batch is never half done,
        unless the drain deadline passes: then it stays pending and is redelivered)."""
        with self._shielded():
            await self._process_batch(entries, redelivered)

    # -- claiming ------------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Claim and process entries idle on any consumer; return how many were claimed."""
        config = self.config
        start = MIN_ID
        claimed = 0
        while not self.stopping:
            result = await self.log.claim_idle(
                config.group,
                config.consumer,
                config.claim_min_idle_s,
                config.batch_size,
                start,
            )
            self.stats.deleted_pending += len(result.deleted_ids)
            if result.entries:
                claimed += len(result.entries)
                self.stats.claimed += len(result.entries)
                await self._process(result.entries, redelivered=True)
            start = result.next_start_id
            if start == MIN_ID:
                break
        return claimed

    async def _sweep_loop(self) -> None:
        # Sweep once the own pending entries were re-read; a stop may come first (a SIGTERM
        # right after start), and then ready is never set.
        async with anyio.create_task_group() as waiting:

            async def stop_waiting() -> None:
                await self._stop.wait()
                waiting.cancel_scope.cancel()

            waiting.start_soon(stop_waiting)
            await self.ready.wait()
            waiting.cancel_scope.cancel()
        while not self.stopping:
            with anyio.move_on_after(self.config.claim_interval_s):
                await self._stop.wait()
            if self.stopping:
                return
            try:
                await self.sweep()
                await self.check_gaps()
            except LogGroupMissingError:
                await self._recovering(self._recreate_group)
            except _PERMANENT:
                raise
            except LogError as exc:
                self.stats.backend_errors += 1
                _log.warning("claim sweep failed: %s", exc)
            except WorkerStateError as exc:  # reported by the store; the entries stay pending
                _log.debug("claim sweep: %s", exc)

    # -- applying ------------------------------------------------------------------------------

    async def _apply_loop(self, index: int) -> None:
        applier = self.appliers[index]
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._listen, index)
                await self._apply_rounds(index)
                tg.cancel_scope.cancel()
        finally:
            with self._shielded():
                try:
                    await applier.release()
                except (LogError, WorkerStateError, PermissionDeniedError) as exc:
                    _log.debug("releasing the applier lease: %s", exc)

    async def _listen(self, index: int) -> None:
        """While this worker holds the lease, turn other workers' notifications into wake-ups
        of its applier (a short blocking pop, so a lost lease stops listening soon)."""
        applier = self.appliers[index]
        interval = self.config.apply_interval_s
        while True:
            if not applier.leader:
                await anyio.sleep(max(interval, _LISTEN_IDLE_S))
                continue
            try:
                if await applier.store.wait_notified(_LISTEN_BLOCK_S):
                    self._wake_appliers((index,))
            except _PERMANENT:
                raise
            except (LogError, WorkerStateError) as exc:
                _log.debug("waiting for staged entries: %s", exc)
                await anyio.sleep(interval)

    async def _apply_rounds(self, index: int) -> None:
        """Apply rounds until the drain is done: at once after a full round, ``coalesce_s``
        after a round that applied fewer than a read's ``batch_size`` while the reads are not
        full (a trickle: what is staged meanwhile goes into the next one),
        else on a wake-up (this worker's batches, other workers' notifications) or after
        ``apply_interval_s``, doubled after each idle round up to ``_IDLE_APPLY_MAX_S`` (a
        quarter of the lease time at most, so a held lease is extended in time): the fallback
        poll of an idle applier costs a few round trips a second, not hundreds."""
        applier = self.appliers[index]
        attempt = 0
        final_errors = 0
        interval = self.config.apply_interval_s
        ceiling = max(interval, min(_IDLE_APPLY_MAX_S, self.config.lease_ttl_s / 4))
        idle_s = interval
        while True:
            draining = self._consume_done.is_set()
            applier.final = draining
            wake = self._wakes[index]
            try:
                applied = await applier.round()
                attempt = 0
            except _PERMANENT:
                raise  # retrying cannot help: the refusal stops the worker
            except WorkerStateError as exc:
                # Unreadable state, reported once by the store: nothing is applied until it
                # reads again (repaired, or reset), retried after a back-off.
                applied = -1
                _log.debug("%s apply round: %s", applier.derivation.name, exc)
            except LogError as exc:
                applied = -1
                self.stats.backend_errors += 1
                _log.warning("%s apply round failed: %s", applier.derivation.name, exc)
            except Exception:
                applied = -1
                _log.exception("%s apply round failed (export)", applier.derivation.name)
            if applied < 0:
                final_errors += draining
                if final_errors > 3:
                    return
                await self._backoff(attempt)
                attempt += 1
                continue
            if draining and applied == 0:
                return
            if applied >= applier.max_batch:
                continue
            coalesce = self.config.coalesce_s and not self._backlog and not draining
            if coalesce and 0 < applied < self.config.batch_size:
                # A trickle, not a backlog: what is staged meanwhile goes into the next round.
                # (In a backlog the rounds keep the CPU busy while the reads wait on Redis.)
                await anyio.sleep(self.config.coalesce_s)
                continue
            idle_s = min(idle_s * 2, ceiling) if applied == 0 else interval
            with anyio.move_on_after(idle_s if applied == 0 else interval):
                await wake.wait()

    # -- health --------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Refresh the group gauges (lag, pending, oldest pending age) from the log."""
        stats = self.stats
        try:
            for info in await self.log.group_info():
                if info.name == self.config.group:
                    stats.lag = info.lag
                    break
            summary = await self.log.pending_summary(self.config.group)
            await self.check_gaps()
        except LogError:
            self.connected = False
            raise
        stats.pending = summary.count
        stats.oldest_pending_age_s = summary.oldest_idle_s
        stats.last_refresh = time.time()
        self.connected = True

    async def check_gaps(self) -> int:
        """Count entries trimmed before the group read them (``stats.gap_entries``, logged);
        return how many this check found."""
        found = await self.gaps.check()
        self.stats.gap_entries = self.gaps.entries
        return found

    @property
    def keeping_up(self) -> bool:
        """Whether the oldest pending entry is younger than ``max_pending_age_s``."""
        return self.stats.oldest_pending_age_s <= self.config.max_pending_age_s
