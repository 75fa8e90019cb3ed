"""CausalTraceId: generation, parsing and its validation, ancestry, W3C traceparent mapping."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st

from hypervisor.observability.causal_trace import CausalTraceId

HEX12 = re.compile(r"[0-9a-f]{12}")
HEX8 = re.compile(r"[0-9a-f]{8}")
segments = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-",
    min_size=1,
    max_size=64,
)


def test_root_child_and_sibling_follow_the_published_shape() -> None:
    """A root is 12/8 hex and depth 0; child() links the parent; sibling() shares it."""
    root = CausalTraceId()
    assert HEX12.fullmatch(root.trace_id)
    assert HEX8.fullmatch(root.span_id)
    assert (root.parent_span_id, root.depth) == (None, 0)
    assert root.full_id == f"{root.trace_id}/{root.span_id}" == str(root)
    child = root.child()
    assert (child.trace_id, child.parent_span_id, child.depth) == (root.trace_id, root.span_id, 1)
    assert child.span_id != root.span_id
    assert child.full_id == f"{root.trace_id}/{child.span_id}/{root.span_id}"
    sibling = child.sibling()
    assert (sibling.trace_id, sibling.parent_span_id, sibling.depth) == (
        child.trace_id,
        child.parent_span_id,
        child.depth,
    )
    assert sibling.span_id != child.span_id


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/",
        "a//",
        "//",
        "a/",
        "/b",
        "a/b/",
        "a/b/c/d",
        "invalid",
        " abc/def",
        "abc/def ",
        "abc /def",
        "abc/def\n",
        "\tabc/def",
        "abc/d$f",
        "abc/def/g.h",
        "ab:c/def",
        "abc/dé",
        "a" * 65 + "/b",
        "a/" + "b" * 65,
        "a/b/" + "c" * 10_000,
        "x" * 1_000_000,
    ],
)
def test_from_string_rejects_malformed_ids(text: str) -> None:
    """Anything but 2 or 3 non-empty [A-Za-z0-9_-] segments (each <= 64 chars) is a ValueError."""
    with pytest.raises(ValueError, match="Invalid causal trace ID"):
        CausalTraceId.from_string(text)


def test_from_string_rejects_non_strings() -> None:
    """A non-str argument is a ValueError too, never an AttributeError."""
    with pytest.raises(ValueError, match="expected str"):
        CausalTraceId.from_string(None)  # type: ignore[arg-type]


def test_from_string_accepts_short_readable_ids() -> None:
    """Short non-hex ids such as "abc/def/ghi" parse (code in the wild relies on them)."""
    parsed = CausalTraceId.from_string("abc/def/ghi")
    assert (parsed.trace_id, parsed.span_id, parsed.parent_span_id) == ("abc", "def", "ghi")
    assert parsed.depth == 1
    assert parsed.full_id == "abc/def/ghi"
    root = CausalTraceId.from_string("abc/def")
    assert (root.parent_span_id, root.depth) == (None, 0)


@settings(max_examples=300)
@given(parts=st.lists(segments, min_size=2, max_size=3))
def test_from_string_round_trips_every_valid_id(parts: list[str]) -> None:
    """For any valid string, from_string(s).full_id == s."""
    text = "/".join(parts)
    assert CausalTraceId.from_string(text).full_id == text


@settings(max_examples=300)
@given(text=st.text(max_size=80))
def test_from_string_either_parses_exactly_or_raises(text: str) -> None:
    """Arbitrary text never crashes differently: it parses to the same string or is rejected."""
    try:
        parsed = CausalTraceId.from_string(text)
    except ValueError:
        return
    assert parsed.full_id == text


@settings(max_examples=100)
@given(depth=st.integers(min_value=0, max_value=6))
def test_generated_ids_round_trip_through_their_string(depth: int) -> None:
    """trace, span and parent survive full_id -> from_string at any depth."""
    span = CausalTraceId()
    for _ in range(depth):
        span = span.child()
    parsed = CausalTraceId.from_string(span.full_id)
    assert (parsed.trace_id, parsed.span_id, parsed.parent_span_id) == (
        span.trace_id,
        span.span_id,
        span.parent_span_id,
    )
    assert parsed.depth == min(depth, 1)


def test_is_ancestor_of_follows_the_lineage() -> None:
    """Parents and grandparents are ancestors; cousins, siblings, self and descendants are not."""
    root = CausalTraceId()
    left, right = root.child(), root.child()
    grandchild = left.child()
    cousin = right.child()
    assert root.is_ancestor_of(left)
    assert root.is_ancestor_of(grandchild)
    assert left.is_ancestor_of(grandchild)
    assert not right.is_ancestor_of(grandchild)
    assert not left.is_ancestor_of(cousin)
    assert not left.is_ancestor_of(right)
    assert not left.is_ancestor_of(left)
    assert not grandchild.is_ancestor_of(left)
    other_trace = CausalTraceId().child()
    assert not root.is_ancestor_of(other_trace)


def test_is_ancestor_of_with_parsed_ids() -> None:
    """Parsed ids (parent known, depth not): the parent and the trace root are ancestors."""
    root = CausalTraceId()
    mid = root.child()
    grandchild = mid.child()
    parsed_root = CausalTraceId.from_string(root.full_id)
    parsed_mid = CausalTraceId.from_string(mid.full_id)
    parsed_grandchild = CausalTraceId.from_string(grandchild.full_id)
    # The string names the parent: it is an ancestor whatever depth the parse guessed.
    assert parsed_mid.is_ancestor_of(parsed_grandchild)
    assert mid.is_ancestor_of(parsed_grandchild)
    # The trace root precedes every deeper span, even when the lineage between is unknown.
    assert root.is_ancestor_of(parsed_grandchild)
    assert parsed_root.is_ancestor_of(parsed_grandchild)
    assert not parsed_grandchild.is_ancestor_of(parsed_mid)
    assert not parsed_grandchild.is_ancestor_of(parsed_root)
    # Cousins in other branches are never descendants.
    cousin = CausalTraceId.from_string(f"{root.trace_id}/cousin01/other001")
    branch = CausalTraceId.from_string(f"{root.trace_id}/span0001/{root.span_id}")
    assert not branch.is_ancestor_of(cousin)
    assert not parsed_mid.is_ancestor_of(cousin)
    assert not parsed_mid.is_ancestor_of(parsed_mid)


def test_traceparent_round_trip_for_generated_ids() -> None:
    """to_traceparent/from_traceparent keeps generated trace and span ids; the flag is honoured."""
    span = CausalTraceId().child()
    header = span.to_traceparent()
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", header)
    back = CausalTraceId.from_traceparent(header, parent_span_id=span.parent_span_id)
    assert (back.trace_id, back.span_id, back.parent_span_id, back.depth) == (
        span.trace_id,
        span.span_id,
        span.parent_span_id,
        1,
    )
    assert span.to_traceparent(sampled=False).endswith("-00")
    assert span.otel_trace_id == int(header.split("-")[1], 16)
    assert span.otel_span_id == int(header.split("-")[2], 16)


@settings(max_examples=200)
@given(trace=segments, span=segments)
def test_traceparent_is_valid_and_deterministic_for_any_id(trace: str, span: str) -> None:
    """Any causal id maps to a valid, non-zero traceparent, the same one every time."""
    cid = CausalTraceId(trace, span)
    header = cid.to_traceparent()
    assert header == CausalTraceId(trace, span).to_traceparent()
    version, trace_hex, span_hex, flags = header.split("-")
    assert (version, flags) == ("00", "01")
    assert len(trace_hex) == 32
    assert int(trace_hex, 16) != 0
    assert len(span_hex) == 16
    assert int(span_hex, 16) != 0
    parsed = CausalTraceId.from_traceparent(header)
    assert parsed.to_traceparent() == header


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
        "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
    ],
)
def test_from_traceparent_rejects_invalid_headers(header: str) -> None:
    """Malformed, version ff and all-zero ids are ValueErrors."""
    with pytest.raises(ValueError, match="traceparent"):
        CausalTraceId.from_traceparent(header)


def test_from_traceparent_accepts_foreign_ids() -> None:
    """A traceparent from another system is kept whole (32/16 hex) and case-insensitively."""
    header = "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01"
    cid = CausalTraceId.from_traceparent(header)
    assert cid.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert cid.span_id == "b7ad6b7169203331"
    assert cid.to_traceparent() == header.lower()
