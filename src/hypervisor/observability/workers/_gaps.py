"""Entries trimmed before a worker's consumer group read them: counted and logged.

The bus's retention never trims entries a group has not acknowledged, so a group misses entries
only when they were gone before it could read them: a group created at ``"0"`` on a stream
already trimmed, or a stream trimmed by something that does not protect groups (an ``XTRIM``
or ``XADD ... MAXLEN`` run by hand or by another tool). Redis 7 counts what a stream ever held
(``XINFO STREAM`` ``entries-added``) and how far each group has read (``XINFO GROUPS``
``entries-read``), so the entries trimmed after the group's last delivered one are
``entries-added - length - entries-read`` while the group's last delivered id is below the
first retained one. Once the group reads past them the server forgets them, so the check runs
when the worker starts, at every ``/metrics`` and ``/healthz`` refresh and at every claim sweep:
a gap the group crosses between two checks is not seen (``docs/workers.md``, "Gaps").
"""

from __future__ import annotations

import logging

from hypervisor.observability._backends.log import StreamLog, parse_id, trimmed_before_first

__all__ = ["GroupGaps"]

_log = logging.getLogger("hypervisor.observability.workers")


class GroupGaps:
    """Counts, for one group, the entries trimmed before the group read them.

    Each worker of the group counts what it sees, so the workers of one group each report the
    same gap (take the largest, not the sum, across them).
    """

    __slots__ = ("_counted", "entries", "group", "log")

    def __init__(self, log: StreamLog, group: str) -> None:
        self.log = log
        self.group = group
        self.entries = 0
        """Entries counted so far."""
        # Entries of the stream's history up to which trimmed entries were counted already.
        self._counted = 0

    async def check(self) -> int:
        """Count the group's entries trimmed before it read them, not counted yet; return them.

        The stream's counters are read before the group's, so an entry the group reads in
        between is never counted (it was retained when it was read).

        Raises:
            LogError: the backend failed.
        """
        info = await self.log.stream_info()
        trimmed = trimmed_before_first(info)
        if trimmed is None or trimmed <= self._counted:
            return 0
        group = next((g for g in await self.log.group_info() if g.name == self.group), None)
        if group is None:
            return 0
        delivered = parse_id(group.last_delivered_id)
        if info.first_id is not None and delivered >= parse_id(info.first_id):
            return 0
        read = group.entries_read
        if read is None:
            if delivered != (0, 0):
                return 0  # the server does not know how far the group read: nothing to count
            read = 0
        missed = trimmed - max(read, self._counted)
        self._counted = trimmed
        if missed <= 0:
            return 0
        self.entries += missed
        _log.warning(
            "consumer group %r of %r: %d entries after %s %s were trimmed before the group "
            "read them; they are missing from its results (gap_entries %d)",
            self.group,
            self.log.name,
            missed,
            group.last_delivered_id,
            f"and before {info.first_id}" if info.first_id is not None else f"up to {info.head_id}",
            self.entries,
        )
        return missed
