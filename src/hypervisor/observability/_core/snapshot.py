"""Snapshots of the derivation states: an explicit, versioned msgspec schema.

A worker checkpoints its state (``RingMetricsState``, ``SagaSpanState``) as one of the structs
below and rebuilds the state from it; nothing but these plain fields (strings, numbers, lists and
dicts of them) is ever read back, so a snapshot can be wrong but never run code. The schema
grows the way the event schema does: a new field gets a default, so a snapshot written before the
field existed still loads, and a reader ignores fields it does not know. A change that older
readers cannot survive that way bumps :data:`SNAPSHOT_SCHEMA_VERSION`.

Adding a field to a state is one line in its struct (with a default) and one line in each of
its two conversion functions (``_ring_snapshot``/``_ring_of``, ``_saga_snapshot``/``_saga_of``).

Times are kept exactly, never through a lossy float: an event timestamp is a :class:`Stamp` (its
wall-clock time in microseconds, its UTC offset, its fold), which holds any ``datetime`` from year
1 to year 9999 at any offset, including instants outside the range a UTC ``datetime`` can hold.
Integers beyond the 64 bits msgpack carries (a ring of ``1e300`` is a valid, if odd, ring) are
moved into ``wide_ints`` as hex strings by :func:`widen_ints` and put back on load.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Final, get_type_hints

import msgspec

from hypervisor.observability._core.agent_spans import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CLOSED_AGENTS,
    DEFAULT_MAX_LINKS,
    DEFAULT_MAX_OPEN_AGENTS,
    DEFAULT_MAX_SPAN_EVENTS,
    AgentSpanState,
    _OpenAgent,
)
from hypervisor.observability._core.ring import (
    _NO_CLOCK,
    _NO_TIME,
    RingMetricsState,
    _epoch_exemplars,
)
from hypervisor.observability._core.span_records import SagaSpanRecord, _record
from hypervisor.observability._core.span_sagas import _OpenSaga
from hypervisor.observability._core.spans import (
    DEFAULT_MAX_OPEN_SAGAS,
    DEFAULT_MAX_OPEN_STEPS,
    DEFAULT_MAX_SPANS,
    SagaSpanState,
)

__all__ = [
    "SNAPSHOT_SCHEMA_VERSION",
    "AgentSnapshot",
    "OpenSagaSnapshot",
    "OpenStepSnapshot",
    "RingSnapshot",
    "SagaSnapshot",
    "SpanSnapshot",
    "Stamp",
    "StateSnapshot",
    "WideInt",
    "datetime_of",
    "snapshot_of",
    "stamp_of",
    "state_of",
    "widen_ints",
]

SNAPSHOT_SCHEMA_VERSION: Final = 1
"""The snapshot schema version this release writes and the newest it reads."""

_MICROSECOND: Final = timedelta(microseconds=1)
_WALL_ZERO: Final = datetime.min  # naive 0001-01-01T00:00
_MAX_WALL_US: Final = (datetime.max - datetime.min) // _MICROSECOND
_DAY_US: Final = 86_400_000_000
_INT64_MIN: Final = -(2**63)
_UINT64_MAX: Final = 2**64 - 1
_MAX_WIDE_HEX: Final = 4096
"""Longest hex text of a wide integer (16 kbit, past any ring a payload can spell)."""

Count = Annotated[int, msgspec.Meta(ge=0)]
Ring = Annotated[int, msgspec.Meta(ge=0)]


class Stamp(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A ``datetime`` exactly: wall-clock time, UTC offset and fold.

    Attributes:
        wall_us: microseconds from ``0001-01-01T00:00`` to the wall-clock time.
        offset_us: the UTC offset in microseconds, ``None`` for a naive datetime.
        fold: the ``fold`` attribute (which of two ambiguous local times).
    """

    wall_us: Annotated[int, msgspec.Meta(ge=0, le=_MAX_WALL_US)]
    offset_us: Annotated[int, msgspec.Meta(gt=-_DAY_US, lt=_DAY_US)] | None = None
    fold: Annotated[int, msgspec.Meta(ge=0, le=1)] = 0


def stamp_of(moment: datetime) -> Stamp:
    """Return the :class:`Stamp` of ``moment`` (an aware one keeps its offset, not its zone)."""
    offset = moment.utcoffset()
    wall = (moment.replace(tzinfo=None) - _WALL_ZERO) // _MICROSECOND
    return Stamp(wall, None if offset is None else offset // _MICROSECOND, moment.fold)


def datetime_of(stamp: Stamp) -> datetime:
    """Return the ``datetime`` a :class:`Stamp` describes (a fixed-offset one when aware)."""
    moment = _WALL_ZERO + timedelta(microseconds=stamp.wall_us)
    if stamp.offset_us is not None:
        moment = moment.replace(tzinfo=timezone(timedelta(microseconds=stamp.offset_us)))
    if stamp.fold:
        moment = moment.replace(fold=1)
    return moment


class WideInt(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """An integer of a ``dict[str, int]`` field that msgpack cannot carry (beyond 64 bits).

    Attributes:
        field: the struct field holding the dict.
        key: the dict key.
        hex: the value in hex (``int(hex, 16)``), sign included.
    """

    field: str
    key: str
    hex: Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_WIDE_HEX)]


class RingSnapshot(msgspec.Struct, tag="ring", gc=False):
    """The state of ``RingMetricsState``: one field per attribute (see its docstring)."""

    transitions: dict[tuple[str, str, str], Count] = {}
    breaches: dict[tuple[str, str], Count] = {}
    current_rings: dict[str, Ring] = {}
    elevation_durations: dict[str, float] = {}
    elevation_starts: dict[str, float] = {}
    elevation_origins: dict[str, Ring | None] = {}
    events_processed: Count = 0
    bad_events: Count = 0
    newest: Stamp | None = None
    """The newest event timestamp applied; ``None`` before any."""
    # Bounded mode (``RingBounds``; all limits 0: an unbounded state).
    max_agents: Count = 0
    max_sessions: Count = 0
    max_tracked: Count = 0
    idle_s: float = 0.0
    clock_window: Count = 0
    agents: dict[str, float] = {}
    """Tracked agent -> the clock at its last ring event, least recently active first."""
    admitted: dict[str, dict[str, Count]] = {}
    sessions: dict[str, Count] = {}
    clock: float = _NO_CLOCK
    clock_samples: list[float] = []
    clock_taken: Count = 0
    retired_idle: Count = 0
    retired_capacity: Count = 0
    folded_agent_events: Count = 0
    folded_session_events: Count = 0
    transition_exemplars: dict[tuple[str, str, str], tuple[str, float]] = {}
    """Key -> (causal trace id, epoch seconds) of the newest event of that key with one."""
    breach_exemplars: dict[tuple[str, str], tuple[str, float]] = {}
    wide_ints: list[WideInt] = []
    """Values of the int-valued dicts that do not fit 64 bits (see :func:`widen_ints`)."""


class SpanSnapshot(msgspec.Struct, array_like=True, gc=False):
    """A completed span (``SagaSpanRecord``), field for field."""

    name: str
    saga_id: str
    step_id: str
    step_action: str
    start_time: float
    end_time: float
    status: str
    attributes: dict[str, str]
    trace_id: str
    span_id: str
    parent_span_id: str | None


class OpenStepSnapshot(msgspec.Struct, array_like=True, gc=False):
    """A step started and not yet ended: its key, its start and the event that opened it.

    The start is in epoch seconds, the value the step's span will take, except for a naive
    timestamp: that one is kept as it is (its epoch seconds depend on the local zone of the
    process that ends the step).
    """

    saga_id: str
    step: str
    start: float | Stamp
    opening_id: str


class OpenSagaSnapshot(msgspec.Struct, array_like=True, gc=False):
    """A saga created and not yet closed: its start, its id inputs and its compensation anchor."""

    saga_id: str
    start: float
    created_id: str
    causal_trace_id: str | None
    anchor: float | None = None


class SagaSnapshot(msgspec.Struct, tag="saga", gc=False):
    """The state of ``SagaSpanState``: caps, buffers (oldest first) and counters."""

    max_spans: Count = DEFAULT_MAX_SPANS
    max_open_steps: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_OPEN_STEPS
    max_open_sagas: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_OPEN_SAGAS
    lazy_records: bool = False
    spans: list[SpanSnapshot] = []
    open_steps: list[OpenStepSnapshot] = []
    open_sagas: list[OpenSagaSnapshot] = []
    events_processed: Count = 0
    evicted_spans: Count = 0
    evicted_open_steps: Count = 0
    evicted_open_sagas: Count = 0


class AgentSnapshot(msgspec.Struct, tag="agents", gc=False):
    """The state of ``AgentSpanState`` (the spawn tree as spans): its limits, its open nodes in
    their order (least recently touched first), the closed ones remembered, and its counters."""

    max_open_agents: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_OPEN_AGENTS
    max_closed_agents: Count = DEFAULT_MAX_CLOSED_AGENTS
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = DEFAULT_IDLE_TIMEOUT_S
    max_span_events: Count = DEFAULT_MAX_SPAN_EVENTS
    max_links: Count = DEFAULT_MAX_LINKS
    open: list[tuple[str, _OpenAgent]] = []
    by_agent: dict[str, str] = {}
    closed: list[str] = []
    newest: float = -math.inf
    events_processed: Count = 0
    spans_completed: Count = 0
    late_events: Count = 0
    evicted_open_agents: Count = 0
    bad_causal_ids: Count = 0


StateSnapshot = RingSnapshot | SagaSnapshot | AgentSnapshot
"""Any kind of snapshot; the ``type`` tag (``"ring"``/``"saga"``/``"agents"``) tells them
apart."""


def _agent_snapshot(state: AgentSpanState) -> AgentSnapshot:
    return AgentSnapshot(
        max_open_agents=state.max_open_agents,
        max_closed_agents=state.max_closed_agents,
        idle_timeout_s=state.idle_timeout_s,
        max_span_events=state.max_span_events,
        max_links=state.max_links,
        open=list(state._open.items()),
        by_agent=state._by_agent,
        closed=list(state._closed),
        newest=state._newest,
        events_processed=state.events_processed,
        spans_completed=state.spans_completed,
        late_events=state.late_events,
        evicted_open_agents=state.evicted_open_agents,
        bad_causal_ids=state.bad_causal_ids,
    )


def _agents_of(snapshot: AgentSnapshot) -> AgentSpanState:
    if len(snapshot.open) > snapshot.max_open_agents:
        raise ValueError(
            f"{len(snapshot.open)} open agents, more than the cap of {snapshot.max_open_agents}"
        )
    state = AgentSpanState(
        max_open_agents=snapshot.max_open_agents,
        max_closed_agents=snapshot.max_closed_agents,
        idle_timeout_s=snapshot.idle_timeout_s,
        max_span_events=snapshot.max_span_events,
        max_links=snapshot.max_links,
    )
    state._open = OrderedDict(snapshot.open)
    state._by_agent = snapshot.by_agent
    state._closed = OrderedDict.fromkeys(snapshot.closed)
    state._newest = snapshot.newest
    state.events_processed = snapshot.events_processed
    state.spans_completed = snapshot.spans_completed
    state.late_events = snapshot.late_events
    state.evicted_open_agents = snapshot.evicted_open_agents
    state.bad_causal_ids = snapshot.bad_causal_ids
    return state


# -- RingMetricsState -----------------------------------------------------------------------------


def _ring_snapshot(state: RingMetricsState) -> RingSnapshot:
    # The live dicts themselves, not copies: the struct is encoded before the state changes.
    newest = state._newest
    return RingSnapshot(
        transitions=state.transitions,
        breaches=state.breaches,
        current_rings=state.current_rings,
        elevation_durations=state.elevation_durations,
        elevation_starts=state.elevation_starts,
        elevation_origins=state._elevation_origins,
        events_processed=state.events_processed,
        bad_events=state.bad_events,
        newest=None if newest is _NO_TIME else stamp_of(newest),
        max_agents=state._max_agents,
        max_sessions=state._max_sessions,
        max_tracked=state._max_tracked,
        idle_s=state._idle_s,
        clock_window=state._clock_window,
        # A plain dict in the OrderedDict's order: an encoder walking the OrderedDict's own
        # storage would see insertion order, not the order move_to_end keeps.
        agents=dict(state._agents),
        admitted=state._admitted,
        sessions=state._sessions,
        clock=state._clock,
        clock_samples=state._clock_samples,
        clock_taken=state._clock_taken,
        retired_idle=state.retired_idle,
        retired_capacity=state.retired_capacity,
        folded_agent_events=state.folded_agent_events,
        folded_session_events=state.folded_session_events,
        transition_exemplars=_epoch_exemplars(state.transition_exemplars),
        breach_exemplars=_epoch_exemplars(state.breach_exemplars),
    )


def _ring_of(snapshot: RingSnapshot) -> RingMetricsState:
    _unwiden(snapshot)
    state = RingMetricsState()
    state.transitions = snapshot.transitions
    state.breaches = snapshot.breaches
    state.current_rings = snapshot.current_rings
    state.elevation_durations = snapshot.elevation_durations
    state.elevation_starts = snapshot.elevation_starts
    state._elevation_origins = snapshot.elevation_origins
    state.events_processed = snapshot.events_processed
    state.bad_events = snapshot.bad_events
    newest = snapshot.newest
    state._newest = _NO_TIME if newest is None else datetime_of(newest)
    state._max_agents = snapshot.max_agents
    state._max_sessions = snapshot.max_sessions
    state._max_tracked = snapshot.max_tracked
    state._idle_s = snapshot.idle_s
    state._clock_window = snapshot.clock_window
    state._agents = OrderedDict(snapshot.agents)  # msgpack maps keep their order
    state._admitted = snapshot.admitted
    state._sessions = snapshot.sessions
    state._clock = snapshot.clock
    state._clock_samples = snapshot.clock_samples
    state._clock_taken = snapshot.clock_taken
    state.retired_idle = snapshot.retired_idle
    state.retired_capacity = snapshot.retired_capacity
    state.folded_agent_events = snapshot.folded_agent_events
    state.folded_session_events = snapshot.folded_session_events
    state.transition_exemplars = dict(snapshot.transition_exemplars)
    state.breach_exemplars = dict(snapshot.breach_exemplars)
    return state


# -- SagaSpanState --------------------------------------------------------------------------------


def _saga_snapshot(state: SagaSpanState) -> SagaSnapshot:
    return SagaSnapshot(
        max_spans=state.max_spans,
        max_open_steps=state.max_open_steps,
        max_open_sagas=state.max_open_sagas,
        lazy_records=state.lazy_records,
        spans=[
            SpanSnapshot(
                r.name,
                r.saga_id,
                r.step_id,
                r.step_action,
                r.start_time,
                r.end_time,
                r.status,
                r.attributes,
                r.trace_id,
                r.span_id,
                r.parent_span_id,
            )
            for r in state.completed_spans
        ],
        open_steps=[
            OpenStepSnapshot(
                saga_id,
                step,
                start
                if type(start) is float
                else start.timestamp()  # type: ignore[union-attr]
                if start.tzinfo is UTC  # type: ignore[union-attr]
                else _step_start(start),
                opening_id,
            )
            for (saga_id, step), (start, opening_id) in state._open_steps.items()
        ],
        open_sagas=[
            OpenSagaSnapshot(saga.saga_id, saga.start, saga.ref[0], saga.ref[1], saga.anchor)
            for saga in state._open_sagas.values()
        ],
        events_processed=state.events_processed,
        evicted_spans=state.evicted_spans,
        evicted_open_steps=state.evicted_open_steps,
        evicted_open_sagas=state.evicted_open_sagas,
    )


def _step_start(start: datetime | float) -> float | Stamp:
    """The snapshot of an open step's start: the epoch seconds the span will get, for a float
    or an aware datetime; the datetime itself for a naive one, whose epoch seconds depend on
    the local zone of the process that ends the step (and may not exist: year 1 or 9999)."""
    if isinstance(start, datetime):
        return stamp_of(start) if start.utcoffset() is None else start.timestamp()
    return float(start)


def _saga_of(snapshot: SagaSnapshot) -> SagaSpanState:
    state = SagaSpanState(
        max_spans=snapshot.max_spans,
        max_open_steps=snapshot.max_open_steps,
        max_open_sagas=snapshot.max_open_sagas,
    )
    state.lazy_records = snapshot.lazy_records
    if len(snapshot.spans) > snapshot.max_spans:
        raise ValueError(f"{len(snapshot.spans)} completed spans above max_spans")
    if len(snapshot.open_steps) > snapshot.max_open_steps:
        raise ValueError(f"{len(snapshot.open_steps)} open steps above max_open_steps")
    if len(snapshot.open_sagas) > snapshot.max_open_sagas:
        raise ValueError(f"{len(snapshot.open_sagas)} open sagas above max_open_sagas")
    state._spans.extend(_span_of(span) for span in snapshot.spans)
    state._open_steps = {
        (step.saga_id, step.step): (
            step.start if type(step.start) is float else datetime_of(step.start),  # type: ignore[arg-type]
            step.opening_id,
        )
        for step in snapshot.open_steps
    }
    sagas: dict[str, _OpenSaga] = {}
    for item in snapshot.open_sagas:
        saga = _OpenSaga(item.start, item.saga_id, item.created_id, item.causal_trace_id)
        saga.anchor = item.anchor
        sagas[item.saga_id] = saga
    state._open_sagas = sagas
    state.events_processed = snapshot.events_processed
    state.evicted_spans = snapshot.evicted_spans
    state.evicted_open_steps = snapshot.evicted_open_steps
    state.evicted_open_sagas = snapshot.evicted_open_sagas
    return state


def _span_of(span: SpanSnapshot) -> SagaSpanRecord:
    return _record(
        span.name,
        span.saga_id,
        span.step_id,
        span.step_action,
        span.start_time,
        span.end_time,
        span.status,
        span.attributes,
        span.trace_id,
        span.span_id,
        span.parent_span_id,
    )


# -- both -----------------------------------------------------------------------------------------


def snapshot_of(state: object) -> StateSnapshot:
    """Return the snapshot struct of a derivation state.

    The struct shares the state's dicts: encode it before the state changes again. Building
    the unbuilt spans of a lazy ``SagaSpanState`` is the only change it makes to the state.

    Raises:
        TypeError: ``state`` is neither a ``RingMetricsState`` nor a ``SagaSpanState``.
    """
    if isinstance(state, RingMetricsState):
        return _ring_snapshot(state)
    if isinstance(state, SagaSpanState):
        return _saga_snapshot(state)
    if isinstance(state, AgentSpanState):
        return _agent_snapshot(state)
    raise TypeError(f"no snapshot schema for {type(state).__qualname__}")


def state_of(snapshot: StateSnapshot) -> RingMetricsState | SagaSpanState | AgentSpanState:
    """Return the state a snapshot describes (it takes the snapshot's dicts over).

    Raises:
        ValueError: the snapshot breaks an invariant of its state (say, more open steps than
            its cap, or a wide integer that is not one).
    """
    if isinstance(snapshot, RingSnapshot):
        return _ring_of(snapshot)
    if isinstance(snapshot, AgentSnapshot):
        return _agents_of(snapshot)
    return _saga_of(snapshot)


def widen_ints(snapshot: StateSnapshot) -> StateSnapshot:
    """Return ``snapshot`` with the integers msgpack cannot carry moved into ``wide_ints``.

    The slow path of encoding, taken only when an encoder refused the snapshot with an
    ``OverflowError``: each ``dict[str, int]`` field holding such values is copied with the
    values replaced by ``0``, and each value is listed in hex.
    """
    if not isinstance(snapshot, RingSnapshot):
        return snapshot
    wide: list[WideInt] = []
    changes: dict[str, Any] = {}
    for name in snapshot.__struct_fields__:
        value = getattr(snapshot, name)
        if not isinstance(value, dict):
            continue
        found = {
            key: item
            for key, item in value.items()
            if type(key) is str and type(item) is int and not _INT64_MIN <= item <= _UINT64_MAX
        }
        if found:
            changes[name] = {**value, **dict.fromkeys(found, 0)}
            wide.extend(WideInt(name, key, format(item, "x")) for key, item in found.items())
    if not wide:
        return snapshot
    return msgspec.structs.replace(snapshot, wide_ints=wide, **changes)


def _int_dict_fields(kind: type[msgspec.Struct]) -> frozenset[str]:
    hints = get_type_hints(kind, include_extras=False)
    return frozenset(
        name for name, hint in hints.items() if hint in (dict[str, int], dict[str, int | None])
    )


_WIDE_FIELDS: Final = _int_dict_fields(RingSnapshot)
"""The fields a wide integer may belong to: the ``dict[str, int]``-shaped ones."""


def _unwiden(snapshot: RingSnapshot) -> None:
    for item in snapshot.wide_ints:
        if item.field not in _WIDE_FIELDS:
            raise ValueError(f"wide integer for field {item.field!r}, which holds none")
        target: dict[str, Any] = getattr(snapshot, item.field)
        if item.key not in target:
            raise ValueError(f"wide integer for {item.field}[{item.key!r}], which is absent")
        target[item.key] = int(item.hex, 16)
