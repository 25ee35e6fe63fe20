"""The promotion gate on a real SQLite MLflow store: first model, a worse challenger, the champion
re-evaluated on a changed warehouse, a champion of another catalogue replaced."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.app.steps import (
    build_features,
    champion_score,
    ingest_catalog,
    ingest_events,
    popularity_score,
    registered_scorer,
    train,
    training_fingerprint,
)
from pipeline.config import load_settings
from pipeline.errors import UserError
from pipeline.registry.model_store import resolve_bundle
from tests.pipeline.conftest import TINY_TRAINING

pytestmark = pytest.mark.slow


@pytest.fixture
def home(champion_home: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "home"
    shutil.copytree(champion_home, dst)
    return dst


def version_tags(home: Path, version: str) -> dict[str, str]:
    settings = load_settings(home=home)
    return MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri).get_model_version("attnrec", version).tags


def version_description(home: Path, version: str) -> str:
    settings = load_settings(home=home)
    return MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri).get_model_version("attnrec", version).description


def champion_version(home: Path) -> str:
    settings = load_settings(home=home)
    return str(MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri).get_model_version_by_alias("attnrec", "champion").version)


def test_the_first_model_is_champion_and_a_worse_one_a_challenger(home: Path) -> None:
    first = version_tags(home, "1")
    assert first["role"] == "champion" and first["gate_reason"].startswith("first model: no champion yet; valid NDCG@10 ")
    assert float(first["popularity_valid_ndcg_at_10"]) > 0  # measured, though the floor is off for tiny models
    assert float(first["valid_ndcg_at_10"]) > 0 and first["selection_metric"] == "ndcg@10"
    worse = train(load_settings(home=home, **{**TINY_TRAINING, "train.epochs": 0}), baselines=False)
    assert worse["version"] == "2" and worse["promoted"] is False
    assert worse["gate_reason"].startswith("valid NDCG@10 ") and " < champion v1 " in worse["gate_reason"]
    assert version_tags(home, "2")["role"] == "challenger" and champion_version(home) == "1"


def test_runs_and_versions_read_well_in_mlflow(home: Path) -> None:
    settings = load_settings(home=home)
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("attnrec")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the model-training view
    version = client.get_model_version("attnrec", "1")
    assert version.description.startswith("Trained on feature set ") and "Gate: champion (first model" in version.description
    run = client.get_run(version.run_id)
    assert run.info.run_name.startswith("train 610 users x 9,") and run.info.run_name.endswith("-> attnrec v1")
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == f"features-{version.tags['feature_version']}"
    assert [t.value for t in dataset.tags if t.key == "mlflow.data.context"] == ["training"]


def test_a_model_below_most_popular_is_never_promoted_not_even_the_first(small_copy: Path) -> None:
    untrained = train(load_settings(home=small_copy, **{**TINY_TRAINING, "train.epochs": 0,
                                                         "registry.popularity_floor": True}), baselines=False)
    tags = version_tags(small_copy, untrained["version"])
    assert untrained["version"] == "1" and untrained["promoted"] is False and tags["role"] == "challenger"
    floor = float(tags["popularity_valid_ndcg_at_10"])
    assert float(tags["valid_ndcg_at_10"]) < floor
    assert untrained["gate_reason"] == (f"valid NDCG@10 {float(tags['valid_ndcg_at_10']):.4f} < most-popular's {floor:.4f}: "
                                        "below the popularity floor (no champion yet, none promoted)")
    settings = load_settings(home=small_copy)
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    assert not client.get_registered_model("attnrec").aliases
    with pytest.raises(UserError) as caught:  # what serve / recommend say then
        resolve_bundle(settings, None)
    assert "the newest, attnrec v1, was not promoted (valid NDCG@10 " in str(caught.value)
    assert str(caught.value).endswith("use it anyway with --model models:/attnrec/1")


def test_the_champion_is_re_evaluated_when_the_warehouse_changed(home: Path, tmp_path: Path) -> None:
    settings = load_settings(home=home, **TINY_TRAINING)
    old_tag = float(version_tags(home, "1")["valid_ndcg_at_10"])
    extra = tmp_path / "more.csv"  # new events of known users and items: same catalogue, new feature set
    extra.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},1,4.0,1700000000\n" for u in range(2, 60)))
    ingest_events(settings, [extra])
    features = build_features(settings)
    assert features["built"] and features["version"] != version_tags(home, "1")["feature_version"]
    expected = champion_score(settings, _feature_set(settings), "1")  # measured apart, on the new feature set
    assert expected is not None and expected != pytest.approx(old_tag, abs=1e-9)
    worse = train(load_settings(home=home, **{**TINY_TRAINING, "train.epochs": 0}), baselines=False)
    assert worse["promoted"] is False and f"champion v1 {expected:.4f}" in worse["gate_reason"], worse["gate_reason"]
    assert features["version"] in worse["gate_reason"] and champion_version(home) == "1"
    measured = version_tags(home, "1")[f"valid_ndcg_at_10_on_{features['version']}"]  # kept: measured once
    assert float(measured) == pytest.approx(expected, abs=1e-6)


def test_a_challenger_validated_on_a_sample_of_users_meets_the_champion_on_the_same_sample(home: Path) -> None:
    """The champion's own tag ranks every validation user; a challenger validated on
    ``train.valid_users`` is compared with the champion re-measured on the same users, and so
    is the popularity floor."""
    sampled = load_settings(home=home, **{**TINY_TRAINING, "train.epochs": 0, "train.valid_users": 50})
    fs = _feature_set(sampled)
    expected = champion_score(sampled, fs, "1")
    assert expected is not None and expected != pytest.approx(float(version_tags(home, "1")["valid_ndcg_at_10"]), abs=1e-9)
    worse = train(sampled, baselines=False)
    assert worse["valid"]["users"] == 50
    assert f"champion v1 {expected:.4f}" in worse["gate_reason"], worse["gate_reason"]
    tags = version_tags(home, worse["version"])
    assert tags["valid_users"] == "50" and version_tags(home, "1")["valid_users"] == "all"
    assert float(version_tags(home, "1")[f"valid_ndcg_at_10_on_{fs.version}_50_users"]) == pytest.approx(expected, abs=1e-6)
    assert float(tags["popularity_valid_ndcg_at_10"]) == pytest.approx(popularity_score(sampled, fs), abs=1e-6)
    assert popularity_score(sampled, fs) != popularity_score(load_settings(home=home), fs)  # the sample's, not everyone's


def test_the_test_report_ranks_one_sample_of_users_in_every_row(home: Path) -> None:
    """``train.test_users``: this run, the champion and the baselines are tested on the same
    fixed sample of users, said in the run's tags; the setting shapes no model, so it leaves
    the training fingerprint (which decides retraining) alone."""
    import torch

    from pipeline.training.evaluation import evaluate
    from pipeline.training.recipe import baseline_model

    plain = load_settings(home=home, **{**TINY_TRAINING, "train.epochs": 0})
    sampled = load_settings(home=home, **{**TINY_TRAINING, "train.epochs": 0, "train.test_users": 40})
    fs, cpu = _feature_set(sampled), torch.device("cpu")
    champion_scorer, max_len = registered_scorer(sampled, fs, "1")
    result = train(sampled, baselines=True)

    assert result["test"]["users"] == 40
    on_sample = evaluate(champion_scorer, fs, "test", max_len, cpu, sample=40).metrics["ndcg@10"]
    assert result["report"]["champion v1"]["ndcg@10"] == pytest.approx(on_sample, abs=1e-9)
    popular = baseline_model("popularity", fs)
    assert result["baselines"]["popularity"] == pytest.approx(
        evaluate(popular, fs, "test", max_len, cpu, sample=40).metrics["ndcg@10"], abs=1e-9)
    assert result["baselines"]["popularity"] != pytest.approx(
        evaluate(popular, fs, "test", max_len, cpu).metrics["ndcg@10"], abs=1e-9)  # the sample's, not everyone's
    settings = load_settings(home=home)
    run = MlflowClient(settings.mlflow_tracking_uri).get_run(result["mlflow_run_id"])
    assert run.data.tags["test_users"] == "40" and "on a sample of 40 users" in version_description(home, result["version"])
    assert training_fingerprint(sampled) == training_fingerprint(plain)


def test_a_champion_of_another_catalogue_is_replaced(home: Path, tmp_path: Path) -> None:
    settings = load_settings(home=home, **TINY_TRAINING)
    items = tmp_path / "items.csv"  # a brand-new item with content changes the item vocabulary
    items.write_text("itemId,title,genres\n999999,A Film Nobody Rated (2030),Drama\n")
    ingest_catalog(settings, [items])
    build_features(settings)
    assert champion_score(settings, _feature_set(settings), "1") is None
    newer = train(load_settings(home=home, **{**TINY_TRAINING, "train.epochs": 0}), baselines=False)
    assert newer["promoted"] is True and "trained on another catalogue" in newer["gate_reason"]
    assert champion_version(home) == newer["version"] and version_tags(home, "1")["role"] == "retired"


def _feature_set(settings):  # noqa: ANN001, ANN202
    from pipeline.data.feature_store import current_feature_set, load_feature_set

    return load_feature_set(current_feature_set(settings))
