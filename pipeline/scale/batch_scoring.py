"""``recommend-all`` on Ray: one Ray task per user partition.

``run_on_ray`` is the default partition runner of ``pipeline.app.steps.recommend_everyone``
under ``engine = "ray"`` (the CLI's path; the flows run the same partitions as Prefect
tasks on Ray's task runner). The application layer hands it the partition function
(``steps.recommend_partition``: load the bundle once, score the users through the one
query path, write a Parquet file), so this layer never imports the one above it. The
caller holds the Ray connection (``pipeline.scale.cluster.ray_connection``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.data.histories import UserRange
from pipeline.scale.cluster import import_ray, run_tasks

PartitionScorer = Callable[[Settings, str, int, UserRange, Path], dict[str, Any]]


def run_on_ray(score: PartitionScorer, settings: Settings, bundle: str, k: int, ranges: list[UserRange],
               files: list[Path]) -> list[dict[str, Any]]:
    """``score`` each of ``ranges`` in its own Ray task (one CPU each, retried twice if its
    worker dies) into the matching Parquet file of ``files``; the reports, in range order."""
    ray = import_ray()
    task = ray.remote(num_cpus=1, max_retries=2)(score)
    return run_tasks(ray, task, [(settings, bundle, k, users, out) for users, out in zip(ranges, files, strict=True)])
