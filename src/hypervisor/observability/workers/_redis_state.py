"""``RedisStateStore``: the ``StateStore`` seam on Redis keys.

The one module of the workers package that imports redis-py: the log seam (``_log``) has no
place for sorted sets, transactions or leases, and these are the worker's own keys. Keys of one
derivation share a hash tag, so the commit transaction stays in one slot on a cluster:

* ``<prefix>:staged``: sorted set, all scores 0, members ``<sort key>|<entry bytes>``;
* ``<prefix>:meta``: hash ``version``, ``applied``, ``seen_gen``, ``seen_count``;
* ``<prefix>:snap``: the snapshot;
* ``<prefix>:seen:<gen>``: sets of applied event ids (two generations are kept);
* ``<prefix>:lease``: the applier lease (token, with a time to live).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Any, Self

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hypervisor.observability._log.base import (
    MIN_ID,
    LogError,
    LogUnavailableError,
    next_id,
)
from hypervisor.observability.workers._state import Commit, StateMeta, sort_key

__all__ = ["RedisStateStore", "state_prefix"]

_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if not held then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def state_prefix(stream: str, group: str, derivation: str) -> str:
    """Return the key prefix of a derivation's state (hash-tagged by stream and group)."""
    return f"hvobs:worker:{{{stream}:{group}}}:{derivation}"


@contextmanager
def _translate(what: str) -> Iterator[None]:
    try:
        yield
    except (rexc.AuthenticationError, rexc.AuthorizationError) as exc:
        raise LogError(f"{what}: redis refused the credentials: {exc}") from exc
    except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
        raise LogUnavailableError(f"{what}: redis unreachable: {exc}") from exc
    except rexc.ResponseError as exc:
        message = str(exc)
        if message.startswith(("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN")):
            raise LogUnavailableError(f"{what}: {message}") from exc
        raise LogError(f"{what}: {message}") from exc
    except rexc.RedisError as exc:
        raise LogError(f"{what}: {exc}") from exc


def _unsort_key(key: bytes) -> str:
    ms, _, seq = key.partition(b"-")
    return f"{int(ms)}-{int(seq)}"


def _meta(raw: dict[bytes, bytes]) -> StateMeta:
    if not raw:
        return StateMeta()
    return StateMeta(
        version=int(raw.get(b"version", b"0")),
        applied_id=raw.get(b"applied", MIN_ID.encode()).decode(),
        seen_gen=int(raw.get(b"seen_gen", b"0")),
        seen_count=int(raw.get(b"seen_count", b"0")),
    )


class RedisStateStore:
    """A derivation's shared state in Redis.

    Args:
        url: the Redis URL (usually the event log's).
        prefix: key prefix, see :func:`state_prefix`.
        socket_timeout_s: socket timeout of the connection.
        client: an existing ``redis.asyncio.Redis`` to use instead of ``url`` (not closed by
            :meth:`aclose`).
    """

    def __init__(
        self,
        url: str | None,
        prefix: str,
        *,
        socket_timeout_s: float = 5.0,
        client: aioredis.Redis | None = None,
    ) -> None:
        if client is None:
            if url is None:
                raise ValueError("pass a url or a client")
            client = aioredis.Redis.from_url(
                url,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                retry=Retry(NoBackoff(), 0),
                decode_responses=False,
            )
            self._own_client = True
        else:
            self._own_client = False
        self._client = client
        self._prefix = prefix
        self._staged_key = f"{prefix}:staged"
        self._meta_key = f"{prefix}:meta"
        self._snap_key = f"{prefix}:snap"
        self._lease_key = f"{prefix}:lease"
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._closed = False

    def _seen_key(self, gen: int) -> str:
        return f"{self._prefix}:seen:{gen}"

    @property
    def name(self) -> str:
        """The key prefix."""
        return self._prefix

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection if this store created it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._own_client:
            with suppress(rexc.RedisError, OSError):
                await self._client.aclose()

    async def stage(self, items: list[tuple[str, bytes]]) -> None:
        """``ZADD`` the pairs (score 0, member ``<sort key>|<bytes>``)."""
        if not items:
            return
        args: list[Any] = ["ZADD", self._staged_key]
        for entry_id, data in items:
            args.append(0)
            args.append(sort_key(entry_id) + b"|" + data)
        with _translate("stage"):
            await self._client.execute_command(*args)  # type: ignore[no-untyped-call]

    async def staged(self, after_id: str, before_id: str, limit: int) -> list[tuple[str, bytes]]:
        """``ZRANGEBYLEX`` between the two ids (both exclusive)."""
        low = b"[" + sort_key(next_id(after_id))
        high = b"(" + sort_key(before_id)
        if sort_key(next_id(after_id)) >= sort_key(before_id):
            return []
        with _translate("read staged"):
            members = await self._client.execute_command(  # type: ignore[no-untyped-call]
                "ZRANGEBYLEX", self._staged_key, low, high, "LIMIT", 0, limit
            )
        out: list[tuple[str, bytes]] = []
        for member in members:
            key, _, data = bytes(member).partition(b"|")
            out.append((_unsort_key(key), data))
        return out

    async def backlog(self) -> int:
        """``ZCARD`` of the staged set."""
        with _translate("backlog"):
            return int(await self._client.zcard(self._staged_key))

    async def meta(self) -> StateMeta:
        """Read the meta hash."""
        with _translate("read meta"):
            raw: Any = await self._client.hgetall(self._meta_key)
        return _meta(raw)

    async def load(self) -> tuple[StateMeta, bytes | None]:
        """Read meta and snapshot in one transaction."""
        with _translate("load state"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._meta_key)
                pipe.get(self._snap_key)
                raw, snapshot = await pipe.execute()
        return _meta(raw), snapshot

    async def seen(self, meta: StateMeta) -> tuple[set[str], set[str]]:
        """Read the two seen generations."""
        with _translate("load seen ids"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.smembers(self._seen_key(meta.seen_gen - 1))
                pipe.smembers(self._seen_key(meta.seen_gen))
                prev, cur = await pipe.execute()
        return {m.decode() for m in prev}, {m.decode() for m in cur}

    async def commit(self, commit: Commit) -> bool:
        """``WATCH`` meta, check the version, then ``MULTI`` the whole update."""
        meta = commit.meta
        high = b"(" + sort_key(next_id(meta.applied_id))
        with _translate("commit"):
            async with self._client.pipeline(transaction=True) as pipe:
                await pipe.watch(self._meta_key)
                current = await pipe.hget(self._meta_key, "version")
                if int(current or 0) != commit.expected_version:
                    await pipe.unwatch()  # type: ignore[no-untyped-call]
                    return False
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(self._snap_key, commit.snapshot)
                pipe.hset(
                    self._meta_key,
                    mapping={
                        "version": meta.version,
                        "applied": meta.applied_id,
                        "seen_gen": meta.seen_gen,
                        "seen_count": meta.seen_count,
                    },
                )
                pipe.zremrangebylex(self._staged_key, b"-", high)
                if commit.seen_add:
                    pipe.sadd(self._seen_key(meta.seen_gen), *commit.seen_add)
                if commit.seen_drop_gen is not None:
                    pipe.delete(self._seen_key(commit.seen_drop_gen))
                try:
                    await pipe.execute()
                except rexc.WatchError:
                    return False
        return True

    async def acquire_lease(self, token: str, ttl_s: float) -> bool:
        """Take or extend the lease (one script call)."""
        with _translate("lease"):
            got = await self._acquire(keys=[self._lease_key], args=[token, int(ttl_s * 1000)])
        return bool(got)

    async def release_lease(self, token: str) -> None:
        """Delete the lease if ``token`` holds it."""
        with _translate("release lease"):
            await self._release(keys=[self._lease_key], args=[token])

    async def reset(self) -> None:
        """Delete every key of this derivation."""
        with _translate("reset"):
            keys = [key async for key in self._client.scan_iter(match=f"{self._prefix}:*")]
            if keys:
                await self._client.delete(*keys)
