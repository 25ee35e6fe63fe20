"""The feature build's histories on Ray: one Ray task per user bucket of the event dataset.

``history_pieces_on_ray`` is the ``pieces_of`` of ``pipeline.data.feature_store.build_feature_set``
under ``engine = "ray"``: each task reads one bucket of the partitioned event dataset
(``pipeline.data.event_dataset``), builds its users' histories and writes them as one piece
(``pipeline.data.history_pieces``) into the build's folder; only the users' indices and
lengths come back to the driver, which assembles the feature set one piece at a time. The
files equal the local build's, byte for byte (tested). The caller holds the Ray connection
(``pipeline.scale.cluster.ray_connection``) and has synced the dataset; the folder must be
on a file system the workers share.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.data.event_dataset import bucket_histories
from pipeline.data.history_pieces import HistoryPiece, write_history_piece
from pipeline.scale.cluster import import_ray, run_tasks


def bucket_piece(root: Path, bucket: int, items: pl.DataFrame, users: pl.DataFrame, event_types: list[str] | None,
                 min_events: int, path: Path) -> HistoryPiece:
    """One bucket's histories (users with ``min_events`` events or more), written to ``path``."""
    return write_history_piece(bucket_histories(root, bucket, items, users, event_types), min_events, path)


def history_pieces_on_ray(root: Path, buckets: int, event_types: list[str] | None, items: pl.DataFrame,
                          users: pl.DataFrame, min_events: int, folder: Path) -> list[HistoryPiece]:
    """Every kept user's history as ``buckets`` pieces in ``folder``, one Ray task per bucket."""
    ray = import_ray()
    task = ray.remote(num_cpus=1, max_retries=2)(bucket_piece)
    items_ref, users_ref = ray.put(items), ray.put(users)
    return run_tasks(ray, task, [(root, b, items_ref, users_ref, event_types, min_events, folder / f"bucket-{b}.arrow")
                                 for b in range(buckets)])
