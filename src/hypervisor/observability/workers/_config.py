"""A worker's settings (``WorkerConfig``) and what it counts (``WorkerStats``)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from hypervisor.observability._core.codec import DEFAULT_MAX_EVENT_BYTES

__all__ = [
    "BATCH_BUCKETS",
    "DEFAULT_DRAIN_TIMEOUT_S",
    "WorkerConfig",
    "WorkerStats",
    "default_consumer_name",
]

BATCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds (seconds) of the batch latency histogram."""
DEFAULT_DRAIN_TIMEOUT_S = 3.0
"""The default longest drain after a stop (``WorkerConfig.drain_timeout_s``)."""


def default_consumer_name() -> str:
    """Return ``<hostname>``: stable across restarts on one host (pass your own per worker)."""
    return socket.gethostname()


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How a worker consumes its group.

    Attributes:
        group: the consumer group.
        consumer: this worker's consumer name; keep it stable across restarts so the worker
            finds its own pending entries.
        batch_size: entries per read.
        block_s: longest wait of one blocking read.
        start_id: where a new group starts (``"0"``: everything retained; ``"$"``: new only).
        claim_interval_s: time between claim sweeps.
        claim_min_idle_s: an entry pending this long on any consumer is claimed.
        max_deliveries: deliveries after which an entry is dead-lettered.
        max_event_bytes: a longer entry is dead-lettered (``oversized``) without being decoded,
            by the worker and by the applier; give every worker of a group the same value.
        apply_interval_s: the fallback poll of an applier between rounds (wake-ups come at
            once); doubled after each idle round, up to a second (a quarter of the lease time).
        coalesce_s: how long a worker lets entries gather before its next read (after a read
            of fewer than a quarter of ``batch_size``: a trickle, not a backlog) and before its
            next apply round (after a round that applied fewer than ``batch_size``): fewer,
            larger batches and
            rounds under load, at the cost of up to about twice this in latency. 0 (the
            default) turns it off; ``hvobs worker --partitions N`` uses 50 ms.
        max_apply_batch: staged entries applied per round at most.
        checkpoint_interval_s: shortest time between snapshots of the state (in between, the
            staged entries since the last snapshot are the committed state's redo log).
        lease_ttl_s: applier lease time to live.
        dedup_window: event ids remembered to drop duplicate appends.
        max_pending_age_s: health threshold: pending entries older than this mean "behind".
        retry_max_s: longest back-off between retries when the backend is unreachable.
        drain_timeout_s: after :meth:`Worker.stop`, the longest time the drain (the batch in
            hand, a last apply round, releasing the lease) may take; what it could not finish
            stays pending in the group and is taken up at the next start (or by another
            worker), so a hung or lost Redis never keeps a stopped worker alive.
    """

    group: str
    consumer: str = field(default_factory=default_consumer_name)
    batch_size: int = 500
    block_s: float = 2.0
    start_id: str = "0"
    claim_interval_s: float = 5.0
    claim_min_idle_s: float = 30.0
    max_deliveries: int = 5
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    apply_interval_s: float = 0.005
    coalesce_s: float = 0.0
    max_apply_batch: int = 20_000
    checkpoint_interval_s: float = 1.0
    lease_ttl_s: float = 5.0
    dedup_window: int = 100_000
    max_pending_age_s: float = 60.0
    retry_max_s: float = 5.0
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S


@dataclass(slots=True)
class WorkerStats:
    """What one worker did (counters) and last saw of its group (gauges)."""

    events: int = 0
    batches: int = 0
    redeliveries: int = 0
    claimed: int = 0
    deleted_pending: int = 0
    decode_errors: int = 0
    processing_errors: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    group_recreated: int = 0
    backend_errors: int = 0
    gap_entries: int = 0
    batch_buckets: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BUCKETS) + 1))
    batch_seconds_sum: float = 0.0
    lag: int | None = None
    pending: int = 0
    oldest_pending_age_s: float = 0.0
    last_refresh: float = 0.0

    def observe_batch(self, seconds: float) -> None:
        """Record one batch's latency."""
        self.batches += 1
        self.batch_seconds_sum += seconds
        for index, bound in enumerate(BATCH_BUCKETS):
            if seconds <= bound:
                self.batch_buckets[index] += 1
                return
        self.batch_buckets[-1] += 1
