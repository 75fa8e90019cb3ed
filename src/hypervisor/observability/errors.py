"""The project's errors: one root, so callers can catch everything this package raises."""

from __future__ import annotations

__all__ = [
    "AclArgumentError",
    "BadRequestError",
    "BusClosedError",
    "BusFullError",
    "BusPermissionError",
    "BusUnavailableError",
    "CommandError",
    "EventDecodeError",
    "EventEncodeError",
    "EventTooLargeError",
    "HypervisorObservabilityError",
    "LogError",
    "LogGroupMissingError",
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
    """The backend stayed unreachable past the configured retry deadline."""


class BusClosedError(HypervisorObservabilityError):
    """The bus was closed; no more events are accepted."""


class LogError(HypervisorObservabilityError):
    """A ``StreamLog`` operation failed."""


class LogUnavailableError(LogError):
    """The backend could not be reached (connection refused, reset, timed out, loading).

    Transient: the same call may succeed when retried later.
    """


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

    def __init__(self, message: str, *, user: str = "default", command: str = "") -> None:
        PermissionDeniedError.__init__(self, message, user=user, command=command)


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
