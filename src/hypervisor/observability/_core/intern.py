"""A bounded pool of short strings that decoded events share (their top-level payload values).

The decoder makes a new string object for every string value of every event, so a payload such
as ``{"tool": "file_read", "ring": 2}`` costs each stored event a copy of ``"file_read"``
(58 bytes) although a fleet repeats a few such values. (Payload keys are already shared: the
decoder caches short map keys.) :class:`StringPool` replaces a short top-level payload value
by an equal string it saw before, so the stored events hold one object per distinct value.

Only values are replaced, by equal strings of the same type, in payloads nobody has seen yet
(the reader's own decoded events): the events compare, hash and read exactly as before. The
pool is bounded whatever a flood of distinct values brings: it holds at most ``max_size``
strings of at most ``max_chars`` characters, and starts over empty when it is full (the values
of a steady workload come back into it at once; a flood only makes it start over more often).
"""

from __future__ import annotations

from collections.abc import Iterable

from hypervisor.observability._core.events import HypervisorEvent

__all__ = ["StringPool"]


class StringPool:
    """Shares short payload string values among events (see the module docstring).

    Args:
        max_size: the most strings held; the pool is emptied when a new one would exceed it.
        max_chars: the longest string pooled (longer ones are rarely repeated and a pooled
            string is kept alive by the pool until it starts over).

    Raises:
        ValueError: ``max_size`` or ``max_chars`` is below 1.
    """

    __slots__ = ("_strings", "max_chars", "max_size")

    def __init__(self, max_size: int = 4096, max_chars: int = 64) -> None:
        if max_size < 1 or max_chars < 1:
            raise ValueError(f"max_size and max_chars must be >= 1, got {max_size}, {max_chars}")
        self.max_size = max_size
        self.max_chars = max_chars
        self._strings: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._strings)

    def share_payloads(self, events: Iterable[HypervisorEvent]) -> None:
        """Replace each short top-level string value of each event's payload by the pool's
        equal string (pooling it when new). The events must be the caller's own, seen by no
        one yet: their payload dicts are changed in place (values only, never keys)."""
        strings = self._strings
        get = strings.get
        max_chars = self.max_chars
        for event in events:
            payload = event.payload
            for key, value in payload.items():
                # Exact str only (a decoded value is never a subclass; a user's could be).
                if type(value) is str and len(value) <= max_chars:
                    shared = get(value)
                    if shared is not value:
                        if shared is None:
                            if len(strings) >= self.max_size:
                                strings.clear()
                            strings[value] = value
                        else:
                            # Replacing the value of an existing key: the dict's size does not
                            # change, so iterating it stays valid.
                            payload[key] = shared
