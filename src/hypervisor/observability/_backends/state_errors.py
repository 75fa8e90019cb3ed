"""What is unreadable in a derivation's stored state, for logs, ``/healthz`` and ``/metrics``.

Every byte a worker reads from its state store is checked; what fails the check is reported
here, by the store (and by :func:`~hypervisor.observability.workers._apply.restore_state` for the
snapshot), at the smallest scope that keeps the results right:

* a **blocking** problem stops the operations that need the bad key (an unreadable snapshot or
  meta hash, a key of the wrong type): :meth:`StateErrors.fail` records it for the operation,
  and the operation's next success clears it (:meth:`StateErrors.ok`). While one is recorded the
  derivation neither applies nor serves its state, and ``/healthz`` is not OK;
* an **item** problem is confined to one entry, which is skipped (a garbage staged batch, seen-id
  list element or skipped-id member) or repaired (a lease without expiry, a wake-up key of the
  wrong type): :meth:`StateErrors.skipped` counts it and everything else goes on.

Each distinct problem is logged once and counted once (``hvobs_worker_state_errors_total``),
however many rounds, scrapes or readers meet it again.
"""

from __future__ import annotations

import logging
from typing import Final

from hypervisor.observability.errors import WorkerStateError

__all__ = ["StateErrors"]

_log = logging.getLogger("hypervisor.observability.workers")
_MAX_REMEMBERED: Final = 1024


class StateErrors:
    """The unreadable state one derivation's store has met.

    Args:
        name: the store's name (its key prefix), for log lines.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.current: dict[str, WorkerStateError] = {}
        """Operation -> the blocking problem it last failed with (cleared by its success)."""
        self.counts: dict[str, int] = {}
        """Key (``"snapshot"``, ``"meta"``, ``"batches"``...) -> distinct problems met."""
        self._met: set[tuple[str, str]] = set()

    def fail(self, operation: str, error: WorkerStateError) -> None:
        """Record that ``operation`` failed on unreadable state (logged and counted once)."""
        problem = (error.key, str(error))
        active = any((e.key, str(e)) == problem for e in self.current.values())
        self.current[operation] = error
        if not active:
            self._count(error.key)
            _log.error("%s: unreadable worker state: %s", self.name, error)

    def ok(self, operation: str) -> None:
        """Record that ``operation`` succeeded: its blocking problem, if any, is gone."""
        if self.current and self.current.pop(operation, None) is not None and not self.current:
            _log.warning("%s: worker state readable again", self.name)

    def skipped(self, key: str, detail: str) -> None:
        """Count an item of ``key`` that was skipped or repaired (logged once per detail)."""
        problem = (key, detail)
        if problem in self._met:
            return
        if len(self._met) >= _MAX_REMEMBERED:
            self._met.clear()
        self._met.add(problem)
        self._count(key)
        _log.warning("%s: %s", self.name, detail)

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    @property
    def blocking(self) -> list[str]:
        """The distinct messages of the blocking problems recorded now, oldest first."""
        return list(dict.fromkeys(str(error) for error in self.current.values()))
