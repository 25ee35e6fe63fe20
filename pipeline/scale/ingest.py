"""Many event files read and checked in parallel on Ray, committed in order by the driver.

``stage_on_ray`` is the ``stage`` of ``pipeline.data.ingest.ingest_paths`` under
``engine = "ray"``: one Ray task per file runs ``stage_file`` (read, parse, check, write the
canonical rows as Parquet into the staging folder, which every worker must see: one file
system, as for the event dataset), at most two tasks per cluster CPU ahead of the commit,
while the driver commits the finished files in file order, one transaction each. A file
that fails stops the run at its turn, the files before it committed, the tasks after it
cancelled. The caller holds the Ray connection (``pipeline.scale.cluster.ray_connection``).
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

from pipeline.data.ingest import IngestOptions, StagedFile, stage_file
from pipeline.data.ingest_formats import SourceSpec
from pipeline.scale.cluster import cluster_cpus, import_ray, stop_tasks, task_results

AHEAD_PER_CPU = 2  # staged files allowed to wait for the commit, per cluster CPU (bounds the staging folder)


def stage_on_ray(specs: list[SourceSpec], opts: IngestOptions, folder: Path,
                 known: frozenset[str]) -> Generator[StagedFile, None, None]:
    """``stage_file`` of every spec as a Ray task (one CPU each), yielded in spec order."""
    ray = import_ray()
    task = ray.remote(num_cpus=1, max_retries=2)(stage_file)
    ahead = AHEAD_PER_CPU * cluster_cpus(ray)
    known_ref = ray.put(known)  # once in the object store, not once per task
    refs: list = []

    def submit() -> None:
        i = len(refs)
        refs.append(task.remote(specs[i], opts, folder, folder / f"file-{i}.parquet", known_ref))

    try:
        for i in range(len(specs)):
            while len(refs) < min(len(specs), i + ahead):
                submit()
            yield task_results(ray, [refs[i]])[0]  # a file's InputFileError: one line
    finally:  # after a failure (or a consumer that stopped early), no task writes into the staging folder any more
        stop_tasks(ray, refs)
