"""Query parameters of the HTTP API: parsing and validation, one clear message per mistake.

Every parser raises :class:`BadRequestError` (answered as 400 with ``{"error": message}``) for
input it refuses; none lets a client's input reach a ``ValueError`` or ``TypeError`` deeper
down (which would be a 500). The limits here are the ones the OpenAPI document states.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Final

from hypervisor.observability._core.events import EventType
from hypervisor.observability.errors import BadRequestError

__all__ = [
    "MAX_EVENT_LIMIT",
    "MAX_ID_LENGTH",
    "BadRequestError",
    "Position",
    "QueryArgs",
    "parse_position",
]

MAX_EVENT_LIMIT: Final = 1000
"""The most events one ``/api/events`` page holds."""
DEFAULT_EVENT_LIMIT: Final = 100
MAX_ID_LENGTH: Final = 256
"""The longest session id, agent DID or saga id accepted as a filter or path parameter."""
EVENT_TYPES: Final = tuple(member.value for member in EventType)

# RFC 3339 date-time (the OpenAPI "date-time" format): date, T, time, fraction, Z or offset.
_DATE_TIME: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})"
)
_FIRST: Final = datetime.min.replace(tzinfo=UTC)
_LAST: Final = datetime.max.replace(tzinfo=UTC)
POSITION_PATTERN: Final = r"^[0-9a-f]{8}:[0-9]{1,18}$"
_POSITION: Final = re.compile(POSITION_PATTERN[1:-1])
TRACE_ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"
_TRACE_ID: Final = re.compile(TRACE_ID_PATTERN[1:-1])


class Position:
    """A position in this server's index, as cursors and stream ids carry it: ``run:position``.

    ``run`` is a random id of the server run, so a cursor or stream id of another run (a
    restarted server, whose positions start again at 0) is recognised.
    """

    __slots__ = ("position", "run")

    def __init__(self, run: str, position: int) -> None:
        self.run = run
        self.position = position

    def __str__(self) -> str:
        return f"{self.run}:{self.position}"


def parse_position(name: str, text: str) -> Position:
    """Parse a cursor or stream id (``run:position``).

    Raises:
        BadRequestError: not of that form.
    """
    if len(text) > 64 or not _POSITION.fullmatch(text):
        raise BadRequestError(
            f"{name}: expected a value this server returned (like 1a2b3c4d:120), got {text!r}"
        )
    run, _, position = text.partition(":")
    return Position(run, int(position))


def parse_date_time(name: str, text: str) -> datetime:
    """Parse an RFC 3339 date-time; the offset is required (``Z`` for UTC).

    A leap second (``:60``) is read as the last microsecond of its minute.

    Raises:
        BadRequestError: not an RFC 3339 date-time or out of range.
    """
    match = _DATE_TIME.fullmatch(text) if len(text) <= 64 else None
    if match is None:
        raise BadRequestError(
            f"{name}: expected an RFC 3339 date-time with an offset, such as "
            f"2026-01-15T09:00:00Z, got {text[:80]!r}"
        )
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    fraction = match.group(7)
    micro = int((fraction[1:] + "000000")[:6]) if fraction else 0
    zone = match.group(8)
    leap = second == 60
    try:
        if zone in ("Z", "z"):
            tz: timezone = UTC
        else:
            sign = 1 if zone[0] == "+" else -1
            hours, minutes = int(zone[1:3]), int(zone[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError("offset out of range")
            tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
        value = datetime(
            year, month, day, hour, minute, 59 if leap else second, 999_999 if leap else micro, tz
        )
    except (ValueError, OverflowError) as exc:
        raise BadRequestError(f"{name}: {text!r} is not a valid date-time ({exc})") from None
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # Within a day of the end of the calendar: the nearest representable instant.
        return _LAST if value.year > 1 else _FIRST


class QueryArgs:
    """A request's query parameters, each given at most once.

    Raises:
        BadRequestError: a parameter is given more than once.
    """

    __slots__ = ("_values",)

    def __init__(self, items: Sequence[tuple[str, str]]) -> None:
        values: dict[str, str] = {}
        for key, value in items:
            if key in values:
                raise BadRequestError(f"{key}: given more than once")
            values[key] = value
        self._values: Mapping[str, str] = values

    def text(self, name: str, *, max_length: int = MAX_ID_LENGTH) -> str | None:
        """A string parameter (1 to ``max_length`` characters), ``None`` when absent."""
        value = self._values.get(name)
        if value is None:
            return None
        if not value:
            raise BadRequestError(f"{name}: must not be empty (leave it out to match any)")
        if len(value) > max_length:
            raise BadRequestError(f"{name}: longer than {max_length} characters")
        return value

    def integer(self, name: str, *, default: int, minimum: int, maximum: int) -> int:
        """An integer parameter within ``[minimum, maximum]``, ``default`` when absent."""
        value = self._values.get(name)
        if value is None:
            return default
        text = value.strip()
        if not (text.isascii() and (text.isdigit() or (text[:1] == "-" and text[1:].isdigit()))):
            raise BadRequestError(f"{name}: expected an integer, got {value[:40]!r}")
        if len(text) > 12:
            raise BadRequestError(f"{name}: must be between {minimum} and {maximum}")
        number = int(text)
        if not minimum <= number <= maximum:
            raise BadRequestError(f"{name}: must be between {minimum} and {maximum}, got {number}")
        return number

    def boolean(self, name: str) -> bool | None:
        """A boolean parameter (``true`` or ``false``), ``None`` when absent."""
        value = self._values.get(name)
        if value is None:
            return None
        if value in ("true", "false"):
            return value == "true"
        raise BadRequestError(f"{name}: expected true or false, got {value[:40]!r}")

    def choice(self, name: str, choices: Sequence[str]) -> str | None:
        """A parameter that must be one of ``choices``, ``None`` when absent."""
        value = self._values.get(name)
        if value is None:
            return None
        if value not in choices:
            shown = ", ".join(choices) if len(choices) <= 8 else ", ".join(choices[:8]) + ", ..."
            raise BadRequestError(f"{name}: unknown value {value[:80]!r} (one of: {shown})")
        return value

    def event_type(self, name: str = "event_type") -> EventType | None:
        """An event type by its wire value (``ring.elevated``), ``None`` when absent."""
        value = self.choice(name, EVENT_TYPES)
        return None if value is None else EventType(value)

    def date_time(self, name: str) -> datetime | None:
        """An RFC 3339 date-time parameter, ``None`` when absent."""
        value = self._values.get(name)
        return None if value is None else parse_date_time(name, value)

    def position(self, name: str) -> Position | None:
        """A cursor or stream id parameter, ``None`` when absent."""
        value = self._values.get(name)
        return None if value is None else parse_position(name, value)


def check_path_id(name: str, value: str, *, pattern: re.Pattern[str] | None = None) -> str:
    """Validate a path parameter (a saga id or trace id).

    Raises:
        BadRequestError: empty, too long, or not matching ``pattern``.
    """
    if not value or len(value) > MAX_ID_LENGTH:
        raise BadRequestError(f"{name}: must be 1 to {MAX_ID_LENGTH} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise BadRequestError(
            f"{name}: expected letters, digits, '-' or '_' (the causal trace id's first "
            f"segment, e.g. a1b2c3d4e5f6), got {value[:80]!r}"
        )
    return value


def check_trace_id(value: str) -> str:
    """Validate a trace id path parameter (a causal trace id's first segment)."""
    return check_path_id("trace_id", value, pattern=_TRACE_ID)
