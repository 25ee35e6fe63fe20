"""Staged ingest (``stage_file`` then ``commit_staged``, the path Ray runs in parallel) writes the
same warehouse as the one-file-at-a-time ingest, for every kind of file, and fails the same way.

The stager here runs ``stage_file`` in this process, one file after the other; the Ray stager
is tested on a real cluster in ``tests/pipeline/scale/test_ingest_on_ray.py``.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import polars as pl
import pytest

from pipeline.data.ingest import IngestOptions, StagedFile, ingest_paths, stage_file
from pipeline.data.ingest_formats import SourceSpec
from pipeline.data.warehouse import open_warehouse
from pipeline.errors import InputFileError

TABLES = {
    "events": "SELECT * FROM events ORDER BY source_id, line, user_key, item_key, ts",
    "user_dict": "SELECT * FROM user_dict ORDER BY user_key",
    "item_dict": "SELECT * FROM item_dict ORDER BY item_key",
    "quarantine": "SELECT * FROM quarantine ORDER BY source_id, line",
    "sources": "SELECT * EXCLUDE (ingested_at) FROM sources ORDER BY source_id",
}


def stage_here(specs: list[SourceSpec], opts: IngestOptions, folder: Path,
               known: frozenset[str]) -> Generator[StagedFile, None, None]:
    """The ``Stager`` contract in one process: each file staged when its turn comes."""
    for i, spec in enumerate(specs):
        yield stage_file(spec, opts, folder, folder / f"file-{i}.parquet", known)


def warehouse_rows(db: Path) -> dict[str, list[tuple]]:
    with open_warehouse(db, read_only=True) as con:
        return {name: con.execute(sql).fetchall() for name, sql in TABLES.items()}


def ingest_both(tmp_path: Path, files: list[Path], **options: object) -> tuple[dict, dict, list, list]:
    """The files through the plain and the staged path, each into its own warehouse:
    (plain tables, staged tables, plain reports, staged reports without their timings)."""
    out = []
    for name, stage in (("plain", None), ("staged", stage_here)):
        (tmp_path / name).mkdir()
        with open_warehouse(tmp_path / name / "w.duckdb") as con:
            reports = ingest_paths(con, files, IngestOptions(**options), tmp_path / name / "tmp", stage=stage)
        out.append(([{**r.as_dict(), "seconds": None} for r in reports], warehouse_rows(tmp_path / name / "w.duckdb")))
        if stage is not None:
            assert list((tmp_path / name / "tmp").iterdir()) == []  # no staged file left behind
    (plain_reports, plain), (staged_reports, staged) = out
    return plain, staged, plain_reports, staged_reports


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_real_files_with_overlaps_and_a_repeat_give_the_same_warehouse(ml_small: Path, tmp_path: Path) -> None:
    ratings = pl.read_csv(ml_small / "ratings.csv", infer_schema=False)
    first = ratings.slice(0, 60_000)
    first.write_csv(a := tmp_path / "a.csv")
    ratings.slice(50_000, 40_000).write_parquet(b := tmp_path / "b.parquet")  # 10,000 rows overlap a.csv
    ratings.slice(80_000).write_ndjson(c := tmp_path / "c.ndjson")  # 10,000 rows overlap b.parquet
    first.write_csv(again := tmp_path / "a-again.csv")  # the same bytes: identical to a.csv
    plain, staged, plain_reports, staged_reports = ingest_both(tmp_path, [a, b, c, again])
    assert staged == plain
    assert staged_reports == plain_reports
    assert [(r["loaded"], r["duplicates"], r["identical_to"]) for r in staged_reports] == [
        (60_000, 0, None), (30_000, 10_000, None), (10_836, 10_000, None), (0, 60_000, 1)]
    assert len(staged["events"]) == 100_836


def test_order_only_sequences_bad_rows_and_other_encodings_give_the_same_warehouse(tmp_path: Path) -> None:
    files = [
        write(tmp_path / "a.txt", "1 10\n1 11\n2 10\n"),      # order only: ts from the line
        write(tmp_path / "b.txt", "3 12\n1 11\n2 10\n"),      # same (user, item, line) as a.txt: new events
        write(tmp_path / "seq.txt", "u1 5 6 7\nu2 7 5\n"),   # one sequence per line
        write(tmp_path / "bad.csv", "user,item,time,rating\nx,1,1600000000,4\n,2,1600000001,3\ny,3,notatime,2\n"
                                    "z,4,1600000003,abc\nw,5,1e23,1\nx,1,1600000000,4\n"),
        write(tmp_path / "mixed.csv", "user,item,time\nJosé,1,1600000000\n".encode()
              + "Josè,1,1600000001\n".encode("latin-1")),
    ]
    plain, staged, plain_reports, staged_reports = ingest_both(tmp_path, files)
    assert staged == plain
    assert staged_reports == plain_reports
    assert len(staged["quarantine"]) == 5
    assert {ts >> 40 for (_, _, ts, *_rest) in staged["events"][:6]} == {1, 2}  # the source id in order-only times

    latin = write(tmp_path / "latin.csv", "user,item,time\nJosé,1,1600000000\nJosè,1,1600000001\n".encode("latin-1"))
    (tmp_path / "latin").mkdir()
    plain, staged, _, _ = ingest_both(tmp_path / "latin", [latin], encoding="latin-1")
    assert staged == plain and {r[1] for r in staged["user_dict"]} == {"José", "Josè"}


def test_a_file_that_fails_stops_the_run_at_its_turn_and_keeps_the_files_before_it(ml_small: Path, tmp_path: Path) -> None:
    good = write(tmp_path / "good.csv", "user,item,time\na,1,1600000000\nb,2,1600000001\n")
    not_ascii = write(tmp_path / "not-ascii.csv", "user,item,time\nJosé,1,1600000000\n")
    later = write(tmp_path / "later.csv", "user,item,time\nc,3,1600000002\n")
    db = tmp_path / "w.duckdb"
    with open_warehouse(db) as con, pytest.raises(InputFileError) as failed:
        ingest_paths(con, [good, not_ascii, later], IngestOptions(encoding="ascii"), tmp_path / "tmp", stage=stage_here)
    assert "not-ascii.csv" in str(failed.value) and "not ascii text at byte" in str(failed.value)
    rows = warehouse_rows(db)
    assert [s[2] for s in rows["sources"]] == [str(good)]  # later.csv is not committed
    assert len(rows["events"]) == 2
    assert list((tmp_path / "tmp").iterdir()) == []

    strict_bad = write(tmp_path / "strict.csv", "user,item,time\nd,4,1600000003\ne,5,notatime\n")
    with open_warehouse(db) as con, pytest.raises(InputFileError, match="--strict: 1 bad rows"):
        ingest_paths(con, [later, strict_bad], IngestOptions(strict=True), tmp_path / "tmp", stage=stage_here)
    rows = warehouse_rows(db)
    assert [s[2] for s in rows["sources"]] == [str(good), str(later)]
    assert len(rows["events"]) == 3 and rows["quarantine"] == []
