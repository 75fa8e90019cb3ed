"""Reads by position: the cursor paging of the event store.

:class:`_PositionReads` is a base class of ``EventStore`` holding its reads by position
(``first_position``, ``next_position``, ``read_from``, ``page``) and the value types they return.
It has no state of its own (``__slots__ = ()``): it works on the store's containers, declared
below for the type checker only, and is never used on its own. Living apart keeps ``store.py``
about writing and the published queries; the hot paths (``extend``, ``append``, ``query``) are
unchanged and make no call into this module. The argument checks shared with ``store.py`` live
here too, so that ``store.py`` imports this module and never the other way round.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Hashable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

from hypervisor.observability._core.events import EventType, HypervisorEvent

__all__ = ["EventPage", "EventSlice"]

# A posting list: a list, or an array("q") for the events a store owns (EventStore.extend).
_Postings: TypeAlias = "list[int] | array[int]"
_Index: TypeAlias = "dict[Hashable, _Postings]"


def _query_limit(limit: int | None) -> int | None:
    """``query``'s limit as the published module reads it: ``None`` or ``0`` (``[-0:]`` keeps
    everything) means all matches; a negative limit is returned as is (the caller drops that
    many of the oldest matches, as ``matches[-limit:]`` does).

    Raises:
        TypeError: not an int (a bool included), as the published slice raises for a float or
            a string.
    """
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int or None, got {type(limit).__name__} {limit!r}")
    return None if limit == 0 else limit


def _matching(
    events: Iterable[HypervisorEvent],
    event_type: Hashable | None,
    session_id: str | None,
    agent_did: str | None,
) -> list[HypervisorEvent]:
    """The events matching every filter that is not ``None``."""
    if event_type is None:
        if session_id is None:
            return [e for e in events if e.agent_did == agent_did]
        if agent_did is None:
            return [e for e in events if e.session_id == session_id]
        return [e for e in events if e.session_id == session_id and e.agent_did == agent_did]
    if session_id is None:
        if agent_did is None:
            return [e for e in events if e.event_type == event_type]
        return [e for e in events if e.event_type == event_type and e.agent_did == agent_did]
    if agent_did is None:
        return [e for e in events if e.event_type == event_type and e.session_id == session_id]
    return [
        e
        for e in events
        if e.event_type == event_type and e.session_id == session_id and e.agent_did == agent_did
    ]


class EventPage(NamedTuple):
    """One page of a cursor query (:meth:`EventStore.page`).

    Attributes:
        events: the matching events of the page, oldest first.
        next_before: the position to pass as ``before`` for the next, older page; ``None``
            when no older event matched.
        positions: the position of each event (a caller that keeps only the newest part of
            the page passes the oldest kept position as the next ``before``).
    """

    events: list[HypervisorEvent]
    next_before: int | None
    positions: list[int]


class EventSlice(NamedTuple):
    """Consecutive stored events by position (:meth:`EventStore.read_from`).

    Attributes:
        events: the events, oldest first.
        start: the position of the first event (above the one asked for when older events
            were evicted meanwhile).
        stop: the position after the last event: where the next read starts.
    """

    events: list[HypervisorEvent]
    start: int
    stop: int


def _check_limit(limit: int | None) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


def _check_aware(name: str, value: datetime) -> None:
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.utcoffset() is None:
        raise ValueError(
            f"{name} must be timezone-aware (event timestamps are aware UTC datetimes), "
            f"got naive {value.isoformat()}"
        )


def _normalise(ts: object) -> datetime | None:
    """Return a comparable (aware) form of an unusual timestamp, or ``None`` if it has none."""
    if isinstance(ts, datetime):
        return ts.replace(tzinfo=UTC) if ts.utcoffset() is None else ts
    return None


class _PositionReads:
    """The reads by position of :class:`~hypervisor.observability._core.store.EventStore`."""

    __slots__ = ()

    # The store's state these reads use (slots of EventStore; see its module docstring).
    _by_agent: _Index
    _by_session: _Index
    _by_type: _Index
    _cap: int
    _codes: bytearray
    _first: int
    _late: dict[int, tuple[datetime, datetime | None]]
    _late_sorted: list[tuple[datetime, int]]
    _next: int
    _slots: list[HypervisorEvent]
    _type_codes: dict[Hashable, int]

    if TYPE_CHECKING:
        # Implemented by EventStore (declared here for the type checker only).
        def _events(self, lo: int, hi: int) -> list[HypervisorEvent]: ...

        def _gather(self, seqs: Iterable[int]) -> list[HypervisorEvent]: ...

        def _search(self, bound: datetime, right: bool) -> int: ...

    # -- positions and pages ---------------------------------------------------------------
    # A position is an event's seq: assigned once in append order and never reused, so a
    # position handed out stays meaningful while newer events are appended (they get higher
    # positions) and older ones are evicted (positions below ``first_position`` are gone).

    @property
    def first_position(self) -> int:
        """The position of the oldest stored event (equal to ``next_position`` when empty)."""
        return self._first

    @property
    def next_position(self) -> int:
        """The position the next appended event gets."""
        return self._next

    def read_from(self, position: int, limit: int) -> EventSlice:
        """The stored events at ``position`` and after, at most ``limit`` of them.

        Starts at the oldest stored event when ``position`` was evicted (the slice's ``start``
        tells); returns no events when ``position`` is at or past ``next_position``.

        Raises:
            ValueError: ``limit`` is not an int >= 1.
        """
        _check_limit(limit)
        start = min(max(position, self._first), self._next)
        stop = min(self._next, start + limit)
        return EventSlice(self._events(start, stop), start, stop)

    def page(
        self,
        event_type: EventType | None = None,
        session_id: str | None = None,
        agent_did: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> EventPage:
        """The newest ``limit`` events matching every given filter, below position ``before``.

        Paging backwards is stable while events are appended and evicted: passing each page's
        ``next_before`` as the next call's ``before`` visits every matching event still stored
        exactly once, newest page first, whatever was appended meanwhile (newer events are
        above every position handed out); events evicted meanwhile are simply not returned.

        Args:
            event_type: keep only this type.
            session_id: keep only this session.
            agent_did: keep only this agent.
            since: keep only events with ``timestamp >= since`` (aware).
            until: keep only events with ``timestamp <= until`` (aware).
            before: keep only events at positions below this one (``None``: no bound).
            limit: the most events returned (an int >= 1).

        Raises:
            ValueError: ``limit`` is not an int >= 1, or ``since``/``until`` is naive.
        """
        _check_limit(limit)
        orig_type, orig_session, orig_agent = event_type, session_id, agent_did
        if since is not None:
            _check_aware("since", since)
        if until is not None:
            _check_aware("until", until)
        lo = self._first
        hi = self._next if before is None else max(lo, min(before, self._next))
        if hi <= lo or (since is not None and until is not None and until < since):
            return EventPage([], None, [])
        timed = since is not None or until is not None
        # Late events (see the module docstring) that match the time range but lie outside the
        # range of positions the ring's sort keys give: they are merged in by position.
        late_above: list[int] = []
        late_below: list[int] = []
        if timed:
            upper = hi
            if since is not None:
                lo = max(lo, self._search(since, right=False))
            if until is not None:
                upper = min(hi, self._search(until, right=True))
            if self._late:
                side = self._late_sorted
                first = 0 if since is None else bisect_left(side, (since,))
                last = len(side) if until is None else bisect_right(side, (until, sys.maxsize))
                for _, seq in side[first:last]:
                    if seq >= hi or seq < self._first:
                        continue
                    if seq >= upper:
                        late_above.append(seq)
                    elif seq < lo:
                        late_below.append(seq)
                late_above.sort()
                late_below.sort()
            hi = max(lo, upper)
        candidates: list[tuple[int, _Postings, int, int]] = []
        for which, (index, key) in enumerate(
            (
                (self._by_type, event_type),
                (self._by_session, session_id),
                (self._by_agent, agent_did),
            )
        ):
            if key is None:
                continue
            seqs = index.get(key)
            if seqs is None:
                return EventPage([], None, [])
            head = seqs[0]
            candidates.append((len(seqs) - head, seqs, head, which))
        main: _Postings | range
        if candidates:
            _, posting, head, walked = min(candidates, key=lambda c: c[0])
            start = bisect_left(posting, lo, head)
            stop = bisect_left(posting, hi, start)
            main = posting[start:stop]
            # The walked list's own key needs no check on its entries.
            if walked == 0:
                event_type = None
            elif walked == 1:
                session_id = None
            else:
                agent_did = None
        else:
            main = range(lo, hi)
        # Events inside the position range whose real timestamp is outside the time range are
        # late ones only: check the time on events when the store holds any late event.
        check_time = timed and bool(self._late)
        wanted = limit + 1  # one more than a page tells whether an older match exists
        found: list[int] = []
        for part, exact in ((late_above, False), (main, True), (late_below, False)):
            if len(found) >= wanted:
                break
            if exact:
                self._walk_newest(
                    part,
                    wanted,
                    found,
                    event_type,
                    session_id,
                    agent_did,
                    since,
                    until,
                    check_time,
                )
            else:  # late events: every filter is checked on them
                self._walk_newest(
                    part, wanted, found, orig_type, orig_session, orig_agent, since, until, True
                )
        more = len(found) > limit
        found = found[:limit]
        found.reverse()
        return EventPage(self._gather(found), found[0] if more and found else None, found)

    def _walk_newest(
        self,
        seqs: _Postings | range,
        wanted: int,
        found: list[int],
        event_type: EventType | None,
        session_id: str | None,
        agent_did: str | None,
        since: datetime | None,
        until: datetime | None,
        check_time: bool,
    ) -> None:
        """Append to ``found``, newest first, the positions among ``seqs`` (ascending) whose
        events match, until ``found`` holds ``wanted``; in growing chunks, as ``EventStore.query``
        does. A type is checked on the code ring before any event is touched."""
        hi = len(seqs)
        if event_type is None and session_id is None and agent_did is None and not check_time:
            take = wanted - len(found)
            found.extend(reversed(seqs[max(0, hi - take) : hi]))
            return
        slots = self._slots
        cap = self._cap
        code = 0 if event_type is None else self._type_codes.get(event_type, 0)
        codes = self._codes
        step = 64
        while hi > 0 and len(found) < wanted:
            lo = max(0, hi - step)
            chunk = list(seqs[lo:hi])
            chunk.reverse()
            if code:
                chunk = [seq for seq in chunk if codes[seq % cap] == code]
                check_type = None
            else:
                check_type = event_type
            if session_id is not None:
                chunk = [seq for seq in chunk if slots[seq % cap].session_id == session_id]
            if agent_did is not None:
                chunk = [seq for seq in chunk if slots[seq % cap].agent_did == agent_did]
            if check_type is not None or check_time:
                chunk = [
                    seq
                    for seq in chunk
                    if _accepts(slots[seq % cap], check_type, None, None, since, until, check_time)
                ]
            found.extend(chunk[: wanted - len(found)])
            hi = lo
            step *= 2


def _accepts(
    event: HypervisorEvent,
    event_type: Hashable | None,
    session_id: str | None,
    agent_did: str | None,
    since: datetime | None,
    until: datetime | None,
    check_time: bool,
) -> bool:
    """Whether ``event`` matches every filter that is not ``None`` (the time only when
    ``check_time``)."""
    if event_type is not None and event.event_type != event_type:
        return False
    if session_id is not None and event.session_id != session_id:
        return False
    if agent_did is not None and event.agent_did != agent_did:
        return False
    if check_time:
        stamp = _normalise(event.timestamp)
        if stamp is None:
            return False
        if (since is not None and stamp < since) or (until is not None and stamp > until):
            return False
    return True
