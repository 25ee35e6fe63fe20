"""Many event files read and checked in parallel on Ray, committed in order by the driver.

``stage_on_ray`` is the ``stage`` of ``pipeline.data.ingest.ingest_paths`` under
``engine = "ray"``: one Ray task per file runs ``stage_file`` (read, parse, check, write the
canonical rows as Parquet into the staging folder, which every worker must see: one file
system, as for the event dataset), at most two tasks per cluster CPU ahead of the commit
(``pipeline.scale.cluster.task_stream``), while the driver commits the finished files in
file order, one transaction each. A file that fails stops the run at its turn, the files
before it committed; no task starts after it, and those running finish before the error is
raised. The caller holds the Ray connection (``pipeline.scale.cluster.ray_connection``).
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

from pipeline.data.ingest import IngestOptions, StagedFile, stage_file
from pipeline.data.ingest_formats import SourceSpec
from pipeline.scale.cluster import import_ray, task_stream


def stage_on_ray(specs: list[SourceSpec], opts: IngestOptions, folder: Path,
                 known: frozenset[str]) -> Generator[StagedFile, None, None]:
    """``stage_file`` of every spec as a Ray task (one CPU each), yielded in spec order."""
    ray = import_ray()
    task = ray.remote(num_cpus=1, max_retries=2)(stage_file)
    known_ref = ray.put(known)  # once in the object store, not once per task
    # a file's InputFileError: one line; after a failure, or a consumer that stopped early, the
    # running tasks finish before this returns, so none writes into the staging folder any more
    yield from task_stream(ray, task, [(spec, opts, folder, folder / f"file-{i}.parquet", known_ref)
                                       for i, spec in enumerate(specs)])
