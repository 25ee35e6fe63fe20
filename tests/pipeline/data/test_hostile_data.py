"""Hostile input files: bad data never costs a file or doubles a row (items 1-6 of the hardening issue).

Each test reproduces a reported failure with a small real file and the real ingest.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from pipeline.data.ingest import IngestOptions, ingest_paths
from pipeline.data.warehouse import open_warehouse
from tests.support import Attnrec, assert_one_line_error


def ingest(tmp_path: Path, *paths: Path, **options: object) -> list:
    with open_warehouse(tmp_path / "w.duckdb") as con:
        return ingest_paths(con, list(paths), IngestOptions(**options), tmp_path)


def query(tmp_path: Path, sql: str) -> list[tuple]:
    with open_warehouse(tmp_path / "w.duckdb", read_only=True) as con:
        return con.execute(sql).fetchall()


def test_1_column_order_does_not_change_an_events_identity(ml_small: Path, tmp_path: Path) -> None:
    ratings = pl.read_csv(ml_small / "ratings.csv", infer_schema=False)
    reordered = tmp_path / "reordered.csv"
    ratings.select("timestamp", "movieId", "userId", "rating").write_csv(reordered)
    renamed = tmp_path / "renamed.csv"  # another spelling of the same header
    ratings.head(1000).rename({"userId": "user_id", "movieId": "Movie_ID"}).write_csv(renamed)
    first, again, spelled = ingest(tmp_path, ml_small / "ratings.csv", reordered, renamed)
    assert first.loaded == 100_836
    assert (again.loaded, again.duplicates) == (0, 100_836)
    assert (spelled.loaded, spelled.duplicates) == (0, 1000)
    assert query(tmp_path, "SELECT count(*) FROM events") == [(100_836,)]


def test_2_bytes_that_are_not_utf8_are_quarantined_not_altered(tmp_path: Path) -> None:
    path = tmp_path / "mixed.csv"
    path.write_bytes("user,item,time\nJosé,1,1600000000\n".encode()
                     + "Josè,1,1600000001\nJosê,1,1600000002\n".encode("latin-1")
                     + "Zoë,2,1600000003\n".encode())
    report = ingest(tmp_path, path)[0]
    assert (report.loaded, report.quarantined) == (2, 2)
    assert {r[2] for r in report.examples} == {"not valid UTF-8 (name the file's encoding with --encoding)"}
    assert sorted(query(tmp_path, "SELECT user_id FROM users_v")) == [("José",), ("Zoë",)]


def test_2_a_named_encoding_is_read_as_such(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("user,item,time\nJosé,1,1600000000\nJosè,1,1600000001\nJosê,1,1600000002\n".encode("latin-1"))
    report = ingest(tmp_path, path, encoding="latin-1")[0]
    assert (report.loaded, report.quarantined) == (3, 0)
    assert {u for (u,) in query(tmp_path, "SELECT user_id FROM users_v")} == {"José", "Josè", "Josê"}


def test_3_one_bad_value_costs_its_row_not_the_file(tmp_path: Path) -> None:
    ndjson = tmp_path / "events.ndjson"
    deep = "[" * 5000 + "]" * 5000
    ndjson.write_text("\n".join([
        json.dumps({"user": "a", "item": "1", "time": 1600000000, "properties": {"page": "home", "tags": [1, 2]}}),
        json.dumps({"user": {"nested": 1}, "item": "2", "time": 1600000001}),  # a mapped field that is not a value
        '{"user": "b", "item": "3", "time": 1600000002, "deep": ' + deep + "}",
        json.dumps({"user": "c", "item": "4", "time": -9223372036854775808}),
        json.dumps({"user": "d", "item": "5", "time": 1600000004}),
    ]) + "\n")
    report = ingest(tmp_path, ndjson)[0]  # the unmapped "properties" object is ignored
    assert (report.loaded, report.quarantined) == (2, 3), report.examples
    assert report.examples == [
        (2, "user", "not a single value (an object or a list)"),
        (3, None, "not a JSON object"),  # nested deeper than any JSON parser here reads
        (4, "time", "time out of range (1970-01-01 to 2200-01-01): '-9223372036854775808'")]
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"user,item,time\nx,1,1600000000\ny\x00,2,1600000001\nz,3,1600000002\n")
    report = ingest(tmp_path, nul)[0]
    assert (report.loaded, report.quarantined) == (2, 1)
    assert report.examples[0][0] == 3 and "NUL" in report.examples[0][2]


def test_3_deep_nesting_is_a_quarantined_line_not_a_traceback(cli: Attnrec, tmp_path: Path) -> None:
    path = tmp_path / "deep.ndjson"
    path.write_text('{"user": "a", "item": "1", "time": 1600000000}\n' + "[" * 5000 + "]" * 5000 + "\n")
    out = cli.ingest(path)[0]
    assert (out["loaded"], out["quarantined"]) == (1, 1)


def test_4_outliers_do_not_flip_the_time_unit_and_out_of_range_times_are_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "times.csv"
    path.write_text("user,item,time\na,1,1500000000\nb,1,1e23\nc,1,-1\nd,1,1500000100\n")
    report = ingest(tmp_path, path)[0]
    assert (report.loaded, report.quarantined) == (2, 2)
    assert {r[2] for r in report.examples} == {"time out of range (1970-01-01 to 2200-01-01): '1e23'",
                                                "time out of range (1970-01-01 to 2200-01-01): '-1'"}
    assert sorted(query(tmp_path, "SELECT ts FROM events")) == [(1_500_000_000_000_000,), (1_500_000_100_000_000,)]


def test_5_a_huge_line_and_duplicate_headers_are_clear_errors(cli: Attnrec, tmp_path: Path) -> None:
    huge = tmp_path / "huge.csv"
    huge.write_text("user,item,time," + "x" * 10_000_000)
    assert_one_line_error(cli.run("ingest", huge, ok=False), "huge.csv", "line 1 is longer than")
    for header in ("user,item,time,user", '"user","item","time","user"'):
        dup = tmp_path / "dup.csv"
        dup.write_text(f"{header}\n1,2,1600000000,3\n")
        assert_one_line_error(cli.run("ingest", dup, ok=False), "dup.csv", "column 'user' appears twice")
    assert not cli.db.exists() or cli.query("SELECT count(*) FROM events") == [(0,)]


def test_an_item_catalogue_given_as_events_is_one_error_naming_ingest_items(cli: Attnrec, shared_data: Path) -> None:
    """``attnrec ingest u.item`` said "column '0' appears twice in the header" (its first line
    read as a header) and ``attnrec ingest movies.dat`` quarantined all 3,883 lines as
    unparseable times: both are MovieLens item catalogues, which ``ingest-items`` reads."""
    for path in (shared_data / "ml-100k" / "u.item", shared_data / "ml-1m" / "movies.dat"):
        out = cli.run("ingest", path, ok=False)
        assert_one_line_error(out, path.name, "item catalogue", "attnrec ingest-items")
    assert not cli.db.exists() or cli.query("SELECT count(*) FROM events") == [(0,)]
    forced = cli.run("ingest", shared_data / "ml-1m" / "movies.dat", "--format", "csv", "--delimiter", "::", ok=False)
    assert "item catalogue" not in forced.stdout + forced.stderr  # a format given is read as asked


def test_6_order_only_files_never_collide(tmp_path: Path) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("1 10\n1 11\n2 10\n")
    second.write_text("3 12\n1 11\n2 10\n")  # line 2 and 3 repeat (user, item, line) of the first file
    reports = ingest(tmp_path, first, second)
    assert [(r.loaded, r.duplicates) for r in reports] == [(3, 0), (3, 0)]
    assert query(tmp_path, "SELECT count(*) FROM events") == [(6,)]


def test_a_time_unit_named_by_hand_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "ms.csv"
    path.write_text("user,item,time\na,1,1500000000000\n")
    ingest(tmp_path, path, time_unit="ms")
    assert query(tmp_path, "SELECT ts FROM events") == [(1_500_000_000_000_000,)]

