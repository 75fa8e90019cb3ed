"""The one backoff of the project (``_util.retry.Backoff``)."""

from __future__ import annotations

import anyio
import pytest

from hypervisor.observability._util.retry import Backoff


def test_bound_doubles_per_attempt_up_to_the_cap() -> None:
    """Attempt n's bound is base * 2**n, never above the cap, and huge attempts do not overflow."""
    backoff = Backoff(0.05, 2.0)
    assert [backoff.bound(n) for n in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    assert backoff.bound(10_000) == 2.0
    assert backoff.bound(-3) == 0.05


def test_delay_is_full_jitter_within_the_bound() -> None:
    """Delays spread over [0, bound]: some in the lower and some in the upper half."""
    backoff = Backoff(1.0, 1.0)
    delays = [backoff.delay(0) for _ in range(400)]
    assert all(0.0 <= delay <= 1.0 for delay in delays)
    assert min(delays) < 0.5 < max(delays)


def test_negative_times_are_refused() -> None:
    """A negative base or cap is a configuration error."""
    with pytest.raises(ValueError, match="must be >= 0"):
        Backoff(-0.1, 1.0)


@pytest.mark.anyio
async def test_wait_ends_at_the_limit_and_when_stopped() -> None:
    """A wait never outlasts ``limit_s`` and returns as soon as ``stop`` is set."""
    long = Backoff(60.0, 60.0)
    with anyio.fail_after(5):
        await long.wait(0, limit_s=0.0)
    stop = anyio.Event()
    stop.set()
    with anyio.fail_after(5):
        await long.wait(0, stop=stop)
