"""A partitioned stream on Redis, a single server or a cluster: its partition logs and its
appends, one pipeline per node.

:func:`redis_partitions` builds the :class:`PartitionSet`: a ``RoutedStreamLog`` per partition
(:mod:`~hypervisor.observability._backends.redis_routed`: reads, groups, trims on the node of
its slot) sharing one ``SlotMap``, a ``prepare`` that detects a cluster and ensures the layout
record, and :class:`NodePipelines` for the writer's appends.

A flush's partition groups go out as one plain pipeline per node: the partitions are grouped by
the node serving their slot now, each node's pipeline holds every group's ``XADD``s (then one
``WAIT``/``WAITAOF`` when durable), and the nodes are written to concurrently. On a single
Redis a flush is one round trip whatever the partition count; on a cluster, one per master.
The replies are split per partition (``redis_append.append_streams``): a ``MOVED``, ``ASK``,
``TRYAGAIN`` or ``CLUSTERDOWN`` reply fails only its partition's group, with the retryable
``LogUnavailableError``; a node that fails the round trip fails every group it was sent
(``LogOutcomeUnknownError`` once the request may have been sent); both mark the slot map
stale, so the caller's retry finds each slot's owner anew.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import redis.asyncio as aioredis

from hypervisor.observability._backends import redis_append
from hypervisor.observability._backends.log import (
    DurableWait,
    LogError,
    LogPermissionError,
    LogUnavailableError,
    TrimPolicy,
)
from hypervisor.observability._backends.partition_set import (
    GroupOutcome,
    PartitionSet,
    partition_retention,
)
from hypervisor.observability._backends.redis_client import make_client, url_user
from hypervisor.observability._backends.redis_cluster import (
    ensure_layout,
    make_cluster_client,
    translate_cluster_errors,
)
from hypervisor.observability._backends.redis_log import DEFAULT_FIELD, RedisStreamLog
from hypervisor.observability._backends.redis_routed import RoutedStreamLog, SlotMap
from hypervisor.observability._core.partition import PartitionLayout
from hypervisor.observability._util.cli import redis_location

__all__ = ["NodePipelines", "redis_partitions"]


class NodePipelines:
    """The appends of a partition set: one pipeline per node for each call.

    Args:
        slots: the slot map the partition logs share.
        logs: the partition logs, in partition order (their keys, slots and retention).
        make_client: makes the writing client of a node's URL (one per node, shared by the
            partitions it serves, closed by :meth:`aclose`).
        user: the ACL user, for the messages of refusals.
        field: the entry field holding the bytes.
        timeout_s: the round trip's deadline (plus the durable waits).
        retention: whether the partition logs trim (then each is told what it appended).
    """

    def __init__(
        self,
        slots: SlotMap,
        logs: Sequence[RoutedStreamLog],
        make_client: Callable[[str], aioredis.Redis],
        *,
        user: str,
        field: bytes = DEFAULT_FIELD,
        timeout_s: float = 5.0,
        retention: bool = False,
    ) -> None:
        self._slots = slots
        self._logs = tuple(logs)
        self._keys = tuple(log.name.encode() for log in logs)
        self._make_client = make_client
        self._user = user
        self._field = field
        self._timeout_s = timeout_s
        self._retention = retention
        self._clients: dict[str, aioredis.Redis] = {}
        self._closed = False

    def _client(self, url: str) -> aioredis.Redis:
        if self._closed:
            raise LogError("the partition logs are closed")
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = self._make_client(url)
        return client

    async def append_groups(
        self, groups: Mapping[int, list[bytes]], durable: DurableWait | None = None
    ) -> dict[int, GroupOutcome]:
        """See :meth:`PartitionSet.append_groups`: one pipeline per node, all concurrently."""
        outcomes: dict[int, GroupOutcome] = {}
        by_node: dict[str, list[int]] = {}
        for part in groups:
            try:
                url = await self._slots.node_url(self._logs[part].slot)
            except (LogError, LogPermissionError) as exc:  # no node answered CLUSTER SLOTS
                outcomes[part] = exc
                continue
            by_node.setdefault(url, []).append(part)
        sent = await asyncio.gather(
            *(self._send(url, parts, groups, durable) for url, parts in by_node.items())
        )
        for node_outcomes in sent:
            outcomes.update(node_outcomes)
        if self._retention:
            await asyncio.gather(
                *(
                    self._logs[part].appended(len(outcome))
                    for part, outcome in outcomes.items()
                    if isinstance(outcome, list)
                )
            )
        return outcomes

    async def _send(
        self,
        url: str,
        parts: list[int],
        groups: Mapping[int, list[bytes]],
        durable: DurableWait | None,
    ) -> dict[int, GroupOutcome]:
        """One node's pipeline: the groups of ``parts``, then the waits."""
        location = redis_location(url)
        user = self._user

        def errors(key: str) -> redis_append.Errors:
            def translate(what: str, command: str) -> AbstractContextManager[None]:
                return translate_cluster_errors(
                    what, user=user, command=command, key=key, location=location
                )

            return translate

        streams = [(self._keys[p], groups[p], errors(self._logs[p].name)) for p in parts]
        try:
            client = self._client(url)
            replies = await redis_append.append_streams(
                client,
                streams,
                field=self._field,
                timeout_s=self._timeout_s,
                durable=durable,
                errors=errors(""),
            )
        except (LogError, LogPermissionError) as exc:
            if isinstance(exc, LogUnavailableError):
                self._slots.mark_stale()
            return dict.fromkeys(parts, exc)
        outcomes: dict[int, GroupOutcome] = {}
        for part, reply in zip(parts, replies, strict=True):
            if isinstance(reply, LogUnavailableError):
                self._slots.mark_stale()  # the slot moved, or the cluster is changing
            if isinstance(reply, Exception):
                outcomes[part] = reply
            else:
                outcomes[part] = [entry_id.decode() for entry_id in reply]
        return outcomes

    async def aclose(self) -> None:
        """Close every node's client. Idempotent."""
        self._closed = True
        clients, self._clients = list(self._clients.values()), {}
        # A dead connection may fail to close: nothing to do about it.
        await asyncio.gather(*(client.aclose() for client in clients), return_exceptions=True)


def redis_partitions(
    url: str,
    layout: PartitionLayout,
    *,
    retention: TrimPolicy | None = None,
    connect_timeout_s: float = 5.0,
    **log_options: Any,
) -> PartitionSet:
    """The partition logs of ``layout`` on the Redis (single or cluster) that ``url`` names.

    Nothing connects here: :meth:`PartitionSet.prepare` detects a cluster and ensures the
    layout record; each partition log connects to its slot's node on first use, and the
    appends to each node on the first flush that writes there.

    Args:
        url: a single Redis's URL, or any cluster node's (database 0).
        layout: the partitions.
        retention: the whole stream's retention (split by :func:`partition_retention`).
        connect_timeout_s: connect timeout of every client.
        log_options: more ``RedisStreamLog`` options (timeouts, TLS files, ...).
    """
    client_options = {
        k: v
        for k, v in log_options.items()
        if k not in {"trim_interval_s", "max_block_s", "socket_timeout_s", "field"}
    }
    slots = SlotMap(url, connect_timeout_s=connect_timeout_s, **client_options)
    share = partition_retention(retention, layout.partitions)
    user = str(client_options.get("username") or url_user(url))

    def maker(key: str) -> Callable[[str], RedisStreamLog]:
        def make(node: str) -> RedisStreamLog:
            return RedisStreamLog(
                node, key, retention=share, connect_timeout_s=connect_timeout_s, **log_options
            )

        return make

    logs = [
        RoutedStreamLog(slots, layout.stream_key(i), layout.slot(i), maker(layout.stream_key(i)))
        for i in range(layout.partitions)
    ]

    def writer(node: str) -> aioredis.Redis:
        # As RedisStreamLog's writer: no socket timeout, one deadline on the round trip.
        return make_client(
            node,
            socket_timeout_s=None,
            connect_timeout_s=connect_timeout_s,
            raw_replies=True,
            **client_options,
        )

    nodes = NodePipelines(
        slots,
        logs,
        writer,
        user=user,
        field=log_options.get("field", DEFAULT_FIELD),
        timeout_s=log_options.get("socket_timeout_s", 5.0),
        retention=share is not None,
    )

    async def prepare() -> None:
        cluster = await slots.detect()
        parts.cluster = cluster
        if cluster:
            client: Any = make_cluster_client(
                url,
                socket_timeout_s=connect_timeout_s,
                connect_timeout_s=connect_timeout_s,
                **client_options,
            )
        else:
            client = make_client(
                url,
                socket_timeout_s=connect_timeout_s,
                connect_timeout_s=connect_timeout_s,
                max_connections=1,
                raw_replies=True,
                **client_options,
            )
        try:
            await ensure_layout(client, layout, user=user)
        finally:
            await client.aclose()

    parts = PartitionSet(
        layout, logs, prepare=prepare, close=nodes.aclose, append=nodes.append_groups
    )
    return parts
