"""A real model bundle on ml-latest-small, shared by the index / recommend / serving tests.

The model is built with seeded random weights (the retrieval tests check exactness,
filters and plumbing, which hold for any weights); training itself is tested elsewhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from mlflow import MlflowClient

from pipeline.config import load_settings
from pipeline.data.catalog import ingest_items
from pipeline.data.feature_store import FeatureSet, build_feature_set, load_feature_set
from pipeline.data.ingest import IngestOptions, ingest_paths
from pipeline.data.warehouse import connect
from pipeline.registry.model_store import write_bundle
from pipeline.training.recipe import build_sasrec, validation_queries
from tests.support import Attnrec

REPO = Path(__file__).resolve().parents[2]


def make_bundle(home: Path, fs: FeatureSet, name: str, seed: int, hidden: int = 16) -> Path:
    settings = load_settings(home=home, **{"model.hidden_size": hidden, "model.max_len": 30, "model.num_heads": 2})
    torch.manual_seed(seed)
    model, shape = build_sasrec(fs, settings.model)
    model.eval()
    run = home / "runs" / name
    write_bundle(run, model, shape, fs.items, fs.version, validation_queries(model, fs))
    return run


@pytest.fixture(scope="session")
def small_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state folder with ml-latest-small ingested (ratings, movies, tags), LOO features, two
    bundles and an MLflow store with no runs."""
    home = tmp_path_factory.mktemp("small") / "home"
    data = REPO / "datasets" / "ml-latest-small"
    settings = load_settings(home=home)
    con = connect(settings.duckdb_path)
    try:
        ingest_paths(con, [data / "ratings.csv"], IngestOptions(), settings.tmp_dir)
        ingest_items(con, data / "movies.csv")
        ingest_items(con, data / "tags.csv")
        build_feature_set(con, settings)
    finally:
        con.close()
    # its MLflow store's tables, made once here (a new SQLite store's migrations take ~8 s); the
    # attnrec experiment is left to each copy, whose artefacts then stay in the copy
    MlflowClient(settings.mlflow_tracking_uri).search_experiments(max_results=1)
    fs = load_feature_set(home / "features" / (home / "features" / "CURRENT").read_text().strip())
    make_bundle(home, fs, "model-a", seed=1)
    make_bundle(home, fs, "model-b", seed=2)
    (home / "runs" / "LATEST").write_text("model-a\n")
    return home


@pytest.fixture
def small_copy(small_home: Path, tmp_path: Path) -> Path:
    """A private copy of ``small_home`` for tests that write to it."""
    dst = tmp_path / "home"
    shutil.copytree(small_home, dst)
    return dst


@pytest.fixture
def small_cli(small_copy: Path, tmp_path: Path) -> Attnrec:
    work = tmp_path / "work"
    work.mkdir()
    return Attnrec(small_copy, work)


@pytest.fixture(scope="session")
def small_fs(small_home: Path) -> FeatureSet:
    return load_feature_set(small_home / "features" / (small_home / "features" / "CURRENT").read_text().strip())


# Tiny models do not beat most-popular: their tests turn the gate's popularity floor off
# (tests/pipeline/app/test_gate.py tests the floor itself).
TINY_TRAINING = {"train.epochs": 2, "model.max_len": 30, "model.hidden_size": 16, "train.batch_size": 256,
                 "train.negatives": 256, "registry.popularity_floor": False}


@pytest.fixture(scope="session")
def champion_home(small_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state folder like ``small_home`` with a real registry champion: a tiny model trained,
    tracked in the SQLite MLflow store and promoted by ``attnrec train``'s own step."""
    from pipeline.app.steps import train

    home = tmp_path_factory.mktemp("champion") / "home"
    shutil.copytree(small_home, home)
    result = train(load_settings(home=home, **TINY_TRAINING), baselines=False)
    assert result["promoted"] and result["version"] == "1"
    return home


TINY_CATALOGUE_MOVIES = 40  # the first 40 movies of ml-latest-small and their ratings


def ingested_feature_set(home: Path, events: Path, items: Path, id_map: Path | None = None,
                         **overrides: object) -> FeatureSet:
    """Ingest ``events`` and the catalogue ``items`` into ``home`` and build its feature set
    (``overrides``: settings, e.g. ``features.cold_item_fraction``)."""
    settings = load_settings(home=home, **overrides)
    con = connect(settings.duckdb_path)
    try:
        ingest_paths(con, [events], IngestOptions(), settings.tmp_dir)
        ingest_items(con, items, id_map=id_map)
        path, _ = build_feature_set(con, settings)
    finally:
        con.close()
    return load_feature_set(path)


def movielens_feature_set(home: Path, data: Path, **overrides: object) -> FeatureSet:
    """``ingested_feature_set`` of a MovieLens folder's ratings.csv and movies.csv."""
    return ingested_feature_set(home, data / "ratings.csv", data / "movies.csv", **overrides)


def seeded_flat_bundle(home: Path, events: Path, items: Path, id_map: Path | None = None) -> Path:
    """``home`` with ``events`` and ``items`` ingested, LOO features and a seeded random-weight
    model (hidden 32, 50 positions) written as a bundle with a flat index; returns the bundle."""
    shape_settings = {"model.hidden_size": 32, "model.max_len": 50}
    fs = ingested_feature_set(home, events, items, id_map, **shape_settings)
    torch.manual_seed(0)
    model, shape = build_sasrec(fs, load_settings(home=home, **shape_settings).model)
    model.eval()
    write_bundle(home / "bundle", model, shape, fs.items, fs.version, validation_queries(model, fs), kind="flat")
    return home / "bundle"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real catalogue: 40 MovieLens movies (plus one with no title) and their ratings, so
    that sentence encoding takes a second."""
    src = REPO / "datasets" / "ml-latest-small"
    out = tmp_path_factory.mktemp("tiny-catalogue")
    movies = pl.read_csv(src / "movies.csv").head(TINY_CATALOGUE_MOVIES)
    movies.vstack(pl.DataFrame({"movieId": [999999], "title": [""], "genres": ["(no genres listed)"]})).write_csv(out / "movies.csv")
    pl.read_csv(src / "ratings.csv").filter(pl.col("movieId").is_in(movies["movieId"].implode())).write_csv(out / "ratings.csv")
    return out


@pytest.fixture(scope="session")
def tiny_fs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> FeatureSet:
    return movielens_feature_set(tmp_path_factory.mktemp("tiny") / "home", tiny_data)
