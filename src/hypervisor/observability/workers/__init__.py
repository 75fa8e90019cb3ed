"""Consumer-group workers for ring metrics and saga spans, exact at any scale.

Workers read a consumer group of the event log in batches, stage the entries their derivation
uses, acknowledge them, and one applier at a time folds the staged entries into the shared state
in stream order (see ``docs/workers.md``). The same pure state machines as the in-process
collector and exporter do the folding, so the results are equal for any number of workers,
crashes and redeliveries.
"""

from __future__ import annotations

from hypervisor.observability._backends.state import (
    Commit,
    MemoryStateStore,
    StateMeta,
    StateStore,
)
from hypervisor.observability._core.ring import RingBounds
from hypervisor.observability.errors import WorkerStateError
from hypervisor.observability.workers._apply import Applier, watermark
from hypervisor.observability.workers._derivations import (
    AGENT_SPANS,
    RING_METRICS,
    SAGA_SPANS,
    AgentSpansDerivation,
    Derivation,
    RingMetricsDerivation,
    SagaSpansDerivation,
)
from hypervisor.observability.workers._dlq import (
    REASON_APPLY_ERROR,
    REASON_MAX_DELIVERIES,
    REASON_OVERSIZED,
    REASON_UNDECODABLE,
    DeadLetter,
    decode_dead_letter,
    dlq_name,
    list_dead_letters,
    replay_dead_letters,
)
from hypervisor.observability.workers._partitioned import (
    Partition,
    PartitionedWorker,
    WorkerRegistry,
    assign_partitions,
)
from hypervisor.observability.workers._runtime import (
    Worker,
    WorkerConfig,
    WorkerStats,
    default_consumer_name,
)
from hypervisor.observability.workers._sinks import (
    JsonLinesSpanSink,
    agent_span_to_dict,
    span_to_dict,
)

__all__ = [
    "AGENT_SPANS",
    "REASON_APPLY_ERROR",
    "REASON_MAX_DELIVERIES",
    "REASON_OVERSIZED",
    "REASON_UNDECODABLE",
    "RING_METRICS",
    "SAGA_SPANS",
    "AgentSpansDerivation",
    "Applier",
    "Commit",
    "DeadLetter",
    "Derivation",
    "JsonLinesSpanSink",
    "MemoryStateStore",
    "Partition",
    "PartitionedWorker",
    "RingBounds",
    "RingMetricsDerivation",
    "SagaSpansDerivation",
    "StateMeta",
    "StateStore",
    "Worker",
    "WorkerConfig",
    "WorkerRegistry",
    "WorkerStateError",
    "WorkerStats",
    "agent_span_to_dict",
    "assign_partitions",
    "decode_dead_letter",
    "default_consumer_name",
    "dlq_name",
    "list_dead_letters",
    "replay_dead_letters",
    "span_to_dict",
    "watermark",
]
