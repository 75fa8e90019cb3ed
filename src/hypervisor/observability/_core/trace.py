"""Causal trace ids: ``trace_id/span_id[/parent_span_id]`` encoding the spawn tree."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

__all__ = ["CausalTraceId"]

# One segment: letters, digits, '-' and '_' (the published ids are hex; code in the wild uses
# short readable ids such as "abc"). Bounded so that a garbage header cannot become a huge id.
_SEGMENT = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_LENGTH = 3 * 64 + 2
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def _hex(n_bytes: int) -> str:
    return os.urandom(n_bytes).hex()


def _new_trace_id() -> str:
    return _hex(6)


def _new_span_id() -> str:
    return _hex(4)


def _to_hex(segment: str, width: int) -> str:
    """Map a segment to exactly ``width`` lowercase hex characters, deterministically.

    Hex segments of the right width map to themselves (so ids round-trip through W3C), shorter
    hex segments are left-padded with zeros, anything else is hashed.
    """
    lowered = segment.lower()
    if len(lowered) <= width and all(c in "0123456789abcdef" for c in lowered):
        return lowered.rjust(width, "0")
    return hashlib.blake2b(segment.encode(), digest_size=width // 2).hexdigest()


@dataclass(frozen=True, slots=True)
class CausalTraceId:
    """Encodes the spawn/delegation tree of a trace.

    Attributes:
        trace_id: shared by every span of the tree (12 hex characters when generated).
        span_id: this span (8 hex characters when generated).
        parent_span_id: the parent's span id, ``None`` for a root.
        depth: 0 for a root, parent's depth + 1 for a child.
    """

    trace_id: str = field(default_factory=_new_trace_id)
    span_id: str = field(default_factory=_new_span_id)
    parent_span_id: str | None = None
    depth: int = 0
    # Span ids of the known ancestors, root first. Complete (``len == depth``) for ids made with
    # child()/sibling(); empty for ids parsed from a string, whose depth is a guess (the string
    # names only the parent, which is_ancestor_of checks on its own).
    ancestors: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def child(self) -> CausalTraceId:
        """Return a child span: same trace, new span, parented to this span, one level deeper."""
        return CausalTraceId(
            self.trace_id,
            _new_span_id(),
            self.span_id,
            self.depth + 1,
            (*self.ancestors, self.span_id),
        )

    def sibling(self) -> CausalTraceId:
        """Return a sibling span: same trace, parent and depth, new span id."""
        return CausalTraceId(
            self.trace_id, _new_span_id(), self.parent_span_id, self.depth, self.ancestors
        )

    @property
    def full_id(self) -> str:
        """``trace_id/span_id`` for a root, ``trace_id/span_id/parent_span_id`` otherwise."""
        if self.parent_span_id:
            return f"{self.trace_id}/{self.span_id}/{self.parent_span_id}"
        return f"{self.trace_id}/{self.span_id}"

    @classmethod
    def from_string(cls, s: str) -> CausalTraceId:
        """Parse ``trace/span[/parent]``.

        The string format carries no depth: a parsed id with a parent has depth 1 (at least one
        level below a root), a root has depth 0.

        Raises:
            ValueError: not two or three non-empty segments of letters, digits, ``-`` or ``_``
                (at most 64 characters each).
        """
        if not isinstance(s, str):
            raise ValueError(f"Invalid causal trace ID: expected str, got {type(s).__name__}")
        if len(s) > _MAX_LENGTH:
            raise ValueError(f"Invalid causal trace ID: longer than {_MAX_LENGTH} characters")
        parts = s.split("/")
        if not 2 <= len(parts) <= 3:
            raise ValueError(f"Invalid causal trace ID: {s!r} (expected trace/span[/parent])")
        for part in parts:
            if not _SEGMENT.fullmatch(part):
                raise ValueError(f"Invalid causal trace ID: {s!r} (bad segment {part!r})")
        if len(parts) == 3:
            return cls(parts[0], parts[1], parts[2], 1)
        return cls(parts[0], parts[1], None, 0)

    def is_ancestor_of(self, other: CausalTraceId) -> bool:
        """Whether ``other`` descends from this span.

        Requires the same trace; then true when this span is ``other``'s parent, or ``other`` is
        deeper and this span is one of its known ancestors (ids made with :meth:`child` know
        their whole lineage). When ``other``'s lineage is incomplete (it was parsed from a
        string, which names only the parent and no depth), the root of the trace is still every
        deeper span's ancestor. A cousin in another branch is never a descendant.
        """
        if self.trace_id != other.trace_id or self.span_id == other.span_id:
            return False
        # The parent link is explicit, while a parsed id's depth is only a guess: check it first.
        if other.parent_span_id == self.span_id:
            return True
        if other.depth <= self.depth:
            return False
        if self.span_id in other.ancestors:
            return True
        if len(other.ancestors) >= other.depth:
            return False
        return self.parent_span_id is None and self.depth == 0

    def to_traceparent(self, sampled: bool = True) -> str:
        """Return a W3C ``traceparent`` header for this span (version 00).

        The 12-hex trace id is left-padded to 32 hex characters and the 8-hex span id to 16;
        non-hex ids are hashed deterministically, so the same causal id always maps to the same
        W3C ids.
        """
        trace = _to_hex(self.trace_id, 32)
        span = _to_hex(self.span_id, 16)
        if trace == "0" * 32:
            trace = trace[:-1] + "1"
        if span == "0" * 16:
            span = span[:-1] + "1"
        return f"00-{trace}-{span}-{'01' if sampled else '00'}"

    @property
    def otel_trace_id(self) -> int:
        """The 128-bit OpenTelemetry trace id this causal id maps to."""
        return int(self.to_traceparent().split("-")[1], 16)

    @property
    def otel_span_id(self) -> int:
        """The 64-bit OpenTelemetry span id this causal id maps to."""
        return int(self.to_traceparent().split("-")[2], 16)

    @classmethod
    def from_traceparent(
        cls, header: str, parent_span_id: str | None = None, depth: int | None = None
    ) -> CausalTraceId:
        """Build a causal id from a W3C ``traceparent`` header.

        Ids produced by :meth:`to_traceparent` from generated (hex) causal ids round-trip: the
        zero padding is stripped back to 12 and 8 characters when present.

        Raises:
            ValueError: not a valid version-00 ``traceparent``.
        """
        match = _TRACEPARENT.fullmatch(header.strip().lower())
        if match is None or match.group(1) == "ff":
            raise ValueError(f"Invalid traceparent: {header!r}")
        trace, span = match.group(2), match.group(3)
        if trace == "0" * 32 or span == "0" * 16:
            raise ValueError(f"Invalid traceparent (all-zero id): {header!r}")
        if trace.startswith("0" * 20):
            trace = trace[20:]
        if span.startswith("0" * 8):
            span = span[8:]
        if depth is None:
            depth = 0 if parent_span_id is None else 1
        ancestors = () if parent_span_id is None else (parent_span_id,)
        return cls(trace, span, parent_span_id, depth, ancestors)

    def __str__(self) -> str:
        return self.full_id
