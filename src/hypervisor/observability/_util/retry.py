"""The one backoff of the project: exponential, capped, with full jitter.

Every retry loop (the bus's writer and reader, the workers' start, read and apply loops) waits
through :class:`Backoff`, so they share one rule: attempt ``n`` (from 0) waits a uniformly random
time in ``[0, min(cap_s, base_s * 2**n)]``. Full jitter spreads the reconnects of a fleet of
processes that lost the same server at the same moment.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import anyio

__all__ = ["Backoff"]

# 2**64 times any sane base is far beyond any cap: larger exponents only risk float overflow.
_MAX_EXPONENT = 64


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter.

    Args:
        base_s: the upper bound of the first wait (attempt 0); doubles per attempt.
        cap_s: the largest upper bound of one wait.
    """

    base_s: float
    cap_s: float

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.cap_s < 0:
            raise ValueError(f"backoff times must be >= 0, got {self.base_s}, {self.cap_s}")

    def bound(self, attempt: int) -> float:
        """The upper bound of the wait before retry ``attempt`` (0 for the first retry)."""
        return min(self.cap_s, math.ldexp(self.base_s, min(max(attempt, 0), _MAX_EXPONENT)))

    def delay(self, attempt: int) -> float:
        """A random wait for retry ``attempt``: uniform in ``[0, bound(attempt)]``."""
        return random.uniform(0, self.bound(attempt))

    async def wait(
        self, attempt: int, *, limit_s: float | None = None, stop: anyio.Event | None = None
    ) -> None:
        """Sleep :meth:`delay` seconds, at most ``limit_s``, and return early once ``stop`` is set.

        Args:
            attempt: the retry's number, from 0.
            limit_s: the longest wait (the time left before a deadline), if any.
            stop: an event that ends the wait when set (shutdown).
        """
        delay = self.delay(attempt)
        if limit_s is not None:
            delay = min(delay, max(0.0, limit_s))
        if stop is None:
            await anyio.sleep(delay)
            return
        with anyio.move_on_after(delay):
            await stop.wait()
