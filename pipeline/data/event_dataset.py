"""The events as a hive-partitioned Parquet dataset beside the warehouse, for parallel readers.

``HOME/events/bucket=<b>/source-<s>-0.parquet`` holds the events of ingested file ``s`` whose
users fall in bucket ``b`` (``user_key mod B``, ``B = event_buckets``), with the columns of
the warehouse's ``events`` table. The warehouse stays the truth; the dataset is its copy by
user bucket, written by ``sync`` after ingest under ``engine = "ray"``, so that Ray workers
read one bucket each (``bucket_histories``: the feature build split by user partition).

Exactly once per partition: a source's files are written into a staging folder, moved into
their buckets, and only then is ``_done/source-<s>`` written. A source without that mark
(never exported, or interrupted half-way) is exported again, its files overwritten, so
every bucket holds every source's events once, also after a crash; readers read only the
sources whose mark is there. ``_layout.json`` records ``B``; a different ``B`` rewrites the
dataset. The warehouse queries the dataset with ``read_parquet(..., hive_partitioning =
true)`` (``dataset_sql``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

from features.histories import user_histories
from pipeline.errors import UserError

EVENT_COLUMNS = "user_key, item_key, ts, event_type, weight, event_id, source_id, line"
DONE_DIR = "_done"
LAYOUT_FILE = "_layout.json"


@dataclass
class SyncReport:
    root: str
    buckets: int
    exported: list[int]   # source ids written by this call
    sources: int          # sources in the dataset after it


def bucket_sql(column: str, buckets: int) -> str:
    """The bucket (0..buckets-1) of a BIGINT user key, for negative keys too."""
    return f"((({column} % {buckets}) + {buckets}) % {buckets})"


def done_sources(root: Path) -> list[int]:
    """Source ids whose files are complete in the dataset at ``root``, ascending."""
    marks = root / DONE_DIR
    return sorted(int(p.name.removeprefix("source-")) for p in marks.glob("source-*")) if marks.is_dir() else []


def sync(con: duckdb.DuckDBPyConnection, root: Path, buckets: int) -> SyncReport:
    """Export every events source of the warehouse that the dataset at ``root`` lacks."""
    layout = root / LAYOUT_FILE
    if layout.exists() and json.loads(layout.read_text()).get("buckets") != buckets:
        shutil.rmtree(root)  # another bucket count: every file would move
    root.mkdir(parents=True, exist_ok=True)
    layout.write_text(json.dumps({"buckets": buckets, "columns": EVENT_COLUMNS}))
    done = set(done_sources(root))
    wanted = [sid for (sid,) in con.execute("SELECT source_id FROM sources WHERE kind = 'events' ORDER BY source_id").fetchall()]
    exported = [sid for sid in wanted if sid not in done]
    for sid in exported:
        _export_source(con, root, buckets, sid)
    return SyncReport(str(root), buckets, exported, len(done) + len(exported))


def _export_source(con: duckdb.DuckDBPyConnection, root: Path, buckets: int, source_id: int) -> None:
    """Write source ``source_id``'s events into their buckets, then mark the source done."""
    staging = root / f".staging-{source_id}"
    shutil.rmtree(staging, ignore_errors=True)
    con.execute(
        f"COPY (SELECT {EVENT_COLUMNS}, {bucket_sql('user_key', buckets)} AS bucket FROM events "
        f"WHERE source_id = {int(source_id)} ORDER BY user_key, ts, line) TO '{staging}' "
        f"(FORMAT parquet, PARTITION_BY (bucket), FILENAME_PATTERN 'source-{int(source_id)}-{{i}}', OVERWRITE_OR_IGNORE)"
    )
    for part in sorted(staging.glob("bucket=*/*.parquet")) if staging.exists() else []:
        (root / part.parent.name).mkdir(exist_ok=True)
        os.replace(part, root / part.parent.name / part.name)  # atomic per file; overwrites a half-done earlier try
    shutil.rmtree(staging, ignore_errors=True)
    (root / DONE_DIR).mkdir(exist_ok=True)
    (root / DONE_DIR / f"source-{source_id}").touch()


def dataset_sql(root: Path) -> str:
    """A DuckDB relation over the complete sources of the dataset, ``bucket`` as a column."""
    sources = done_sources(root)
    if not sources:
        return f"(SELECT {EVENT_COLUMNS}, 0 AS bucket FROM events WHERE false)"
    return (f"(SELECT * FROM read_parquet('{root}/bucket=*/source-*.parquet', hive_partitioning = true) "
            f"WHERE source_id IN ({', '.join(map(str, sources))}))")


def bucket_histories(root: Path, bucket: int, items: pl.DataFrame, users: pl.DataFrame,
                     event_types: list[str] | None) -> pl.DataFrame:
    """``features.histories.user_histories`` of one bucket's users, read from its files only
    (complete sources, ``event_types`` when given): rows in ``user_idx`` order."""
    done = set(done_sources(root))
    files = [p for p in sorted((root / f"bucket={bucket}").glob("source-*.parquet"))
             if int(p.name.split("-")[1]) in done]
    columns = ["user_key", "item_key", "ts", "source_id", "line"]

    def read(paths: list[Path]) -> pl.DataFrame:
        scan = pl.scan_parquet(paths, hive_partitioning=False)
        if event_types:
            scan = scan.filter(pl.col("event_type").is_in(event_types))
        return scan.select(columns).collect()

    unreadable = (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError)
    if files:
        try:
            events = read(files)
        except unreadable as exc:
            what, error = f"{root / f'bucket={bucket}'}: the files of the event dataset cannot be read together", exc
            for path in files:  # which file: the error does not say
                try:
                    read([path])
                except unreadable as exc_of_path:
                    what, error = f"{path}: a file of the event dataset cannot be read", exc_of_path
                    break
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(f"{what} ({first}); remove {root} and run the command again: the dataset is "
                            "written again from the warehouse") from None
    else:
        events = pl.DataFrame(schema={"user_key": pl.Int64, "item_key": pl.Int64, "ts": pl.Int64,
                                      "source_id": pl.Int32, "line": pl.Int64})
    return user_histories(events, items, users)
