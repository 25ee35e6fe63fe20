"""Evaluation splits over user histories, as positions into each user's sequence.

A split gives every user ``train_end`` (the first ``train_end`` events are training data),
``valid_pos`` and ``test_pos`` (index of the validation / test target, or null). The input
for a target at position p is the history before p, so the test input includes the
validation item, as in the SASRec protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
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


def time_quantiles(times: Callable[[], Iterable[np.ndarray]], test_fraction: float) -> tuple[int, int]:
    """(valid_time, test_time): the times leaving the last 2x / 1x ``test_fraction`` of events after them.

    ``times()`` yields every event time (int64 arrays, in any order and chunking); it is
    called once per pass (see ``quantile_lower``).
    """
    test_time = quantile_lower(times, 1.0 - test_fraction)
    valid_time = quantile_lower(times, max(0.0, 1.0 - 2 * test_fraction))
    return valid_time, test_time


def quantile_lower(chunks: Callable[[], Iterable[np.ndarray]], q: float, bins: int = 1 << 16,
                   gather: int = 1 << 20) -> int:
    """The ``q`` quantile of the int64 values ``chunks()`` yields, "lower" interpolation (the
    value at sorted index floor((n - 1) q), as Polars and NumPy compute it), exactly.

    No pass holds more than one chunk and ``bins`` counts: each pass histograms the values
    in the range known to hold the answer into ``bins`` equal bins and keeps the answer's bin,
    until at most ``gather`` values are left, which are then selected directly. Passes:
    one for the count and range, then about log_bins(range) (2 for microsecond times over a
    year). Raises ValueError when there are no values.
    """
    n, lo, hi = 0, None, None
    for chunk in chunks():
        if len(chunk):
            n += len(chunk)
            lo = int(chunk.min()) if lo is None else min(lo, int(chunk.min()))
            hi = int(chunk.max()) if hi is None else max(hi, int(chunk.max()))
    if lo is None or hi is None:
        raise ValueError("the quantile of no values")
    k = int((n - 1) * q)  # rank of the answer among the values in [lo, hi]
    inside = n
    while inside > gather and hi > lo:
        width = -(-(hi - lo + 1) // bins)  # ceil: bins of `width` values cover [lo, hi]
        counts = np.zeros(bins, dtype=np.int64)
        for chunk in chunks():
            v = chunk[(chunk >= lo) & (chunk <= hi)]
            offset = v.view(np.uint64) - np.uint64(lo & 0xFFFF_FFFF_FFFF_FFFF)  # v - lo, no overflow
            counts += np.bincount((offset // np.uint64(width)).astype(np.int64), minlength=bins)
        below = np.cumsum(counts) - counts  # values in [lo, hi] before each bin
        b = int(np.searchsorted(below, k, side="right")) - 1
        k -= int(below[b])
        inside = int(counts[b])
        lo, hi = lo + b * width, min(hi, lo + (b + 1) * width - 1)
    if lo == hi:  # one value left, however many hold it (ties of day-only times)
        return lo
    values = np.concatenate([c[(c >= lo) & (c <= hi)] for c in chunks()])
    return int(np.partition(values, k)[k])


def cold_items(items: pl.DataFrame, fraction: float, seed: int) -> pl.Series:
    """A deterministic ``fraction`` of event items to hold out of training (cold-start report).

    Returns a boolean Series aligned with ``items`` (``item_idx``, ``item_key``, ``in_events``).
    """
    if fraction <= 0:
        return pl.Series("cold", [False] * items.height, dtype=pl.Boolean)
    h = items["item_key"].hash(seed=seed)
    threshold = int(fraction * (2**64 - 1))
    return ((h < threshold) & items["in_events"]).alias("cold")
