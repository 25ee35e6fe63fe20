"""features/splits.py: leave-one-out, temporal split, time quantiles, cold items (pure functions)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.splits import cold_items, leave_one_out, quantile_lower, temporal, time_quantiles


def histories(rows: dict[int, list[int]]) -> pl.DataFrame:
    """user_idx -> times; items are 1..n so item == position + 1."""
    return pl.DataFrame(
        {
            "user_idx": list(rows),
            "items": [list(range(1, len(t) + 1)) for t in rows.values()],
            "times": list(rows.values()),
        },
        schema={"user_idx": pl.Int32, "items": pl.List(pl.Int32), "times": pl.List(pl.Int64)},
    )


def as_rows(split: pl.DataFrame) -> dict[int, tuple]:
    return {r["user_idx"]: (r["train_end"], r["valid_pos"], r["test_pos"]) for r in split.iter_rows(named=True)}


def test_leave_one_out_last_is_test_second_last_is_valid() -> None:
    h = histories({0: [1, 2, 3, 4, 5], 1: [10, 20, 30], 2: [7, 8], 3: [9]})
    split = leave_one_out(h)
    assert split.schema == pl.Schema({"user_idx": pl.Int32, "train_end": pl.Int32, "valid_pos": pl.Int32,
                                      "test_pos": pl.Int32})
    assert as_rows(split) == {
        0: (3, 3, 4),        # train on items[0:3], validate on items[3], test on items[4]
        1: (1, 1, 2),        # the shortest history with targets
        2: (2, None, None),  # fewer than 3 events: everything is training, no targets
        3: (1, None, None),
    }


def test_leave_one_out_keeps_user_order_and_count() -> None:
    h = histories({5: [1, 2, 3], 2: [1, 2, 3, 4], 9: [1]})
    split = leave_one_out(h)
    assert split["user_idx"].to_list() == [5, 2, 9]
    assert split["test_pos"].to_list() == [2, 3, None]


def test_temporal_split_positions() -> None:
    # valid window [100, 200), test from 200
    h = histories({
        0: [10, 20, 150, 160, 250, 300],  # train 2, valid at 2, test at 4
        1: [10, 20, 30],                  # all before: training only
        2: [150, 250],                    # nothing before valid_time: no valid target, test at 1
        3: [250, 260],                    # nothing before test time: no target at all
        4: [10, 250],                     # no valid-window event: test at 1
        5: [10, 100, 200],                # boundaries: valid at 1 (>= valid_time), test at 2 (>= test_time)
    })
    split = temporal(h, valid_time=100, test_time=200)
    assert as_rows(split) == {
        0: (2, 2, 4),
        1: (3, None, None),
        2: (0, None, 1),
        3: (0, None, None),
        4: (1, None, 1),
        5: (1, 1, 2),
    }


def test_temporal_targets_respect_the_times() -> None:
    h = histories({u: sorted({(u * 37 + k * 13) % 500 for k in range(12)}) for u in range(40)})
    valid_time, test_time = 250, 400
    split = temporal(h, valid_time, test_time)
    for times, (train_end, valid_pos, test_pos) in zip(h["times"].to_list(), split.select(
            "train_end", "valid_pos", "test_pos").iter_rows(), strict=True):
        assert all(t < valid_time for t in times[:train_end])
        assert all(t >= valid_time for t in times[train_end:])
        if valid_pos is not None:
            assert valid_time <= times[valid_pos] < test_time
            assert valid_pos == train_end
        if test_pos is not None:
            assert times[test_pos] >= test_time
            assert times[test_pos - 1] < test_time  # the first event at/after the split time


def test_temporal_rejects_valid_after_test() -> None:
    with pytest.raises(ValueError, match="valid_time"):
        temporal(histories({0: [1, 2, 3]}), valid_time=5, test_time=4)


def test_time_quantiles() -> None:
    chunks = [np.arange(0, 50), np.arange(50, 100)]  # times 0..99, in two chunks
    valid_time, test_time = time_quantiles(lambda: iter(chunks), 0.1)
    assert test_time == 89  # 11 of 100 events at/after it (lower interpolation)
    assert valid_time == 79
    assert valid_time <= test_time


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=400) | st.lists(st.integers(0, 4), min_size=1, max_size=400),
       q=st.floats(0, 1), cuts=st.lists(st.integers(0, 400), max_size=4), bins=st.integers(2, 16), gather=st.integers(1, 50))
def test_quantile_lower_is_the_value_at_the_lower_sorted_index_in_any_chunking(
        values: list[int], q: float, cuts: list[int], bins: int, gather: int) -> None:
    """Small bins and gather limits force several histogram passes; int64 extremes check the range arithmetic."""
    x = np.array(values, dtype=np.int64)
    chunks = np.split(x, sorted(c for c in cuts if c <= len(x)))
    expected = int(np.sort(x)[int((len(x) - 1) * q)])
    assert quantile_lower(lambda: iter(chunks), q, bins=bins, gather=gather) == expected
    if np.abs(x).max() < 2**53:  # Polars answers in float64: exact below 2**53
        assert expected == int(pl.Series(x).quantile(q, interpolation="lower"))


def test_quantile_of_no_values_is_an_error() -> None:
    with pytest.raises(ValueError):
        quantile_lower(lambda: iter([np.zeros(0, np.int64)]), 0.5)


def items_frame(n: int, in_events: list[bool] | None = None) -> pl.DataFrame:
    return pl.DataFrame({
        "item_idx": pl.int_range(1, n + 1, dtype=pl.Int32, eager=True),
        "item_key": pl.int_range(1000, 1000 + n, dtype=pl.Int64, eager=True),
        "in_events": in_events if in_events is not None else [True] * n,
    })


def test_cold_items_fraction_and_determinism() -> None:
    items = items_frame(20_000)
    cold = cold_items(items, 0.2, seed=7)
    assert cold.dtype == pl.Boolean and cold.len() == items.height
    share = cold.mean()
    assert 0.18 < share < 0.22
    assert cold.equals(cold_items(items, 0.2, seed=7))  # deterministic
    assert not cold.equals(cold_items(items, 0.2, seed=8))  # the seed matters
    # a larger fraction holds out a superset
    bigger = cold_items(items, 0.5, seed=7)
    assert (cold & ~bigger).sum() == 0
    assert 0.48 < bigger.mean() < 0.52


def test_cold_items_zero_fraction_and_catalog_only_items() -> None:
    items = items_frame(1000, in_events=[i % 2 == 0 for i in range(1000)])
    assert cold_items(items, 0.0, seed=1).sum() == 0
    cold = cold_items(items, 0.5, seed=1)
    assert cold.sum() > 100
    # only items seen in events can be held out
    assert (cold & ~items["in_events"]).sum() == 0
