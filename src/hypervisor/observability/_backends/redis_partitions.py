"""Redis side of partitioned workers: the live-worker registry of a group, the layout check.

The registry of a group is one sorted set, ``hvobs:workers:{<stream>}:<group>`` (the stream's
own hash tag, the layout record's slot): member = consumer name, score = the server's clock (ms)
at its last heartbeat. A heartbeat is one script (one round trip, one key): it stamps the
caller, drops members not seen for ``ttl``, and returns the live names sorted. The server's
clock (``TIME``) is used, so workers on hosts with skewed clocks agree on who is live.
Names read back are decoded and checked, never trusted.
"""

from __future__ import annotations

from typing import Any

from redis import asyncio as aioredis

from hypervisor.observability._backends.redis_client import make_client, translate_errors, url_user
from hypervisor.observability._backends.redis_cluster import ensure_layout
from hypervisor.observability._core.partition import LayoutRecord, PartitionLayout

__all__ = ["RedisWorkerRegistry", "check_layout", "registry_key"]

_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 10)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
_MAX_NAME = 256
"""Longest consumer name accepted back from the registry (anything else is ignored)."""


def registry_key(stream: str, group: str) -> str:
    """The registry key of ``group`` on ``stream`` (the layout record's hash tag)."""
    return f"hvobs:workers:{{{stream}}}:{group}"


class RedisWorkerRegistry:
    """Heartbeats of the live workers of one group on one partitioned stream.

    Args:
        url: the Redis URL.
        stream: the stream's name.
        group: the consumer group.
        options: more client options (TLS files, ...).
    """

    def __init__(self, url: str, stream: str, group: str, **options: Any) -> None:
        self.key = registry_key(stream, group)
        self._user = url_user(url)
        self._client: aioredis.Redis = make_client(
            url, socket_timeout_s=5.0, connect_timeout_s=5.0, **options
        )
        self._script = self._client.register_script(_HEARTBEAT)

    async def heartbeat(self, consumer: str, ttl_s: float) -> list[str]:
        """Stamp ``consumer`` as live; return the names live within ``ttl_s``, sorted.

        Raises:
            LogUnavailableError: Redis is unreachable for now (retryable).
            LogPermanentError: credentials, database or TLS refused.
            LogPermissionError: an ACL refuses the script or the key.
        """
        ttl_ms = max(1, int(ttl_s * 1000))
        with translate_errors("worker registry", user=self._user, command="evalsha", key=self.key):
            reply = await self._script(keys=[self.key], args=[consumer, ttl_ms])
        names: set[str] = {consumer}
        for item in reply if isinstance(reply, list) else ():
            if isinstance(item, bytes) and len(item) <= _MAX_NAME:
                try:
                    names.add(item.decode())
                except UnicodeDecodeError:
                    continue
        return sorted(names)

    async def leave(self, consumer: str) -> None:
        """Remove ``consumer`` (a clean stop: its partitions move at the others' next beat)."""
        with translate_errors("worker registry", user=self._user, command="zrem", key=self.key):
            await self._client.zrem(self.key, consumer)

    async def aclose(self) -> None:
        """Close the connection."""
        await self._client.aclose()


async def check_layout(url: str, layout: PartitionLayout, **options: Any) -> LayoutRecord:
    """Create or check the layout record of ``layout`` on the Redis at ``url``.

    Raises:
        PartitionLayoutError: another partition count is recorded (naming both counts).
        LogUnavailableError: Redis is unreachable for now (retryable).
    """
    client = make_client(url, socket_timeout_s=5.0, connect_timeout_s=5.0, **options)
    try:
        return await ensure_layout(client, layout, user=url_user(url))
    finally:
        await client.aclose()
