"""The data commands of the CLI: output, and the error contract (one ``error:`` line, exit 1, nothing written)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from tests.support import Attnrec, assert_one_line_error


def snapshot(cli: Attnrec) -> dict[str, Any]:
    """Everything an ingest could have written."""
    return {
        "stats": cli.stats(),
        "events": cli.query("SELECT count(*), coalesce(sum(hash(user_key, item_key, ts)), 0) FROM events"),
        "dicts": cli.query("SELECT (SELECT count(*) FROM user_dict), (SELECT count(*) FROM item_dict)"),
        "quarantine": cli.query("SELECT count(*) FROM quarantine"),
    }


@pytest.fixture
def seeded(cli: Attnrec, tmp_path: Path) -> Attnrec:
    """An installation with a few events already in it (user 'alice' included)."""
    seed = tmp_path / "seed.csv"
    seed.write_text("user,item,time\n1,10,100\nalice,11,200\n2,10,300\n")
    cli.ingest(seed)
    return cli


def test_missing_columns_are_named(seeded: Attnrec, tmp_path: Path, ml_small: Path) -> None:
    before = snapshot(seeded)
    abc = tmp_path / "abc.csv"
    abc.write_text("a,b,c\n1,2,3\n4,5,6\n")
    assert_one_line_error(seeded.run("ingest", abc, ok=False), "abc.csv", "no user column", "--user-col")
    line = assert_one_line_error(seeded.run("ingest", ml_small / "ratings.csv", "--user-col", "nope", ok=False),
                                 "ratings.csv", "'nope'", "--user-col")
    assert "userId" in line  # the columns that do exist
    items_only = tmp_path / "users.csv"
    items_only.write_text("user_id,age\n1,30\n")
    assert_one_line_error(seeded.run("ingest", items_only, ok=False), "users.csv", "no item column", "--item-col")
    assert snapshot(seeded) == before


def test_missing_unreadable_binary_and_empty_files(seeded: Attnrec, tmp_path: Path) -> None:
    before = snapshot(seeded)
    assert_one_line_error(seeded.run("ingest", tmp_path / "nope.csv", ok=False), "nope.csv", "no such file")
    broken = tmp_path / "broken.csv"
    broken.symlink_to(tmp_path / "gone" / "x.csv")
    assert_one_line_error(seeded.run("ingest", broken, ok=False), "broken.csv", "no such file")
    # a file the OS refuses to read, even for root
    assert_one_line_error(seeded.run("ingest", "/proc/self/mem", ok=False), "/proc/self/mem", "cannot read")

    binary = tmp_path / "blob.csv"
    binary.write_bytes(os.urandom(4096) + b"\x00" * 64)  # NUL bytes past the first 4 KiB still say binary
    assert_one_line_error(seeded.run("ingest", binary, ok=False), "blob.csv", "binary")
    # bytes without NULs that Polars cannot parse mid-file: its error, in one line (it once came
    # wrapped in DuckDB's, with a Python traceback inside)
    noise = tmp_path / "noise.csv"
    rng = random.Random(2)
    noise.write_bytes(bytes(rng.randrange(1, 256) for _ in range(4096)))
    assert_one_line_error(seeded.run("ingest", noise, ok=False), "noise.csv", "cannot parse as csv: CSV malformed")
    fake_parquet = tmp_path / "fake.parquet"
    fake_parquet.write_text("user,item\n1,2\n")
    assert_one_line_error(seeded.run("ingest", fake_parquet, ok=False), "fake.parquet", "Parquet")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert_one_line_error(seeded.run("ingest", empty, ok=False), "empty.csv", "empty")
    folder = tmp_path / "nothing-here"
    folder.mkdir()
    (folder / "readme.md").write_text("no data\n")
    assert_one_line_error(seeded.run("ingest", folder, ok=False), "nothing-here", "no data files")
    malformed = tmp_path / "quotes.csv"
    malformed.write_text('user,item,time\n"1,2\n')
    assert_one_line_error(seeded.run("ingest", malformed, ok=False), "quotes.csv")
    assert snapshot(seeded) == before


def test_one_bad_file_stops_the_run_before_anything_is_written(seeded: Attnrec, tmp_path: Path) -> None:
    before = snapshot(seeded)
    good = tmp_path / "good.csv"
    good.write_text("user,item,time\n5,50,500\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert_one_line_error(seeded.run("ingest", good, bad, ok=False), "bad.csv")
    assert snapshot(seeded) == before
    seeded.ingest(good)
    assert seeded.stats()["events"] == before["stats"]["events"] + 1


def test_bad_options(seeded: Attnrec, tmp_path: Path) -> None:
    before = snapshot(seeded)
    f = tmp_path / "f.csv"
    f.write_text("user,item,time\n9,9,9\n")
    assert_one_line_error(seeded.run("ingest", f, "--format", "xml", ok=False), "unknown format 'xml'")
    assert_one_line_error(seeded.run("ingest", f, "--time-unit", "days", ok=False), "--time-unit")
    assert_one_line_error(seeded.run("ingest-items", f, "--format", "xml", ok=False), "unknown item format")
    assert snapshot(seeded) == before


def test_commands_without_a_warehouse(cli: Attnrec) -> None:
    for command in (["stats"], ["stats", "--json"], ["features"]):
        assert_one_line_error(cli.run(*command, ok=False), "no warehouse", "attnrec ingest")
    assert not cli.home.exists()  # asking does not create an installation


def test_human_output(cli: Attnrec, ml_small: Path) -> None:
    proc = cli.run("ingest", ml_small / "ratings.csv")
    assert "ratings.csv: 100,836 loaded, 0 duplicate, 0 quarantined" in proc.stdout
    assert "read as movielens-csv" in proc.stderr and "user=userId, item=movieId" in proc.stderr
    again = cli.run("ingest", ml_small / "ratings.csv")
    assert "0 loaded, 100,836 duplicate" in again.stdout and "already ingested" in again.stdout

    stats = cli.run("stats").stdout
    assert "events      100,836" in stats
    assert "users       610" in stats
    assert "items       9,724 with events, 0 in the catalog" in stats
    assert "time        time: 1996-03-29T18:36:55+00:00 .. 2018-09-24T14:27:30+00:00" in stats

    built = cli.run("features").stdout
    assert "(built)" in built
    assert "610 users, 9,724 items, 100,836 events; split loo" in built
    assert "610 validation / 610 test targets" in built
    assert "(unchanged warehouse: reused)" in cli.run("features").stdout


def test_quarantine_examples_are_printed(cli: Attnrec, tmp_path: Path) -> None:
    rows = ["user,item,time"] + [f"{u},{u},{u}" for u in range(1, 20)] + [",1,1"] * 7
    f = tmp_path / "bad.csv"
    f.write_text("\n".join(rows) + "\n")
    out = cli.run("ingest", f).stdout
    assert "19 loaded, 0 duplicate, 7 quarantined" in out
    assert "quarantined line 21, column 'user': missing user id" in out
    assert "... 2 more in the quarantine table" in out


def test_the_demo_reads_the_bundled_dataset() -> None:
    from pipeline.cli import DEMO_DATA

    assert {"ratings.csv", "movies.csv", "tags.csv"} <= {p.name for p in DEMO_DATA.iterdir()}


def test_version(cli: Attnrec) -> None:
    from importlib.metadata import version

    assert cli.run("--version").stdout.strip() == f"attnrec {version('attnrec')}"  # the installed distribution's
