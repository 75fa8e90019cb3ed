"""``RedisStreamLog``: the ``StreamLog`` contract on one Redis stream.

Three clients share one URL: a writer (appends pipelined in ``redis_append``), a reader for
blocking reads (its socket timeout stays above the longest ``BLOCK`` so redis-py 8's default of
5 s cannot break them) and a control client for group management, acks and trimming. Response
callbacks are switched off so replies arrive raw (hiredis-parsed lists and bytes) and their shape
does not depend on the redis-py version. The clients come from ``redis_client.make_client`` and
every redis-py error is translated by ``redis_client.translate_errors`` where it is caught.

The reading path (``read``, ``head_id``, ``first_id``, ``length``, ``id_from_end``,
``count_after``) runs plain read commands only, no scripts: Redis counts every key a script is
given as written, so a read-only ACL user could not run one. The server version comes from
``HELLO``, which every user may run.

Retention never removes entries a consumer group still needs, and keeps up with any append
rate: its script and schedule are in ``redis_trim.py``.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions as rexc

from hypervisor.observability._backends import redis_append
from hypervisor.observability._backends.log import (
    ClaimResult,
    ConsumerPending,
    DurabilityOffer,
    DurableWait,
    Entry,
    GroupInfo,
    GroupPosition,
    LogError,
    LogGroupMissingError,
    LogPermissionError,
    LogUnavailableError,
    PendingSummary,
    StreamInfo,
    TrimPolicy,
)
from hypervisor.observability._backends.redis_client import (
    make_client,
    retry_read,
    translate_errors,
    url_user,
)
from hypervisor.observability._backends.redis_replies import (
    EMPTY_INFO as _EMPTY_INFO,
    entries as _entries,
    int_or_none as _int_or_none,
    pairs as _pairs,
    stream_entries as _stream_entries,
    stream_info as _stream_info,
    text as _text,
)
from hypervisor.observability._backends.redis_trim import TRIM_SCRIPT, TrimSchedule, trim_args
from hypervisor.observability._util.aio import AsyncResource
from hypervisor.observability._util.cli import redis_location

__all__ = ["DEFAULT_FIELD", "RedisStreamLog", "translate_errors"]

_log = logging.getLogger(__name__)

DEFAULT_FIELD = b"e"
"""The stream entry field that holds an encoded event."""


async def _call(client: aioredis.Redis, *args: Any) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


async def _read(client: aioredis.Redis, *args: Any) -> Any:
    """A command that changes nothing: once more if its pooled connection was dead."""
    return await retry_read(client, lambda: _call(client, *args))


_PAGE: Final = 500
"""Entries per ``XRANGE``/``XREVRANGE`` page when ``id_from_end``/``count_after`` walk ids (the
replies carry the entries' bytes too: a page bounds that transfer)."""


class RedisStreamLog(AsyncResource):
    """A ``StreamLog`` on one Redis stream.

    Args:
        url: ``redis://`` or ``rediss://`` (TLS) URL; ACL username and password come from it
            (``redis://user:secret@host:6379/0``).
        name: the stream key.
        retention: bounds applied by ``trim`` and automatically after appends (after every
            ``max_len / 4`` entries this log appended, and every ``trim_interval_s``);
            ``None`` keeps everything.
        trim_interval_s: longest time between automatic trims while appending (at most
            ``max_age_s / 2``).
        max_block_s: the longest ``BLOCK`` a read may use (longer requests are capped); the
            reader's socket timeout is this plus ``socket_timeout_s``.
        socket_timeout_s: socket timeout of the writer and control connections.
        connect_timeout_s: TCP/TLS connect timeout.
        field: the entry field holding the bytes.
        **client_options: extra ``redis.asyncio.Redis`` options (e.g. ``ssl_ca_certs``).
    """

    def __init__(
        self,
        url: str,
        name: str = "hvobs:events",
        *,
        retention: TrimPolicy | None = None,
        trim_interval_s: float = 1.0,
        max_block_s: float = 5.0,
        socket_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        field: bytes = DEFAULT_FIELD,
        **client_options: Any,
    ) -> None:
        self._name = name
        self._key = name.encode()
        self._user = str(client_options.get("username") or url_user(url))
        self._location = redis_location(url)
        self._field = field
        self._retention = retention
        self._schedule = None if retention is None else TrimSchedule(retention, trim_interval_s)
        self._max_block_s = max_block_s
        self._version: tuple[int, int, int] | None = None
        self._scripts: dict[str, str] = {}
        self._closed = False
        self.trimmed = 0
        """Entries removed by retention so far (as reported by the server)."""
        self.trim_errors = 0
        """Automatic trims that failed (the append itself had succeeded)."""

        def client(socket_timeout_s: float | None) -> aioredis.Redis:
            return make_client(
                url,
                socket_timeout_s=socket_timeout_s,
                connect_timeout_s=connect_timeout_s,
                raw_replies=True,
                **client_options,
            )

        # The writer reads replies without a socket timeout: redis-py would otherwise arm a
        # timer for every reply of a pipeline (a measurable share of the per-entry cost), so
        # append_many puts one deadline on the whole round trip instead.
        self._write_timeout_s = socket_timeout_s
        self._writer = client(None)
        self._reader = client(max_block_s + socket_timeout_s)
        self._control = client(socket_timeout_s)

    @property
    def name(self) -> str:
        """The stream key."""
        return self._name

    @property
    def user(self) -> str:
        """The ACL user the connections authenticate as (``"default"`` without one)."""
        return self._user

    def _errors(self, what: str, command: str) -> Any:
        return translate_errors(
            what, user=self._user, command=command, key=self._name, location=self._location
        )

    async def aclose(self) -> None:
        """Close all connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for made in (self._writer, self._reader, self._control):
            try:
                await made.aclose()
            except (rexc.RedisError, OSError) as exc:  # closing a dead connection
                _log.debug("closing redis client: %s", exc)

    def _check_open(self) -> None:
        if self._closed:
            raise LogError(f"log {self._name!r} is closed")

    async def append_many(
        self, entries: list[bytes], durable: DurableWait | None = None
    ) -> list[str]:
        """Append in one pipeline; see ``StreamLog.append_many``, ``redis_append.append``."""
        self._check_open()
        if not entries:
            return []
        ids = await redis_append.append(
            self._writer,
            entries,
            key=self._key,
            field=self._field,
            timeout_s=self._write_timeout_s,
            durable=durable,
            errors=self._errors,
        )
        await self.appended(len(ids))
        return [entry_id.decode() for entry_id in ids]

    async def appended(self, count: int) -> None:
        """Count ``count`` entries appended to the stream, by ``append_many`` or by a pipeline
        that serves several streams of the server: run the automatic trim when it is due."""
        schedule = self._schedule
        if self._retention is not None and schedule is not None and schedule.appended(count):
            await self._auto_trim(self._retention)

    async def _auto_trim(self, retention: TrimPolicy) -> None:
        try:
            await self.trim(retention)
        except LogPermissionError as exc:
            # The append succeeded; a refusal is permanent, so stop trying (and saying so).
            self.trim_errors += 1
            self._retention = None
            _log.error("automatic retention of %r is off: %s", self._name, exc)
        except LogError as exc:
            self.trim_errors += 1
            _log.warning("retention trim of %r failed: %s", self._name, exc)

    def _block_ms(self, block_s: float | None) -> list[Any]:
        if block_s is None:
            return []
        return [b"BLOCK", max(1, int(min(block_s, self._max_block_s) * 1000))]

    async def read(self, after_id: str, count: int, block_s: float | None = None) -> list[Entry]:
        """Read after an id (``XREAD``); see ``StreamLog.read``."""
        self._check_open()
        with self._errors("read", "xread"):
            raw = await _read(
                self._reader,
                b"XREAD",
                b"COUNT",
                count,
                *self._block_ms(block_s),
                b"STREAMS",
                self._key,
                after_id,
            )
        return _stream_entries(raw, self._field)

    async def read_with_info(self, after_id: str, count: int) -> tuple[list[Entry], StreamInfo]:
        """``XREAD`` and ``XINFO STREAM`` in one pipeline; see ``StreamLog.read_with_info``.

        Redis runs the commands a connection sent together one after the other, no other
        client's command in between (they arrive in one write; a transaction would guarantee
        it, but would need ``MULTI`` in the reader's ACL role).
        """
        self._check_open()
        with self._errors("read", "xread"):
            pipe = self._reader.pipeline(transaction=False)
            pipe.execute_command(b"XREAD", b"COUNT", count, b"STREAMS", self._key, after_id)
            pipe.execute_command(b"XINFO", b"STREAM", self._key)
            raw, info = await pipe.execute(raise_on_error=False)
        for reply in (raw, info):
            if isinstance(reply, rexc.ResponseError) and "no such key" in str(reply):
                return [], _EMPTY_INFO
            if isinstance(reply, Exception):
                with self._errors("read", "xinfo|stream"):
                    raise reply
        return _stream_entries(raw, self._field), _stream_info(info)

    async def stream_info(self) -> StreamInfo:
        """Return ``XINFO STREAM``'s counters; see ``StreamLog.stream_info``."""
        self._check_open()
        try:
            with self._errors("stream_info", "xinfo|stream"):
                raw = await _call(self._control, b"XINFO", b"STREAM", self._key)
        except LogGroupMissingError:  # "no such key": an empty log
            return _EMPTY_INFO
        return _stream_info(raw)

    async def head_id(self) -> str:
        """Return the stream's last generated id; see ``StreamLog.head_id``."""
        self._check_open()
        try:
            with self._errors("head_id", "xinfo|stream"):
                raw = await _read(self._control, b"XINFO", b"STREAM", self._key)
        except LogGroupMissingError:  # "no such key": an empty log
            return "0-0"
        return _text(_pairs(raw)["last-generated-id"])

    async def first_id(self) -> str | None:
        """Return the oldest retained id; see ``StreamLog.first_id``."""
        self._check_open()
        with self._errors("first_id", "xrange"):
            raw = await _read(self._control, b"XRANGE", self._key, b"-", b"+", b"COUNT", 1)
        return _text(raw[0][0]) if raw else None

    async def length(self) -> int:
        """Return ``XLEN``."""
        self._check_open()
        with self._errors("length", "xlen"):
            return int(await _read(self._control, b"XLEN", self._key))

    async def id_from_end(self, n: int) -> str | None:
        """Return the ``n``-th newest id; see ``StreamLog.id_from_end``.

        Read commands only (a read-only user may run it): ``XLEN``, then pages of ids from
        whichever end of the stream is nearer, so at most ``min(n, length - n)`` entries are
        transferred, and none when the stream holds at most ``n``. Not atomic: entries appended
        or trimmed meanwhile move the answer by as many entries.
        """
        self._check_open()
        n = max(1, n)
        length = await self.length()
        if length == 0:
            return None
        if length <= n:
            return await self.first_id()
        if length - n < n:
            return await self._id_at("id_from_end", forward=True, skip=length - n)
        return await self._id_at("id_from_end", forward=False, skip=n - 1)

    async def _id_at(self, what: str, *, forward: bool, skip: int) -> str | None:
        """The id ``skip`` entries from the oldest (``forward``) or newest end; the farthest
        id reached when fewer are retained."""
        command = b"XRANGE" if forward else b"XREVRANGE"
        start, stop = (b"-", b"+") if forward else (b"+", b"-")
        last: str | None = None
        while True:
            count = min(skip + 1, _PAGE)
            with self._errors(what, command.decode().lower()):
                page = await _read(self._control, command, self._key, start, stop, b"COUNT", count)
            if not page:
                return last
            if len(page) > skip:
                return _text(page[skip][0])
            skip -= len(page)
            last = _text(page[-1][0])
            start = b"(" + last.encode()

    async def count_after(self, after_id: str, limit: int) -> int:
        """Count entries after an id, at most ``limit``; see ``StreamLog.count_after``.

        Read commands only (pages of ``XRANGE``): it transfers the entries it counts, so keep
        ``limit`` to what the caller needs.
        """
        self._check_open()
        if after_id in ("0", "0-0"):
            after_id = "0-0"
        counted = 0
        start = b"(" + after_id.encode()
        while counted < limit:
            count = min(limit - counted, _PAGE)
            with self._errors("count_after", "xrange"):
                page = await _read(
                    self._control, b"XRANGE", self._key, start, b"+", b"COUNT", count
                )
            if not page:
                break
            counted += len(page)
            start = b"(" + _text(page[-1][0]).encode()
        return counted

    async def _script(self, source: str, keys: list[bytes], args: list[Any]) -> Any:
        """Run a Lua script by its digest, loading it once (again after a server restart)."""
        sha = self._scripts.get(source)
        if sha is not None:
            try:
                return await _call(self._control, b"EVALSHA", sha, len(keys), *keys, *args)
            except rexc.NoScriptError:
                pass
        self._scripts[source] = _text(await _call(self._control, b"SCRIPT", b"LOAD", source))
        return await _call(
            self._control, b"EVALSHA", self._scripts[source], len(keys), *keys, *args
        )

    async def ensure_group(self, group: str, start_id: str = "0") -> bool:
        """Create a group (and the stream) if missing; see ``StreamLog.ensure_group``."""
        self._check_open()
        try:
            with self._errors("ensure_group", "xgroup|create"):
                await _call(
                    self._control, b"XGROUP", b"CREATE", self._key, group, start_id, b"MKSTREAM"
                )
        except LogError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    async def read_group(
        self,
        group: str,
        consumer: str,
        count: int,
        block_s: float | None = None,
        *,
        pending: bool = False,
    ) -> list[Entry]:
        """Deliver entries to a consumer (``XREADGROUP``); see ``StreamLog.read_group``."""
        self._check_open()
        args: list[Any] = [b"XREADGROUP", b"GROUP", group, consumer, b"COUNT", count]
        if not pending:
            args += self._block_ms(block_s)
        args += [b"STREAMS", self._key, b"0" if pending else b">"]
        with self._errors("read_group", "xreadgroup"):
            raw = await _call(self._reader, *args)
        return _stream_entries(raw, self._field)

    async def ack(self, group: str, ids: list[str]) -> int:
        """Acknowledge entries (``XACK``)."""
        self._check_open()
        if not ids:
            return 0
        with self._errors("ack", "xack"):
            return int(await _call(self._control, b"XACK", self._key, group, *ids))

    async def claim_idle(
        self,
        group: str,
        consumer: str,
        min_idle_s: float,
        count: int,
        start_id: str = "0-0",
    ) -> ClaimResult:
        """Claim idle pending entries (``XAUTOCLAIM``); see ``StreamLog.claim_idle``."""
        self._check_open()
        with self._errors("claim_idle", "xautoclaim"):
            raw = await _call(
                self._control,
                b"XAUTOCLAIM",
                self._key,
                group,
                consumer,
                int(min_idle_s * 1000),
                start_id,
                b"COUNT",
                count,
            )
        # Redis 6.2 replies [next, entries]; 7.0+ adds a third element, the deleted ids.
        next_start = _text(raw[0])
        claimed: list[Entry] = []
        deleted: list[str] = [_text(i) for i in raw[2]] if len(raw) > 2 and raw[2] else []
        for entry in _entries(raw[1], self._field):
            if entry.data is None:  # 6.2 reports a deleted entry as a nil body
                deleted.append(entry.id)
            else:
                claimed.append(entry)
        return ClaimResult(next_start, claimed, deleted)

    async def pending_summary(self, group: str) -> PendingSummary:
        """Summarise a group's PEL (``XPENDING`` and its extended form for the idle time)."""
        self._check_open()
        with self._errors("pending_summary", "xpending"):
            raw = await _read(self._control, b"XPENDING", self._key, group)
            count = int(raw[0])
            if count == 0:
                return PendingSummary(0, None, None, 0.0, ())
            oldest = await _read(self._control, b"XPENDING", self._key, group, b"-", b"+", 1)
        idle_s = int(oldest[0][2]) / 1000 if oldest else 0.0
        consumers = tuple(ConsumerPending(_text(name), int(n)) for name, n in sorted(raw[3] or []))
        return PendingSummary(count, _text(raw[1]), _text(raw[2]), idle_s, consumers)

    async def group_position(self, group: str) -> GroupPosition:
        """``XINFO GROUPS`` then ``XPENDING`` (summary) in one pipeline; see
        ``StreamLog.group_position``. Redis runs the two one after the other, in that order."""
        self._check_open()
        with self._errors("group_position", "xpending"):

            async def both() -> list[Any]:
                pipe = self._control.pipeline(transaction=False)
                pipe.execute_command(b"XINFO", b"GROUPS", self._key)
                pipe.execute_command(b"XPENDING", self._key, group)
                return await pipe.execute(raise_on_error=False)

            groups, pending = await retry_read(self._control, both)
            for reply in (groups, pending):
                if isinstance(reply, Exception):
                    raise reply
        for item in groups:
            fields = _pairs(item)
            if _text(fields["name"]) == group:
                oldest = None if int(pending[0]) == 0 else _text(pending[1])
                return GroupPosition(_text(fields["last-delivered-id"]), oldest)
        raise LogGroupMissingError(f"no group {group!r} on log {self._name!r}")

    async def delivery_counts(self, group: str, ids: list[str]) -> dict[str, int]:
        """Return delivery counts of pending ids (``XPENDING`` over each id's range)."""
        self._check_open()
        if not ids:
            return {}
        with self._errors("delivery_counts", "xpending"):

            async def pending_of_each() -> list[Any]:
                pipe = self._control.pipeline(transaction=False)
                for entry_id in ids:
                    pipe.execute_command(b"XPENDING", self._key, group, entry_id, entry_id, 1)
                return await pipe.execute()

            replies = await retry_read(self._control, pending_of_each)
        counts: dict[str, int] = {}
        for entry_id, reply in zip(ids, replies, strict=True):
            if reply:
                counts[entry_id] = int(reply[0][3])
        return counts

    async def group_info(self) -> list[GroupInfo]:
        """Describe every group (``XINFO GROUPS``)."""
        self._check_open()
        try:
            with self._errors("group_info", "xinfo|groups"):
                raw = await _read(self._control, b"XINFO", b"GROUPS", self._key)
        except LogGroupMissingError:
            return []
        infos: list[GroupInfo] = []
        for item in raw:
            fields = _pairs(item)
            lag = fields.get("lag")
            infos.append(
                GroupInfo(
                    name=_text(fields["name"]),
                    last_delivered_id=_text(fields["last-delivered-id"]),
                    pending=int(fields["pending"]),
                    lag=None if lag is None else int(lag),
                    consumers=int(fields["consumers"]),
                    entries_read=_int_or_none(fields.get("entries-read")),
                )
            )
        return infos

    async def delete_consumer(self, group: str, consumer: str) -> int:
        """Remove a consumer (``XGROUP DELCONSUMER``); return its pending count."""
        self._check_open()
        with self._errors("delete_consumer", "xgroup|delconsumer"):
            return int(
                await _call(self._control, b"XGROUP", b"DELCONSUMER", self._key, group, consumer)
            )

    async def delete(self) -> bool:
        """Delete the stream key with its entries and groups (``UNLINK``); return whether it
        existed. Not part of ``StreamLog``: only a tool that made the stream removes it (the
        Redis demo, which cleans up its own stream)."""
        self._check_open()
        with self._errors("delete", "unlink"):
            return bool(await _call(self._control, b"UNLINK", self._key))

    async def trim(self, policy: TrimPolicy) -> int:
        """Apply retention now, never past unacknowledged entries; see ``StreamLog.trim``."""
        self._check_open()
        version = await self.server_version()
        args = trim_args(policy, acked=version >= (8, 2, 0))
        try:
            with self._errors("trim", "evalsha"):
                removed = await self._script(TRIM_SCRIPT, [self._key], args)
        except LogPermissionError as exc:
            raise LogPermissionError(
                f"{exc}; retention (max_len, max_age_s) trims the stream, which only the admin "
                "role may: run it under an admin user, not in every producer",
                user=exc.user,
                command=exc.command,
            ) from exc
        self.trimmed += int(removed)
        return int(removed)

    async def durability(self) -> DurabilityOffer:
        """What the server offers an append to wait for; see ``StreamLog.durability``."""
        self._check_open()
        return await redis_append.durability(
            self._control, await self.server_version(), self._errors
        )

    async def server_version(self) -> tuple[int, int, int]:
        """Return the server's version (cached after the first call).

        From ``HELLO`` (without a protocol version: no switch), which Redis lets every user run,
        so no role needs ``INFO``; from ``INFO server`` where ``HELLO`` is not understood (a
        proxy).
        """
        if self._version is None:
            self._check_open()
            text = ""
            try:
                with self._errors("server_version", "hello"):
                    text = _text(_pairs(await _read(self._control, b"HELLO")).get("version", ""))
            except LogError as exc:
                if isinstance(exc, LogUnavailableError):
                    raise
                with self._errors("server_version", "info"):
                    info = _text(await _read(self._control, b"INFO", b"server"))
                for line in info.splitlines():
                    if line.startswith("redis_version:"):
                        text = line.split(":", 1)[1].strip()
            numbers = [int(p) for p in text.split(".")[:3] if p.isdigit()]
            major, minor, patch = [*numbers, 0, 0, 0][:3]
            self._version = (major, minor, patch)
        return self._version
