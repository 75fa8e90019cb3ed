"""What every ``hvobs`` command shares, so each guides its operator the same way.

* :class:`CommandParser`: a usage mistake is one line on stderr (what is wrong and where the
  help is) and exit status 2, never the whole usage text;
* option types that check a value and say the rule it broke: whole numbers and durations in
  range, ports, log levels, stream names, Redis URLs (a URL is never echoed with its
  credentials);
* :func:`redis_location`: ``host:port`` of a Redis URL, the only part of it a message shows;
* start checks that turn the usual operator mistakes into one :class:`CommandError` line: a
  port already in use (:func:`check_port_free`, :func:`listen_error`) and a Redis that does
  not answer or refuses for good (:func:`check_redis`);
* the TLS options of every command that takes a Redis URL (:func:`add_tls_options`,
  :func:`tls_options`).

Nothing here imports a backend client at import time, so ``hvobs --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

from hypervisor.observability.errors import CommandError

__all__ = [
    "DEFAULT_STREAM",
    "LOG_LEVELS",
    "REDIS_SCHEMES",
    "REDIS_URL_ENV",
    "CommandParser",
    "add_redis_options",
    "add_tls_options",
    "check_port_free",
    "check_redis",
    "failure_reason",
    "listen_error",
    "log_level",
    "port",
    "readable_file",
    "redis_location",
    "redis_url",
    "redis_url_or_env",
    "seconds",
    "stream_name",
    "tls_options",
    "whole_number",
]

DEFAULT_STREAM: Final = "hvobs:events"
"""The bus stream of every command that takes ``--stream``."""
REDIS_URL_ENV: Final = "HVOBS_REDIS_URL"
"""The environment variable that supplies ``--redis`` when it is not given (it keeps the URL's
password out of the process list)."""
REDIS_SCHEMES: Final = ("redis", "rediss", "unix")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
MAX_STREAM_NAME: Final = 512


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: ``<prog>: <what> (see <prog>
    --help)``, exit status 2. Subcommand parsers made from it are of this class too."""

    def error(self, message: str) -> NoReturn:
        """Print the mistake on one line and exit with status 2."""
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: {text} (see {self.prog} --help)\n")


# -- option types ------------------------------------------------------------------------------


def whole_number(minimum: int, maximum: int | None = None, unit: str = "") -> Callable[[str], int]:
    """An option type: a whole number from ``minimum`` to ``maximum`` (inclusive)."""
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            unit = suffix if minimum != 1 else ""
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{unit}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}{suffix}, got {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def seconds(maximum: float | None = None, *, allow_zero: bool = False) -> Callable[[str], float]:
    """An option type: a duration in seconds, finite and above zero (or zero when
    ``allow_zero``), at most ``maximum``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of seconds, got {text!r}"
            ) from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            kind = "a number of seconds >= 0" if allow_zero else "a positive number of seconds"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text.strip()}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(
                f"must be at most {maximum:g} seconds, got {text.strip()}"
            )
        return value

    parse.__name__ = "seconds"
    return parse


def port(text: str) -> int:
    """An option type: a TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535 (0: any free port), got {value}")
    return value


def log_level(text: str) -> str:
    """An option type: a log level name, any case; returns it in upper case."""
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r}: choose one of {', '.join(LOG_LEVELS)}"
        )
    return text.upper()


def stream_name(text: str) -> str:
    """An option type: a stream key, 1 to 512 characters."""
    if not text or len(text) > MAX_STREAM_NAME:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_STREAM_NAME} characters")
    return text


def _shown(text: str) -> str:
    """``text`` as a message may show it: without anything that could be a credential (what
    precedes an ``@``, a query string)."""
    text = text.split("?", 1)[0]
    if "@" in text:
        scheme, sep, rest = text.partition("://")
        rest = rest if sep else scheme
        shown = "***@" + rest.rsplit("@", 1)[1]
        return f"{scheme}://{shown}" if sep else shown
    return text


def redis_url(text: str) -> str:
    """An option type: a Redis URL (``redis://``, ``rediss://`` or ``unix://``).

    The error never repeats the URL's user, password or query string.
    """
    parts = urlsplit(text)
    if "://" not in text or parts.scheme not in REDIS_SCHEMES:
        hint = f" (did you mean redis://{_shown(text)}?)" if "://" not in text and text else ""
        raise argparse.ArgumentTypeError(
            "expected a URL with a scheme, such as redis://localhost:6379/0 (schemes: "
            f"{', '.join(REDIS_SCHEMES)}), got {_shown(text)!r}{hint}"
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise argparse.ArgumentTypeError(
                "a unix:// URL names the socket file, such as unix:///run/redis/redis.sock"
            )
        return text
    try:
        parts.port  # noqa: B018 - parses the port; a bad one raises here
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad port in {_shown(text)!r}: expected redis://host:port/db"
        ) from None
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise argparse.ArgumentTypeError(
            f"the path of {_shown(text)!r} must be a database number, as in "
            "redis://localhost:6379/0"
        )
    return text


def redis_url_or_env(given: str | None, option: str = "--redis") -> str:
    """``given``, else ``$HVOBS_REDIS_URL``, checked as :func:`redis_url` checks an option.

    Raises:
        CommandError: neither is set, or the environment's URL is not a Redis URL (status 2).
    """
    if given:
        return given
    url = os.environ.get(REDIS_URL_ENV, "")
    if not url:
        raise CommandError(f"pass {option} URL or set {REDIS_URL_ENV}", exit_status=2)
    try:
        return redis_url(url)
    except argparse.ArgumentTypeError as exc:
        raise CommandError(f"{REDIS_URL_ENV}: {exc}", exit_status=2) from None


def redis_location(url: str) -> str:
    """``host:port`` (or the socket path) of a Redis URL, without any credentials."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path or "(no socket path)"
    host = parts.hostname or "localhost"
    try:
        found = parts.port or 6379
    except ValueError:
        found = 6379
    return f"[{host}]:{found}" if ":" in host else f"{host}:{found}"


# -- start checks ------------------------------------------------------------------------------


def listen_error(
    exc: OSError, host: str, number: int, *, port_option: str, host_option: str
) -> CommandError:
    """The one-line error for a failed bind of ``host:number``: which port, and what to do."""
    if exc.errno == errno.EADDRINUSE:
        return CommandError(
            f"port {number} on {host} is already in use; choose another with {port_option} "
            f"({port_option} 0 picks a free one)"
        )
    if exc.errno == errno.EACCES:
        return CommandError(
            f"not allowed to listen on port {number} (ports below 1024 need privileges); "
            f"choose another with {port_option}"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return CommandError(f"{host_option} {host} is not an address of this machine")
    return CommandError(f"cannot listen on {host}:{number}: {exc.strerror or exc}")


def check_port_free(host: str, number: int, *, port_option: str, host_option: str) -> None:
    """Bind ``host:number`` for a moment, as the server will, to report a busy port at once.

    Port 0 (any free port) always passes.

    Raises:
        CommandError: the port is in use or not allowed, or the host is not an address here.
    """
    if number == 0:
        return
    try:
        infos = socket.getaddrinfo(host, number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CommandError(f"cannot listen on {host_option} {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
        except OSError as exc:
            raise listen_error(
                exc, host, number, port_option=port_option, host_option=host_option
            ) from None


def failure_reason(exc: BaseException, timeout_s: float | None = None) -> str:
    """A short reason for a failed connection: refused, timed out (``no answer within ...``),
    host name not resolved, or the operating system's words for the deepest socket error, else
    the first line of the error's text."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TimeoutError) or type(current).__name__ == "TimeoutError":
            return "no answer" + (f" within {timeout_s:g} s" if timeout_s else "")
        if isinstance(current, socket.gaierror):
            return f"host name not resolved: {current.strerror or current}"
        if isinstance(current, OSError) and current.errno is not None and current.errno > 0:
            return os.strerror(current.errno)
        current = current.__cause__ or current.__context__
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def tls_options(args: argparse.Namespace, option: str = "--redis") -> dict[str, Any]:
    """The ``redis.asyncio.Redis`` TLS options of a command's ``--tls-ca``, ``--tls-cert`` and
    ``--tls-key`` (see :func:`add_tls_options`), for ``args.redis``'s ``rediss://`` URL.

    Raises:
        CommandError: a TLS option with a URL that is not ``rediss://``, or a certificate
            without its key (status 2).
    """
    options: dict[str, Any] = {}
    for name, key in (
        ("tls_ca", "ssl_ca_certs"),
        ("tls_cert", "ssl_certfile"),
        ("tls_key", "ssl_keyfile"),
    ):
        value = getattr(args, name, None)
        if value:
            options[key] = value
    if not options:
        return options
    url = getattr(args, "redis", None) or ""
    if urlsplit(url).scheme != "rediss":
        raise CommandError(
            f"--tls-ca, --tls-cert and --tls-key need a rediss:// URL in {option} "
            f"(got {urlsplit(url).scheme or 'none'}://)",
            exit_status=2,
        )
    if ("ssl_certfile" in options) != ("ssl_keyfile" in options):
        raise CommandError("--tls-cert and --tls-key go together", exit_status=2)
    return options


def readable_file(text: str) -> str:
    """An option type: the path of a file this process can read."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"cannot read {text!r} (permissions)")
    return text


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    """Declare ``--tls-ca``, ``--tls-cert`` and ``--tls-key`` (for a ``rediss://`` URL)."""
    parser.add_argument(
        "--tls-ca",
        metavar="PATH",
        type=readable_file,
        help="with a rediss:// URL: verify the server against this CA bundle (PEM) "
        "(default: the system's CAs)",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PATH",
        type=readable_file,
        help="with a rediss:// URL: the client certificate (PEM), for a server that requires "
        "one (tls-auth-clients yes) (default: none)",
    )
    parser.add_argument(
        "--tls-key",
        metavar="PATH",
        type=readable_file,
        help="with --tls-cert: its private key (PEM) (default: none)",
    )


async def check_redis(
    url: str, *, timeout_s: float = 5.0, **client_options: Any
) -> tuple[int, int, int]:
    """Wait until the Redis at ``url`` answers (``HELLO``), at most ``timeout_s`` seconds.

    A Redis still starting (connection refused, ``LOADING``) is retried until the deadline, so
    a stack that starts everything at once is not refused; a refusal that retrying cannot fix
    (credentials, database number, ACL, TLS verification) ends the wait at once.

    Args:
        url: the Redis URL.
        timeout_s: how long to retry a Redis that does not answer.
        **client_options: more ``redis.asyncio.Redis`` options (see :func:`tls_options`).

    Returns:
        The server's version.

    Raises:
        CommandError: it does not answer in time (naming its host and port, never the
            credentials; status 1), refuses for good (status
            :data:`~hypervisor.observability.errors.PERMANENT_EXIT_STATUS`), or the URL is
            one redis-py cannot use (status 2).
    """
    import anyio

    from hypervisor.observability._backends.redis_log import RedisStreamLog
    from hypervisor.observability.errors import (
        PERMANENT_EXIT_STATUS,
        LogError,
        LogPermanentError,
        LogUnavailableError,
        PermissionDeniedError,
    )

    location = redis_location(url)
    connect_s = max(0.1, min(timeout_s, 5.0))
    try:
        log = RedisStreamLog(
            url,
            "hvobs:check",
            connect_timeout_s=connect_s,
            socket_timeout_s=connect_s,
            **client_options,
        )
    except (ValueError, TypeError) as exc:  # redis-py's own URL checks (no credentials)
        raise CommandError(
            f"cannot use the Redis URL for {location}: {exc}", exit_status=2
        ) from None
    deadline = time.monotonic() + timeout_s
    async with log:
        while True:
            try:
                return await log.server_version()
            except LogUnavailableError as exc:
                if time.monotonic() >= deadline:
                    raise CommandError(
                        f"cannot reach Redis at {location} ({failure_reason(exc, connect_s)}); "
                        "start redis-server there or fix --redis"
                    ) from None
                await anyio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            except LogPermanentError as exc:
                raise CommandError(exc.detail, exit_status=PERMANENT_EXIT_STATUS) from None
            except PermissionDeniedError as exc:
                raise CommandError(str(exc), exit_status=PERMANENT_EXIT_STATUS) from None
            except LogError as exc:
                raise CommandError(
                    f"Redis at {location} answered with an error: {failure_reason(exc)}"
                ) from None


def add_redis_options(parser: argparse.ArgumentParser) -> None:
    """Declare ``--redis``, ``--stream``, ``--connect-timeout`` and the TLS options of a command
    on the bus (``hvobs worker``, ``hvobs dlq``)."""
    parser.add_argument(
        "--redis",
        metavar="URL",
        type=redis_url,
        default=None,
        help=(
            "Redis URL of the bus, such as redis://user:password@host:6379/0 (rediss:// for "
            f"TLS, unix:// for a socket) (default: ${REDIS_URL_ENV}, which keeps the password "
            "out of the process list)"
        ),
    )
    parser.add_argument(
        "--stream",
        type=stream_name,
        default=DEFAULT_STREAM,
        metavar="NAME",
        help="stream key of the bus (default: %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=seconds(3600),
        default=5.0,
        metavar="SECONDS",
        help=(
            "at start, wait this long for Redis to answer before giving up with one line "
            "(default: %(default)g seconds)"
        ),
    )
    add_tls_options(parser)
