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
    # Prefect artefacts: the metrics table and a link to the MLflow run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        table = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["training-metrics"])))
        link = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["training-mlflow-run"])))
    assert table and link
    assert f"attnrec v{first['trained']['version']} (this run)" in str(table[0].data) and "popularity" in str(table[0].data)
    assert first["trained"]["mlflow_run_url"] in str(link[0].data)
    assert first["trained"]["mlflow_run_url"].startswith("http://127.0.0.1:5000/#/experiments/")
    # the index is built once per run: with the bundle at training time, kept by the index step
    assert first["index"]["rebuilt"] is False and first["index"]["kind"] == "flat"


def test_pyfunc_model_answers_as_the_api_does(pipeline_run: tuple[Path, dict, dict]) -> None:
    import mlflow
    import pandas as pd

    from pipeline import Recommender

    home, _, _ = pipeline_run
    settings = load_settings(home=home)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model("models:/attnrec@champion")
    rows = pd.DataFrame({"items": [["1", "260", "1196"], [], ["2571", "no-such-item", "nor-this"], [" 2571 "]]})
    out = model.predict(rows, params={"k": 5, "explain": True})
    assert list(out.columns) == ["recommendations", "fallback", "model_version", "history_length", "error", "unknown_items"]
    assert len(out) == 4
    # a history: titles, scores and reasons over that history, as the API answers it
    api = Recommender.load(settings=settings).recommend(items=["1", "260", "1196"], k=5, explain=True).as_dict()
    first = out.iloc[0]
    assert first["recommendations"] == api["recommendations"] and first["error"] is None
    assert all(r["title"] and r["reasons"] for r in first["recommendations"])
    assert all({x["item_id"] for x in r["reasons"]} <= {"1", "260", "1196"} for r in first["recommendations"])
    assert all(abs(sum(x["weight"] for x in r["reasons"])) <= 1.0 + 1e-6 for r in first["recommendations"])
    # an empty history is said to be the popularity fallback, not passed off as the model's scores
    assert out.iloc[1]["fallback"] == "popular" and len(out.iloc[1]["recommendations"]) == 5
    # unknown ids: that row is refused with the ids named (the API's 422); the other rows are answered
    assert out.iloc[2]["recommendations"] == [] and list(out.iloc[2]["unknown_items"]) == ["no-such-item", "nor-this"]
    assert "unknown item ids: no-such-item, nor-this" in out.iloc[2]["error"]
    # the identity rule: " 2571 " is item 2571
    assert out.iloc[3]["error"] is None and out.iloc[3]["history_length"] == 1
    plain = model.predict(rows.iloc[:1], params={"k": 3})
    assert [r["item_id"] for r in plain.iloc[0]["recommendations"]] == [r["item_id"] for r in api["recommendations"][:3]]
    assert all(r["reasons"] == [] for r in plain.iloc[0]["recommendations"])


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
    # its report names the split and puts it beside the champion and the baselines, with the gate's decision
    report = Path(client.download_artifacts(worse["mlflow_run_id"], "evaluation/report.md", str(home.parent))).read_text()
    champion = first["trained"]["version"]
    assert report.startswith("# attnrec evaluation on the test split") and "leave-one-out" in report
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["model", f"attnrec v{worse['version']} (this run)", f"champion v{champion}", "popularity", "itemknn"]
    assert f"Promotion gate (on validation): challenger: {worse['gate_reason']}" in report
    assert set(worse["report"]) == set(rows[1:])
    assert worse["report"][f"champion v{champion}"]["ndcg@10"] == pytest.approx(first["trained"]["test_ndcg@10"], abs=1e-6)


def test_the_readme_pyfunc_example_runs_as_written(pipeline_run: tuple[Path, dict, dict], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib
    import io
    import re

    home, _, _ = pipeline_run
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("**MLflow.** Every"):text.index("**Promotion gate**")]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example, "the README's MLflow paragraph has no python example"
    (tmp_path / ".attnrec").symlink_to(home)  # the example's store is the default state folder's
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example.group(1), "README.md (MLflow pyfunc)", "exec"), {})  # noqa: S102
    lines = printed.getvalue().splitlines()
    assert len(lines) == 6 and lines[-1] == "popular", printed.getvalue()
    assert all("[(" in line for line in lines[:5])  # each recommendation with its reasons
