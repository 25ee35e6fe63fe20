"""The attnrec-pipeline flow end to end on ml-latest-small, its caching, and the promotion gate."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from mlflow import MlflowClient

from pipeline.config import load_settings
from tests.flows.conftest import TINY

pytestmark = pytest.mark.slow


def test_pipeline_produces_mlflow_run_registered_model_and_batch_table(pipeline_run: tuple[Path, dict, dict]) -> None:
    home, first, _ = pipeline_run
    settings = load_settings(home=home)
    client = MlflowClient(settings.mlflow_tracking_uri)
    run = client.get_run(first["mlflow_run_id"])
    for key in ("loss", "valid_ndcg_at_10", "valid_hr_at_10", "throughput_seq_per_s", "test_ndcg_at_10", "test_hr_at_10",
                "baseline_popularity_test_ndcg_at_10"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "loss")) == TINY["train.epochs"]
    assert run.data.params["model.hidden_size"] == "16" and "feature_set.fingerprint" in run.data.params
    assert run.data.tags["device"] == "cpu" and run.data.tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluation", "plots", "index"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/training_curve.png", "plots/attention.png"} <= plots
    champion = client.get_model_version_by_alias("attnrec", "champion")
    assert str(champion.version) == first["trained"]["version"] and champion.tags["role"] == "champion"
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    try:
        users, rows = con.execute("SELECT count(DISTINCT user_id), count(*) FROM recommendations").fetchall()[0]
    finally:
        con.close()
    assert users == 610 and rows == 6100
    # the index is built once per run: with the bundle at training time, kept by the index step
    assert first["index"]["rebuilt"] is False and first["index"]["kind"] == "flat"


def test_pyfunc_model_loads_and_returns_top_k(pipeline_run: tuple[Path, dict, dict]) -> None:
    import mlflow
    import pandas as pd

    home, _, _ = pipeline_run
    mlflow.set_tracking_uri(load_settings(home=home).mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model("models:/attnrec@champion")
    out = model.predict(pd.DataFrame({"items": [["1", "260", "1196"], ["2571"]]}), params={"k": 5})
    assert list(out.columns) == ["item_ids", "scores"] and len(out) == 2
    assert all(len(ids) == 5 for ids in out["item_ids"])
    assert not {"1", "260", "1196"} & set(out["item_ids"][0])


def test_unchanged_warehouse_reuses_features_and_skips_training(pipeline_run: tuple[Path, dict, dict]) -> None:
    _, first, second = pipeline_run
    assert second["features"]["version"] == first["features"]["version"]
    features_dir = Path(second["features"]["path"])
    assert {p.name: p.stat().st_mtime_ns for p in features_dir.iterdir()} == second["_stamp_before"]  # not rebuilt
    assert all(r["loaded"] == 0 for r in second["ingested"])
    assert second["trained"] is None
    assert second["recommendations"]["model_version"] == f"attnrec v{first['trained']['version']}"


def test_worse_model_is_not_promoted_and_serving_keeps_the_champion(pipeline_run: tuple[Path, dict, dict]) -> None:
    from pipeline import Recommender
    from pipeline.app.steps import train

    home, first, _ = pipeline_run
    worse = train(load_settings(home=home, **{**TINY, "train.epochs": 0}))
    assert worse["promoted"] is False and "<" in worse["gate_reason"]
    settings = load_settings(home=home)
    client = MlflowClient(settings.mlflow_tracking_uri)
    version = client.get_model_version("attnrec", worse["version"])
    assert version.tags["role"] == "challenger" and version.tags["gate_reason"] == worse["gate_reason"]
    assert str(client.get_model_version_by_alias("attnrec", "champion").version) == first["trained"]["version"]
    recommender = Recommender.load(settings=settings)
    assert recommender.version == f"attnrec v{first['trained']['version']}"
    assert len(recommender.recommend(items=["1", "2"], k=5).recommendations) == 5
