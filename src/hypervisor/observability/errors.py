"""The project's errors: one root, so callers can catch everything this package raises."""

from __future__ import annotations

__all__ = [
    "BadRequestError",
    "BusClosedError",
    "BusFullError",
    "BusUnavailableError",
    "EventDecodeError",
    "EventEncodeError",
    "HypervisorObservabilityError",
    "ServeError",
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


class BadRequestError(HypervisorObservabilityError, ValueError):
    """An HTTP API request with a bad parameter (answered 400); the message says which."""


class ServeError(HypervisorObservabilityError):
    """``hvobs serve`` cannot start (port in use, Redis unreachable); the message says why."""
