"""Item and user vocabularies: warehouse keys -> dense indices. Item index 0 is padding."""

from __future__ import annotations

import polars as pl


def item_vocabulary(event_items: pl.DataFrame, catalog: pl.DataFrame | None = None,
                    include_catalog_only: bool = True) -> pl.DataFrame:
    """Dense item indices 1..N in ascending ``item_key`` order.

    Args:
        event_items: frame with ``item_key`` (i64) of items seen in events (duplicates allowed).
        catalog: frame with ``item_key`` of items with content, or None.
        include_catalog_only: also index catalog items no one interacted with yet (they can
            be recommended from their content).

    Returns:
        frame ``item_idx`` (i32, from 1), ``item_key`` (i64), ``in_events`` (bool).
    """
    seen = event_items.select(pl.col("item_key").cast(pl.Int64)).unique()
    keys = seen
    if catalog is not None and include_catalog_only and catalog.height:
        keys = pl.concat([seen, catalog.select(pl.col("item_key").cast(pl.Int64))]).unique()
    return (
        keys.sort("item_key")
        .with_columns(
            pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias("item_idx"),
            pl.col("item_key").is_in(seen["item_key"].implode()).alias("in_events"),
        )
        .select("item_idx", "item_key", "in_events")
    )


def user_vocabulary(event_users: pl.DataFrame) -> pl.DataFrame:
    """Dense user indices 0..U-1 in ascending ``user_key`` order: ``user_idx`` (i32), ``user_key``."""
    return (
        event_users.select(pl.col("user_key").cast(pl.Int64)).unique().sort("user_key")
        .with_columns(pl.int_range(0, pl.len(), dtype=pl.Int32).alias("user_idx"))
        .select("user_idx", "user_key")
    )
