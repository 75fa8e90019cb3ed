"""Redis side of partitioned workers: the live-worker registry of a group, the layout check.

The registry of a group is one sorted set, ``hvobs:workers:{<stream>}:<group>`` (the stream's
own hash tag, the layout record's slot): member = consumer name, score = the server's clock (ms)
at its last heartbeat. A heartbeat is one script (one round trip, one key): it stamps the
caller, drops members not seen for ``ttl``, and returns the live names sorted. The server's
clock (``TIME``) is used, so workers on hosts with skewed clocks agree on who is live.
Names read back are decoded and checked, never trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from redis import asyncio as aioredis

from hypervisor.observability._backends.redis_client import make_client, translate_errors, url_user
from hypervisor.observability._backends.redis_cluster import (
    ensure_layout,
    node_command,
    node_url,
    parse_cluster_slots,
)
from hypervisor.observability._core.partition import (
    LayoutRecord,
    PartitionLayout,
    key_hash_slot,
    registry_key,
)
from hypervisor.observability.errors import LogError, LogPermanentError, LogUnavailableError

__all__ = ["RedisWorkerRegistry", "SlotRouter", "check_layout", "registry_key"]

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
        self.url = url
        self._user = url_user(url)
        self._options = options
        self._client: aioredis.Redis = make_client(
            url, socket_timeout_s=5.0, connect_timeout_s=5.0, **options
        )
        self._script = self._client.register_script(_HEARTBEAT)

    async def rehome(self, url: str) -> None:
        """Talk to the node at ``url`` from now on (on a cluster: the registry key's slot moved
        to another master, or a replica took over)."""
        if url == self.url:
            return
        old = self._client
        self.url = url
        self._client = make_client(
            url, socket_timeout_s=5.0, connect_timeout_s=5.0, **self._options
        )
        self._script = self._client.register_script(_HEARTBEAT)
        await old.aclose()

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


class SlotRouter:
    """Which master serves each of some hash slots, read from the cluster (``CLUSTER SLOTS``).

    One plain client per call, to the first node that answers: the URL's node, then the
    masters the last answer named (so a dead seed node does not blind the router).

    Args:
        url: the URL of any node of the cluster (credentials are kept for the node URLs).
        options: more client options (TLS files, ...).
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self._options = options
        self._known: list[tuple[str, int]] = []

    async def _slots(self, url: str) -> list[tuple[int, int, str, int]]:
        reply = await node_command(
            url,
            "CLUSTER",
            "SLOTS",
            what="cluster slots",
            command="cluster|slots",
            timeout_s=2.0,
            **self._options,
        )
        ranges, _ = parse_cluster_slots(reply, urlsplit(url).hostname or "127.0.0.1")
        return ranges

    async def homes(self, keys: Sequence[str]) -> list[str]:
        """The URL of the master serving each of ``keys``' slots.

        Raises:
            LogUnavailableError: no node answered, or a slot has no master now (failover).
            LogPermanentError: credentials, TLS refused.
        """
        candidates = [self.url] + [node_url(self.url, h, p) for h, p in self._known]
        ranges: list[tuple[int, int, str, int]] = []
        failure: LogError | None = None
        for candidate in dict.fromkeys(candidates):
            try:
                ranges = await self._slots(candidate)
            except LogPermanentError:
                raise
            except LogError as exc:
                failure = exc
                continue
            if ranges:
                break
        if not ranges:
            raise LogUnavailableError(f"cluster slots: no node answered ({failure})")
        self._known = sorted({(host, port) for _, _, host, port in ranges})
        out: list[str] = []
        for key in keys:
            slot = key_hash_slot(key)
            found = next(((h, p) for a, b, h, p in ranges if a <= slot <= b), None)
            if found is None:
                raise LogUnavailableError(f"cluster slots: slot {slot} has no master now")
            out.append(node_url(self.url, *found))
        return out
