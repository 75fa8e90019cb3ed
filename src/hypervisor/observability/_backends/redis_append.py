"""The Redis log's append round trip, and what it can wait for after storing (durability).

``append`` takes a connected connection from the writer's pool first, apart from the
pipeline: a failure up to there sent nothing, so no entry can be stored (``LogUnavailableError``);
a failure while the pipeline runs may come after Redis applied some of it
(``LogOutcomeUnknownError``). With a ``DurableWait`` the same pipeline ends with ``WAIT`` and/or
``WAITAOF 1 0``: both wait for the writes of *their own connection*, so they must follow the
``XADD``s on it, and in one round trip they cost no extra latency beyond the wait itself.

``append_streams`` is the same round trip for several streams of one server (the partitions a
node serves): one pipeline with every stream's ``XADD``s and the waits once at its end. Replies
are read whole, a refused command's error in its place, so a refused ``XADD`` (a ``MOVED``
reply for a slot that left the node) fails its own stream only, and a round trip that fails
fails them all.

``durability`` reads what the server offers: ``WAITAOF`` (``COMMAND INFO``, or the version where
that is refused), the append-only file (``INFO persistence``) and the connected replicas
(``INFO replication``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final

import anyio
import redis.asyncio as aioredis

from hypervisor.observability._backends.log import (
    DurabilityOffer,
    DurableWait,
    LogDurabilityError,
    LogError,
    LogOutcomeUnknownError,
    LogUnavailableError,
)

__all__ = ["append", "append_streams", "check_waits", "durability"]

Errors = Callable[[str, str], AbstractContextManager[None]]
"""``errors(what, command)``: the log's translator of redis-py errors for one operation."""

# redis-py 5.3 deprecated get_connection's arguments (a warning), 5.2 requires a command name.
_COMMAND_NAME: Final = inspect.signature(aioredis.ConnectionPool.get_connection).parameters.get(
    "command_name"
)
_GET_CONNECTION_ARGS: Final = (
    ("PIPELINE",)
    if _COMMAND_NAME is not None and _COMMAND_NAME.default is inspect.Parameter.empty
    else ()
)


async def _call(client: aioredis.Redis, *args: Any) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(seconds: float) -> int:
    # WAIT and WAITAOF read 0 as "forever".
    return max(1, int(seconds * 1000))


async def _round_trip(
    client: aioredis.Redis,
    streams: Sequence[tuple[bytes, list[bytes]]],
    *,
    field: bytes,
    timeout_s: float,
    durable: DurableWait | None,
    errors: Errors,
) -> list[Any]:
    """Send every stream's ``XADD``s, then the durable waits, in one pipeline on ``client``;
    return the replies in order, a refused command's error in its place."""
    with errors("append", "xadd"):
        connection = await client.connection_pool.get_connection(*_GET_CONNECTION_ARGS)  # type: ignore[no-untyped-call]
    pipe = client.pipeline(transaction=False)
    pipe.connection = connection  # the pipeline's reset() gives it back to the pool
    command = pipe.execute_command
    count = 0
    for key, entries in streams:
        for data in entries:
            command(b"XADD", key, b"*", field, data)
        count += len(entries)
    deadline_s = timeout_s
    if durable is not None:
        if durable.replicas:
            command(b"WAIT", durable.replicas, _ms(durable.timeout_s))
            deadline_s += durable.timeout_s
        if durable.local:
            command(b"WAITAOF", 1, 0, _ms(durable.timeout_s))
            deadline_s += durable.timeout_s
    try:
        with errors("append", "xadd"):
            try:
                with anyio.fail_after(deadline_s):
                    return await pipe.execute(raise_on_error=False)
            except BaseException:
                # Interrupted mid-pipeline, the connection may still owe replies: drop it so
                # no later command reads a stale one.
                with anyio.CancelScope(shield=True):
                    await client.connection_pool.disconnect()
                raise
    except LogUnavailableError as exc:
        raise LogOutcomeUnknownError(
            f"{exc}; the request was sent, so some of the {count} entries may be stored"
        ) from exc


def _translated(reply: Exception, errors: Errors, command: str) -> Exception:
    """A refused command's error reply as the log's error (``LogError``, ``LogPermissionError``)."""
    try:
        with errors("append", command):
            raise reply
    except Exception as exc:
        return exc


def _refused(replies: list[Any], errors: Errors) -> Exception | None:
    """The first refused ``XADD`` among one stream's replies, translated by ``errors``;
    ``None`` when none was. Refused after others of the stream were stored, a retryable error
    takes its outcome-unknown form (a retry stores those again; readers drop the copies)."""
    failed = next((reply for reply in replies if isinstance(reply, Exception)), None)
    if failed is None:
        return None
    error = _translated(failed, errors, "xadd")
    stored = sum(1 for reply in replies if not isinstance(reply, Exception))
    if stored and isinstance(error, LogUnavailableError):
        partly = LogOutcomeUnknownError(
            f"{error}; {stored} of the {len(replies)} entries were stored"
        )
        partly.__cause__ = error
        return partly
    return error


def _confirm(durable: DurableWait, replies: list[Any], count: int, errors: Errors) -> None:
    """Raise a refused wait's error, or ``LogDurabilityError`` unless the waits met ``durable``
    (``check_waits``)."""
    commands = ["wait"] * bool(durable.replicas) + ["waitaof"] * durable.local
    for command, reply in zip(commands, replies, strict=False):
        if isinstance(reply, Exception):
            raise _translated(reply, errors, command)
    check_waits(durable, replies, count)


async def append(
    client: aioredis.Redis,
    entries: list[bytes],
    *,
    key: bytes,
    field: bytes,
    timeout_s: float,
    durable: DurableWait | None,
    errors: Errors,
) -> list[bytes]:
    """Append ``entries`` (``XADD``) in one pipeline on ``client``; return their ids.

    Raises:
        LogUnavailableError: nothing was sent (no connection), or Redis refused every entry
            for a transient reason.
        LogOutcomeUnknownError: sent, and the reply lost (a timeout covers the round trip,
            ``timeout_s`` plus the durable waits), or some entries stored and the rest refused.
        LogDurabilityError: stored, and not confirmed as ``durable`` asks.
    """
    streams = [(key, entries)]
    replies = await _round_trip(
        client, streams, field=field, timeout_s=timeout_s, durable=durable, errors=errors
    )
    ids = replies[: len(entries)]
    refused = _refused(ids, errors)
    if refused is not None:
        raise refused
    if durable is not None:
        _confirm(durable, replies[len(entries) :], len(entries), errors)
    return ids


async def append_streams(
    client: aioredis.Redis,
    streams: Sequence[tuple[bytes, list[bytes], Errors]],
    *,
    field: bytes,
    timeout_s: float,
    durable: DurableWait | None,
    errors: Errors,
) -> list[list[bytes] | Exception]:
    """Append to several streams of one server in one pipeline on ``client`` (each stream's
    ``XADD``s in order, then the durable waits once for all of them).

    Args:
        streams: ``(key, entries, errors)``: each stream's key, entries and the translator of
            its refusals (a refused ``XADD`` fails its stream only).
        errors: the translator of the round trip's errors (they fail every stream).

    Returns:
        Per stream, its ids or the error ``append`` would have raised for it alone (a refused
        wait or ``LogDurabilityError`` for every stream stored).

    Raises:
        LogUnavailableError: nothing was sent (no connection).
        LogOutcomeUnknownError: sent, and the reply lost.
    """
    sent = [(key, entries) for key, entries, _ in streams]
    replies = await _round_trip(
        client, sent, field=field, timeout_s=timeout_s, durable=durable, errors=errors
    )
    outcomes: list[list[bytes] | Exception] = []
    at = 0
    for _, entries, stream_errors in streams:
        own = replies[at : at + len(entries)]
        at += len(entries)
        refused = _refused(own, stream_errors)
        outcomes.append(own if refused is None else refused)
    if durable is not None:
        try:
            _confirm(durable, replies[at:], at, errors)
        except Exception as exc:  # LogDurabilityError, or the wait's refusal
            return [o if isinstance(o, Exception) else exc for o in outcomes]
    return outcomes


def check_waits(durable: DurableWait, replies: list[Any], count: int) -> None:
    """Raise ``LogDurabilityError`` unless the wait replies meet ``durable``."""
    replicas = local = 0
    if durable.replicas:
        replicas = int(replies.pop(0))
    if durable.local:
        local = int(replies[0][0])
    missing: list[str] = []
    if replicas < durable.replicas:
        missing.append(f"{replicas} of {durable.replicas} replicas confirmed (WAIT)")
    if durable.local and local < 1:
        missing.append("the append-only file's fsync did not confirm (WAITAOF)")
    if missing:
        raise LogDurabilityError(
            f"append: the {count} entries are stored on the primary but not confirmed within "
            f"{durable.timeout_s:g} s: {'; '.join(missing)}",
            local=local,
            replicas=replicas,
        )


def _info_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    return fields


async def durability(
    client: aioredis.Redis, version: tuple[int, int, int], errors: Errors
) -> DurabilityOffer:
    """What the server behind ``client`` offers an append to wait for."""
    with errors("durability", "info"):
        fields = _info_fields(_text(await _call(client, b"INFO", b"persistence")))
        fields.update(_info_fields(_text(await _call(client, b"INFO", b"replication"))))
    try:
        with errors("durability", "command|info"):
            found = await _call(client, b"COMMAND", b"INFO", b"WAITAOF")
        waitaof = bool(found and found[0])  # [nil] for a command the server does not know
    except LogError as exc:  # e.g. a proxy without COMMAND INFO: go by the version
        if isinstance(exc, LogUnavailableError):
            raise
        waitaof = version >= (7, 2, 0)
    return DurabilityOffer(
        version=version,
        waitaof=waitaof,
        aof=fields.get("aof_enabled") == "1",
        replicas=int(fields.get("connected_slaves", "0") or 0),
    )
