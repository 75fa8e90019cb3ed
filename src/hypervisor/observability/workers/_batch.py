"""A worker's batch step: stage, dead-letter and acknowledge the entries of one read.

:class:`BatchProcessor` is a part of :class:`~hypervisor.observability.workers._runtime.Worker`
(a mixin: the worker owns the attributes it declares). Per entry: a deleted entry is
acknowledged, one delivered too often, too long or undecodable is dead-lettered, the others
are staged for every derivation that uses them; then the letters are written, the batch is
acknowledged, and the appliers are woken (here, or in another worker through the store).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Iterable, Sequence

import anyio

from hypervisor.observability._backends.log import Entry, StreamLog
from hypervisor.observability._core.codec import decode_event, error_text
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.errors import EventDecodeError
from hypervisor.observability.workers._apply import Applier
from hypervisor.observability.workers._config import WorkerConfig, WorkerStats
from hypervisor.observability.workers._derivations import Derivation
from hypervisor.observability.workers._dlq import (
    REASON_MAX_DELIVERIES,
    REASON_OVERSIZED,
    REASON_UNDECODABLE,
    DeadLetter,
    encode_dead_letter,
)

__all__ = ["BatchProcessor"]

_log = logging.getLogger("hypervisor.observability.workers")

_MAX_REMEMBERED_ERRORS = 10_000


async def _all(calls: list[Awaitable[None]]) -> None:
    """Await the calls, concurrently when there are several (one round trip of latency)."""
    if len(calls) == 1:
        await calls[0]
    elif calls:
        try:
            async with anyio.create_task_group() as tg:
                for call in calls:
                    tg.start_soon(_await, call)
        except BaseExceptionGroup as group:  # callers handle the backend's own errors
            raise group.exceptions[0] from None


async def _await(call: Awaitable[None]) -> None:
    await call


class BatchProcessor:
    """The batch step of a worker (see the module's docstring)."""

    log: StreamLog
    dlq: StreamLog
    config: WorkerConfig
    stats: WorkerStats
    derivations: list[Derivation]
    appliers: list[Applier]
    _users_by_type: dict[EventType, tuple[int, ...]]
    _custom_users: list[int]
    _wakes: list[anyio.Event]
    _errors: dict[str, str]

    def _wake_appliers(self, indices: Iterable[int] | None = None) -> None:
        for index in range(len(self.appliers)) if indices is None else indices:
            self._wakes[index].set()
            self._wakes[index] = anyio.Event()

    async def _process_batch(self, entries: list[Entry], redelivered: bool) -> None:
        started = time.perf_counter()
        config = self.config
        stats = self.stats
        derivations = self.derivations
        counts: dict[str, int] = {}
        if redelivered:
            counts = await self.log.delivery_counts(config.group, [e.id for e in entries])
            stats.redeliveries += len(entries)
        to_ack: list[str] = []
        letters: list[DeadLetter] = []
        staged: list[list[tuple[str, bytes]]] = [[] for _ in derivations]
        # Event type -> indices of the derivations that use it, for derivations that keep the
        # default ``uses``/``prepare``; the others are asked per event.
        by_type = self._users_by_type
        custom = self._custom_users
        max_deliveries = config.max_deliveries
        max_bytes = config.max_event_bytes
        for entry in entries:
            entry_id, data = entry.id, entry.data
            if data is None:  # deleted from the log while pending: nothing to process
                stats.deleted_pending += 1
                to_ack.append(entry_id)
                continue
            deliveries = counts.get(entry_id, 1) if counts else 1
            if deliveries > max_deliveries:
                letters.append(
                    self._letter(
                        REASON_MAX_DELIVERIES,
                        entry_id,
                        data,
                        deliveries,
                        self._errors.pop(entry_id, ""),
                    )
                )
                continue
            if len(data) > max_bytes:  # never decoded: its size alone rules it out
                letters.append(
                    self._letter(
                        REASON_OVERSIZED,
                        entry_id,
                        data,
                        deliveries,
                        f"{len(data)} bytes, over the limit of {max_bytes} (--max-event-bytes)",
                    )
                )
                continue
            try:
                # Strict, as the applier decodes: an entry it would refuse is not staged.
                event = decode_event(data, strict=True)
            except EventDecodeError as exc:  # whatever the bytes, decoding raises only this
                stats.decode_errors += 1
                letters.append(
                    self._letter(REASON_UNDECODABLE, entry_id, data, deliveries, str(exc))
                )
                continue
            users: Sequence[int] = by_type.get(event.event_type, ())
            if custom:
                try:
                    users = self._custom_uses(event, users)
                except Exception as exc:  # a derivation's own code: anything at all
                    # Left pending: the sweep retries it; max_deliveries ends the retries.
                    stats.processing_errors += 1
                    if len(self._errors) >= _MAX_REMEMBERED_ERRORS:
                        self._errors.clear()
                    self._errors[entry_id] = error_text(exc)
                    continue
            for index in users:
                staged[index].append((entry_id, data))
            to_ack.append(entry_id)
        used = [index for index in range(len(derivations)) if staged[index]]
        await _all([derivations[i].store.stage(staged[i]) for i in used])
        if letters:
            await self.dlq.append_many([encode_dead_letter(letter) for letter in letters])
            for letter in letters:
                to_ack.append(letter.original_id)
                stats.dead_lettered[letter.reason] = stats.dead_lettered.get(letter.reason, 0) + 1
            _log.warning(
                "worker %s dead-lettered %d entries (%s)",
                config.consumer,
                len(letters),
                ", ".join(sorted({letter.reason for letter in letters})),
            )
        if to_ack:
            await self.log.ack(config.group, to_ack)
        stats.events += len(entries)
        stats.observe_batch(time.perf_counter() - started)
        # Wake the lease holder, after the ack that moves the watermark past these entries:
        # here directly, in another worker through the store (its listener pops it).
        appliers = self.appliers
        self._wake_appliers(i for i in used if appliers[i].leader)
        await _all([derivations[i].store.notify() for i in used if not appliers[i].leader])

    def _custom_uses(self, event: HypervisorEvent, users: Sequence[int]) -> Sequence[int]:
        """Add the derivations with their own ``uses``/``prepare`` that want ``event``."""
        found = list(users)
        for index in self._custom_users:
            derivation = self.derivations[index]
            if derivation.uses(event):
                derivation.prepare(event)
                found.append(index)
        return found

    def _letter(
        self, reason: str, entry_id: str, data: bytes, deliveries: int, error: str
    ) -> DeadLetter:
        return DeadLetter(
            reason=reason,
            original_id=entry_id,
            group=self.config.group,
            consumer=self.config.consumer,
            deliveries=deliveries,
            error=error,
            data=data,
        )
