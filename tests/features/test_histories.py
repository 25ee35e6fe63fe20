"""features/histories.py and features/vocabulary.py: dense indices, time-ordered histories, popularity."""

from __future__ import annotations

import polars as pl

from features.histories import item_popularity, user_histories
from features.vocabulary import item_vocabulary, user_vocabulary

EVENT_SCHEMA = {"user_key": pl.Int64, "item_key": pl.Int64, "ts": pl.Int64, "source_id": pl.Int32, "line": pl.Int64}


def events(rows: list[tuple[int, int, int, int, int]]) -> pl.DataFrame:
    """(user_key, item_key, ts, source_id, line) rows."""
    return pl.DataFrame(rows, schema=EVENT_SCHEMA, orient="row")


def test_item_vocabulary_dense_from_one_with_catalog_only_items() -> None:
    ev = pl.DataFrame({"item_key": [30, 10, 30, 20]})
    cat = pl.DataFrame({"item_key": [20, 40, 5]})
    vocab = item_vocabulary(ev, cat)
    assert vocab["item_key"].to_list() == [5, 10, 20, 30, 40]
    assert vocab["item_idx"].to_list() == [1, 2, 3, 4, 5]  # 0 is padding
    assert vocab["in_events"].to_list() == [False, True, True, True, False]
    only_events = item_vocabulary(ev, cat, include_catalog_only=False)
    assert only_events["item_key"].to_list() == [10, 20, 30]


def test_user_vocabulary_dense_from_zero() -> None:
    vocab = user_vocabulary(pl.DataFrame({"user_key": [7, 3, 7, 1 << 62]}))
    assert vocab["user_key"].to_list() == [3, 7, 1 << 62]
    assert vocab["user_idx"].to_list() == [0, 1, 2]


def test_histories_ordered_by_time_then_source_then_line() -> None:
    ev = events([
        # user 1: shuffled rows; two events share ts=50 (line 9 after line 4), a third in a later source
        (1, 103, 50, 1, 9),
        (1, 101, 10, 1, 1),
        (1, 104, 50, 2, 1),
        (1, 102, 50, 1, 4),
        (1, 105, 70, 1, 2),
        # user 2: file order when time does not decide
        (2, 102, 5, 1, 8),
        (2, 101, 5, 1, 7),
    ])
    items = item_vocabulary(ev.select("item_key"))
    users = user_vocabulary(ev.select("user_key"))
    h = user_histories(ev, items, users)
    idx = dict(zip(items["item_key"].to_list(), items["item_idx"].to_list(), strict=True))
    assert h["user_idx"].to_list() == [0, 1]
    assert h["user_key"].to_list() == [1, 2]
    assert h["items"].to_list() == [
        [idx[101], idx[102], idx[103], idx[104], idx[105]],
        [idx[101], idx[102]],
    ]
    assert h["times"].to_list() == [[10, 50, 50, 50, 70], [5, 5]]
    assert h.schema["items"] == pl.List(pl.Int32)


def test_histories_are_independent_of_input_row_order() -> None:
    rows = [(u, 100 + (u * 7 + k) % 13, (u * 31 + k * 17) % 50, 1 + k % 2, k) for u in range(20) for k in range(15)]
    ev = events(rows)
    items = item_vocabulary(ev.select("item_key"))
    users = user_vocabulary(ev.select("user_key"))
    a = user_histories(ev, items, users)
    b = user_histories(ev.sample(fraction=1.0, shuffle=True, seed=3), items, users)
    assert a.equals(b)
    for times in a["times"].to_list():
        assert times == sorted(times)


def test_histories_drop_events_outside_the_vocabularies() -> None:
    ev = events([(1, 10, 1, 1, 1), (1, 11, 2, 1, 2), (2, 10, 3, 1, 3)])
    items = item_vocabulary(pl.DataFrame({"item_key": [10]}))
    users = user_vocabulary(pl.DataFrame({"user_key": [1]}))
    h = user_histories(ev, items, users)
    assert h["user_key"].to_list() == [1]
    assert h["items"].to_list() == [[1]]


def test_item_popularity_counts_only_the_training_prefix() -> None:
    h = pl.DataFrame({"items": [[1, 2, 2, 3], [3, 1], [2]]}, schema={"items": pl.List(pl.Int32)})
    pop = item_popularity(h, pl.Series([3, 1, 0]), num_items=4)
    assert pop["item_idx"].to_list() == [0, 1, 2, 3, 4]
    assert pop["count"].to_list() == [0, 1, 2, 1, 0]  # user 0: 1,2,2; user 1: 3; user 2: nothing
