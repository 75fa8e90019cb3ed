"""The one way this package makes a redis-py client and reads its errors.

Every Redis client of the backends (the log's three, the state store's) comes from
:func:`make_client`, with the options every one of them needs, and every redis-py error is
translated by :func:`translate_errors` where it is caught: connection failures become
``LogUnavailableError``, ``NOGROUP`` becomes ``LogGroupMissingError``, refused credentials a
``LogError`` (not retried), and an ACL refusal (``NOPERM``, or its script form) a
``LogPermissionError`` naming the user, the refused command and the ``hvobs acl`` roles that grant
it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hypervisor.observability.errors import (
    LogError,
    LogGroupMissingError,
    LogPermissionError,
    LogUnavailableError,
)

__all__ = ["make_client", "permission_error", "retry_read", "translate_errors", "url_user"]

_T = TypeVar("_T")

# Redis 7.0: "NOPERM this user has no permissions to run the 'xtrim' command", and from a script
# "ERR The user executing the script can't run this command or subcommand ..."; Redis 7.2+:
# "NOPERM User u has no permissions to run the 'xtrim' command" and "ERR ACL failure in script:".
_DENIED: Final = re.compile(r"NOPERM|ERR ACL failure in script|ERR The user executing the script")
_DENIED_COMMAND: Final = re.compile(r"run the '([^']+)' command")


def url_user(url: str) -> str:
    """Return the ACL user name of a Redis URL (``"default"`` when it names none)."""
    name = urlsplit(url).username
    return unquote(name) if name else "default"


def default_client_options() -> dict[str, Any]:
    """redis-py options every client of this package gets: no ``CLIENT SETINFO`` on connect.

    redis-py announces itself with ``CLIENT SETINFO`` and ignores a refusal, but Redis 7.2+
    records every refusal in the ``ACL LOG``; no ``hvobs acl`` role grants it (Redis 7.0 has no
    such subcommand, so a rule naming it would not load there), and a log full of these would
    hide the refusals that matter.
    """
    if "driver_info" in inspect.signature(aioredis.Redis.__init__).parameters:
        return {"driver_info": None}
    return {"lib_name": None, "lib_version": None}


def _and(words: tuple[str, ...]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def permission_error(
    what: str, message: str, *, user: str, command: str = "", key: str = ""
) -> LogPermissionError:
    """Build the error for an ACL refusal: who, which command, on what, and who may."""
    from hypervisor.observability.acl import roles_granting  # acl imports the workers package

    found = _DENIED_COMMAND.search(message)
    refused = found.group(1).lower() if found else (command or what)
    roles = roles_granting(refused)
    if roles:
        hint = f"`hvobs acl` grants it to the {_and(roles)} role{'s' if len(roles) > 1 else ''}"
    else:
        hint = "no `hvobs acl` role grants it"
    where = f" on {key!r}" if key else ""
    return LogPermissionError(
        f"{what}: redis user {user!r} may not run {refused.upper()}{where} ({message}); {hint}",
        user=user,
        command=refused,
    )


@contextmanager
def translate_errors(
    what: str, *, user: str = "default", command: str = "", key: str = ""
) -> Iterator[None]:
    """Translate redis-py errors into the log's errors at the boundary.

    ``user``, ``command`` (the Redis command sent, lower case) and ``key`` only go into the
    message of a refusal (``LogPermissionError``).
    """
    try:
        yield
    except (rexc.AuthenticationError, rexc.AuthorizationError) as exc:
        # Subclasses of ConnectionError, but retrying cannot fix credentials.
        raise LogError(f"{what}: redis refused the credentials: {exc}") from exc
    except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
        # OSError includes the builtin TimeoutError of anyio.fail_after deadlines.
        raise LogUnavailableError(f"{what}: redis unreachable: {exc!r}") from exc
    except rexc.ResponseError as exc:
        message = str(exc)
        if isinstance(exc, rexc.NoPermissionError):
            message = f"NOPERM {message}"  # redis-py drops the error code from the text
        if _DENIED.match(message):
            raise permission_error(what, message, user=user, command=command, key=key) from exc
        if message.startswith(("NOGROUP", "no such key")):
            raise LogGroupMissingError(f"{what}: {message}") from exc
        if message.startswith(("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN")):
            raise LogUnavailableError(f"{what}: {message}") from exc
        raise LogError(f"{what}: {message}") from exc
    except rexc.RedisError as exc:
        raise LogError(f"{what}: {exc}") from exc


def make_client(
    url: str,
    *,
    socket_timeout_s: float | None,
    connect_timeout_s: float,
    max_connections: int | None = None,
    raw_replies: bool = False,
    **options: Any,
) -> aioredis.Redis:
    """A redis-py asyncio client for ``url`` as every client of this package is made.

    Callers own retrying (with their deadlines), so the client never retries by itself; it
    sends no ``CLIENT SETINFO`` (see :func:`default_client_options`); replies are bytes.

    Args:
        url: the Redis URL (``redis://`` or ``rediss://``, credentials and database included).
        socket_timeout_s: the socket timeout of a reply (``None``: none).
        connect_timeout_s: the connect timeout.
        max_connections: the pool's limit (``None``: redis-py's default).
        raw_replies: switch response callbacks off, so replies keep the server's shapes
            (hiredis-parsed lists and bytes) whatever the redis-py version.
        options: more ``redis.asyncio.Redis`` options (TLS files, user name, ...); they win.
    """
    client = aioredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections,
        decode_responses=False,
        **{**default_client_options(), **options},
    )
    if raw_replies:
        client.response_callbacks = {}
    return client


def _dead_pooled(exc: BaseException) -> bool:
    """Whether ``exc`` is what a command meets on a pooled connection the server dropped.

    redis-py checks a pooled connection before handing it out, but a connection the server
    closed (a restart, a proxy, ``CLIENT KILL``) often still looks healthy then: the command
    is written and the reply is an end of file ("Connection closed by server."). Refused
    credentials are final, a timeout may be a slow server (another wait would double it) and
    a failure to connect had no pooled connection to blame, so none of these counts.
    """
    if not isinstance(exc, rexc.ConnectionError) or isinstance(
        exc, rexc.AuthenticationError | rexc.AuthorizationError | rexc.MaxConnectionsError
    ):
        return False
    return " connecting to " not in str(exc)


async def retry_read(client: aioredis.Redis, call: Callable[[], Awaitable[_T]]) -> _T:
    """Run an idempotent read, once more if its pooled connection turned out to be dead.

    Only for commands that change nothing (meta and state reads, ``XRANGE``, ``XINFO``,
    ``XPENDING``, read-only scripts): running them twice is harmless. The pool's idle
    connections are dropped before the second attempt (what killed one, a server restart or a
    proxy, killed them all), so it runs on a new connection. Writes are never retried here:
    their callers retry with their own deduplication.

    Args:
        client: the client ``call`` uses.
        call: makes the read (called at most twice).
    """
    try:
        return await call()
    except rexc.ConnectionError as exc:
        if not _dead_pooled(exc):
            raise
    await client.connection_pool.disconnect(inuse_connections=False)
    return await call()
