"""Each user's time-ordered history of item indices."""

from __future__ import annotations

import polars as pl


def user_histories(events: pl.DataFrame, items: pl.DataFrame, users: pl.DataFrame) -> pl.DataFrame:
    """Time-ordered item sequences per user.

    Args:
        events: ``user_key``, ``item_key``, ``ts`` (i64), ``source_id``, ``line``; ties in ``ts``
            are broken by (source_id, line), i.e. file order.
        items: item vocabulary (``item_idx``, ``item_key``).
        users: user vocabulary (``user_idx``, ``user_key``).

    Returns:
        one row per user in ``user_idx`` order: ``user_idx`` (i32), ``user_key`` (i64),
        ``items`` (list[i32], oldest first), ``times`` (list[i64]).
    """
    return (
        events.lazy()
        .join(items.lazy().select("item_key", "item_idx"), on="item_key", how="inner")
        .join(users.lazy(), on="user_key", how="inner")
        .sort(["user_idx", "ts", "source_id", "line"])
        .group_by("user_idx", maintain_order=True)
        .agg(pl.col("user_key").first(), pl.col("item_idx").alias("items"), pl.col("ts").alias("times"))
        .sort("user_idx")
        .collect()
    )


def item_popularity(histories: pl.DataFrame, lengths: pl.Series, num_items: int) -> pl.DataFrame:
    """Interaction counts per item over each user's first ``lengths[u]`` events (the training part).

    Returns ``item_idx`` (i32, 0..num_items) and ``count`` (i64), index 0 (padding) included.
    """
    counts = (
        histories.select("items").with_columns(lengths.alias("n"))
        .select(pl.col("items").list.head(pl.col("n")).alias("items"))
        .explode("items").drop_nulls()
        .group_by("items").len()
    )
    return (
        pl.DataFrame({"item_idx": pl.int_range(0, num_items + 1, dtype=pl.Int32, eager=True)})
        .join(counts.rename({"items": "item_idx", "len": "count"}).with_columns(pl.col("item_idx").cast(pl.Int32)),
              on="item_idx", how="left")
        .with_columns(pl.col("count").fill_null(0).cast(pl.Int64))
    )
