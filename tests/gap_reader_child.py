"""A bus reader in a process of its own, for the gap test: ``python gap_reader_child.py URL
STREAM``. Prints ``ready <events>`` once its index holds the stream, then, after its reader has
counted a gap and caught up, one JSON line with its counters, and exits."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

from hypervisor.observability.redis_bus import RedisEventBus


async def main(url: str, stream: str) -> None:
    """Index the stream, report readiness, wait for a gap, report the counters."""
    async with RedisEventBus.from_url(url, stream) as bus:
        print("ready", await bus.event_count(), flush=True)
        deadline = time.monotonic() + 120
        # A counter has no event to wait on: poll it, with a deadline.
        while bus.gap_entries == 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await bus.sync()
        lag = await bus.index_lag()
        report = {
            "gap_entries": bus.gap_entries,
            "gaps": bus.gaps,
            "events": await bus.event_count(),
            "lag_entries": lag.entries,
            "lag_trimmed": lag.trimmed,
            "lag_gap_entries": lag.gap_entries,
        }
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
