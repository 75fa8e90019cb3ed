"""Redis Cluster: detecting it behind a URL, its client, its errors, the partition layout record.

The same URL form serves a single Redis and a cluster: ``redis://host:port/0`` names one node;
:func:`detect_cluster` asks that node (``INFO cluster``: ``cluster_enabled:1``), and
:func:`make_cluster_client` makes a ``redis.asyncio.RedisCluster`` from it that discovers the
other nodes (``CLUSTER SLOTS``), with the options every client of this package gets
(:func:`~hypervisor.observability._backends.redis_client.make_client`'s): no retries of its
own, no ``CLIENT SETINFO``, bytes replies.

The cluster client follows ``MOVED`` and ``ASK`` redirections itself (a slot that moved is
retried at its new owner within the same call, pipelines included), so a reshard is
transparent. What it cannot absorb in one call (``CLUSTERDOWN`` or ``TRYAGAIN`` during a
failover or migration, a master that stopped answering, a slot not covered yet, redirections
beyond redis-py's limit) leaves :func:`translate_cluster_errors` as the retryable
``LogUnavailableError``, so callers retry it with their backoff and deadline like any
connection error; everything else goes through the one translator, ``translate_errors``.
Pipelines go through :func:`execute_pipeline`, which also makes the client rediscover the
cluster after such a failure (redis-py's cluster pipeline does not by itself when it may not
retry, and would keep sending to a dead master after its replica took over: found by the
failover test).

The layout record (:func:`ensure_layout`) holds a partitioned stream's partition count at
``hvobs:layout:{<stream>}``: the first producer or worker creates it (``SET NX``), every later
one reads it and refuses to run with another count (``PartitionLayoutError``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hypervisor.observability._backends.redis_client import (
    default_client_options,
    make_client,
    translate_errors,
    url_user,
)
from hypervisor.observability._core.partition import (
    LayoutRecord,
    PartitionLayout,
    decode_layout_record,
    encode_layout_record,
)
from hypervisor.observability.errors import LogError, LogUnavailableError, PartitionLayoutError

__all__ = [
    "detect_cluster",
    "ensure_layout",
    "execute_pipeline",
    "make_cluster_client",
    "node_command",
    "node_url",
    "parse_cluster_slots",
    "read_layout",
    "translate_cluster_errors",
]


def node_url(url: str, host: str, port: int) -> str:
    """``url`` pointed at the node ``host:port`` (scheme, credentials and query kept), db 0."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    host_text = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host_text}:{port}", path="/0"))


def _slots_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_cluster_slots(
    raw: Any, asked: str
) -> tuple[list[tuple[int, int, str, int]], list[tuple[str, int]]]:
    """``CLUSTER SLOTS``'s reply as ``(first slot, last slot, master host, master port)``
    ranges, sorted, and every node it names. The reply is server input: anything malformed is
    skipped; an empty or unknown (``?``) host means the node asked, ``asked`` (Redis's
    ``cluster-preferred-endpoint``)."""
    ranges: list[tuple[int, int, str, int]] = []
    known: list[tuple[str, int]] = []
    if not isinstance(raw, list):
        return ranges, known
    for item in raw:
        try:
            first, last = int(item[0]), int(item[1])
            nodes = []
            for node in item[2:]:
                host = _slots_text(node[0]) or asked
                nodes.append((asked if host == "?" else host, int(node[1])))
        except (TypeError, ValueError, IndexError):
            continue
        nodes = [(host, port) for host, port in nodes if 0 < port < 65536]
        if not nodes or not 0 <= first <= last < 16384:
            continue
        ranges.append((first, last, *nodes[0]))
        known.extend(nodes)
    ranges.sort()
    return ranges, known


@contextmanager
def translate_cluster_errors(
    what: str, *, user: str = "default", command: str = "", key: str = "", location: str = ""
) -> Iterator[None]:
    """Translate a cluster client's errors, as ``translate_errors`` does for any client.

    ``MOVED``/``ASK`` left over after redis-py's redirections, ``TRYAGAIN``, ``CLUSTERDOWN``
    (and ``MASTERDOWN``), redis-py's other cluster errors and a slot it knows no node for become
    ``LogUnavailableError`` (retryable: a failover or a migration is under way); a cluster
    client that reaches no node at all is unavailable too. ``CROSSSLOT`` stays a ``LogError``:
    the keys are wrong, and retrying cannot fix them. The rest is ``translate_errors``'s
    (``location`` too: the ``host:port`` of a plain client's node).
    """
    with translate_errors(what, user=user, command=command, key=key, location=location):
        try:
            yield
        except (rexc.AskError, rexc.TryAgainError, rexc.ClusterError) as exc:
            # MovedError is an AskError; ClusterDownError and MasterDownError are ClusterErrors.
            raise LogUnavailableError(
                f"{what}: redis cluster in transition ({type(exc).__name__}: {exc})"
            ) from exc
        except rexc.RedisClusterException as exc:
            # Not a RedisError, so the common translator would let it through.
            if isinstance(exc, rexc.SlotNotCoveredError) or "cannot be connected" in str(exc):
                raise LogUnavailableError(f"{what}: redis cluster unreachable: {exc}") from exc
            raise LogError(f"{what}: {exc}") from exc


def _with_database_0(url: str) -> str:
    """``url`` naming database 0: a cluster node refuses ``SELECT`` of any other, and the
    detection must say so clearly rather than fail on connect."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/0"))


def _database(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    try:
        return int(path) if path else 0
    except ValueError:
        return -1


def _cluster_enabled(reply: Any) -> bool:
    """Read ``cluster_enabled`` from an ``INFO cluster`` reply (server input: checked)."""
    if isinstance(reply, str):
        reply = reply.encode()
    if not isinstance(reply, bytes):
        raise LogError(f"cluster detection: INFO cluster replied {type(reply).__name__}")
    for line in reply.splitlines():
        if line.startswith(b"cluster_enabled:"):
            return line.split(b":", 1)[1].strip() == b"1"
    # A server without the field (very old, or a proxy) is not a cluster node.
    return False


async def node_command(
    url: str, *args: Any, what: str, command: str, timeout_s: float, **options: Any
) -> Any:
    """Run one command on the node ``url`` names, through a client of one connection made
    and closed here (raw replies; ``timeout_s`` to connect and for the reply); its errors
    translated (``translate_cluster_errors``, naming ``what`` and the ACL ``command``).

    Raises:
        LogUnavailableError: the node cannot be reached (retryable).
        LogPermissionError: the URL's user may not run ``command``.
    """
    client = make_client(
        url,
        socket_timeout_s=timeout_s,
        connect_timeout_s=timeout_s,
        max_connections=1,
        raw_replies=True,
        **options,
    )
    try:
        with translate_cluster_errors(
            what, user=str(options.get("username") or url_user(url)), command=command
        ):
            return await client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def detect_cluster(url: str, *, connect_timeout_s: float = 5.0, **options: Any) -> bool:
    """Whether the node ``url`` names runs in cluster mode (``INFO cluster``).

    Args:
        url: a Redis URL of one node (``redis://`` or ``rediss://``, credentials included).
        connect_timeout_s: the connect and reply timeout of this one request.
        options: more client options (TLS files, ...), as for ``make_client``.

    Raises:
        LogUnavailableError: the node cannot be reached (retryable).
        LogPermissionError: the URL's user may not run ``INFO``.
        LogError: a cluster node named with a database other than 0 (a cluster has only 0).
    """
    reply = await node_command(
        _with_database_0(url),
        "INFO",
        "cluster",
        what="cluster detection",
        command="info",
        timeout_s=connect_timeout_s,
        **options,
    )
    enabled = _cluster_enabled(reply)
    if enabled and _database(url) != 0:
        raise LogError("cluster detection: a Redis Cluster has only database 0; use /0 in the URL")
    return enabled


def make_cluster_client(
    url: str,
    *,
    socket_timeout_s: float | None,
    connect_timeout_s: float,
    max_connections: int | None = None,
    **options: Any,
) -> RedisCluster:
    """A ``redis.asyncio.RedisCluster`` that starts from the node ``url`` names.

    The other nodes are discovered. Options are ``make_client``'s: callers own retrying, so
    the client retries nothing by itself (it still follows ``MOVED``/``ASK`` redirections
    within a call), no ``CLIENT SETINFO``, bytes replies.

    Args:
        url: a Redis URL of any node of the cluster (database 0).
        socket_timeout_s: the socket timeout of a reply (``None``: none).
        connect_timeout_s: the connect timeout.
        max_connections: the limit of each node's pool (``None``: redis-py's default); the
            cluster client has no blocking pool, so give blocking reads their own client.
        options: more ``RedisCluster`` options (TLS files, ...); they win.
    """
    limit = {} if max_connections is None else {"max_connections": max_connections}
    return RedisCluster.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
        **limit,
        **{**default_client_options(), **options},
    )


_TRANSIENT = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    OSError,
    rexc.AskError,
    rexc.TryAgainError,
    rexc.ClusterError,
    rexc.SlotNotCoveredError,
)


async def execute_pipeline(
    client: RedisCluster,
    pipe: Any,
    what: str,
    *,
    user: str = "default",
    raise_on_error: bool = True,
) -> list[Any]:
    """Send a cluster pipeline of ``client``; after a transient failure, make ``client``
    rediscover the cluster before its next call.

    redis-py's cluster pipeline, when it may not retry (this package's clients never do), raises
    a dead master's connection error without marking its slot map stale, so every later
    pipeline would go to the dead node again, even after its replica took over (its single
    commands do mark it). Closing the client's connections here marks it (``aclose`` keeps the
    client usable: the next call reconnects and reloads the slot map).

    Args:
        client: the cluster client that made ``pipe``.
        pipe: ``client.pipeline(transaction=False)`` with its commands queued.
        what: the operation, for error messages.
        user: the Redis user, for the message of a refusal.
        raise_on_error: raise the first failed command's error (translated); when false, return
            every command's reply or redis-py exception, as ``pipe.execute`` does.

    Raises:
        LogUnavailableError: the pipeline (or, with ``raise_on_error``, a command) failed
            transiently: retry it; some of its commands may have been applied.
        LogError: any other failure (see :func:`translate_cluster_errors`).
    """
    try:
        with translate_cluster_errors(what, user=user, command="pipeline"):
            replies: list[Any] = await pipe.execute(raise_on_error=raise_on_error)
    except LogUnavailableError:
        await client.aclose()
        raise
    if any(isinstance(reply, _TRANSIENT) for reply in replies):
        await client.aclose()
    return replies


async def read_layout(
    client: aioredis.Redis | RedisCluster, stream: str, *, user: str = "default"
) -> LayoutRecord | None:
    """The layout record of ``stream`` (``None`` when there is none yet).

    Raises:
        PartitionLayoutError: the stored record is unreadable (it is checked, not trusted).
        LogUnavailableError: Redis (or the key's slot) is unreachable for now (retryable).
    """
    key = PartitionLayout(stream, 1).layout_key
    with translate_cluster_errors("partition layout", user=user, command="get", key=key):
        stored = await client.get(key)
    if stored is None:
        return None
    try:
        return decode_layout_record(stored if isinstance(stored, bytes) else str(stored).encode())
    except ValueError as exc:
        raise PartitionLayoutError(
            f"stream {stream!r}: the layout record at {key!r} is unreadable ({exc}); "
            "delete it only if no process uses the stream",
            stream=stream,
            recorded=None,
            requested=None,
        ) from None


async def ensure_layout(
    client: aioredis.Redis | RedisCluster, layout: PartitionLayout, *, user: str = "default"
) -> LayoutRecord:
    """Record ``layout``'s partition count if none is recorded, else check it against the record.

    Whoever starts first (a producer or a worker) creates the record with ``SET NX``; everyone
    else reads it. Two starters racing with the same count both succeed; with different counts
    the later one refuses.

    Returns:
        the record now in Redis (equal to ``layout.record()``).

    Raises:
        PartitionLayoutError: another partition count or key hash is recorded (the message
            names the stream and both counts), or the record is unreadable.
        LogUnavailableError: Redis (or the key's slot) is unreachable for now (retryable).
    """
    key = layout.layout_key
    wanted = layout.record()
    for _ in range(3):  # the record deleted between SET NX and GET: try again
        with translate_cluster_errors("partition layout", user=user, command="set", key=key):
            created = await client.set(key, encode_layout_record(wanted), nx=True)
        if created:
            return wanted
        try:
            recorded = await read_layout(client, layout.stream, user=user)
        except PartitionLayoutError as exc:
            raise PartitionLayoutError(
                str(exc), stream=layout.stream, recorded=None, requested=layout.partitions
            ) from None
        if recorded is None:
            continue
        if recorded.partitions != layout.partitions:
            raise PartitionLayoutError(
                f"stream {layout.stream!r} has {recorded.partitions} partitions recorded "
                f"(at {key!r}), but this process was started with {layout.partitions}; start "
                f"it with {recorded.partitions} partitions",
                stream=layout.stream,
                recorded=recorded.partitions,
                requested=layout.partitions,
            )
        if (recorded.hash, recorded.tags) != (wanted.hash, wanted.tags):
            raise PartitionLayoutError(
                f"stream {layout.stream!r} records the partition hash {recorded.hash!r} and "
                f"tags {recorded.tags!r} (at {key!r}); this release routes with "
                f"{wanted.hash!r} and {wanted.tags!r}",
                stream=layout.stream,
                recorded=recorded.partitions,
                requested=layout.partitions,
            )
        return recorded
    raise LogUnavailableError(f"partition layout: the record at {key!r} keeps disappearing")
