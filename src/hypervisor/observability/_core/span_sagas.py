"""What the saga span state knows of a saga: an event's saga keys and an open saga.

Both follow the published rules of :mod:`hypervisor.observability._core.spans` (its first item
for the keys, its "Ids" item for an open saga's ids); ``SagaSpanState`` there is their user, and
the state snapshots (:mod:`hypervisor.observability._core.snapshot`) rebuild open sagas.
"""

from __future__ import annotations

from typing import Any

from hypervisor.observability._core.events import HypervisorEvent
from hypervisor.observability._core.span_ids import _saga_ids, _SagaIds, _SagaRef

__all__: list[str] = []


def _saga_keys(event: HypervisorEvent) -> tuple[str, str, str]:
    """``(saga_id, step_id, step_action)`` of a saga event, with the published fallbacks."""
    get = event.payload.get
    value: Any = get("saga_id")
    if type(value) is not str:
        value = None if value is None else str(value)
    saga_id: str = value or event.causal_trace_id or "unknown"
    value = get("step_id")
    if type(value) is not str:
        value = "" if value is None else str(value)
    step_id: str = value
    value = get("action")
    if value is None:
        value = get("step_action")
    if type(value) is not str:
        value = "" if value is None else str(value)
    return saga_id, step_id, value


class _OpenSaga:
    """A created saga: its start, compensation anchor, and ids (computed on first use)."""

    __slots__ = ("_ids", "anchor", "ref", "saga_id", "start")

    def __init__(
        self, start: float, saga_id: str, created_id: str, causal_trace_id: str | None
    ) -> None:
        self.start = start
        self.saga_id = saga_id
        # What the saga's ids derive from. An unbuilt span keeps this (strings only, so the
        # garbage collector soon stops tracking it) rather than the saga object itself.
        self.ref: _SagaRef = (created_id, causal_trace_id)
        # Where the next compensation starts: the last failure or the last compensation's end.
        self.anchor: float | None = None
        self._ids: _SagaIds | None = None

    def ids(self) -> _SagaIds:
        """``(trace id, span id, parent span id)`` of the saga span."""
        ids = self._ids
        if ids is None:
            ids = self._ids = _saga_ids(self.saga_id, self.ref)
        return ids

    @property
    def trace_id(self) -> str:
        return self.ids()[0]

    @property
    def span_id(self) -> str:
        return self.ids()[1]

    @property
    def parent_span_id(self) -> str | None:
        return self.ids()[2]
