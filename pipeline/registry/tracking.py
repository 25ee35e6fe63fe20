"""MLflow tracking and registry: every training and evaluation is an MLflow run.

A training run logs the whole typed config, the feature-set fingerprint and counts,
per-epoch loss / validation metrics / throughput, final test metrics next to the
baselines, system info, and artefacts: the model (an MLflow pyfunc returning top-k for a
history, with signature and input example), the FAISS index and item map (inside the
model's bundle), the evaluation report (JSON, Markdown, HTML), a training curve and
attention heatmaps (PNG). The model is registered as ``attnrec``; the promotion gate gives
the new version the ``champion`` alias only if its validation NDCG@10 is not worse than
the current champion's on the same feature set (within a tolerance), else tags it
``challenger`` with the reason. Serving loads ``models:/attnrec@champion`` by default.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.data.feature_store import FeatureSet
from pipeline.training.loop import EpochRecord

EXPERIMENT = "attnrec"
ROOT = Path(__file__).resolve().parents[2]
VALID_METRIC = "valid_ndcg_at_10"


def metric_name(key: str, prefix: str = "") -> str:
    """MLflow-safe metric names: 'ndcg@10' -> 'ndcg_at_10'."""
    return prefix + key.replace("@", "_at_")


def configure(settings: Settings) -> str:
    """Point MLflow at the configured store; returns the experiment id (created on first use)."""
    import mlflow

    settings.home.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        location = settings.mlflow_artifact_root.as_uri() if settings.mlflow_tracking_uri.startswith("sqlite") else None
        return mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    return exp.experiment_id


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def system_tags(device: str) -> dict[str, str]:
    import duckdb
    import faiss
    import mlflow
    import polars

    return {
        "device": device, "cuda": str(torch.cuda.is_available()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(), "torch": torch.__version__, "polars": polars.__version__,
        "duckdb": duckdb.__version__, "faiss": faiss.__version__, "mlflow": mlflow.__version__,
        "git_commit": git_commit(), "host": platform.node(), "cpu_count": str(os.cpu_count()),
    }


@dataclass
class TrackedTraining:
    run_id: str
    version: str | None
    promoted: bool
    gate_reason: str
    valid: dict[str, float]
    test: dict[str, Any]
    run_dir: Path
    best_epoch: int
    epochs_run: int
    seconds: float


def tracked_train(settings: Settings, fs: FeatureSet, run_dir: Path | None = None, resume: bool = False,
                  progress: bool = True, on_epoch: Callable[[EpochRecord], None] | None = None,
                  baselines: bool = True, register: bool = True, run_name: str | None = None) -> TrackedTraining:
    """Train, evaluate, log everything to MLflow, register the model and apply the promotion gate."""
    import mlflow

    from pipeline.training.recipe import baseline_model, evaluate_model, sasrec_scorer, train_sasrec
    from pipeline.registry.run_report import plot_attention, plot_training_curve, write_evaluation_report
    from pipeline.training.loop import resolve_device

    experiment = configure(settings)
    device = resolve_device(settings.device)
    with mlflow.start_run(experiment_id=experiment, run_name=run_name) as run:
        mlflow.set_tags({**system_tags(str(device)), "type": "train", "feature_version": fs.version})
        params = flatten(settings.model_dump(mode="json", include={"model", "train", "features", "device"}))
        params.update({"feature_set.version": fs.version, "feature_set.fingerprint": fs.manifest["source"]["fingerprint"],
                       **{f"feature_set.{k}": v for k, v in fs.manifest["counts"].items()},
                       "feature_set.split": fs.manifest["split"]["kind"]})
        mlflow.log_params(params)

        def log_epoch(rec: EpochRecord) -> None:
            metrics = {"loss": rec.loss, "throughput_seq_per_s": rec.samples_per_s, "epoch_seconds": rec.seconds,
                       "valid_seconds": rec.valid_seconds}
            metrics.update({metric_name(k, "valid_"): v for k, v in rec.valid.items() if k != "users"})
            mlflow.log_metrics(metrics, step=rec.epoch)
            if on_epoch:
                on_epoch(rec)

        outcome = train_sasrec(settings, fs, run_dir=run_dir, resume=resume, progress=progress, on_epoch=log_epoch)
        mlflow.set_tag("run_dir", str(outcome.run_dir))
        mlflow.log_metrics({metric_name(k, "valid_"): v for k, v in outcome.valid.items() if k != "users"})
        mlflow.log_metrics({"best_epoch": outcome.fit.best_epoch, "epochs_run": outcome.fit.epochs_run,
                            "train_seconds": outcome.fit.seconds})

        # Test metrics, side by side with the baselines (the checkpoint was chosen on validation).
        test = evaluate_model(sasrec_scorer(outcome.model), fs, "test", settings.model.max_len, device)
        mlflow.log_metrics({metric_name(k, "test_"): v for k, v in test.items() if isinstance(v, float)})
        rows = {"attnrec": test}
        if baselines:
            for name in ("popularity", "itemknn"):
                rows[name] = evaluate_model(baseline_model(name, fs).to(device), fs, "test", settings.model.max_len, device)
                mlflow.log_metric(f"baseline_{name}_test_ndcg_at_10", rows[name]["ndcg@10"])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            context = {"feature_version": fs.version, "users": fs.num_users, "items": fs.num_items,
                       "split_protocol": fs.manifest["split"]["kind"]}
            for path in write_evaluation_report(folder / "evaluation", rows, context):
                mlflow.log_artifact(str(path), "evaluation")
            mlflow.log_artifact(str(plot_training_curve(folder / "training_curve.png", outcome.fit.history)), "plots")
            users = [int(u) for u in np.nonzero(fs.test_pos >= 3)[0][:3]]
            if users:
                mlflow.log_artifact(str(plot_attention(folder / "attention.png", outcome.model.cpu(), fs, users)), "plots")
            mlflow.log_artifact(str(outcome.run_dir / "index" / "index.json"), "index")

        version = None
        promoted, reason = False, "not registered"
        if register:
            info = log_pyfunc(outcome.run_dir, settings.registry.model_name)
            version = str(info.registered_model_version)
            promoted, reason = promotion_gate(settings, fs, version, outcome.valid["ndcg@10"])
            mlflow.set_tags({"registered_version": version, "promoted": str(promoted), "gate_reason": reason})
        return TrackedTraining(run.info.run_id, version, promoted, reason, outcome.valid, test, outcome.run_dir,
                               outcome.fit.best_epoch, outcome.fit.epochs_run, outcome.fit.seconds)


def log_pyfunc(bundle_dir: Path, registered_name: str | None) -> Any:
    """Log the bundle as an MLflow pyfunc model (optionally registering it)."""
    import mlflow
    from mlflow.models import infer_signature

    from pipeline.serving.query import ModelBundle

    from pipeline.serving.pyfunc import predict_frame

    bundle = ModelBundle(bundle_dir)
    example = pd.DataFrame({"items": [bundle.item_ids[:3]]})
    signature = infer_signature(example, predict_frame(bundle, example, 10), params={"k": 10})
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(ROOT / "pipeline" / "serving" / "pyfunc.py"),
        artifacts={"bundle": str(_bundle_files(bundle_dir))},
        code_paths=[str(ROOT / "pipeline"), str(ROOT / "models"), str(ROOT / "features")],
        signature=signature, input_example=example, registered_model_name=registered_name,
        pip_requirements=_requirements(),
    )


def _bundle_files(run_dir: Path) -> Path:
    """A folder with only what serving needs (model.pt, items.parquet, index/), not checkpoints."""
    out = run_dir / "bundle_files"
    out.mkdir(exist_ok=True)
    for name in ("model.pt", "items.parquet"):
        shutil.copy2(run_dir / name, out / name)
    shutil.copytree(run_dir / "index", out / "index", dirs_exist_ok=True)
    return out


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = ["torch", "numpy", "pandas", "polars", "pyarrow", "duckdb", "faiss-gpu", "pydantic", "pydantic-settings", "mlflow"]
    out = []
    for n in names:
        try:
            out.append(f"{n}=={version(n).split('+')[0]}")
        except Exception:  # noqa: BLE001 - a package missing here is simply not pinned
            continue
    return out


def promotion_gate(settings: Settings, fs: FeatureSet, version: str, valid_ndcg: float) -> tuple[bool, str]:
    """Give ``version`` the champion alias if it is not worse than the champion on ``fs``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    reg = settings.registry
    client = MlflowClient()
    client.set_model_version_tag(reg.model_name, version, VALID_METRIC, f"{valid_ndcg:.6f}")
    client.set_model_version_tag(reg.model_name, version, "feature_version", fs.version)
    try:
        champion = client.get_model_version_by_alias(reg.model_name, reg.champion_alias)
    except MlflowException:
        champion = None
    if champion is None:
        promoted, reason = True, "first model: no champion yet"
    else:
        champ_score = _champion_score(settings, fs, champion)
        if champ_score is None:
            promoted, reason = True, f"champion v{champion.version} was trained on another catalogue; replaced"
        elif valid_ndcg >= champ_score - reg.promotion_tolerance:
            promoted, reason = True, (f"valid NDCG@10 {valid_ndcg:.4f} >= champion v{champion.version} "
                                      f"{champ_score:.4f} - tolerance {reg.promotion_tolerance}")
        else:
            promoted, reason = False, (f"valid NDCG@10 {valid_ndcg:.4f} < champion v{champion.version} "
                                       f"{champ_score:.4f} - tolerance {reg.promotion_tolerance} on feature set {fs.version}")
    if promoted:
        client.set_registered_model_alias(reg.model_name, reg.champion_alias, version)
        client.set_model_version_tag(reg.model_name, version, "role", "champion")
        if champion is not None:
            client.set_model_version_tag(reg.model_name, champion.version, "role", "retired")
    else:
        client.set_model_version_tag(reg.model_name, version, "role", "challenger")
    client.set_model_version_tag(reg.model_name, version, "gate_reason", reason)
    return promoted, reason


def _champion_score(settings: Settings, fs: FeatureSet, champion: Any) -> float | None:
    """The champion's validation NDCG@10 on ``fs`` (logged if same feature set, else re-evaluated)."""
    tags = champion.tags or {}
    if tags.get("feature_version") == fs.version and VALID_METRIC in tags:
        return float(tags[VALID_METRIC])
    from pipeline.training.evaluation import evaluate
    from pipeline.registry.model_store import check_vocabulary
    from pipeline.serving.query import ModelBundle
    from pipeline.training.recipe import sasrec_scorer
    from pipeline.training.loop import resolve_device

    bundle = ModelBundle(download_bundle(settings, f"models:/{settings.registry.model_name}/{champion.version}"))
    try:
        check_vocabulary(bundle.meta, fs)
    except UserError:
        return None
    device = resolve_device(settings.device)
    return evaluate(sasrec_scorer(bundle.model.to(device)), fs, "valid", bundle.model.max_len, device, ks=(10,)).metrics["ndcg@10"]


def download_bundle(settings: Settings, uri: str) -> Path:
    """A local bundle folder for a ``models:/name@alias`` or ``models:/name/version`` URI (cached)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure(settings)
    client = MlflowClient()
    ref = uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, ver = ref.split("/", 1)
            mv = client.get_model_version(name, ver)
    except MlflowException as exc:
        raise UserError(f"{uri}: no such model in the registry at {settings.mlflow_tracking_uri} "
                        f"(train one with `attnrec train`)") from exc
    cache = settings.home / "model_cache" / f"{name}-v{mv.version}"
    if not (cache / "bundle" / "model.pt").exists():
        tmp = Path(tempfile.mkdtemp(dir=settings.home))
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(tmp)))
            found = next(local.rglob("model.pt")).parent
            if cache.exists():
                shutil.rmtree(cache)
            cache.mkdir(parents=True)
            shutil.copytree(found, cache / "bundle")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (cache / "bundle" / "VERSION").write_text(f"{name} v{mv.version}\n")
    return cache / "bundle"


def tracked_evaluation(settings: Settings, model_name: str, report: dict[str, Any]) -> str:
    """Record an ``attnrec evaluate`` as an MLflow run; returns its run id."""
    import mlflow

    experiment = configure(settings)
    with mlflow.start_run(experiment_id=experiment, run_name=f"evaluate {model_name}") as run:
        mlflow.set_tags({"type": "evaluate", "model": model_name, "feature_version": report.get("feature_set", "")})
        mlflow.log_params({"split": report.get("split"), "model": model_name})
        mlflow.log_metrics({metric_name(k, f"{report.get('split')}_"): v for k, v in report.items()
                            if isinstance(v, float) and k != "seconds"})
        return run.info.run_id

