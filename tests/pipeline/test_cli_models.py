"""The CLI's model commands against a real registry champion: a warm `recommend` that needs no
MLflow, unknown categories said, `recommend-all --out` by extension, `evaluate` on the model's
own feature set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pytest

from pipeline import Recommender
from pipeline.config import load_settings
from tests.support import Attnrec


@pytest.fixture
def champion_cli(champion_home: Path, tmp_path: Path) -> Attnrec:
    home = tmp_path / "home"
    shutil.copytree(champion_home, home)
    work = tmp_path / "work"
    work.mkdir()
    return Attnrec(home, work)


def test_a_warm_recommend_reads_the_cached_champion_without_mlflow(champion_cli: Attnrec) -> None:
    champion_cli.run("recommend", "--user", "42")  # the first query caches the champion's bundle
    warm = champion_cli.run("recommend", "--user", "42", "--json")
    assert json.loads(warm.stdout)["model_version"] == "attnrec v1"
    # the same command with Python's import log: MLflow is never imported once the cache is current
    probe = champion_cli.run("recommend", "--user", "42", "--json", python_flags=("-X", "importtime"))
    imported = {line.split("|")[-1].strip() for line in probe.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and not {m for m in imported if m == "mlflow" or m.startswith("mlflow.")}
    api = Recommender.load(settings=load_settings(home=champion_cli.home)).recommend(user="42", k=10).as_dict()
    assert json.loads(probe.stdout) == json.loads(json.dumps(api))
    # a new champion moves the alias: the cache of v1 is then not current, and MLflow resolves v2
    import mlflow
    from mlflow import MlflowClient

    settings = load_settings(home=champion_cli.home)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)  # the model source resolves through the global store
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    source = client.get_model_version("attnrec", "1")
    v2 = client.create_model_version("attnrec", source.source, run_id=source.run_id, tags=source.tags)
    client.set_registered_model_alias("attnrec", "champion", v2.version)
    assert champion_cli.json("recommend", "--user", "42")["model_version"] == "attnrec v2"


def test_unknown_categories_are_said_with_the_close_ones(champion_cli: Attnrec) -> None:
    bad = champion_cli.run("recommend", "--user", "42", "--category", "Comdy", ok=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "error: include_categories: unknown category 'Comdy' (did you mean Comedy?)"
    bad = champion_cli.run("recommend", "--user", "42", "--exclude-category", "Zzzzz", ok=False)
    assert bad.returncode == 1 and "exclude_categories: unknown category 'Zzzzz' (the catalogue has 19 categories, e.g. Action" in bad.stderr
    ok = champion_cli.json("recommend", "--user", "42", "--category", "Comedy", "-k", "5")
    assert len(ok["recommendations"]) == 5


@pytest.mark.parametrize("name", ["recs.csv", "recs.ndjson", "recs.parquet"])
def test_recommend_all_writes_the_format_its_extension_names(champion_cli: Attnrec, name: str) -> None:
    out = champion_cli.cwd / name
    champion_cli.run("recommend-all", "-k", "3", "--out", out)
    read = {".csv": pl.read_csv, ".ndjson": pl.read_ndjson, ".parquet": pl.read_parquet}[out.suffix]
    frame = read(out)
    assert frame.height == 610 * 3 and frame.columns[:4] == ["user_id", "rank", "item_id", "score"]
    con = duckdb.connect(str(champion_cli.db), read_only=True)
    try:
        table = con.execute("SELECT user_id, rank, item_id FROM recommendations ORDER BY user_id, rank").fetchall()
    finally:
        con.close()
    got = frame.select(pl.col("user_id").cast(pl.String), "rank", pl.col("item_id").cast(pl.String)).sort("user_id", "rank")
    assert got.rows() == table


def test_recommend_all_refuses_an_extension_it_does_not_write(champion_cli: Attnrec) -> None:
    bad = champion_cli.run("recommend-all", "--out", champion_cli.cwd / "recs.xlsx", ok=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error: --out") and ".parquet, .csv, .ndjson" in bad.stderr
    assert not (champion_cli.cwd / "recs.xlsx").exists()


def test_evaluate_uses_the_models_own_feature_set(champion_cli: Attnrec) -> None:
    trained_on = (champion_cli.home / "features" / "CURRENT").read_text().strip()
    champion_cli.run("features", "--split", "temporal")  # a newer feature set over the same items
    newer = (champion_cli.home / "features" / "CURRENT").read_text().strip()
    assert newer != trained_on
    report = champion_cli.json("evaluate")
    assert report["feature_set"] == trained_on and report["feature_set_note"] == "the model's own feature set"
    shutil.rmtree(champion_cli.home / "features" / trained_on)
    report = champion_cli.json("evaluate")
    assert report["feature_set"] == newer and f"the model's feature set {trained_on} is no longer" in report["feature_set_note"]
    text = champion_cli.run("evaluate").stdout
    assert f"of feature set {newer}, the model's feature set {trained_on} is no longer" in text


def test_evaluate_keep_seen_reports_beside_the_default(champion_cli: Attnrec) -> None:
    report = champion_cli.json("evaluate", "--keep-seen")
    kept = report["keep_seen"]
    assert kept["users"] == report["users"] == 610
    for k in (5, 10, 20, 50):  # more items compete for each rank: never better than with seen items left out
        assert kept[f"hr@{k}"] <= report[f"hr@{k}"] and kept[f"ndcg@{k}"] <= report[f"ndcg@{k}"]
    assert "seen items ranked too (--keep-seen)" in champion_cli.run("evaluate", "--keep-seen").stdout
