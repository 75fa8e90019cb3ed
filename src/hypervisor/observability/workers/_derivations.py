"""The derivations a worker runs: which events they use, their state, what they export."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Final

from hypervisor.observability._backends.state import StateStore
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RING_EVENTS, RingBounds, RingMetricsState
from hypervisor.observability._core.spans import (
    DEFAULT_MAX_OPEN_SAGAS,
    DEFAULT_MAX_OPEN_STEPS,
    SAGA_SPAN_EVENTS,
    SagaSpanRecord,
    SagaSpanState,
    SpanRecordSink,
    SpanSink,
)
from hypervisor.observability.errors import WorkerStateError
from hypervisor.observability.workers._sinks import export_records

__all__ = [
    "RING_METRICS",
    "SAGA_SPANS",
    "Derivation",
    "RingMetricsDerivation",
    "SagaSpansDerivation",
]

RING_METRICS: Final = "ring-metrics"
SAGA_SPANS: Final = "saga-spans"


class Derivation:
    """A fold of the event stream that a worker runs on a consumer group.

    Subclasses set :attr:`name` and :attr:`event_types` and implement :meth:`new_state` and
    :meth:`apply`; the state must be a ``RingMetricsState`` or a ``SagaSpanState`` (the states
    the snapshot schema describes). :meth:`prepare` runs on every worker for every used event
    before it is staged: an exception there leaves the entry pending (retried, dead-lettered
    after ``max_deliveries``).

    Args:
        store: where the shared state lives.
    """

    name: ClassVar[str] = ""
    event_types: ClassVar[frozenset[EventType]] = frozenset()

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def uses(self, event: HypervisorEvent) -> bool:
        """Whether the event matters to this derivation (only those are staged)."""
        return event.event_type in self.event_types

    def prepare(self, event: HypervisorEvent) -> None:
        """Check an event before staging; raise to refuse it. Default: accept."""

    def new_state(self) -> Any:
        """Return an empty state."""
        raise NotImplementedError

    def restored(self, state: Any) -> Any:
        """Return ``state``, just loaded from a snapshot, ready to fold with this derivation's
        settings (a snapshot carries the settings of the worker that wrote it). Default: as is.

        Raises:
            WorkerStateError: the snapshot holds a state this derivation cannot continue.
        """
        return state

    def apply(self, state: Any, event: HypervisorEvent) -> list[SagaSpanRecord]:
        """Fold ``event`` into ``state``; return spans produced (none for metrics)."""
        raise NotImplementedError

    def export(self, records: list[SagaSpanRecord]) -> None:
        """Send what a round produced to its destinations; raising aborts the commit."""


class RingMetricsDerivation(Derivation):
    """Ring metrics: a bounded ``RingMetricsState`` over the ring events.

    The state decides, while folding in stream order, which agents and sessions have series of
    their own and which agents to retire (``bounds``), so every worker of a group exports the
    same series. Give every worker of a group the same bounds.

    Args:
        store: where the shared state lives.
        bounds: label and retirement limits (see ``RingBounds``).
    """

    name: ClassVar[str] = RING_METRICS
    event_types: ClassVar[frozenset[EventType]] = RING_EVENTS

    def __init__(self, store: StateStore, *, bounds: RingBounds | None = None) -> None:
        super().__init__(store)
        self.bounds = bounds if bounds is not None else RingBounds()

    def new_state(self) -> RingMetricsState:
        """Return an empty bounded ``RingMetricsState``."""
        return RingMetricsState(self.bounds)

    def restored(self, state: Any) -> RingMetricsState:
        """Apply this derivation's bounds to a loaded state (retiring what they exclude).

        Raises:
            WorkerStateError: the snapshot is not of a bounded ring state.
        """
        if not isinstance(state, RingMetricsState) or state.bounds is None:
            raise WorkerStateError(
                "the ring-metrics snapshot is not a bounded ring state (written by an older "
                "release); start the workers with --reset-state"
            )
        state.set_bounds(self.bounds)
        return state

    def apply(self, state: Any, event: HypervisorEvent) -> list[SagaSpanRecord]:
        """Apply one ring event."""
        state.apply(event)
        return []


class SagaSpansDerivation(Derivation):
    """Saga spans: ``SagaSpanState`` over the saga lifecycle events, spans sent to sinks.

    The state buffers no completed spans (``max_spans=0``): spans leave through the sinks, so
    the snapshot holds only open steps and sagas.

    Args:
        store: where the shared state lives.
        sinks: span sinks (``export_span`` or the published ``record_span``).
        max_open_steps: cap on open steps (as ``SagaSpanState``).
        max_open_sagas: cap on open sagas.
    """

    name: ClassVar[str] = SAGA_SPANS
    event_types: ClassVar[frozenset[EventType]] = SAGA_SPAN_EVENTS

    def __init__(
        self,
        store: StateStore,
        sinks: Sequence[SpanRecordSink | SpanSink] = (),
        *,
        max_open_steps: int = DEFAULT_MAX_OPEN_STEPS,
        max_open_sagas: int = DEFAULT_MAX_OPEN_SAGAS,
    ) -> None:
        super().__init__(store)
        self.sinks: list[SpanRecordSink | SpanSink] = list(sinks)
        self._max_open_steps = max_open_steps
        self._max_open_sagas = max_open_sagas
        self.spans_exported = 0
        """Spans handed to the sinks by this process (re-exports included)."""

    def new_state(self) -> SagaSpanState:
        """Return an empty ``SagaSpanState`` that keeps no completed spans."""
        return SagaSpanState(
            max_spans=0,
            max_open_steps=self._max_open_steps,
            max_open_sagas=self._max_open_sagas,
        )

    def apply(self, state: Any, event: HypervisorEvent) -> list[SagaSpanRecord]:
        """Apply one saga event; return the spans it completed."""
        produced: list[SagaSpanRecord] = state.apply(event)
        return produced

    def export(self, records: list[SagaSpanRecord]) -> None:
        """Send spans to every sink (flushing buffered sinks)."""
        if records:
            export_records(records, self.sinks)
            self.spans_exported += len(records)
