"""A clock that moves only when a test moves it, for code that takes a ``clock`` argument."""

from __future__ import annotations

__all__ = ["ManualClock"]


class ManualClock:
    """Seconds that stand still until :meth:`advance` (a ``Callable[[], float]``).

    Args:
        start: the first reading; any value (a monotonic clock's origin is arbitrary), or
            ``time.time()`` to stand in for a wall clock.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (never backwards).

        Raises:
            ValueError: ``seconds`` is negative.
        """
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} s)")
        self.now += seconds
