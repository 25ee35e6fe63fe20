"""``recommend-all`` on Ray: one Ray task per user partition.

``run_on_ray`` is the default partition runner of ``pipeline.app.steps.recommend_everyone``
under ``engine = "ray"`` (the CLI's path; the flows run the same partitions as Prefect
tasks on Ray's task runner). Each task runs ``steps.recommend_partition``: it loads the
bundle once and scores its users through the one query path. The caller holds the Ray
connection (``pipeline.scale.cluster.ray_connection``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.app import steps
from pipeline.config import Settings
from pipeline.data.histories import UserRange
from pipeline.scale.cluster import import_ray


def run_on_ray(settings: Settings, bundle: str, k: int, ranges: list[UserRange], files: list[Path]) -> list[dict[str, Any]]:
    """Score each of ``ranges`` in its own Ray task (one CPU each) into the matching Parquet
    file of ``files``; the tasks' reports, in the order of ``ranges``."""
    ray = import_ray()
    task = ray.remote(num_cpus=1, max_retries=2)(steps.recommend_partition)
    return ray.get([task.remote(settings, bundle, k, users, out) for users, out in zip(ranges, files, strict=True)])
