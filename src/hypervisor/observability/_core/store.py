"""The bounded event store with its secondary indexes (type, session, agent, time).

``EventStore`` is pure and not thread-safe: the buses lock around it. Layout:

* Events live in a ring of ``max_events`` slots addressed by a monotonically increasing sequence
  number ``seq`` (slot ``seq % capacity``), so any stored event is reachable in O(1) and the
  oldest one is evicted in O(1). The list grows up to the capacity instead of being allocated up
  front, so a large cap costs nothing until it is used; an unbounded store is a ring whose
  capacity is never reached.
* Each secondary index maps a key to a posting list, a list of seqs in append order whose
  element 0 is the head offset (the position of the oldest live entry; keeping it in the list
  saves a second dict lookup on every eviction); a type's list also keeps the type's code
  (below) at element 1. Evicting the oldest event advances the
  head of exactly the lists that event is in (by construction it is their oldest entry) and drops
  a key whose list becomes empty, so every index, and ``type_counts()``, agrees with the store at
  all times. Dead heads are compacted away once they are half of a list, which keeps the
  amortised cost O(1). (Plain lists: the three share each seq's int object, 32 bytes an event
  more than ``array('q')``, but ``array.append`` parses its argument through a format string
  and costs about twice as much, on the path of every ``emit``. The events the store owns, the
  Redis bus reader's, get arrays and share strings: ``extend(..., own_events=True)``.)
* Beside the ring of events, a ring of one-byte type codes (a ``bytearray``, same slots): each
  event type gets a small code when first stored. A combined query walks its shortest posting
  list and keeps only the seqs whose slot holds the wanted type code before it touches any
  event object: a candidate event is a cache miss, a code byte is not. A slot's code
  is overwritten with its event, so the filter is exact under eviction (code 0, past 255 types,
  means "check the event").
* Time: timestamps are almost always non-decreasing in append order. An event whose timestamp is
  not below the newest timestamp seen so far (the high-water mark) is *in order*; a binary search
  over the ring finds the in-order events of a range. The rare others (clock skew, threads,
  other processes; also naive or non-``datetime`` timestamps) are *late*: their sort key in the
  ring is the high-water mark at their append, which keeps the ring sorted, and their real
  timestamp goes to a small sorted side index that is merged in. A range query is exact and costs
  O(log n + results + late events involved).
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Hashable, Iterable, Iterator
from datetime import UTC, datetime

from msgspec.structs import force_setattr

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.store_pages import (
    EventPage,
    EventSlice,
    _check_aware,
    _Index,
    _matching,
    _normalise,
    _PositionReads,
    _Postings,
    _query_limit,
)

__all__ = ["DEFAULT_MAX_EVENTS", "EventPage", "EventSlice", "EventStore"]

DEFAULT_MAX_EVENTS = 100_000
"""Default cap of the in-process store: bounded by default, as published."""

# Dead entries before a posting list's head are compacted away once there are at least this many
# and they are at least half of the list.
_COMPACT_MIN = 64
# Type codes fit a byte; 0 is "no code" (more than this many distinct types were seen).
_MAX_TYPE_CODES = 255
# A type's posting list is [head, code, seqs...]: its first entry is at 2 (1 for the others).
_TYPE_HEAD = 2
_MIN_TIME = datetime.min.replace(tzinfo=UTC)


class EventStore(_PositionReads):
    """A bounded, indexed, append-only store of events (oldest evicted first).

    Not thread-safe; callers serialise access. Every query returns a new list, oldest first.
    The reads by position (``first_position``, ``next_position``, ``read_from``, ``page``) come
    from its base class in :mod:`~hypervisor.observability._core.store_pages`.

    Args:
        max_events: capacity; ``None`` for an unbounded store.

    Raises:
        ValueError: ``max_events`` is neither ``None`` nor an int >= 1.
    """

    __slots__ = (
        "_by_agent",
        "_by_session",
        "_by_type",
        "_cap",
        "_codes",
        "_first",
        "_hwm",
        "_late",
        "_late_dead",
        "_late_seqs",
        "_late_sorted",
        "_max_events",
        "_next",
        "_shared_agents",
        "_shared_sessions",
        "_slots",
        "_type_codes",
        "evicted",
    )

    def __init__(self, max_events: int | None = DEFAULT_MAX_EVENTS) -> None:
        if max_events is not None and (
            isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1
        ):
            raise ValueError(f"max_events must be None or an int >= 1, got {max_events!r}")
        self._max_events = max_events
        # An unbounded store is a ring that never fills: seq % maxsize == seq.
        self._cap: int = sys.maxsize if max_events is None else max_events
        self.evicted: int = 0
        """How many events were evicted to respect ``max_events`` since creation."""
        self._reset()

    def _reset(self) -> None:
        self._slots: list[HypervisorEvent] = []
        # The type code of the event in each slot (see the module docstring).
        # (A bytearray: its append is about twice as fast as array("B")'s.)
        self._codes = bytearray()
        # Type -> code, assigned on first sight and kept (at most _MAX_TYPE_CODES of them).
        self._type_codes: dict[Hashable, int] = {}
        self._first = 0  # seq of the oldest stored event
        self._next = 0  # seq the next event gets
        self._by_type: _Index = {}
        self._by_session: _Index = {}
        self._by_agent: _Index = {}
        # The string object of each session and agent key that own events share (see extend):
        # the key itself, kept while the key is in its index.
        self._shared_sessions: dict[Hashable, Hashable] = {}
        self._shared_agents: dict[Hashable, Hashable] = {}
        self._hwm: datetime = _MIN_TIME
        # Late events: seq -> (ring sort key, comparable timestamp or None), and the sorted side
        # index of (comparable timestamp, seq) for those that have one.
        self._late: dict[int, tuple[datetime, datetime | None]] = {}
        self._late_sorted: list[tuple[datetime, int]] = []
        # The late seqs in order; a prefix of ``_late_dead`` of them is already evicted.
        self._late_seqs: list[int] = []
        self._late_dead = 0

    @property
    def max_events(self) -> int | None:
        """The capacity, ``None`` when unbounded."""
        return self._max_events

    # -- writing ---------------------------------------------------------------------------

    def append(self, event: HypervisorEvent) -> None:
        """Store ``event`` as the newest, evicting the oldest when the store is full.

        Raises:
            TypeError: the event's type, session or agent cannot be a key (not hashable); the
                store is left as it was.
        """
        self.extend((event,))

    def _type_code(self, key: Hashable) -> int:
        """The code of type ``key``, assigned on first sight (0 once the codes are used up)."""
        codes = self._type_codes
        code = codes.get(key)
        if code is None:
            if len(codes) >= _MAX_TYPE_CODES:
                return 0  # not recorded: a later list of this type looks it up again
            code = codes[key] = len(codes) + 1
        return code

    def extend(
        self,
        events: Iterable[HypervisorEvent],
        on_rejected: Callable[[HypervisorEvent, Exception], None] | None = None,
        *,
        own_events: bool = False,
    ) -> None:
        """Append each of ``events`` in order (the oldest are evicted when the store is full).

        One loop with the store's containers in locals: a batch costs less per event than one
        ``append`` call per event.

        Args:
            events: the events, oldest first.
            on_rejected: called with an event whose type, session or agent cannot be a key
                (not hashable) and the error, and the rest are stored; without it the error is
                raised, the events before the rejected one stored and the rest not.
            own_events: the events are the caller's own, seen by no one yet (the Redis bus's
                reader decoded them): an event whose session or agent is already a key of
                the index (brought by an own event) gets the key's string object in place of
                its equal one, so the stored events share one object per distinct session and
                agent instead of the copy each the decoder made (about 160 bytes an event on
                ids like ``did:mesh:...``); and their posting lists are arrays (see
                ``_new_postings``). Never for events a user may hold.

        Raises:
            TypeError: an event was rejected and there is no ``on_rejected``. The store is
                consistent: the rejected event changed nothing.
        """
        cap = self._cap
        slots = self._slots
        codes = self._codes
        by_type = self._by_type
        by_session = self._by_session
        by_agent = self._by_agent
        shared_sessions = self._shared_sessions
        shared_agents = self._shared_agents
        seq = self._next
        hwm = self._hwm
        try:
            for event in events:
                # Every lookup before any change, so that an unhashable key raises while the
                # store is untouched. (Subscripting inside try is the cheapest lookup when the
                # key is almost always there.)
                key: Hashable = event.event_type
                session = event.session_id
                agent = event.agent_did
                session_seqs = agent_seqs = None
                try:
                    try:
                        type_seqs = by_type[key]
                    except KeyError:
                        type_seqs = None
                    if session is not None:
                        try:
                            session_seqs = by_session[session]
                        except KeyError:
                            session_seqs = None
                    if agent is not None:
                        try:
                            agent_seqs = by_agent[agent]
                        except KeyError:
                            agent_seqs = None
                except TypeError as exc:
                    if on_rejected is None:
                        raise
                    on_rejected(event, exc)
                    continue

                this = seq
                full = len(slots) >= cap
                if full and self._evict_oldest():
                    # The eviction dropped a key whose only live event it was: look again.
                    type_seqs = by_type.get(key)
                    session_seqs = None if session is None else by_session.get(session)
                    agent_seqs = None if agent is None else by_agent.get(agent)
                if type_seqs is None:
                    type_seqs = by_type[key] = _new_postings(
                        own_events, _TYPE_HEAD, self._type_code(key)
                    )
                type_seqs.append(this)
                # A type's list keeps its code at [1]: the code comes with the list's lookup.
                if full:
                    slot = this % cap
                    slots[slot] = event
                    codes[slot] = type_seqs[1]
                else:
                    slots.append(event)
                    codes.append(type_seqs[1])
                seq = this + 1
                if session is not None:
                    if session_seqs is None:
                        by_session[session] = _new_postings(own_events, 1, this)
                        if own_events:
                            shared_sessions[session] = session
                    else:
                        if own_events:
                            # (The hash is cached on the string by the lookup above: no miss.)
                            shared = shared_sessions.get(session, session)
                            if shared is not session:
                                force_setattr(event, "session_id", shared)
                        session_seqs.append(this)
                if agent is not None:
                    if agent_seqs is None:
                        by_agent[agent] = _new_postings(own_events, 1, this)
                        if own_events:
                            shared_agents[agent] = agent
                    else:
                        if own_events:
                            shared = shared_agents.get(agent, agent)
                            if shared is not agent:
                                force_setattr(event, "agent_did", shared)
                        agent_seqs.append(this)

                ts = event.timestamp
                try:
                    if ts >= hwm:
                        hwm = ts
                        continue
                except TypeError:
                    pass  # a naive or non-datetime timestamp: kept out of the ring's sorted keys
                self._hwm = hwm
                self._add_late(this, ts)
                hwm = self._hwm
        finally:
            self._next = seq
            self._hwm = hwm

    def _add_late(self, seq: int, ts: object) -> None:
        comparable = _normalise(ts)
        key = self._hwm
        if comparable is not None:
            if comparable >= key:
                # A naive timestamp that is in order once read as UTC: it advances the mark.
                key = self._hwm = comparable
            insort(self._late_sorted, (comparable, seq))
        self._late[seq] = (key, comparable)
        self._late_seqs.append(seq)

    def _evict_oldest(self) -> bool:
        """Evict the oldest event; return whether a key of an index was dropped with it."""
        dropped = False
        seq = self._first
        event = self._slots[seq % self._cap]
        self._first = seq + 1
        self.evicted += 1
        # The common case of _pop_head (advance the head) inlined: every eviction pays it.
        key: Hashable = event.event_type
        seqs = self._by_type[key]
        head = seqs[0] + 1
        if head * 2 < len(seqs) or (head < _COMPACT_MIN and head < len(seqs)):
            seqs[0] = head
        else:
            dropped = _pop_head(self._by_type, key, _TYPE_HEAD)
        key = event.session_id
        if key is not None:
            seqs = self._by_session[key]
            head = seqs[0] + 1
            if head * 2 < len(seqs) or (head < _COMPACT_MIN and head < len(seqs)):
                seqs[0] = head
            elif _pop_head(self._by_session, key):
                self._shared_sessions.pop(key, None)
                dropped = True
        key = event.agent_did
        if key is not None:
            seqs = self._by_agent[key]
            head = seqs[0] + 1
            if head * 2 < len(seqs) or (head < _COMPACT_MIN and head < len(seqs)):
                seqs[0] = head
            elif _pop_head(self._by_agent, key):
                self._shared_agents.pop(key, None)
                dropped = True
        if self._late:
            self._evict_late(seq)
        return dropped

    def _evict_late(self, seq: int) -> None:
        entry = self._late.pop(seq, None)
        if entry is None:
            return
        if entry[1] is not None:
            side = self._late_sorted
            del side[bisect_left(side, (entry[1], seq))]
        dead = self._late_dead + 1
        if dead >= _COMPACT_MIN and dead * 2 >= len(self._late_seqs):
            del self._late_seqs[:dead]
            dead = 0
        self._late_dead = dead

    def clear(self) -> None:
        """Remove every event (the eviction count is kept)."""
        self._reset()

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._next - self._first

    def _events(self, lo: int, hi: int) -> list[HypervisorEvent]:
        """The events with seqs in ``[lo, hi)`` (a subrange of the stored ones), in order."""
        if lo >= hi:
            return []
        cap = self._cap
        start = lo % cap
        stop = start + (hi - lo)
        slots = self._slots
        if stop <= cap:
            return slots[start:stop]
        return slots[start:] + slots[: stop - cap]

    def _iter(self, seqs: Iterable[int]) -> Iterator[HypervisorEvent]:
        slots = self._slots
        if self._max_events is None:  # seq is the slot: let map() index at C speed
            return map(slots.__getitem__, seqs)
        cap = self._cap
        return (slots[seq % cap] for seq in seqs)

    def _gather(self, seqs: Iterable[int]) -> list[HypervisorEvent]:
        return list(self._iter(seqs))

    def all(self) -> list[HypervisorEvent]:
        """Every stored event, oldest first."""
        return self._events(self._first, self._next)

    def _posting(self, index: _Index, key: Hashable) -> _Postings:
        seqs = index.get(key)
        if seqs is None:
            return []
        return seqs[seqs[0] :]

    def by_type(self, event_type: EventType) -> list[HypervisorEvent]:
        """The stored events of ``event_type``, oldest first."""
        return self._gather(self._posting(self._by_type, event_type))

    def by_session(self, session_id: str) -> list[HypervisorEvent]:
        """The stored events of ``session_id``, oldest first."""
        return self._gather(self._posting(self._by_session, session_id))

    def by_agent(self, agent_did: str) -> list[HypervisorEvent]:
        """The stored events of ``agent_did``, oldest first."""
        return self._gather(self._posting(self._by_agent, agent_did))

    def type_counts(self) -> dict[str, int]:
        """Stored events per type, keyed by the type's string value."""
        return {
            (key.value if isinstance(key, EventType) else str(key)): len(seqs) - seqs[0]
            for key, seqs in self._by_type.items()
        }

    def _search(self, bound: datetime, right: bool) -> int:
        """First seq whose ring sort key is ``>= bound`` (``> bound`` when ``right``)."""
        lo, hi = self._first, self._next
        late = self._late
        slots = self._slots
        cap = self._cap
        while lo < hi:
            mid = (lo + hi) // 2
            entry = late.get(mid) if late else None
            key = entry[0] if entry is not None else slots[mid % cap].timestamp
            if key < bound or (right and key == bound):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def time_range(self, start: datetime, end: datetime) -> list[HypervisorEvent]:
        """The stored events with ``start <= timestamp <= end``, in append order.

        Raises:
            ValueError: ``start`` or ``end`` is naive (event timestamps are aware).
        """
        _check_aware("start", start)
        _check_aware("end", end)
        if end < start:
            return []
        lo = self._search(start, right=False)
        hi = self._search(end, right=True)
        late = self._late
        if not late:
            return self._events(lo, hi)
        side = self._late_sorted
        first = bisect_left(side, (start,))
        last = bisect_right(side, (end, sys.maxsize))
        matching = {seq for _, seq in side[first:last]}
        before = sorted(seq for seq in matching if seq < lo)
        after = sorted(seq for seq in matching if seq >= hi)
        # Late events inside [lo, hi) whose real timestamp is outside the range.
        late_seqs = self._late_seqs
        inside = late_seqs[bisect_left(late_seqs, lo) : bisect_left(late_seqs, hi)]
        excluded = [seq for seq in inside if seq not in matching]
        seqs: list[int] = before
        cursor = lo
        for seq in excluded:
            seqs.extend(range(cursor, seq))
            cursor = seq + 1
        seqs.extend(range(cursor, hi))
        seqs.extend(after)
        return self._gather(seqs)

    def query(
        self,
        event_type: EventType | None = None,
        session_id: str | None = None,
        agent_did: str | None = None,
        limit: int | None = None,
    ) -> list[HypervisorEvent]:
        """The stored events matching every given filter; with ``limit``, the newest ``limit``.

        Walks the shortest applicable posting list from its newest end, checking the other
        filters on each event, and stops at ``limit``. The result is oldest first. As in the
        published module (``matches[-limit:]``), ``limit=0`` returns every match and a negative
        limit ``-n`` every match but the ``n`` oldest.

        Raises:
            TypeError: ``limit`` is not ``None`` nor an int (bools are refused).
        """
        limit = _query_limit(limit)
        if limit is not None and limit < 0:
            return self.query(event_type, session_id, agent_did)[-limit:]
        candidates: list[tuple[int, _Postings, int]] = []
        for index, key in (
            (self._by_type, event_type),
            (self._by_session, session_id),
            (self._by_agent, agent_did),
        ):
            if key is None:
                continue
            seqs = index.get(key)
            if seqs is None:
                return []
            head = seqs[0]
            candidates.append((len(seqs) - head, seqs, head))
        if not candidates:
            hi = self._next
            lo = self._first if limit is None else max(self._first, hi - limit)
            return self._events(lo, hi)
        size, seqs, head = min(candidates, key=lambda c: c[0])
        if len(candidates) == 1:
            lo = head if limit is None else max(head, len(seqs) - limit)
            return self._gather(seqs[lo:])
        # The type filter is checked on the code ring first, unless the walked list is the
        # type's own (then every entry has the type).
        code = 0
        if event_type is not None and size != candidates[0][0]:
            code = self._type_codes.get(event_type, 0)
        if limit is None:
            chunk = self._with_code(seqs[head:], code) if code else seqs[head:]
            return _matching(self._iter(chunk), event_type, session_id, agent_did)
        # Newest first, in growing chunks: a comprehension per chunk is several times faster
        # than testing events one by one, and most queries stop within the first chunk.
        chunks: list[list[HypervisorEvent]] = []
        found = 0
        hi = len(seqs)
        step = max(32, 4 * limit) if not code else max(256, 16 * limit)
        while hi > head and found < limit:
            lo = max(head, hi - step)
            chunk = self._with_code(seqs[lo:hi], code) if code else seqs[lo:hi]
            matched = _matching(self._iter(chunk), event_type, session_id, agent_did)
            chunks.append(matched)
            found += len(matched)
            hi = lo
            step *= 2
        if len(chunks) == 1:
            return chunks[0][-limit:]
        result: list[HypervisorEvent] = []
        for matched in reversed(chunks):
            result += matched
        return result[-limit:]

    def _with_code(self, seqs: _Postings, code: int) -> list[int]:
        """The seqs among ``seqs`` whose slot holds type code ``code``."""
        # A comprehension beats map/compress here: the bytearray's slot wrapper called through
        # map() is slower than the inline subscript.
        codes = self._codes
        if self._max_events is None:  # seq is the slot
            return [seq for seq in seqs if codes[seq] == code]
        cap = self._cap
        return [seq for seq in seqs if codes[seq % cap] == code]


def _new_postings(packed: bool, first: int, second: int) -> _Postings:
    """A new posting list ``[first, second]``: an ``array("q")`` when ``packed``.

    The events of the Redis bus's reader (``own_events``) go to arrays: an array holds its seqs
    as machine words, so the seq's int object (32 bytes an event, shared by the three lists) is
    not kept; its ``append`` costs about 30 ns more than a list's, three times an event, which
    the reader's 4-5 µs per event absorbs and the in-process ``emit`` (about 1 µs) would not.
    """
    if packed:
        return array("q", (first, second))
    return [first, second]


def _pop_head(index: _Index, key: Hashable, first: int = 1) -> bool:
    """Drop the oldest live entry of ``index[key]`` (the evicted event's seq); return whether
    that dropped the key (it was the key's only live entry).

    ``first`` is the position of a list's first entry (after its header).
    """
    seqs = index[key]
    head = seqs[0] + 1
    size = len(seqs)
    if head >= size:
        del index[key]
        return True
    if head >= _COMPACT_MIN and head * 2 >= size:
        del seqs[first:head]
        seqs[0] = first
    else:
        seqs[0] = head
    return False
