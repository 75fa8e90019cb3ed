"""The project's errors: one root, so callers can catch everything this package raises."""

from __future__ import annotations

__all__ = [
    "BusClosedError",
    "BusFullError",
    "BusUnavailableError",
    "EventDecodeError",
    "EventEncodeError",
    "HypervisorObservabilityError",
    "LogError",
    "LogGroupMissingError",
    "LogUnavailableError",
    "MetricsExportError",
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
