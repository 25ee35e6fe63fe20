"""Exactly-once event ingest through the real CLI: counts, dedup, quarantine, strict mode, crashes."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.config import load_settings
from pipeline.data.feature_store import current_feature_set, load_feature_set
from tests.support import Attnrec, assert_one_line_error

ML_SMALL_EVENTS = 100_836
ML_SMALL_USERS = 610


def ratings_lines(ml_small: Path) -> tuple[str, list[str]]:
    lines = (ml_small / "ratings.csv").read_text().splitlines()
    return lines[0], lines[1:]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# --- ml-1m: the benchmark file --------------------------------------------------------------


@pytest.fixture(scope="module")
def ml1m(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Attnrec, Path]:
    """ml-1m.txt ingested and its feature set built, in one installation shared by this module."""
    root = tmp_path_factory.mktemp("ml1m")
    app = Attnrec(root / "home", root)
    report = app.ingest(shared_data / "ml-1m" / "ml-1m.txt")
    assert report[0]["loaded"] == 999_611
    features = app.features()
    assert features["built"] is True
    return app, Path(features["path"])


def test_ml1m_counts(ml1m: tuple[Attnrec, Path], shared_data: Path) -> None:
    app, _ = ml1m
    stats = app.stats()
    assert stats["events"] == 999_611
    assert stats["users"] == 6_040
    assert stats["items"] == 3_416
    assert stats["quarantined"] == 0
    assert stats["time"] == {"kind": "order", "min": None, "max": None}
    [source] = stats["sources"]
    assert source["format"] == "sasrec"
    assert source["rows_read"] == source["loaded"] == 999_611
    assert source["path"] == str(shared_data / "ml-1m" / "ml-1m.txt")


def test_ml1m_leave_one_out_targets_are_each_users_last_line(
        ml1m: tuple[Attnrec, Path], shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app, path = ml1m
    monkeypatch.setenv("ATTNREC_HOME", str(app.home))
    fs = load_feature_set(current_feature_set(load_settings()))
    assert fs.path == path

    # The file, per user: items in line order (the file is in each user's chronological order).
    lines = pl.read_csv(shared_data / "ml-1m" / "ml-1m.txt", has_header=False, separator=" ",
                        new_columns=["user", "item"], schema_overrides={"user": pl.String, "item": pl.String})
    per_user = lines.group_by("user", maintain_order=True).agg(pl.col("item"))
    expected = dict(zip(per_user["user"].to_list(), per_user["item"].to_list(), strict=True))

    assert fs.num_users == 6_040
    assert int((fs.test_pos >= 0).sum()) == 6_040
    assert int((fs.valid_pos >= 0).sum()) == 6_040
    assert fs.manifest["counts"]["test_targets"] == 6_040
    item_id = dict(zip(fs.items["item_idx"].to_list(), fs.items["item_id"].to_list(), strict=True))
    assert sorted(fs.user_ids, key=int) == sorted(expected, key=int)
    for u, user in enumerate(fs.user_ids):
        seq = fs.sequences.row(u)
        file_items = expected[user]
        assert fs.test_pos[u] == len(seq) - 1 == len(file_items) - 1
        assert item_id[int(seq[fs.test_pos[u]])] == file_items[-1], f"user {user}"
        assert item_id[int(seq[fs.valid_pos[u]])] == file_items[-2], f"user {user}"
        assert fs.train_end[u] == len(file_items) - 2
    # the whole history, not just the targets, follows the file's line order (spot check 200 users)
    for u in range(0, 6_040, 30):
        assert [item_id[int(i)] for i in fs.sequences.row(u)] == expected[fs.user_ids[u]]


# --- ml-latest-small: exactly once ----------------------------------------------------------


def test_ratings_csv_counts_and_second_ingest_is_a_no_op(cli: Attnrec, ml_small: Path) -> None:
    [first] = cli.ingest(ml_small / "ratings.csv")
    assert first["format"] == "movielens-csv"
    assert (first["rows"], first["loaded"], first["duplicates"], first["quarantined"]) == (ML_SMALL_EVENTS, ML_SMALL_EVENTS, 0, 0)
    stats = cli.stats()
    assert (stats["events"], stats["users"]) == (ML_SMALL_EVENTS, ML_SMALL_USERS)
    assert stats["items"] == 9_724
    assert stats["time"]["kind"] == "time"
    assert stats["time"]["min"] == "1996-03-29T18:36:55+00:00"
    assert stats["time"]["max"] == "2018-09-24T14:27:30+00:00"

    [second] = cli.ingest(ml_small / "ratings.csv")
    assert second["loaded"] == 0
    assert second["duplicates"] == ML_SMALL_EVENTS
    assert second["identical_to"] == first["source_id"]
    after = cli.stats()
    assert after["events"] == ML_SMALL_EVENTS
    assert len(after["sources"]) == 1  # the no-op records nothing


def test_overlapping_files_are_deduplicated_row_by_row(cli: Attnrec, ml_small: Path, tmp_path: Path) -> None:
    header, rows = ratings_lines(ml_small)
    n = len(rows)
    cut = int(n * 0.6)
    first = write_lines(tmp_path / "first.csv", [header, *rows[:cut]])
    last = write_lines(tmp_path / "last.csv", [header, *rows[n - cut:]])
    overlap = cut - (n - cut)
    assert overlap > 20_000

    [a] = cli.ingest(first)
    [b] = cli.ingest(last)
    assert (a["loaded"], a["duplicates"]) == (cut, 0)
    assert b["identical_to"] is None  # a different file: the row-level path, not the shortcut
    assert b["rows"] == cut
    assert b["duplicates"] == overlap
    assert b["loaded"] == cut - overlap
    stats = cli.stats()
    assert (stats["events"], stats["users"]) == (ML_SMALL_EVENTS, ML_SMALL_USERS)
    # the overlapping rows stay attributed to the file that brought them first
    per_source = dict(cli.query("SELECT source_id, count(*) FROM events GROUP BY ALL"))
    assert per_source == {a["source_id"]: cut, b["source_id"]: cut - overlap}


def test_repeated_rows_inside_one_file_are_duplicates(cli: Attnrec, ml_small: Path, tmp_path: Path) -> None:
    header, rows = ratings_lines(ml_small)
    base = rows[:1000]
    repeated = [row for i, row in enumerate(base) for _ in range(2 if i % 5 == 0 else 1)]  # 200 rows twice
    # same identity (user, item, time), different rating: still the same event, first one wins
    user, item, _, ts = base[0].split(",")
    repeated.append(f"{user},{item},0.5,{ts}")
    path = write_lines(tmp_path / "repeats.csv", [header, *repeated])

    [report] = cli.ingest(path)
    assert report["rows"] == 1201
    assert report["loaded"] == 1000
    assert report["duplicates"] == 201
    assert cli.stats()["events"] == 1000
    [(weight, line)] = cli.query("SELECT weight, line FROM events WHERE user_key = ? AND item_key = ?", [int(user), int(item)])
    assert weight == float(base[0].split(",")[2])
    assert line == 2  # the first occurrence (header is line 1)


def test_parquet_and_ndjson_copies_have_the_same_identity(cli: Attnrec, ml_small: Path, tmp_path: Path) -> None:
    cli.ingest(ml_small / "ratings.csv")
    ratings = pl.read_csv(ml_small / "ratings.csv")
    ratings.slice(0, 5000).write_parquet(tmp_path / "copy.parquet")
    new_rows = pl.DataFrame({"userId": [999_999] * 10, "movieId": list(range(1, 11)), "rating": [3.0] * 10,
                             "timestamp": [1_600_000_000 + i for i in range(10)]})
    pl.concat([ratings.slice(3000, 5000), new_rows]).write_ndjson(tmp_path / "copy.ndjson")

    [pq_report] = cli.ingest(tmp_path / "copy.parquet")
    assert pq_report["format"] == "parquet"
    assert (pq_report["loaded"], pq_report["duplicates"]) == (0, 5000)
    [js_report] = cli.ingest(tmp_path / "copy.ndjson")
    assert js_report["format"] == "ndjson"
    assert (js_report["loaded"], js_report["duplicates"]) == (10, 5000)
    stats = cli.stats()
    assert stats["events"] == ML_SMALL_EVENTS + 10
    assert stats["users"] == ML_SMALL_USERS + 1


def test_event_id_column_is_the_identity(cli: Attnrec, tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.csv", ["id,user,item,time", "e1,1,2,100", "e2,1,3,100", "e1,5,5,500"])
    b = write_lines(tmp_path / "b.csv", ["id,user,item,time", "e2,9,9,900", "e3,1,2,100"])
    [ra, rb] = cli.ingest(a, b, "--event-id-col", "id")
    assert (ra["loaded"], ra["duplicates"]) == (2, 1)  # e1 twice in the file
    assert (rb["loaded"], rb["duplicates"]) == (1, 1)  # e2 already in; e3 is new despite same user/item/time as e1
    assert sorted(r[0] for r in cli.query("SELECT event_id FROM events")) == ["e1", "e2", "e3"]
    assert cli.query("SELECT user_key, item_key, ts FROM events WHERE event_id = 'e1'") == [(1, 2, 100_000_000)]


# --- bad rows: quarantine and --strict -----------------------------------------------------

CORRUPTIONS = {
    # file line (1-based, header = line 1) -> replacement text, expected column, reason fragment
    11: (",31,2.5,1260759144", "userId", "missing user id"),
    101: ("1,,3.0,964982703", "movieId", "missing item id"),
    1001: ("7,1,4.0,notatime", "timestamp", "unparseable time 'notatime'"),
    5001: ("32,4,abc,964982703", "rating", "unparseable weight 'abc'"),
    50001: ("99,100", None, "expected 4 fields, found 2"),
}


@pytest.fixture
def corrupted(ml_small: Path, tmp_path: Path) -> Path:
    lines = (ml_small / "ratings.csv").read_text().splitlines()
    for line, (text, _, _) in CORRUPTIONS.items():
        lines[line - 1] = text
    return write_lines(tmp_path / "corrupted.csv", lines)


def test_strict_rejects_the_whole_file_then_lenient_quarantines_bad_rows(cli: Attnrec, corrupted: Path, tmp_path: Path) -> None:
    seed = write_lines(tmp_path / "seed.csv", ["user,item,time", "1,1,100", "2,2,200"])
    cli.ingest(seed)
    before = cli.stats()

    proc = cli.run("ingest", corrupted, "--strict", ok=False)
    line = assert_one_line_error(proc, str(corrupted.name), "--strict", "5 bad rows", "line 11")
    assert "nothing written" in line
    after = cli.stats()
    assert after == before  # no events, no quarantine rows, no source row

    [report] = cli.ingest(corrupted)
    assert report["loaded"] == ML_SMALL_EVENTS - 5
    assert report["quarantined"] == 5
    stats = cli.stats()
    assert stats["events"] == before["events"] + ML_SMALL_EVENTS - 5
    assert stats["quarantined"] == 5

    rows = cli.query("SELECT source_id, path, line, column_name, reason, raw FROM quarantine ORDER BY line")
    assert [r[2] for r in rows] == sorted(CORRUPTIONS)
    for source_id, path, line_no, column, reason, raw in rows:
        text, want_column, want_reason = CORRUPTIONS[line_no]
        assert source_id == report["source_id"]
        assert Path(path).name == corrupted.name
        assert column == want_column
        assert want_reason in reason
        assert raw == text

    # the same file again under --strict is not waved through as "already ingested"
    proc = cli.run("ingest", corrupted, "--strict", ok=False)
    assert "5 quarantined rows" in assert_one_line_error(proc, str(corrupted.name), "--strict", "identical to source")
    assert cli.stats() == stats


def test_quarantined_file_lines_are_exact_with_blank_and_quoted_lines(cli: Attnrec, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "quoted.csv", [
        'user,item,time,rating',       # 1
        '1,"10",100,4',                # 2
        '',                            # 3 blank: skipped, still counted as a line
        '2,"item, with comma",200,5',  # 4
        '3,,300,1',                    # 5 bad
        '4,12,,2',                     # 6 bad: missing time
    ])
    [report] = cli.ingest(path)
    assert (report["loaded"], report["quarantined"]) == (2, 2)
    assert cli.query("SELECT line, reason FROM quarantine ORDER BY line") == [(5, "missing item id"), (6, "missing time")]
    assert sorted(r[0] for r in cli.query("SELECT line FROM events")) == [2, 4]
    assert cli.query("SELECT item_id FROM item_ids_v ORDER BY item_id") == [("10",), ("item, with comma",)]


# --- a killed ingest changes nothing -------------------------------------------------------


def _big_csv(path: Path, rows: int) -> Path:
    rng = np.random.default_rng(rows)
    pl.DataFrame({
        "user_id": rng.integers(1, 50_000, rows),
        "item_id": rng.integers(1, 20_000, rows),
        "timestamp": 1_600_000_000 + np.arange(rows),
    }).write_csv(path)
    return path


def _kill_midway(app: Attnrec, path: Path, moment: str) -> str:
    """Start ``attnrec ingest path`` and SIGKILL it at ``moment``; returns what was observed.

    ``reading``: 0.5 s after the ingest opened the warehouse (its WAL appears), while the
    file is streamed; ``writing``: as soon as the warehouse file grows (events being written).
    Returns "killed" or "finished" (the ingest ended before the kill could land).
    """
    db = app.db
    wal = db.with_name(db.name + ".wal")
    size0 = db.stat().st_size
    assert not wal.exists()
    proc = app.popen("ingest", path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        opened_at = None
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            now = time.monotonic()
            if opened_at is None and wal.exists():
                opened_at = now
            if moment == "reading" and opened_at is not None and now - opened_at >= 0.5:
                break
            if moment == "writing" and db.stat().st_size > size0:
                break
            time.sleep(0.005)
        if proc.poll() is not None:
            return "finished"
        assert opened_at is not None, "the ingest never opened the warehouse"
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert b"loaded" not in out  # it never got to report a commit
        return "killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["reading", "writing"])
def test_killed_ingest_leaves_the_warehouse_unchanged(cli: Attnrec, ml_small: Path, tmp_path: Path, moment: str) -> None:
    seed = write_lines(tmp_path / "seed.csv", ["user,item,time", "1,1,100", "2,2,200", "alice,x,300"])
    cli.ingest(seed)
    before = cli.stats()
    assert before["events"] == 3

    rows = 2_000_000
    for _attempt in range(3):
        big = _big_csv(tmp_path / f"big-{rows}.csv", rows)
        outcome = _kill_midway(cli, big, moment)
        after = cli.stats()
        if outcome == "killed" and after["events"] == before["events"] + rows:
            outcome = "finished"  # killed after its commit, before it exited: too late to prove anything
        if outcome == "killed":
            break
        # too fast for this machine: start again, from the untouched state, with a bigger file
        assert after["events"] == before["events"] + rows, "a finished ingest must have loaded the whole file"
        cli = Attnrec(tmp_path / f"home-{rows}", cli.cwd)
        cli.ingest(seed)
        before = cli.stats()
        rows *= 2
    else:
        pytest.fail(f"could not kill the ingest mid-way ({moment}) even with {rows // 2:,} rows")

    assert after["events"] == before["events"]
    assert after["users"] == before["users"]
    assert after["quarantined"] == before["quarantined"]
    assert after["sources"] == before["sources"]
    assert cli.query("SELECT count(*) FROM user_dict") == [(1,)]  # only 'alice'

    if moment == "writing":
        # the interrupted file is not remembered as ingested: running it again loads all of it
        [report] = cli.ingest(big)
        assert report["identical_to"] is None
        assert report["loaded"] == rows
        assert cli.stats()["events"] == before["events"] + rows
