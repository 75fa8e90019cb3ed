"""The Redis log's append round trip, and what it can wait for after storing (durability).

``append`` takes a connected connection from the writer's pool first, apart from the
pipeline: a failure up to there sent nothing, so no entry can be stored (``LogUnavailableError``);
a failure while the pipeline runs may come after Redis applied some of it
(``LogOutcomeUnknownError``). With a ``DurableWait`` the same pipeline ends with ``WAIT`` and/or
``WAITAOF 1 0``: both wait for the writes of *their own connection*, so they must follow the
``XADD``s on it, and in one round trip they cost no extra latency beyond the wait itself.

``durability`` reads what the server offers: ``WAITAOF`` (``COMMAND INFO``, or the version where
that is refused), the append-only file (``INFO persistence``) and the connected replicas
(``INFO replication``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
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

__all__ = ["append", "check_waits", "durability"]

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
        LogUnavailableError: nothing was sent (no connection).
        LogOutcomeUnknownError: sent, and the reply lost (a timeout covers the round trip,
            ``timeout_s`` plus the durable waits).
        LogDurabilityError: stored, and not confirmed as ``durable`` asks.
    """
    with errors("append", "xadd"):
        connection = await client.connection_pool.get_connection(*_GET_CONNECTION_ARGS)  # type: ignore[no-untyped-call]
    pipe = client.pipeline(transaction=False)
    pipe.connection = connection  # the pipeline's reset() gives it back to the pool
    command = pipe.execute_command
    for data in entries:
        command(b"XADD", key, b"*", field, data)
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
                    replies: list[Any] = await pipe.execute()
            except BaseException:
                # Interrupted mid-pipeline, the connection may still owe replies: drop it so
                # no later command reads a stale one.
                with anyio.CancelScope(shield=True):
                    await client.connection_pool.disconnect()
                raise
    except LogUnavailableError as exc:
        raise LogOutcomeUnknownError(
            f"{exc}; the request was sent, so some of the {len(entries)} entries may be stored"
        ) from exc
    ids = replies[: len(entries)]
    if durable is not None:
        check_waits(durable, replies[len(entries) :], len(entries))
    return ids


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
