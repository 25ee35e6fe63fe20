"""The feature build's histories on Ray: one Ray task per user bucket of the event dataset.

``histories_on_ray`` is the ``histories_of`` of ``pipeline.data.feature_store.build_feature_set``
under ``engine = "ray"``: each task reads one bucket of the partitioned event dataset
(``pipeline.data.event_dataset``) and builds its users' histories, the driver puts the
buckets' rows back in ``user_idx`` order. No process holds every event at once, and the
frame equals the one built from the whole table (tested). The caller holds the Ray connection
(``pipeline.scale.cluster.ray_connection``) and has synced the dataset.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.data.event_dataset import bucket_histories
from pipeline.scale.cluster import import_ray


def histories_on_ray(root: Path, buckets: int, event_types: list[str] | None,
                     items: pl.DataFrame, users: pl.DataFrame) -> pl.DataFrame:
    """Every user's history (``features.histories.user_histories``'s frame), one Ray task per bucket."""
    ray = import_ray()
    task = ray.remote(num_cpus=1, max_retries=2)(bucket_histories)
    items_ref, users_ref = ray.put(items), ray.put(users)
    parts = ray.get([task.remote(root, b, items_ref, users_ref, event_types) for b in range(buckets)])
    return pl.concat(parts).sort("user_idx")
