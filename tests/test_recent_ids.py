"""The recent-ids window shared by the bus reader and the workers' applier."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from hypervisor.observability._core.recent import RecentIds


@given(st.integers(0, 6), st.lists(st.sampled_from("abcdefghij"), max_size=60))
def test_window_remembers_exactly_the_newest_size_distinct_ids(size: int, ids: list[str]) -> None:
    """``add`` reports a copy iff the id is among the newest ``size`` distinct ids remembered."""
    window = RecentIds(size)
    model: list[str] = []  # remembered ids, oldest first
    for event_id in ids:
        is_new = event_id not in model
        assert window.add(event_id) is is_new
        if is_new and size:
            model.append(event_id)
            del model[:-size]
    assert window.newest() == model
    assert len(window) == len(model)
    assert all(event_id in window for event_id in model)


def test_extend_loads_in_order_and_negative_size_is_refused() -> None:
    """``extend`` keeps the newest ids of what it is given; a negative size is an error."""
    window = RecentIds(2)
    window.extend(["a", "b", "c"])
    assert window.newest() == ["b", "c"]
    assert "a" not in window
    with pytest.raises(ValueError, match=">= 0"):
        RecentIds(-1)
