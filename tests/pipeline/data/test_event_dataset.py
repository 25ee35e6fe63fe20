"""The partitioned event dataset: every bucket holds every ingested file's events once, also
after an export that was cut off half-way, and the warehouse reads it back whole."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.config import load_settings
from pipeline.data.event_dataset import DONE_DIR, dataset_sql, done_sources, sync
from pipeline.data.ingest import IngestOptions, ingest_paths
from pipeline.data.warehouse import connect


def two_halves(u_data: Path, folder: Path) -> list[Path]:
    """ML-100K's u.data cut into two event files (the first 60,000 lines and the rest)."""
    lines = u_data.read_text().splitlines(keepends=True)
    folder.mkdir(parents=True)
    first, second = folder / "a.tsv", folder / "b.tsv"
    first.write_text("".join(lines[:60_000]))
    second.write_text("".join(lines[60_000:]))
    return [first, second]


def by_bucket(con, relation: str, buckets: int) -> list[tuple[int, int, int]]:
    """(bucket, source, events) of ``relation``, bucket computed from the user key."""
    return con.execute(
        f"SELECT ((user_key % {buckets}) + {buckets}) % {buckets} AS b, source_id, count(*) FROM {relation} "
        "GROUP BY ALL ORDER BY ALL").fetchall()


def test_each_source_lands_once_per_bucket_and_an_interrupted_export_is_redone(shared_data: Path, tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path / "home")
    files = two_halves(shared_data / "ml-100k" / "u.data", tmp_path / "in")
    con = connect(settings.duckdb_path)
    try:
        ingest_paths(con, files, IngestOptions(), settings.tmp_dir)
        sources = [s for (s,) in con.execute("SELECT source_id FROM sources ORDER BY 1").fetchall()]
        root = settings.events_dir
        report = sync(con, root, 4)
        assert report.exported == sources and report.sources == 2 and done_sources(root) == sources
        truth = by_bucket(con, "events", 4)
        assert by_bucket(con, dataset_sql(root), 4) == truth
        assert sum(n for _, _, n in truth) == 100_000
        for b in range(4):  # one file per source in every bucket, holding that bucket's users only
            assert sorted(p.name for p in (root / f"bucket={b}").glob("*.parquet")) == [f"source-{s}-0.parquet" for s in sources]
            stray = con.execute(f"SELECT count(*) FROM read_parquet('{root}/bucket={b}/*.parquet') "
                                f"WHERE ((user_key % 4) + 4) % 4 <> {b}").fetchone()[0]
            assert stray == 0

        # nothing new: nothing rewritten
        stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")}
        assert sync(con, root, 4).exported == []
        assert {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")} == stamps

        # an export of the second file cut off half-way: its mark never written, one bucket
        # file missing, its staging folder left behind
        late = sources[1]
        (root / DONE_DIR / f"source-{late}").unlink()
        (root / "bucket=1" / f"source-{late}-0.parquet").unlink()
        (root / f".staging-{late}" / "bucket=2").mkdir(parents=True)
        assert by_bucket(con, dataset_sql(root), 4) == [row for row in truth if row[1] != late]  # readers skip it
        assert sync(con, root, 4).exported == [late]
        assert by_bucket(con, dataset_sql(root), 4) == truth  # exactly once again, not twice
        assert not list(root.glob(".staging-*"))

        # the same file delivered again adds no events and nothing to the dataset
        ingest_paths(con, files[:1], IngestOptions(), settings.tmp_dir)
        assert sync(con, root, 4).exported == [] and by_bucket(con, dataset_sql(root), 4) == truth

        # another bucket count lays the dataset out again
        assert sync(con, root, 3).exported == sources
        assert sorted(p.name for p in root.glob("bucket=*")) == ["bucket=0", "bucket=1", "bucket=2"]
        assert by_bucket(con, dataset_sql(root), 3) == by_bucket(con, "events", 3)
    finally:
        con.close()


def test_a_bucket_that_cannot_be_read_names_its_file_or_says_its_files_disagree(shared_data: Path, tmp_path: Path) -> None:
    import polars as pl
    import pytest

    from pipeline.data.event_dataset import bucket_histories
    from pipeline.errors import UserError

    settings = load_settings(home=tmp_path / "home")
    con = connect(settings.duckdb_path)
    try:
        ingest_paths(con, two_halves(shared_data / "ml-100k" / "u.data", tmp_path / "in"), IngestOptions(), settings.tmp_dir)
        root = settings.events_dir
        sync(con, root, 4)
    finally:
        con.close()
    items = pl.DataFrame({"item_idx": [1], "item_key": [1]}, schema={"item_idx": pl.Int32, "item_key": pl.Int64})
    users = pl.DataFrame({"user_idx": [0], "user_key": [1]}, schema={"user_idx": pl.Int32, "user_key": pl.Int64})
    first, second = sorted((root / "bucket=1").glob("source-*.parquet"))
    # two readable files whose column types disagree: no one file is to blame
    pl.read_parquet(second).with_columns(pl.col("line").cast(pl.Int32)).write_parquet(second)
    with pytest.raises(UserError, match=r"bucket=1: the files of the event dataset cannot be read together \(.*\); "
                                        rf"remove {re.escape(str(root))}"):
        bucket_histories(root, 1, items, users, None)
    first.write_bytes(first.read_bytes()[:500])  # a damaged file: named
    with pytest.raises(UserError, match=rf"{re.escape(str(first))}: a file of the event dataset cannot be read \(.*PAR1"):
        bucket_histories(root, 1, items, users, None)
