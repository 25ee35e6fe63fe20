"""Versioned feature sets (``attnrec features``): reproducible bytes, reuse, splits, loading."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_settings
from pipeline.data.feature_store import FeatureSet, current_feature_set, load_feature_set
from pipeline.errors import UserError
from tests.support import Attnrec, assert_one_line_error, small_disk

FILES = {"manifest.json", "items.parquet", "item_features.arrow", "histories.arrow", "splits.parquet", "categories.parquet"}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def small_warehouse(tmp_path_factory: pytest.TempPathFactory, ml_small: Path) -> Path:
    """A warehouse with ml-latest-small events, movies and tags, ingested once per module."""
    root = tmp_path_factory.mktemp("small")
    app = Attnrec(root / "home", root)
    app.ingest(ml_small / "ratings.csv")
    app.ingest_items(ml_small / "movies.csv", ml_small / "tags.csv")
    return app.db


@pytest.fixture
def small(cli: Attnrec, small_warehouse: Path) -> Attnrec:
    """The ``home`` installation with a copy of that warehouse (and no feature set yet)."""
    cli.home.mkdir(parents=True)
    shutil.copyfile(small_warehouse, cli.db)
    return cli


def loaded(app: Attnrec) -> FeatureSet:
    return load_feature_set(current_feature_set(load_settings(home=app.home)))


def test_same_warehouse_same_bytes(small: Attnrec, tmp_path: Path, ml_small: Path) -> None:
    first = small.features()
    assert first["built"] is True
    folder = Path(first["path"])
    assert {p.name for p in folder.iterdir()} == FILES
    before = digests(folder)

    again = small.features("--force")
    assert again["built"] is True and Path(again["path"]) == folder
    assert digests(folder) == before

    # an independent installation fed the same files builds the same bytes too
    other = Attnrec(tmp_path / "other-home", tmp_path)
    other.ingest(ml_small / "ratings.csv")
    other.ingest_items(ml_small / "movies.csv", ml_small / "tags.csv")
    theirs = other.features()
    assert theirs["version"] == first["version"]
    assert digests(Path(theirs["path"])) == before
    # and nothing half-written is left around
    assert {p.name for p in (small.home / "features").iterdir()} == {"CURRENT", first["version"]}


def test_unchanged_warehouse_reuses_the_feature_set(small: Attnrec, tmp_path: Path, ml_small: Path) -> None:
    first = small.features()
    folder = Path(first["path"])
    mtime = (folder / "histories.arrow").stat().st_mtime_ns
    second = small.features()
    assert second["built"] is False
    assert second["version"] == first["version"]
    assert (folder / "histories.arrow").stat().st_mtime_ns == mtime
    assert (small.home / "features" / "CURRENT").read_text().strip() == first["version"]

    # re-ingesting files already in the warehouse changes nothing: still reused
    small.ingest(ml_small / "ratings.csv")
    assert small.features()["built"] is False
    # new events: a new version, and CURRENT moves to it
    extra = tmp_path / "extra.csv"
    extra.write_text("user,item,time\n1,1,1700000000\n")
    small.ingest(extra)
    third = small.features()
    assert third["built"] is True
    assert third["version"] != first["version"]
    assert third["counts"]["events"] == first["counts"]["events"] + 1
    assert (small.home / "features" / "CURRENT").read_text().strip() == third["version"]
    assert folder.is_dir()  # the old version stays readable

    # other parameters: another version from the same warehouse
    fourth = small.features("--split", "temporal")
    assert fourth["version"] not in {first["version"], third["version"]}


def test_leave_one_out_counts(small: Attnrec) -> None:
    out = small.features()
    c = out["counts"]
    assert c["users"] == 610
    assert c["events"] == 100_836
    assert c["items"] == 9_742
    assert c["test_targets"] == c["valid_targets"] == 610  # every ml-latest-small user has >= 20 ratings
    assert c["train_events"] == 100_836 - 2 * 610
    assert out["split"] == {"kind": "loo"}


def test_temporal_split_on_ml_latest_small(small: Attnrec) -> None:
    out = small.features("--split", "temporal")
    split = out["split"]
    assert split["kind"] == "temporal"
    valid_time, test_time = split["valid_time_us"], split["test_time_us"]
    assert valid_time < test_time
    fs = loaded(small)
    assert fs.manifest["version"] == out["version"]

    tests = valid = 0
    all_times = np.concatenate([fs.times.row(u) for u in range(fs.num_users)])
    for u in range(fs.num_users):
        times = fs.times.row(u)
        end = fs.train_end[u]
        assert (times[:end] < valid_time).all()  # training strictly before the validation time
        assert (times[end:] >= valid_time).all()
        if fs.valid_pos[u] >= 0:
            valid += 1
            assert valid_time <= times[fs.valid_pos[u]] < test_time
        if fs.test_pos[u] >= 0:
            tests += 1
            assert times[fs.test_pos[u]] >= test_time  # the target is after the split time
            assert times[fs.test_pos[u] - 1] < test_time  # and read with the history before it
    assert tests == out["counts"]["test_targets"] > 0
    assert valid == out["counts"]["valid_targets"] > 0
    assert out["counts"]["train_events"] == int((all_times < valid_time).sum())
    # the default test share: about the last 10% of events are at/after the split time
    assert 0.09 <= float((all_times >= test_time).mean()) <= 0.11


def test_temporal_split_at_a_given_time(small: Attnrec) -> None:
    out = small.features("--split", "temporal", "--split-time", "2017-01-01T00:00:00", "--valid-time", "2016-01-01")
    assert out["split"]["test_time"] == "2017-01-01T00:00:00+00:00"
    assert out["split"]["valid_time"] == "2016-01-01T00:00:00+00:00"
    fs = loaded(small)
    cut = int(datetime.fromisoformat("2017-01-01T00:00:00+00:00").timestamp() * 1e6)
    targets = [fs.times.row(u)[fs.test_pos[u]] for u in range(fs.num_users) if fs.test_pos[u] >= 0]
    assert targets and min(targets) >= cut


def test_cold_items_are_held_out_of_training_counts(small: Attnrec) -> None:
    out = small.features("--cold-item-fraction", "0.2")
    fs = loaded(small)
    cold = fs.items.filter("cold")
    assert cold.height == out["counts"]["cold_items"]
    in_events = fs.items.filter("in_events").height
    assert 0.17 * in_events < cold.height < 0.23 * in_events
    assert cold["in_events"].all()
    assert (cold["train_count"] == 0).all()
    assert fs.cold_mask.sum() == cold.height and not fs.cold_mask[0]
    warm = fs.items.filter(~fs.items["cold"] & fs.items["in_events"])
    assert warm["train_count"].sum() == out["counts"]["train_events"] - int(
        sum(np.isin(fs.sequences.row(u)[:fs.train_end[u]], cold["item_idx"].to_numpy()).sum() for u in range(fs.num_users)))


def test_loaded_arrays_are_consistent(small: Attnrec) -> None:
    small.features()
    fs = loaded(small)
    n_items = fs.num_items
    assert fs.num_users == 610 and n_items == 9_742
    assert fs.sequences.lengths().sum() == 100_836
    assert (fs.sequences.lengths() == fs.times.lengths()).all()
    assert fs.sequences.values.min() >= 1 and fs.sequences.values.max() <= n_items  # 0 is padding
    for u in range(0, fs.num_users, 7):
        assert (np.diff(fs.times.row(u)) >= 0).all()
    assert fs.items["item_idx"].to_list() == list(range(1, n_items + 1))
    # item features: one row per item plus the padding row
    assert len(fs.item_categories.offsets) == len(fs.item_tokens.offsets) == n_items + 2
    assert fs.item_categories.row(0).size == 0 and fs.item_tokens.row(0).size == 0
    assert fs.item_numeric.shape == (n_items + 1, 1) and fs.manifest["numeric_fields"] == ["year"]
    assert (fs.item_numeric[0] == 0).all()
    assert abs(float(fs.item_numeric[1:, 0].mean())) < 1e-3
    assert fs.item_tokens.values.min() >= 1 and fs.item_tokens.values.max() < fs.manifest["text_buckets"]
    assert fs.categories["category_id"].to_list() == list(range(1, fs.categories.height + 1))
    assert (np.diff(fs.user_keys) > 0).all()


def test_a_feature_set_pickles_as_its_folder_and_loads_from_there(small_fs: FeatureSet) -> None:
    # a Ray task's argument: the arrays are read from the folder again, not copied
    data = pickle.dumps(small_fs)
    assert len(data) < 2_000  # the folder, not the arrays
    again = pickle.loads(data)
    assert again.path == small_fs.path and again.version == small_fs.version
    np.testing.assert_array_equal(again.sequences.values, small_fs.sequences.values)
    np.testing.assert_array_equal(again.test_pos, small_fs.test_pos)


def test_features_need_events(cli: Attnrec, tmp_path: Path) -> None:
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n1,One\n")
    cli.ingest_items(items)  # a warehouse with a catalog but no events
    assert_one_line_error(cli.run("features", ok=False), "no events", "attnrec ingest")
    with pytest.raises(UserError, match="attnrec features"):
        current_feature_set(load_settings())
    assert_one_line_error(cli.run("features", "--split", "random", ok=False), "--split")


def test_a_cut_that_keeps_no_user_or_no_training_event_is_an_error_and_leaves_nothing(small: Attnrec) -> None:
    # before the build read its histories in pieces, the first built an empty feature set
    # (0 users) as if it had worked, and the second ended in a TypeError traceback
    assert_one_line_error(small.run("features", "--min-user-events", "5000", ok=False),
                          "features.min_user_events = 5000")
    assert_one_line_error(small.run("features", "--split", "temporal", "--split-time", "1990-01-01", ok=False),
                          "features.split_time 1990-01-01T00:00:00", "no event is before it")
    assert not (small.home / "features").exists() or [p.name for p in (small.home / "features").iterdir()] == []


def test_a_failed_piece_build_leaves_no_temporary_folder(small: Attnrec) -> None:
    from pipeline.data.feature_store import build_feature_set
    from pipeline.data.history_pieces import write_history_piece
    from pipeline.data.warehouse import open_warehouse
    from features.histories import user_histories

    def first_piece_then_fail(items, users, min_events, folder):  # noqa: ANN001, ANN202
        import polars as pl

        empty = user_histories(pl.DataFrame(schema={"user_key": pl.Int64, "item_key": pl.Int64, "ts": pl.Int64,
                                                    "source_id": pl.Int32, "line": pl.Int64}), items, users)
        write_history_piece(empty, min_events, folder / "bucket-0.arrow")
        raise RuntimeError("a worker died")

    settings = load_settings(home=small.home)
    with open_warehouse(settings.duckdb_path, read_only=True) as con, pytest.raises(RuntimeError, match="a worker died"):
        build_feature_set(con, settings, pieces_of=first_piece_then_fail)
    assert [p.name for p in settings.features_dir.iterdir()] == []


def test_a_valid_time_that_leaves_nothing_to_train_on_or_comes_after_the_test_is_an_error(small: Attnrec) -> None:
    # before: a feature set of 0 training events built as if it had worked, and a traceback
    assert_one_line_error(small.run("features", "--split", "temporal", "--split-time", "1990-01-01",
                                    "--valid-time", "1989-01-01", ok=False), "no event is before the validation time")
    assert_one_line_error(small.run("features", "--split", "temporal", "--split-time", "2017-01-01",
                                    "--valid-time", "2018-01-01", ok=False), "features.valid_time 2018-01-01T00:00:00 is after")
    assert [p.name for p in (small.home / "features").iterdir()] == []


def test_a_build_that_runs_out_of_disk_is_one_error_line_and_leaves_nothing(small: Attnrec, tmp_path: Path) -> None:
    db_size = small.db.stat().st_size
    with small_disk(tmp_path / "disk", db_size + (1 << 20)) as disk:  # the warehouse and 1 MB: the build needs more
        app = Attnrec(disk / "home", tmp_path)
        app.home.mkdir()
        shutil.copyfile(small.db, app.db)
        assert_one_line_error(app.run("features", ok=False), f"{app.home / 'features'}: no space left")
        assert [p.name for p in (app.home / "features").iterdir()] == []


def test_an_abandoned_build_folder_of_a_dead_process_on_this_machine_is_removed(small: Attnrec) -> None:
    import socket
    import subprocess

    finished = subprocess.Popen(["true"])
    finished.wait()
    gone = finished.pid  # reaped: no process has this id now (ids are reused only after the range wraps)
    features = small.home / "features"
    features.mkdir(parents=True)
    host = socket.gethostname()
    abandoned = features / f".tmp-0123456789abcdef-{gone}-{host}"
    live = features / f".tmp-0123456789abcdef-{os.getpid()}-{host}"  # this test's own process: running
    elsewhere = features / f".tmp-0123456789abcdef-{gone}-another-machine"
    for folder in (abandoned, live, elsewhere):
        (folder / "pieces").mkdir(parents=True)
    small.features()
    left = {p.name for p in features.iterdir()}
    assert abandoned.name not in left and {live.name, elsewhere.name} <= left


def test_a_split_time_alone_puts_validation_at_the_last_test_fraction_of_the_events_before_it(small: Attnrec) -> None:
    # a review mend of this change briefly took the 2x test_fraction quantile here (as without
    # split_time); the byte comparison with the earlier build caught it
    out = small.features("--split", "temporal", "--split-time", "2017-01-01T00:00:00", "--test-fraction", "0.1")
    fs = loaded(small)
    valid, test = out["split"]["valid_time_us"], out["split"]["test_time_us"]
    before = fs.times.values[fs.times.values < test]
    share = (before >= valid).mean()
    assert 0.1 <= share < 0.1 + 0.01, share  # at least the last 10% (ties at the cut may add a few)
