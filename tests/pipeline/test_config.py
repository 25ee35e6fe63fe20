"""Typed settings: defaults < attnrec.toml < ATTNREC_* environment < explicit overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import Settings, load_settings
from pipeline.errors import UserError
from tests.support import Attnrec


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean working directory and no ATTNREC_* variables."""
    for key in list(os.environ):
        if key.startswith("ATTNREC_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_toml(folder: Path, text: str, name: str = "attnrec.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_defaults_resolve_home_to_dot_attnrec_of_cwd(workdir: Path) -> None:
    s = load_settings()
    assert isinstance(s, Settings)
    assert s.home == (workdir / ".attnrec").resolve()
    assert s.home.is_absolute()
    assert s.duckdb_path == s.home / "warehouse.duckdb"
    assert s.features_dir == s.home / "features"
    assert s.inbox == s.home / "inbox"
    assert s.mlflow_artifact_root == s.home / "mlartifacts"
    assert s.mlflow_tracking_uri == f"sqlite:///{s.home / 'mlflow.db'}"
    # built-in defaults of the nested groups
    assert s.train.batch_size == 128
    assert s.model.hidden_size == 128
    assert (s.model.max_len, s.model.dropout) == ("auto", "auto")  # fitted to the data
    assert (s.train.epochs, s.train.lr, s.train.patience) == ("auto", "auto", "auto")  # fitted to the data
    assert s.model.text_encoder == "hashed"
    assert s.features.split == "loo"
    assert s.features.split_time is None
    # nothing is created just by loading settings
    assert not s.home.exists()


def test_home_follows_the_working_directory(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = workdir / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert load_settings().home == other.resolve() / ".attnrec"


def test_toml_in_cwd_overrides_defaults(workdir: Path) -> None:
    write_toml(workdir, 'home = "state"\ndevice = "cpu"\n[train]\nepochs = 7\nbatch_size = 64\n'
                        '[features]\nsplit = "temporal"\ntest_fraction = 0.25\n')
    s = load_settings()
    assert s.home == workdir.resolve() / "state"
    assert s.duckdb_path == workdir.resolve() / "state" / "warehouse.duckdb"
    assert s.device == "cpu"
    assert s.train.epochs == 7
    assert s.train.batch_size == 64
    assert (s.train.lr, s.train.grad_clip) == ("auto", 1.0)  # untouched fields keep their defaults
    assert s.features.split == "temporal"
    assert s.features.test_fraction == 0.25


def test_attnrec_config_names_another_toml(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml(workdir, "[train]\nepochs = 7\n")  # ignored: ATTNREC_CONFIG wins
    cfg = write_toml(workdir, "[train]\nepochs = 11\n", name="other.toml")
    monkeypatch.setenv("ATTNREC_CONFIG", str(cfg))
    assert load_settings().train.epochs == 11


def test_env_overrides_toml_including_nested_fields(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml(workdir, 'home = "from-toml"\n[train]\nepochs = 7\nbatch_size = 64\n[model]\nhidden_size = 32\n')
    monkeypatch.setenv("ATTNREC_HOME", str(workdir / "from-env"))
    monkeypatch.setenv("ATTNREC_TRAIN__EPOCHS", "3")
    monkeypatch.setenv("ATTNREC_MODEL__NUM_BLOCKS", "4")
    s = load_settings()
    assert s.home == (workdir / "from-env").resolve()
    assert s.train.epochs == 3
    assert s.model.num_blocks == 4
    # the nested groups are merged field by field, not replaced
    assert s.train.batch_size == 64
    assert s.model.hidden_size == 32


def test_nested_env_without_toml(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNREC_TRAIN__EPOCHS", "3")
    monkeypatch.setenv("ATTNREC_FEATURES__SPLIT", "temporal")
    s = load_settings()
    assert s.train.epochs == 3
    assert s.features.split == "temporal"
    assert s.train.batch_size == 128


def test_explicit_overrides_beat_env_and_toml(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml(workdir, "[train]\nepochs = 7\nbatch_size = 64\n")
    monkeypatch.setenv("ATTNREC_TRAIN__EPOCHS", "3")
    monkeypatch.setenv("ATTNREC_TRAIN__LR", "0.5")
    s = load_settings(**{"train.epochs": 5})
    assert s.train.epochs == 5
    assert s.train.lr == 0.5  # env still applies to the fields not overridden
    assert s.train.batch_size == 64  # and the toml to the rest
    s = load_settings(train={"epochs": 9}, home=workdir / "explicit")
    assert s.train.epochs == 9
    assert s.home == (workdir / "explicit").resolve()


def test_none_overrides_do_not_mask_env(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNREC_TRAIN__EPOCHS", "3")
    monkeypatch.setenv("ATTNREC_HOME", str(workdir / "env-home"))
    s = load_settings(home=None, **{"train.epochs": None})
    assert s.train.epochs == 3
    assert s.home == (workdir / "env-home").resolve()


def test_invalid_values_are_rejected(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNREC_TRAIN__EPOCHS", "-1")
    with pytest.raises(UserError) as bad:
        load_settings()
    # a number-or-"auto" setting is named once, as the user wrote it, not by pydantic's union branches
    assert str(bad.value) == "invalid settings: train.epochs = '-1': Input should be greater than or equal to 0, or 'auto'"
    monkeypatch.delenv("ATTNREC_TRAIN__EPOCHS")
    with pytest.raises(UserError, match="split"):
        load_settings(**{"features.split": "random"})


@pytest.mark.parametrize(("source", "message"), [
    ("override", "unknown setting train.epoch (did you mean train.epochs?)"),
    ("env", "unknown setting train.epoch (did you mean train.epochs?)"),
    ("toml", "unknown setting train.epoch (did you mean train.epochs?)"),
    ("env-top", "unknown environment variable ATTNREC_EPOCHS (did you mean ATTNREC_TRAIN__EPOCHS?)"),
])
def test_an_unknown_key_is_an_error_that_names_the_close_settings(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str) -> None:
    overrides: dict[str, object] = {}
    if source == "override":
        overrides = {"train.epoch": 3}
    elif source == "env":
        monkeypatch.setenv("ATTNREC_TRAIN__EPOCH", "3")
    elif source == "env-top":
        monkeypatch.setenv("ATTNREC_EPOCHS", "3")
    else:
        (workdir / "attnrec.toml").write_text("[train]\nepoch = 3\n")
        monkeypatch.setenv("ATTNREC_CONFIG", str(workdir / "attnrec.toml"))
    with pytest.raises(UserError) as caught:
        load_settings(**overrides)
    assert str(caught.value) == f"invalid settings: {message}"


def test_two_homes_are_independent_installations(tmp_path: Path, ml_small: Path) -> None:
    a = Attnrec(tmp_path / "home-a", tmp_path)
    b = Attnrec(tmp_path / "home-b", tmp_path)
    small = tmp_path / "small.csv"
    small.write_text("user,item,time\n1,10,100\n1,11,200\n2,10,300\n")

    a.ingest(ml_small / "ratings.csv")
    # b has no warehouse yet: stats refuses clearly instead of reading a's
    proc = b.run("stats", "--json", ok=False)
    assert proc.returncode != 0 and "no warehouse" in proc.stderr
    b.ingest(small)

    assert a.stats()["events"] == 100_836
    assert b.stats()["events"] == 3
    assert a.db.is_file() and b.db.is_file() and a.db != b.db

    fa = a.features()
    fb = b.features()
    assert Path(fa["path"]).parent == a.home / "features"
    assert Path(fb["path"]).parent == b.home / "features"
    assert fa["counts"]["users"] == 610 and fb["counts"]["users"] == 2
    assert a.stats()["events"] == 100_836  # b's work never touched a


def test_home_flag_beats_env(tmp_path: Path) -> None:
    env_home = Attnrec(tmp_path / "env-home", tmp_path)
    flag_home = tmp_path / "flag-home"
    small = tmp_path / "small.csv"
    small.write_text("user,item,time\n1,10,100\n2,10,300\n")
    env_home.run("ingest", small, "--home", flag_home)
    assert (flag_home / "warehouse.duckdb").is_file()
    assert not env_home.db.exists()
    assert Attnrec(flag_home, tmp_path).stats()["events"] == 2
