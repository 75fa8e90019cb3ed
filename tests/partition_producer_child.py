"""A producer process for the partition tests: emits ``count`` fleet events tagged ``tag``
through a partitioned bus, in ``emit_many`` chunks, then prints ``done <count>``.

Usage: ``python partition_producer_child.py URL STREAM PARTITIONS TAG COUNT``
"""

from __future__ import annotations

import asyncio
import sys

from hypervisor.observability import RedisEventBus
from test_bus_partitions import fleet


async def main(url: str, stream: str, partitions: int, tag: str, count: int) -> None:
    """Emit the events and report."""
    events = fleet(count, tag)
    async with RedisEventBus.from_url(url, stream, partitions=partitions, reader=False) as bus:
        for offset in range(0, count, 100):
            await bus.emit_many(events[offset : offset + 100])
    print(f"done {count}", flush=True)


if __name__ == "__main__":
    url, stream, partitions, tag, count = sys.argv[1:6]
    asyncio.run(main(url, stream, int(partitions), tag, int(count)))
