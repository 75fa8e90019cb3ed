"""The window of recently applied event ids that detects copies of an event.

A producer that retries a batch whose append reply was lost can store it twice, and a consumer
then sees the same ``event_id`` under two stream ids. Both the bus's reader and the workers'
applier drop such copies with one :class:`RecentIds`: its ``size`` is exactly how many of the
newest distinct ids it remembers, in both places.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["RecentIds"]


class RecentIds:
    """The newest ``size`` distinct ids added, with constant-time membership.

    Args:
        size: how many ids are remembered; 0 remembers none (every id is new).

    Raises:
        ValueError: ``size`` is negative.
    """

    __slots__ = ("_ids", "_order", "size")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"the recent-ids window must be >= 0, got {size}")
        self.size = size
        self._order: deque[str] = deque()
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> bool:
        """Remember ``event_id``; return ``False`` if it was already remembered (a copy).

        The oldest id is forgotten once more than ``size`` are remembered.
        """
        ids = self._ids
        if event_id in ids:
            return False
        if self.size == 0:
            return True
        ids.add(event_id)
        order = self._order
        order.append(event_id)
        if len(order) > self.size:
            ids.discard(order.popleft())
        return True

    def extend(self, event_ids: Iterable[str]) -> None:
        """Add ``event_ids`` in order (oldest first), as :meth:`add` would one by one."""
        for event_id in event_ids:
            self.add(event_id)

    def newest(self) -> list[str]:
        """The remembered ids, oldest first."""
        return list(self._order)
