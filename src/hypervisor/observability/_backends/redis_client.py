"""The one way this package makes a redis-py client and reads its errors.

Every Redis client of the backends (the log's three, the state store's) comes from
:func:`make_client`, with the options every one of them needs, and every redis-py error is
translated by :func:`translate_errors` where it is caught. This is the one place that decides
what is transient and what is not:

* transient, ``LogUnavailableError`` (callers retry with the one backoff): connection refused,
  reset or closed, timed out, host name not resolved, ``LOADING``, ``READONLY`` (failover),
  ``MASTERDOWN``, ``TRYAGAIN``;
* permanent, ``LogPermanentError`` (never retried): refused credentials, a database number the
  server does not have, a TLS certificate that does not verify (which check failed: unknown
  CA or otherwise unverifiable, or host name mismatch) or a failed TLS handshake;
* an ACL refusal (``NOPERM``, or its script form): ``LogPermissionError`` naming the user, the
  refused command and the ``hvobs acl`` roles that grant it (permanent too);
* ``NOGROUP``: ``LogGroupMissingError``.

Every message names the server's ``host:port`` and the cause; none holds the password (only
redis-py's and the operating system's words are quoted, never the URL).
"""

from __future__ import annotations

import inspect
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hypervisor.observability._util.cli import redis_location
from hypervisor.observability.errors import (
    LogError,
    LogGroupMissingError,
    LogPermanentError,
    LogPermissionError,
    LogUnavailableError,
)

__all__ = [
    "connection_failure",
    "make_client",
    "permission_error",
    "redis_location",
    "retry_read",
    "translate_errors",
    "url_user",
]

_T = TypeVar("_T")

# Redis 7.0: "NOPERM this user has no permissions to run the 'xtrim' command", and from a script
# "ERR The user executing the script can't run this command or subcommand ..."; Redis 7.2+:
# "NOPERM User u has no permissions to run the 'xtrim' command" and "ERR ACL failure in script:".
_DENIED: Final = re.compile(r"NOPERM|ERR ACL failure in script|ERR The user executing the script")
_DENIED_COMMAND: Final = re.compile(r"run the '([^']+)' command")
# redis-py names the server in its connection errors: "Error 111 connecting to h:p." or
# "Error while reading from h:p : (104, ...)"; used when the caller did not say where.
_NAMED_SERVER: Final = re.compile(r"(?:connecting to|reading from|writing to) (\S+?:\d+)")
# OpenSSL's verify codes of a certificate that is not for the host name or address asked for.
_HOSTNAME_MISMATCH: Final = frozenset({62, 64})  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_
# OpenSSL's reasons of the usual handshake failures, in an operator's words.
_HANDSHAKE_HINTS: Final = (
    ("CERTIFICATE_REQUIRED", "the server requires a client certificate (--tls-cert, ssl_certfile)"),
    ("ALERT_UNKNOWN_CA", "the server does not trust the client certificate"),
    ("ALERT_BAD_CERTIFICATE", "the server refused the client certificate"),
    ("WRONG_VERSION_NUMBER", "the server does not speak TLS on this port"),
)


# Error replies of a server that cannot take writes for now (a replica, a failover, a slot
# being migrated), as redis-py types them.
_TRANSIENT_REPLIES: Final = (rexc.ReadOnlyError, rexc.MasterDownError, rexc.TryAgainError)


def url_user(url: str) -> str:
    """Return the ACL user name of a Redis URL (``"default"`` when it names none)."""
    name = urlsplit(url).username
    return unquote(name) if name else "default"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the errors it was raised from or during, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _tls_failure(exc: BaseException) -> tuple[str, str] | None:
    """``(cause, words)`` when ``exc`` comes from a TLS failure that retrying cannot fix."""
    for error in _chain(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            detail = error.verify_message or error.reason or str(error)
            if error.verify_code in _HOSTNAME_MISMATCH or "mismatch" in str(detail).lower():
                return "tls-hostname", f"TLS host name mismatch: {detail}"
            return "tls-verify", f"TLS certificate verify failed: {detail}"
        if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLWantReadError)):
            return None  # the connection ended during the handshake: a server going away
        if isinstance(error, ssl.SSLError):
            reason = str(error.reason or error)
            words = next((words for key, words in _HANDSHAKE_HINTS if key in reason), "")
            shown = f"{words} ({reason})" if words else reason
            return "tls-handshake", f"TLS handshake failed: {shown}"
    return None


def connection_failure(exc: BaseException) -> str:
    """Short words for why a connection failed: refused, timed out, host name not resolved,
    reset, closed by the server, or the operating system's words for the deepest socket error.
    """
    for error in _chain(exc):
        if isinstance(error, socket.gaierror):
            return f"host name not resolved ({error.strerror or error})"
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, ConnectionResetError):
            return "connection reset by the server"
        if isinstance(error, (TimeoutError, rexc.TimeoutError)):
            return "timed out"
        if isinstance(error, OSError) and error.errno is not None and error.errno > 0:
            return os.strerror(error.errno)
    text = str(exc).strip() or type(exc).__name__
    # redis-py's own words ("Connection closed by server."), without the location it repeats.
    return _NAMED_SERVER.sub("", text).strip(" .:").splitlines()[0][:200] or type(exc).__name__


def _where(location: str, exc: BaseException) -> str:
    if location:
        return location
    found = _NAMED_SERVER.search(str(exc))
    return found.group(1) if found else "the server"


def _permanent(what: str, detail: str, cause: str, where: str) -> LogPermanentError:
    return LogPermanentError(f"{what}: {detail}", cause=cause, location=where, detail=detail)


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
    what: str, message: str, *, user: str, command: str = "", key: str = "", location: str = ""
) -> LogPermissionError:
    """Build the error for an ACL refusal: who, which command, on what, where, and who may."""
    from hypervisor.observability.acl import roles_granting  # acl imports the workers package

    found = _DENIED_COMMAND.search(message)
    refused = found.group(1).lower() if found else (command or what)
    roles = roles_granting(refused)
    if roles:
        hint = f"`hvobs acl` grants it to the {_and(roles)} role{'s' if len(roles) > 1 else ''}"
    else:
        hint = "no `hvobs acl` role grants it"
    where = (f" on {key!r}" if key else "") + (f" at Redis {location}" if location else "")
    return LogPermissionError(
        f"{what}: redis user {user!r} may not run {refused.upper()}{where} ({message}); {hint}",
        user=user,
        command=refused,
    )


@contextmanager
def translate_errors(
    what: str, *, user: str = "default", command: str = "", key: str = "", location: str = ""
) -> Iterator[None]:
    """Translate redis-py errors into the log's errors at the boundary (see the module's
    docstring for what is transient and what is permanent).

    ``user``, ``command`` (the Redis command sent, lower case) and ``key`` go into the message
    of a refusal (``LogPermissionError``); ``location`` (``host:port``, see
    :func:`~hypervisor.observability._util.cli.redis_location`) into every message (taken
    from redis-py's words when not given).
    """
    try:
        yield
    except (rexc.AuthenticationError, rexc.AuthorizationError) as exc:
        # Subclasses of ConnectionError, but retrying cannot fix credentials. Redis's words
        # ("invalid username-password pair or user is disabled.") hold no password.
        where = _where(location, exc)
        raise _permanent(
            what,
            f"Redis at {where} refused the credentials of user {user!r} "
            f"({str(exc).strip().rstrip('.')}); check the user and password of the URL",
            "authentication",
            where,
        ) from exc
    except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
        # OSError includes the builtin TimeoutError of anyio.fail_after deadlines.
        where = _where(location, exc)
        tls = _tls_failure(exc)
        if tls is not None:
            cause, words = tls
            raise _permanent(
                what, f"cannot connect to Redis at {where}: {words}", cause, where
            ) from exc
        raise LogUnavailableError(
            f"{what}: Redis at {where} unreachable: {connection_failure(exc)}"
        ) from exc
    except rexc.ResponseError as exc:
        message = str(exc)
        if isinstance(exc, rexc.NoPermissionError):
            message = f"NOPERM {message}"  # redis-py drops the error code from the text
        if _DENIED.match(message):
            raise permission_error(
                what, message, user=user, command=command, key=key, location=location
            ) from exc
        if message.startswith(("NOGROUP", "no such key")):
            raise LogGroupMissingError(f"{what}: {message}") from exc
        # redis-py drops the code of the errors it knows from the text: go by their class too.
        if isinstance(exc, _TRANSIENT_REPLIES) or message.startswith(
            ("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN")
        ):
            raise LogUnavailableError(
                f"{what}: Redis at {_where(location, exc)}: {message}"
            ) from exc
        if "DB index is out of range" in message:  # SELECT of the URL's database, on connect
            where = _where(location, exc)
            raise _permanent(
                what,
                f"Redis at {where} has no such database ({message}); the URL's database "
                "number must be below the server's `databases` setting",
                "database",
                where,
            ) from exc
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
