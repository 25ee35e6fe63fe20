"""Faults end in one clear line (the hardening issue): corrupt or missing artefacts, a corrupt
cache, a resume of another shape, a training killed mid-run, bad values on the command line."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import Attnrec, _clean_env, assert_one_line_error

TINY = ["--epochs", "1", "--hidden-size", "16", "--max-len", "20", "--batch-size", "256", "--negatives", "128"]


@pytest.mark.parametrize("name,damage", [
    ("model.pt", b""), ("model.pt", "truncate"), ("model.pt", b"random bytes " * 1000),
    ("index/items.faiss", "truncate"), ("index/items.faiss", b"\x00\x01garbage" * 100),
    ("index/index.json", b"{not json"), ("items.parquet", b"PAR1 not really parquet"),
])
def test_a_corrupt_artefact_is_one_line_naming_the_file_and_the_repair(small_cli: Attnrec, name: str,
                                                                         damage: bytes | str) -> None:
    bundle = small_cli.home / "runs" / "model-a"
    path = bundle / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if damage == "truncate" else damage)
    line = assert_one_line_error(small_cli.run("recommend", "--model", bundle, "--items", "1", ok=False), str(path))
    assert "attnrec" in line.split(str(path), 1)[1], line  # the command that repairs it


def test_a_corrupt_mlflow_store_is_one_line(champion_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(champion_home, home)
    (home / "mlflow.db").write_bytes(b"this is not an sqlite database" * 100)
    shutil.rmtree(home / "model_cache", ignore_errors=True)
    cli = Attnrec(home, tmp_path)
    assert_one_line_error(cli.run("recommend", "--user", "42", ok=False), "mlflow.db")


@pytest.mark.slow
def test_a_corrupt_cached_bundle_is_fetched_again_and_a_lost_one_is_said(small_cli: Attnrec) -> None:
    cli, home = small_cli, small_cli.home
    (cli.cwd / "attnrec.toml").write_text("[registry]\npopularity_floor = false\n")  # a tiny model may be champion
    cli.run("train", *TINY)  # a champion of this state folder's own registry
    assert cli.json("recommend", "--user", "42", "-k", "3")["model_version"] == "attnrec v1"  # fills the cache
    cached = home / "model_cache" / "attnrec-v1" / "bundle" / "model.pt"
    good = cached.read_bytes()
    cached.write_bytes(good[:1000])
    assert len(cli.json("recommend", "--user", "42", "-k", "3")["recommendations"]) == 3
    assert cached.read_bytes() == good  # re-fetched from the registry
    shutil.rmtree(home / "model_cache")
    shutil.rmtree(home / "mlartifacts")
    assert_one_line_error(cli.run("recommend", "--user", "42", ok=False), "attnrec v1", "attnrec train")


@pytest.mark.slow
def test_resume_with_another_shape_says_what_differs(small_cli: Attnrec) -> None:
    run = Path(small_cli.json("train", *TINY)["run_dir"])
    line = assert_one_line_error(small_cli.run("train", *TINY, "--resume", run, "--hidden-size", "32", ok=False),
                                 "--resume", str(run))
    assert "16" in line and "32" in line, line


@pytest.mark.slow
def test_a_training_killed_mid_run_is_failed_and_leaves_no_undecided_version(small_cli: Attnrec) -> None:
    db = small_cli.home / "mlflow.db"
    (small_cli.cwd / "attnrec.toml").write_text("[registry]\npopularity_floor = false\n")  # a tiny model may be champion
    proc = small_cli.popen("train", "--epochs", "1000", "--patience", "1000", "--hidden-size", "16", "--max-len", "20",
                           "--batch-size", "256", "--negatives", "128", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # far from done when it is killed
    try:
        deadline = time.monotonic() + 120
        while not _rows(db, "SELECT run_uuid FROM runs WHERE status = 'RUNNING'", missing_ok=True):
            assert time.monotonic() < deadline and proc.poll() is None, "the training run never started"
            time.sleep(0.5)
        time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    (killed,), = _rows(db, "SELECT run_uuid FROM runs WHERE status = 'RUNNING'")
    # the other half of what a kill leaves: a registered version that never got its gate decision
    _register_without_gate(small_cli, killed)
    result = small_cli.json("train", *TINY)
    assert _rows(db, "SELECT status FROM runs WHERE run_uuid = ?", [killed]) == [("FAILED",)]
    assert result["version"] == "2" and result["promoted"]
    live = "SELECT version FROM model_versions WHERE current_stage != 'Deleted_Internal'"  # MLflow deletes softly
    assert _rows(db, live) == [(2,)]  # the undecided v1 was removed


def test_bad_values_on_the_command_line_are_one_line(small_cli: Attnrec) -> None:
    assert_one_line_error(small_cli.run("train", "--epochs", "-1", ok=False), "train.epochs", "-1")
    assert_one_line_error(small_cli.run("train", "--lr", "0", ok=False), "train.lr")
    assert_one_line_error(small_cli.run("features", "--split", "temporal", "--split-time", "notadate", ok=False),
                          "features.split_time", "notadate")
    env = {**_clean_env(small_cli.home), "ATTNREC_TRAIN__EPOCHS": "many"}
    proc = subprocess.run(small_cli.command("train"), cwd=small_cli.cwd, env=env, capture_output=True, text=True)
    assert_one_line_error(proc, "train.epochs", "many")


def test_evaluate_on_a_split_without_targets_is_one_line(small_cli: Attnrec) -> None:
    small_cli.features("--split", "temporal", "--split-time", "2099-01-01T00:00:00")
    # a baseline is measured on the current feature set (a model on its own, see test_cli_models.py)
    assert_one_line_error(small_cli.run("evaluate", "--split", "test", "--baseline", "popularity", ok=False),
                          "no test targets")


def _rows(db: Path, sql: str, params: list | None = None, missing_ok: bool = False) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, params or []).fetchall()
    except sqlite3.OperationalError:
        if missing_ok:  # the store is still being created
            return []
        raise
    finally:
        con.close()


def _register_without_gate(cli: Attnrec, run_id: str) -> None:
    """Register the killed run's (partial) output as a model version with no gate tags, as a kill
    between registration and the gate leaves it."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.config import load_settings

    settings = load_settings(home=cli.home)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)  # this process may have pointed MLflow elsewhere before
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    client.create_registered_model("attnrec")
    client.create_model_version("attnrec", f"runs:/{run_id}/model", run_id)


@pytest.mark.parametrize("command", [["serve", "--port", "1"], ["recommend", "--items", "1,2"]])
def test_a_state_folder_without_models_is_one_line_and_left_as_it_was(tmp_path: Path, command: list[str]) -> None:
    """Reported: `attnrec serve --home <a folder with nothing in it>` said the right line but had
    first created an MLflow database there."""
    home = tmp_path / "nothing-here"
    cli = Attnrec(home, tmp_path)
    assert_one_line_error(cli.run(*command, "--home", home, ok=False), "no such model in the registry",
                          "attnrec train")
    assert not home.exists()
    home.mkdir()
    assert_one_line_error(cli.run(*command, "--home", home, ok=False), "no such model in the registry")
    assert list(home.iterdir()) == []
