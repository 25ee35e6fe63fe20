"""Evaluation splits over user histories, as positions into each user's sequence.

A split gives every user ``train_end`` (the first ``train_end`` events are training data),
``valid_pos`` and ``test_pos`` (index of the validation / test target, or null). The input
for a target at position p is the history before p, so the test input includes the
validation item, as in the SASRec protocol.
"""

from __future__ import annotations

import polars as pl


def leave_one_out(histories: pl.DataFrame) -> pl.DataFrame:
    """Last event = test target, second-to-last = validation target, the rest = training.

    Users with fewer than 3 events keep everything for training and have no targets
    (the SASRec ``data_partition`` rule).
    """
    n = pl.col("items").list.len()
    return histories.select(
        pl.col("user_idx").cast(pl.Int32),
        pl.when(n >= 3).then(n - 2).otherwise(n).cast(pl.Int32).alias("train_end"),
        pl.when(n >= 3).then(n - 2).cast(pl.Int32).alias("valid_pos"),
        pl.when(n >= 3).then(n - 1).cast(pl.Int32).alias("test_pos"),
    )


def temporal(histories: pl.DataFrame, valid_time: int, test_time: int) -> pl.DataFrame:
    """Global temporal split at two times (same unit as ``times``, valid_time <= test_time).

    Training: events before ``valid_time``. Validation target: a user's first event in
    [valid_time, test_time). Test target: the first event at or after ``test_time``, read
    with the whole history before it. Users need at least one earlier event to get a target.
    """
    if valid_time > test_time:
        raise ValueError("valid_time must not be after test_time")
    t = pl.col("times")
    before_valid = t.list.eval((pl.element() < valid_time).sum()).list.first().cast(pl.Int32)
    before_test = t.list.eval((pl.element() < test_time).sum()).list.first().cast(pl.Int32)
    n = pl.col("items").list.len().cast(pl.Int32)
    return histories.select(
        pl.col("user_idx").cast(pl.Int32),
        before_valid.alias("train_end"),
        pl.when((before_valid < before_test) & (before_valid > 0)).then(before_valid).cast(pl.Int32).alias("valid_pos"),
        pl.when((before_test < n) & (before_test > 0)).then(before_test).cast(pl.Int32).alias("test_pos"),
    )


def time_quantiles(histories: pl.DataFrame, test_fraction: float) -> tuple[int, int]:
    """(valid_time, test_time): the times leaving the last 2x / 1x ``test_fraction`` of events after them."""
    times = histories.select(pl.col("times").explode()).to_series()
    test_time = int(times.quantile(1.0 - test_fraction, interpolation="lower"))
    valid_time = int(times.quantile(max(0.0, 1.0 - 2 * test_fraction), interpolation="lower"))
    return valid_time, test_time


def cold_items(items: pl.DataFrame, fraction: float, seed: int) -> pl.Series:
    """A deterministic ``fraction`` of event items to hold out of training (cold-start report).

    Returns a boolean Series aligned with ``items`` (``item_idx``, ``item_key``, ``in_events``).
    """
    if fraction <= 0:
        return pl.Series("cold", [False] * items.height, dtype=pl.Boolean)
    h = items["item_key"].hash(seed=seed)
    threshold = int(fraction * (2**64 - 1))
    return ((h < threshold) & items["in_events"]).alias("cold")
