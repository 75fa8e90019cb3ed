"""The async context-manager shape every long-lived object here shares."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["AsyncResource"]


class AsyncResource:
    """Mixin: ``async with`` enters as-is and leaves through :meth:`aclose`.

    Subclasses implement ``aclose()``; one that must start work on entry overrides
    ``__aenter__`` and still inherits the exit.
    """

    async def aclose(self) -> object:
        """Release what the object holds. Idempotent in every subclass (which may return what
        it could not finish, as ``RedisEventBus.aclose`` returns the events it could not
        store)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
