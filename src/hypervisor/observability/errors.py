"""The project's errors: one root, so callers can catch everything this package raises."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from hypervisor.observability._core.events import HypervisorEvent

__all__ = [
    "PERMANENT_EXIT_STATUS",
    "AclArgumentError",
    "BadRequestError",
    "BusClosedError",
    "BusDurabilityError",
    "BusFullError",
    "BusPermissionError",
    "BusUnavailableError",
    "CommandError",
    "EventDecodeError",
    "EventEncodeError",
    "EventTooLargeError",
    "HypervisorObservabilityError",
    "LogDurabilityError",
    "LogError",
    "LogGroupMissingError",
    "LogOutcomeUnknownError",
    "LogPermanentError",
    "LogPermissionError",
    "LogUnavailableError",
    "MetricsExportError",
    "PartitionLayoutError",
    "PermissionDeniedError",
    "ServeError",
    "WorkerStateError",
]


class HypervisorObservabilityError(Exception):
    """Root of every error raised by ``hypervisor.observability``."""


class EventEncodeError(HypervisorObservabilityError, TypeError):
    """An event (usually a payload value) cannot be encoded.

    Subclasses ``TypeError`` because that is what an unencodable value is; the message names the
    path of the offending key, e.g. ``payload['tool']['handle']``.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class EventTooLargeError(EventEncodeError):
    """An encoded event is longer than the bus's ``max_event_bytes`` limit.

    Attributes:
        size: the encoded length in bytes.
        limit: the limit it exceeds.
    """

    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(message, path=None)
        self.size = size
        self.limit = limit


class EventDecodeError(HypervisorObservabilityError, ValueError):
    """Bytes on the wire are not a valid event of any known schema version."""


class BusFullError(HypervisorObservabilityError):
    """The emit buffer is full and the caller asked not to wait."""


class BusUnavailableError(HypervisorObservabilityError):
    """The backend stayed unreachable past the configured retry deadline (or failed the call
    for good), so the events of the call were not confirmed stored.

    Re-emitting :attr:`events` is safe whatever their fate: the bus's readers and the workers
    drop an event whose id they already applied, so an event stored twice counts once.

    Attributes:
        events: the events this error is about that were not confirmed stored, in emit order
            (for ``emit`` its event, for ``emit_many`` those of its events whose batch failed,
            for ``flush()`` the buffered events lost since the previous ``flush()``, at most
            ``buffer_size`` of the newest); empty for ``start()`` and ``sync()``.
        stored_unknown: ``True`` when some of them may have been stored after all: a request
            reached Redis but its reply did not (a timeout, a connection lost after sending).
            ``False`` when none of them was stored (the connection was refused before anything
            was sent, or Redis refused the command).
    """

    def __init__(
        self,
        message: str,
        *,
        events: Iterable[HypervisorEvent] = (),
        stored_unknown: bool = False,
    ) -> None:
        super().__init__(message)
        self.events: tuple[HypervisorEvent, ...] = tuple(events)
        self.stored_unknown = stored_unknown


class BusDurabilityError(BusUnavailableError):
    """A ``durable=True`` bus cannot confirm durability: at start, the server offers neither an
    fsync to wait for (``WAITAOF``, Redis 7.2+ with ``appendonly yes``) nor a connected replica
    (``WAIT``); on an emit, Redis stored the events but the fsync or the replicas did not
    confirm them within ``durable_timeout_s``.

    For an emit, :attr:`events` holds the events concerned and :attr:`stored_unknown` is
    ``True``: they are in the primary's memory and may survive, or not (a power loss, a
    failover to a replica that never got them). Re-emitting them is safe (duplicates count
    once).
    """


class BusClosedError(HypervisorObservabilityError):
    """The bus was closed; no more events are accepted."""


class LogError(HypervisorObservabilityError):
    """A ``StreamLog`` operation failed."""


class LogUnavailableError(LogError):
    """The backend could not be reached (connection refused, reset, timed out, loading).

    Transient: the same call may succeed when retried later.
    """


class LogOutcomeUnknownError(LogUnavailableError):
    """A write reached the backend, or may have, but its reply did not (a timeout, or the
    connection lost after the request was sent): whether it was applied is unknown.

    Transient like its parent; retrying the write may apply it twice.
    """


class LogDurabilityError(LogError):
    """An append was stored, but what it was asked to wait for (an fsync, replicas) did not
    confirm it in time, or the log has nothing of the kind.

    Not transient in the retry sense: the entries are stored, so retrying would store them
    again.

    Attributes:
        local: local fsyncs that confirmed the entries (0 or 1).
        replicas: replicas that confirmed them.
    """

    def __init__(self, message: str, *, local: int = 0, replicas: int = 0) -> None:
        super().__init__(message)
        self.local = local
        self.replicas = replicas


PERMANENT_EXIT_STATUS: Final = 78
"""The exit status of an ``hvobs`` command stopped by a refusal that retrying cannot fix (wrong
credentials, unknown database, ACL denial, TLS verification): ``EX_CONFIG`` of ``sysexits.h``,
so a supervisor can be told not to restart it (systemd: ``RestartPreventExitStatus=78``)."""


class LogPermanentError(LogError):
    """The backend refused the connection for a reason retrying cannot fix: the URL's
    credentials, its database number, or the TLS verification of the server.

    A ``LogError`` (code that wraps ``LogError`` keeps working), but no retry loop of this
    package retries it: a worker ends with :data:`PERMANENT_EXIT_STATUS` and one line. The
    message names the host and port and the cause, never the password.

    Attributes:
        cause: ``"authentication"``, ``"database"``, ``"tls-verify"`` (unknown CA, expired or
            otherwise unverifiable certificate), ``"tls-hostname"`` (the certificate is not
            for this host name or address) or ``"tls-handshake"`` (the TLS handshake failed,
            e.g. a client certificate the server requires is missing).
        location: ``host:port`` of the server (``""`` when unknown).
        detail: the message without the operation that met the refusal, as a command's one
            line shows it.
    """

    def __init__(self, message: str, *, cause: str, location: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.cause = cause
        self.location = location
        self.detail = detail or message


class LogGroupMissingError(LogError):
    """The consumer group (or the whole log) does not exist any more; recreate it."""


class MetricsExportError(HypervisorObservabilityError, ValueError):
    """A metric update does not fit the metric already registered under that name.

    Raised for a label set that differs from the one the metric was created with, a name taken by
    another collector on the registry, a counter decrement, or a gauge/counter kind clash.
    """


class PermissionDeniedError(HypervisorObservabilityError):
    """The backend refused an operation to the configured user (a Redis ACL ``NOPERM``).

    Retrying cannot help, so nothing in this package retries it: the message names the user,
    the refused command and the ``hvobs acl`` roles that grant it.

    Attributes:
        user: the Redis user the connection authenticated as (``"default"`` without one).
        command: the refused Redis command in lower case (``"xtrim"``, ``"xinfo|stream"``), or
            the operation when Redis did not name the command (a refused key).
    """

    def __init__(self, message: str, *, user: str = "default", command: str = "") -> None:
        super().__init__(message)
        self.user = user
        self.command = command


class BusPermissionError(BusUnavailableError, PermissionDeniedError):
    """A ``RedisEventBus`` operation was refused to its user (see ``PermissionDeniedError``).

    A ``BusUnavailableError`` too, so code that handles an emit that could not be stored keeps
    working; it is raised at once, never after retries.
    """

    def __init__(
        self,
        message: str,
        *,
        user: str = "default",
        command: str = "",
        events: Iterable[HypervisorEvent] = (),
    ) -> None:
        PermissionDeniedError.__init__(self, message, user=user, command=command)
        self.events = tuple(events)
        self.stored_unknown = False  # refused: nothing was stored


class AclArgumentError(HypervisorObservabilityError, ValueError):
    """An argument of ``hvobs acl`` (role, stream, group, user or password) cannot be used."""


class LogPermissionError(PermissionDeniedError):
    """The backend refused the operation to this user (Redis: ``NOPERM``, an ACL).

    Not a ``LogError`` on purpose: nothing may retry it.
    """


class PartitionLayoutError(HypervisorObservabilityError, ValueError):
    """A partitioned stream's recorded layout differs from the one a process was started with
    (another partition count or key hash), or its record in Redis is unreadable.

    Retrying cannot help: start the process with the recorded count. The message names the
    stream and both counts.

    Attributes:
        stream: the stream's name.
        recorded: the partition count recorded in Redis (``None`` when unreadable).
        requested: the partition count this process was started with (``None`` for a process
            that only read the record).
    """

    def __init__(
        self, message: str, *, stream: str, recorded: int | None, requested: int | None
    ) -> None:
        super().__init__(message)
        self.stream = stream
        self.recorded = recorded
        self.requested = requested


class BadRequestError(HypervisorObservabilityError, ValueError):
    """An HTTP API request with a bad parameter (answered 400); the message says which."""


class ServeError(HypervisorObservabilityError):
    """``hvobs serve`` cannot start (port in use, Redis unreachable); the message says why."""


class WorkerStateError(HypervisorObservabilityError):
    """Worker state in the store is unreadable (foreign format, corrupt, wrong type, or a newer
    layout).

    Args:
        message: what is wrong, for logs and ``/healthz``.
        key: which of the derivation's keys holds it (``"snapshot"``, ``"meta"``, ...).
    """

    def __init__(self, message: str, key: str = "snapshot") -> None:
        super().__init__(message)
        self.key = key


class CommandError(HypervisorObservabilityError):
    """An ``hvobs`` command cannot go on because of how it was run (Redis unreachable, a port in
    use, an argument the parser could not check): the message is one line for the operator and
    never contains credentials.

    Attributes:
        exit_status: the command's exit status (1 by default; 2 for a usage mistake).
    """

    def __init__(self, message: str, *, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status
