"""``RedisStateStore``: the ``StateStore`` seam on Redis keys.

The workers' keys: the log protocol has no place for sorted sets, scripts or leases. Keys of one
derivation share a hash tag, so every script stays in one slot on a cluster:

* ``<prefix>:idx``: sorted set, all scores 0, one member per staged *batch*:
  ``<first sort key>|<last sort key>|<count>|<digest>`` (fixed-width sort keys, so byte order
  is the order of the batches' first ids);
* ``<prefix>:open``: the members of ``idx`` that still hold ids above the applied id (what an
  apply round scans; applied batches stay in ``idx`` as the redo log until a checkpoint);
* ``<prefix>:batches``: hash, index member -> the batch's records (msgpack ``[[id, bytes]..]``);
  staging a batch is one script call with two arguments, whatever its size;
* ``<prefix>:meta``: hash ``version``, ``applied`` (+ ``applied_key``), ``seen_gen``,
  ``seen_count``, ``checkpoint`` (+ ``checkpoint_key``), ``epoch`` (from the first commit on);
* ``<prefix>:snap``: the checkpoint snapshot;
* ``<prefix>:skip``: sorted set of the sort keys of staged ids the applier skipped;
* ``<prefix>:seen:<gen>``: lists of msgpack arrays of applied event ids (two generations);
* ``<prefix>:lease``: the applier lease (token, with a time to live);
* ``<prefix>:wake``: a list of at most one element, pushed after a worker staged and
  acknowledged a batch, popped (``BLPOP``) by the idle lease holder.

A batch staged again after a redelivery is the same member (same ids, same bytes: no change);
a redelivered *subset* (a claim, a re-read after a crash) is another member whose ids overlap
the first one's: readers merge the batches they fetch and keep each id once.

Everything read back is checked before use, never trusted: meta fields must be numbers and ids,
members and records must have their shapes, keys must hold their types. What fails is reported
to the store's :class:`~hypervisor.observability._backends.state_errors.StateErrors`: a bad item
(a garbage batch, a seen-id element, a skipped-id member) is skipped and counted, a lease without
expiry or a wake-up key of the wrong type is repaired and counted, and an unreadable meta hash
or a key of the wrong type raises ``WorkerStateError`` (``docs/workers.md``, "Unreadable state").
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions as rexc

from hypervisor.observability._backends import redis_state_scripts as scripts
from hypervisor.observability._backends.log import (
    MIN_ID,
    next_id,
    parse_id,
)
from hypervisor.observability._backends.redis_client import (
    make_client,
    redis_location,
    retry_read,
    translate_errors,
    url_user,
)
from hypervisor.observability._backends.redis_state_records import (
    _INTEGER,
    _KEY_WIDTH,
    _MEMBER,
    _SORT_KEY,
    _bad_member,
    _batch_records,
    _ids_decoder,
    _key_tuple,
    _meta,
    _pairs,
    _quote,
    _records_encoder,
    _unsort_key,
    batch_member as batch_member,
    merge_batches as merge_batches,
)
from hypervisor.observability._backends.state import (
    Checkpoint,
    Commit,
    Restored,
    StateMeta,
    checkpoint_newer,
    sort_key,
    state_prefix,
)
from hypervisor.observability._backends.state_errors import StateErrors
from hypervisor.observability._util.aio import AsyncResource
from hypervisor.observability.errors import WorkerStateError

__all__ = ["RedisStateStore", "state_prefix"]

_FETCH_BYTES: Final = 32 << 20
"""Bytes of records a first fetch returns at most (and one batch more): an apply round holds
about this much whatever the size of the events. Widened with the scan."""
_FETCH_BATCHES: Final = 64
"""Batches a first fetch scans; widened when they hold nothing usable."""

_EXPECTED_TYPES: Final = {
    "idx": "zset",
    "open": "zset",
    "batches": "hash",
    "meta": "hash",
    "snap": "string",
    "skip": "zset",
}


class RedisStateStore(AsyncResource):
    """A derivation's shared state in Redis.

    Args:
        url: the Redis URL (usually the event log's).
        prefix: key prefix, see :func:`state_prefix`.
        socket_timeout_s: socket timeout of the connection.
        client: an existing ``redis.asyncio.Redis`` to use instead of ``url`` (not closed by
            :meth:`aclose`).
        **client_options: extra ``redis.asyncio.Redis`` options for the client made from
            ``url`` (TLS: ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``).
    """

    def __init__(
        self,
        url: str | None,
        prefix: str,
        *,
        socket_timeout_s: float = 5.0,
        client: aioredis.Redis | None = None,
        **client_options: Any,
    ) -> None:
        if client is None:
            if url is None:
                raise ValueError("pass a url or a client")
            client = make_client(
                url,
                socket_timeout_s=socket_timeout_s,
                connect_timeout_s=socket_timeout_s,
                **client_options,
            )
            self._own_client = True
        else:
            self._own_client = False
        self._user = str(client.connection_pool.connection_kwargs.get("username") or "default")
        if url is not None and self._user == "default":
            self._user = url_user(url)
        made = client.connection_pool.connection_kwargs
        self._location = (
            redis_location(url)
            if url is not None
            else str(
                made.get("path") or f"{made.get('host', 'localhost')}:{made.get('port', 6379)}"
            )
        )
        self._client = client
        self._prefix = prefix
        self._idx_key = f"{prefix}:idx"
        self._batches_key = f"{prefix}:batches"
        self._open_key = f"{prefix}:open"
        self._skip_key = f"{prefix}:skip"
        self._meta_key = f"{prefix}:meta"
        self._snap_key = f"{prefix}:snap"
        self._lease_key = f"{prefix}:lease"
        self._wake_key = f"{prefix}:wake"
        self._acquire = client.register_script(scripts.ACQUIRE)
        self._release = client.register_script(scripts.RELEASE)
        self._lease_round = client.register_script(scripts.LEASE_ROUND)
        self._notify = client.register_script(scripts.NOTIFY)
        self._stage = client.register_script(scripts.STAGE)
        self._fetch = client.register_script(scripts.FETCH)
        self._replay = client.register_script(scripts.REPLAY)
        self._restore = client.register_script(scripts.RESTORE)
        self._commit = client.register_script(scripts.COMMIT)
        self._closed = False
        self._errors = StateErrors(prefix)

    def _seen_key(self, gen: int) -> str:
        return f"{self._prefix}:seen:{gen}"

    @asynccontextmanager
    async def _op(self, operation: str, command: str = "evalsha") -> AsyncIterator[None]:
        """Run one operation: translate backend errors, turn a key of the wrong type into
        ``WorkerStateError`` and report unreadable state to :attr:`errors`."""
        try:
            try:
                yield
            except rexc.ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    with self._translate(operation, command):
                        raise
                raise await self._wrong_type(operation) from exc
            except (rexc.RedisError, OSError):
                with self._translate(operation, command):
                    raise
        except WorkerStateError as error:
            self.errors.fail(operation, error)
            raise
        self.errors.ok(operation)

    def _translate(self, operation: str, command: str) -> Any:
        """Translate redis-py errors, naming this store's user, the command and its keys."""
        return translate_errors(
            operation,
            user=self._user,
            command=command,
            key=f"{self._prefix}:*",
            location=self._location,
        )

    async def _wrong_type(self, operation: str) -> WorkerStateError:
        """Name the key of this derivation that holds the wrong type (a diagnostic read)."""
        expected = dict(_EXPECTED_TYPES)
        try:
            gen: Any = None
            with suppress(rexc.ResponseError):  # the meta hash itself may be the culprit
                gen = await self._client.hget(self._meta_key, "seen_gen")
            if isinstance(gen, bytes) and _INTEGER.fullmatch(gen):
                expected[f"seen:{int(gen) - 1}"] = expected[f"seen:{int(gen)}"] = "list"
            async with self._client.pipeline(transaction=False) as pipe:
                for name in expected:
                    pipe.type(f"{self._prefix}:{name}")
                kinds = await pipe.execute()
        except (rexc.RedisError, OSError):
            kinds = []
        for (name, wanted), kind in zip(expected.items(), kinds, strict=False):
            found = kind.decode() if isinstance(kind, bytes) else str(kind)
            if found not in ("none", wanted):
                return WorkerStateError(
                    f"{self._prefix}:{name} holds a {found}, not a {wanted}",
                    key=name.partition(":")[0],
                )
        return WorkerStateError(
            f"{operation}: a key of {self._prefix} holds the wrong type of value", key="state"
        )

    @property
    def name(self) -> str:
        """The key prefix."""
        return self._prefix

    @property
    def errors(self) -> StateErrors:
        """The unreadable state this store met (reported by every operation)."""
        return self._errors

    async def aclose(self) -> None:
        """Close the connection if this store created it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._own_client:
            with suppress(rexc.RedisError, OSError):
                await self._client.aclose()

    async def stage(self, items: list[tuple[str, bytes]]) -> None:
        """Stage the pairs as one batch (one script call, two arguments)."""
        if not items:
            return
        member, records = batch_member(items)
        async with self._op("stage"):
            await self._stage(
                keys=[self._idx_key, self._batches_key, self._open_key], args=[member, records]
            )

    def _applied_key(self, key: Any, applied: Any) -> tuple[int, int]:
        """The applied sort key a script returned, checked against the applied id."""
        fields = {b"applied_key": bytes(key), b"applied": bytes(applied)} if applied else {}
        return parse_id(_meta(fields, self._meta_key).applied_id)

    async def staged(self, after_id: str, before_id: str, limit: int) -> list[tuple[str, bytes]]:
        """Merge the open batches holding ids in the range; see ``StateStore.staged``."""
        low, high = parse_id(after_id), parse_id(before_id)
        if low >= high:
            return []
        low_key, high_key = sort_key(after_id), sort_key(before_id)
        scan, budget = _FETCH_BATCHES, _FETCH_BYTES
        async with self._op("read staged"):
            while True:
                fetch_args = [low_key, high_key, scan, budget]
                more, flat, applied_key, applied = await retry_read(
                    self._client,
                    lambda args=fetch_args: self._fetch(  # type: ignore[misc]
                        keys=[self._open_key, self._batches_key, self._meta_key], args=args
                    ),
                )
                low = max(low, self._applied_key(applied_key, applied))
                if more and not _MEMBER.fullmatch(bytes(more)):
                    # No bound from a member no worker wrote: scan past it.
                    _bad_member(bytes(more), self.errors)
                    scan *= 4
                    budget *= 4
                    continue
                # Ids at or above the first batch not scanned may be in batches not fetched.
                bound = min(high, _key_tuple(bytes(more))) if more else high
                records = merge_batches(flat, low, bound, self.errors)
                if records or not more:
                    return records[:limit]
                # The scanned batches were all applied ones awaiting the checkpoint, or the
                # budget cut between batches starting at the same id.
                scan *= 4
                budget *= 4

    async def backlog(self) -> int:
        """Count the distinct staged ids above the applied id.

        From the batch headers alone, except for batches whose id ranges overlap another's or
        straddle the applied id: their records are read to count each id once.
        """
        async with self._op("backlog", "zrange"):
            raw_meta, members = await retry_read(self._client, self._meta_and_open)
            applied = parse_id(_meta(raw_meta, self._meta_key).applied_id)
            # Clusters of batches with overlapping id ranges (headers come ordered by first id).
            clusters: list[list[bytes]] = []
            reach = applied
            for raw in members:
                member = bytes(raw)
                if not _MEMBER.fullmatch(member):
                    _bad_member(member, self.errors)
                    continue
                last = _key_tuple(member[_KEY_WIDTH + 1 :])
                if last <= applied:
                    continue
                if clusters and _key_tuple(member) <= reach:
                    clusters[-1].append(member)
                else:
                    clusters.append([member])
                reach = max(reach, last)
            total = 0
            exact: list[bytes] = []
            for cluster in clusters:
                if len(cluster) == 1 and _key_tuple(cluster[0]) > applied:
                    total += int(cluster[0].split(b"|")[2])
                else:
                    exact.extend(cluster)
            if exact:
                blobs: list[Any] = await retry_read(
                    self._client, lambda: self._client.hmget(self._batches_key, exact)
                )
                ids: set[str] = set()
                for member, blob in zip(exact, blobs, strict=True):
                    records = _batch_records(member, blob, self.errors)
                    if records is not None:
                        ids.update(entry_id for entry_id, _ in records)
                total += sum(1 for entry_id in ids if parse_id(entry_id) > applied)
        return total

    async def _meta_and_open(self) -> list[Any]:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._meta_key)
            pipe.zrange(self._open_key, 0, -1)
            return await pipe.execute()

    async def _meta_and_snapshot(self) -> list[Any]:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._meta_key)
            pipe.get(self._snap_key)
            return await pipe.execute()

    async def meta(self) -> StateMeta:
        """Read the meta hash."""
        async with self._op("read meta", "hgetall"):
            raw: Any = await retry_read(self._client, lambda: self._client.hgetall(self._meta_key))
            return _meta(raw, self._meta_key)

    async def load(self) -> tuple[StateMeta, bytes | None]:
        """Read meta and checkpoint snapshot in one transaction."""
        async with self._op("load state", "hgetall"):
            raw, snapshot = await retry_read(self._client, self._meta_and_snapshot)
            return _meta(raw, self._meta_key), snapshot

    async def checkpoint(self, newer_than: str = MIN_ID, epoch: str = "") -> Checkpoint:
        """Read the meta; the snapshot too (meta and snapshot in one transaction) only when
        the checkpoint is not the known one. See ``StateStore.checkpoint``."""
        async with self._op("read checkpoint", "hgetall"):
            raw: Any = await retry_read(self._client, lambda: self._client.hgetall(self._meta_key))
            meta = _meta(raw, self._meta_key)  # checks the checkpoint field too
            checkpoint_id = bytes(raw.get(b"checkpoint", MIN_ID.encode())).decode()
            if not checkpoint_newer(meta, checkpoint_id, newer_than, epoch):
                return Checkpoint(meta, checkpoint_id, None)
            raw, snapshot = await retry_read(self._client, self._meta_and_snapshot)
            meta = _meta(raw, self._meta_key)
            checkpoint_id = bytes(raw.get(b"checkpoint", MIN_ID.encode())).decode()
            return Checkpoint(meta, checkpoint_id, snapshot)

    def _skipped_ids(self, keys: list[Any]) -> frozenset[str]:
        """The skipped ids of sort keys read back; a member no worker wrote is left out."""
        ids: set[str] = set()
        for raw in keys:
            key = bytes(raw)
            if _SORT_KEY.fullmatch(key):
                ids.add(_unsort_key(key))
            else:
                self.errors.skipped("skip", f"ignored skipped-id member {_quote(key)}")
        return frozenset(ids)

    async def restore(self) -> Restored:
        """Read meta, checkpoint and redo records in one script call."""
        async with self._op("restore state"):
            raw_meta, snapshot, flat, skips = await retry_read(
                self._client,
                lambda: self._restore(
                    keys=[
                        self._meta_key,
                        self._snap_key,
                        self._idx_key,
                        self._batches_key,
                        self._skip_key,
                    ]
                ),
            )
            fields = _pairs(raw_meta)
            meta = _meta(fields, self._meta_key)
            checkpoint = fields.get(b"checkpoint", MIN_ID.encode()).decode()
            records = merge_batches(
                flat, parse_id(checkpoint), parse_id(next_id(meta.applied_id)), self.errors
            )
            return Restored(meta, snapshot, checkpoint, records, self._skipped_ids(skips))

    async def replay(
        self, after_id: str, upto_id: str, epoch: str | None = None
    ) -> tuple[list[tuple[str, bytes]], frozenset[str]] | None:
        """Read the redo records after ``after_id`` (one script call); see ``StateStore``."""
        async with self._op("replay state"):
            reply = await retry_read(
                self._client,
                lambda: self._replay(
                    keys=[self._meta_key, self._idx_key, self._batches_key, self._skip_key],
                    args=[
                        sort_key(after_id),
                        sort_key(upto_id),
                        b"0" if epoch is None else b"1",
                        epoch or "",
                    ],
                ),
            )
            if reply is None:
                return None
            flat, skips = reply
            records = merge_batches(
                flat, parse_id(after_id), parse_id(next_id(upto_id)), self.errors
            )
            return records, self._skipped_ids(skips)

    async def seen(self, meta: StateMeta) -> tuple[list[str], list[str]]:
        """Read the two seen generations in commit order (an element no worker wrote is left
        out)."""
        async with self._op("load seen ids", "lrange"):

            async def both() -> list[Any]:
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.lrange(self._seen_key(meta.seen_gen - 1), 0, -1)
                    pipe.lrange(self._seen_key(meta.seen_gen), 0, -1)
                    return await pipe.execute()

            prev, cur = await retry_read(self._client, both)
            return self._unpack_ids(prev, meta.seen_gen - 1), self._unpack_ids(cur, meta.seen_gen)

    def _unpack_ids(self, blobs: list[bytes], gen: int) -> list[str]:
        ids: list[str] = []
        for blob in blobs:
            try:
                ids.extend(_ids_decoder.decode(blob))
            except Exception as exc:  # msgspec raises DecodeError, ValidationError, ...
                self.errors.skipped(
                    "seen", f"ignored element {_quote(bytes(blob))} of {self._seen_key(gen)}: {exc}"
                )
        return ids

    async def commit(self, commit: Commit) -> bool:
        """Run the version-checked commit script; see ``StateStore.commit``."""
        meta = commit.meta
        drop = commit.seen_drop_gen
        keys = [
            self._meta_key,
            self._seen_key(meta.seen_gen),
            self._seen_key(meta.seen_gen if drop is None else drop),
            self._skip_key,
            self._snap_key,
            self._idx_key,
            self._batches_key,
            self._open_key,
        ]
        args: list[Any] = [
            commit.expected_version,
            meta.version,
            meta.applied_id,
            sort_key(meta.applied_id),
            meta.seen_gen,
            meta.seen_count,
            _records_encoder.encode(commit.seen_add) if commit.seen_add else b"",
            b"0" if drop is None else b"1",
            b"" if commit.snapshot is None else commit.snapshot,
            commit.expected_epoch,
            meta.epoch,
            *(sort_key(entry_id) for entry_id in commit.skipped),
        ]
        async with self._op("commit"):
            done = await self._commit(keys=keys, args=args)
        return bool(done)

    def _repaired(self, what: Any, key: str, name: str) -> None:
        if what:
            self.errors.skipped(
                name, f"replaced {key}, which held {bytes(what).decode(errors='replace')}"
            )

    async def acquire_lease(self, token: str, ttl_s: float) -> bool:
        """Take or extend the lease (one script call)."""
        async with self._op("lease"):
            got, repaired = await self._acquire(
                keys=[self._lease_key], args=[token, int(ttl_s * 1000)]
            )
        self._repaired(repaired, self._lease_key, "lease")
        return bool(got)

    async def lease_round(self, token: str, ttl_s: float) -> StateMeta | None:
        """Take or extend the lease and read the meta's version, epoch and applied id (one
        script call)."""
        async with self._op("lease round"):
            held, version, repaired, epoch, applied, applied_key = await self._lease_round(
                keys=[self._lease_key, self._meta_key], args=[token, int(ttl_s * 1000)]
            )
            self._repaired(repaired, self._lease_key, "lease")
            if not held:
                return None
            fields = {b"version": bytes(version)}
            for name, value in ((b"epoch", epoch), (b"applied", applied)):
                if value:
                    fields[name] = bytes(value)
            if applied:
                fields[b"applied_key"] = bytes(applied_key)
            return _meta(fields, self._meta_key)

    async def notify(self) -> None:
        """Push the wake-up (one script call)."""
        async with self._op("notify"):
            repaired = await self._notify(keys=[self._wake_key])
        self._repaired(repaired, self._wake_key, "wake")

    async def wait_notified(self, timeout_s: float) -> bool:
        """``BLPOP`` the wake-up list for at most ``timeout_s``."""
        try:
            reply = await self._client.blpop([self._wake_key], max(0.001, timeout_s))
        except rexc.ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                with self._translate("wait", "blpop"):
                    raise
            await self.notify()  # replaces the key (reported) and leaves a wake-up behind
            return True
        except (rexc.RedisError, OSError):
            with self._translate("wait", "blpop"):
                raise
        return reply is not None

    async def release_lease(self, token: str) -> None:
        """Delete the lease if ``token`` holds it."""
        async with self._op("release lease"):
            await self._release(keys=[self._lease_key], args=[token])

    async def reset(self) -> None:
        """Delete every key of this derivation."""
        async with self._op("reset", "scan"):
            keys = [key async for key in self._client.scan_iter(match=f"{self._prefix}:*")]
            if keys:
                await self._client.delete(*keys)
