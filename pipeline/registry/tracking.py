"""attnrec's MLflow I/O: the tracking store, runs and their artefacts, the model registry.

Nothing here decides anything: the training orchestration and the promotion gate that use
these calls are the application layer's (``pipeline.app.steps``). The store is the one the
settings name (by default SQLite and an artefact folder in the state folder); the
experiment is ``attnrec``; models are registered under ``settings.registry.model_name``
and the serving model carries the ``champion`` alias.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.errors import UserError

EXPERIMENT = "attnrec"
MLFLOW_UI_PORT = 5000  # where `attnrec ui` serves the embedded store by default
MLFLOW_UI_URL = f"http://127.0.0.1:{MLFLOW_UI_PORT}"
ROOT = Path(__file__).resolve().parents[2]


def metric_name(key: str, prefix: str = "") -> str:
    """MLflow-safe metric names: 'ndcg@10' -> 'ndcg_at_10'."""
    return prefix + key.replace("@", "_at_")


# The MLflow UI opens an experiment of this kind in its model-training view (not the GenAI traces view).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development",
                   "mlflow.note.content": "attnrec: content-aware SASRec runs (train, evaluate) and their registered models"}


def configure(settings: Settings) -> str:
    """Point MLflow at the configured store; returns the experiment id (created on first use)."""
    # MLflow draws a progress bar for every artefact it copies; attnrec prints its own lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    # MLflow logs creating a new store's tables at INFO on stderr, which is for errors here (one line)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

    settings.home.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    try:
        exp = mlflow.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            location = settings.mlflow_artifact_root.as_uri() if settings.mlflow_tracking_uri.startswith("sqlite") else None
            return mlflow.create_experiment(EXPERIMENT, artifact_location=location, tags=EXPERIMENT_TAGS)
        if any(exp.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):  # made by an older attnrec
            for key, value in EXPERIMENT_TAGS.items():
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy, REST and MLflow errors all mean an unusable store
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"the MLflow store {settings.mlflow_tracking_uri} cannot be used ({reason}): restore it, or point "
                        "mlflow_tracking_uri at a working store") from None
    return exp.experiment_id


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as MLflow parameters: {'train': {'lr': 1e-3}} -> {'train.lr': 1e-3}."""
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
    import torch

    return {
        "device": device, "cuda": str(torch.cuda.is_available()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(), "torch": torch.__version__, "polars": polars.__version__,
        "duckdb": duckdb.__version__, "faiss": faiss.__version__, "mlflow": mlflow.__version__,
        "git_commit": git_commit(), "host": platform.node(), "pid": str(os.getpid()), "cpu_count": str(os.cpu_count()),
    }


@contextmanager
def tracked_run(settings: Settings, run_name: str | None, tags: dict[str, str]) -> Iterator[str]:
    """An MLflow run in the attnrec experiment; yields its id. Logging calls below go to it."""
    import mlflow

    experiment = configure(settings)
    with mlflow.start_run(experiment_id=experiment, run_name=run_name) as run:
        mlflow.set_tags(tags)
        yield run.info.run_id


def run_url(settings: Settings, run_id: str) -> str:
    """The MLflow UI's page of a run: on the tracking server when the store is one (http/https),
    else on ``attnrec ui``'s default address (``MLFLOW_UI_URL``)."""
    import mlflow

    uri = settings.mlflow_tracking_uri
    base = uri if uri.startswith(("http://", "https://")) else MLFLOW_UI_URL
    experiment = mlflow.MlflowClient(uri, registry_uri=uri).get_run(run_id).info.experiment_id
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    mlflow.log_params(params)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics(metrics, step=step)


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    mlflow.set_tags(tags)


def log_feature_set(path: Path, version: str, counts: dict[str, Any]) -> None:
    """The feature set as the run's training dataset input (its folder, its version as the digest)."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    dataset = MetaDataset(LocalArtifactDatasetSource(path.as_uri()), name=f"features-{version}", digest=version[:36])
    mlflow.log_input(dataset, context="training", tags={k: str(v) for k, v in counts.items()})


def set_run_name(name: str) -> None:
    import mlflow

    mlflow.set_tag("mlflow.runName", name)


def describe_version(settings: Settings, version: str, text: str) -> None:
    from mlflow import MlflowClient

    configure(settings)
    MlflowClient().update_model_version(settings.registry.model_name, version, description=text)


def log_artifact(path: Path, folder: str) -> None:
    import mlflow

    mlflow.log_artifact(str(path), folder)


def log_bundle_model(bundle_dir: Path, registered_name: str | None) -> str | None:
    """Log the bundle folder as the run's pyfunc model (``pipeline/serving/pyfunc.py``);
    returns the registered version when ``registered_name`` is given.

    The signature is declared, not inferred, and no input example is given (MLflow would load
    and run the model to check one), so logging reads nothing back.
    """
    import warnings

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Object, ParamSchema, ParamSpec, Property, Schema

    reason = Object([Property("item_id", DataType.string), Property("title", DataType.string, required=False),
                     Property("weight", DataType.double)])
    item = Object([Property("item_id", DataType.string), Property("score", DataType.double),
                   Property("title", DataType.string, required=False), Property("reasons", Array(reason))])
    signature = ModelSignature(  # the pyfunc's columns and params (pipeline/serving/pyfunc.py)
        inputs=Schema([ColSpec(Array(DataType.string), "items")]),
        outputs=Schema([ColSpec(Array(item), "recommendations"), ColSpec(DataType.string, "fallback", required=False),
                        ColSpec(DataType.string, "model_version"), ColSpec(DataType.long, "history_length"),
                        ColSpec(DataType.string, "error", required=False), ColSpec(Array(DataType.string), "unknown_items")]),
        params=ParamSchema([ParamSpec("k", DataType.long, 10), ParamSpec("explain", DataType.boolean, False),
                            ParamSpec("exclude_seen", DataType.boolean, True)]),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(ROOT / "pipeline" / "serving" / "pyfunc.py"),
            artifacts={"bundle": str(bundle_dir)},
            code_paths=[str(ROOT / "pipeline"), str(ROOT / "models"), str(ROOT / "features")],
            signature=signature, registered_model_name=registered_name, pip_requirements=_requirements(),
        )
    return None if registered_name is None else str(info.registered_model_version)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "numpy", "pandas", "polars", "pyarrow", "duckdb", "faiss-gpu", "pydantic", "pydantic-settings", "mlflow"]
    out = []
    for n in names:
        try:
            out.append(f"{n}=={version(n).split('+')[0]}")
        except PackageNotFoundError:  # a package missing here is simply not pinned
            continue
    return out


# --------------------------------------------------------------------------------------
# Model registry


def set_version_tags(settings: Settings, version: str, tags: dict[str, str]) -> None:
    from mlflow import MlflowClient

    configure(settings)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(settings.registry.model_name, version, key, value)


def champion(settings: Settings) -> tuple[str, dict[str, str]] | None:
    """(version, tags) of the model version holding the champion alias, or None."""
    return version_by_alias(settings, settings.registry.model_name, settings.registry.champion_alias)


def version_by_alias(settings: Settings, name: str, alias: str) -> tuple[str, dict[str, str]] | None:
    """(version, tags) of the version of model ``name`` holding ``alias``, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure(settings)
    try:
        mv = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return str(mv.version), dict(mv.tags or {})


@dataclass
class RegisteredVersion:
    """A registered model version as the web page's model page shows it: its aliases, the gate's
    decision (``role``: champion, challenger or retired, and why) and its run's metrics."""

    version: str
    aliases: list[str]
    role: str | None
    gate_reason: str | None
    registered_at: datetime
    run_id: str | None
    run_url: str | None
    metrics: dict[str, float]


SHOWN_METRICS = ("valid_ndcg_at_10", "test_ndcg_at_10", "test_hr_at_10", "test_mrr_at_10", "best_epoch", "train_seconds")


def registered_versions(settings: Settings) -> list[RegisteredVersion]:
    """Every version of the registered model, newest first, with its run's ``SHOWN_METRICS``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure(settings)
    client = MlflowClient()
    out = []
    for mv in client.search_model_versions(f"name = '{settings.registry.model_name}'", order_by=["version_number DESC"]):
        tags = dict(mv.tags or {})
        metrics: dict[str, float] = {}
        url = None
        if mv.run_id:
            try:
                run = client.get_run(mv.run_id)
            except MlflowException:  # the run was deleted: the version is still shown
                run = None
            if run is not None:
                metrics = {k: v for k, v in run.data.metrics.items() if k in SHOWN_METRICS}
                url = run_url(settings, mv.run_id)
        out.append(RegisteredVersion(str(mv.version), list(mv.aliases or []), tags.get("role"), tags.get("gate_reason"),
                                     datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC), mv.run_id or None,
                                     url, metrics))
    return out


def set_champion(settings: Settings, version: str) -> None:
    from mlflow import MlflowClient

    configure(settings)
    MlflowClient().set_registered_model_alias(settings.registry.model_name, settings.registry.champion_alias, version)


def download_bundle(settings: Settings, uri: str) -> Path:
    """A local bundle folder for a ``models:/name@alias`` or ``models:/name/version`` URI, cached
    under ``HOME/model_cache``: a version is downloaded once, and again when its cached model
    file no longer has the hash the registry recorded (a damaged cache is never served)."""
    ref = uri.removeprefix("models:/")
    current = _current_cached_bundle(settings, ref)
    if current is not None:
        return current
    store = settings.mlflow_tracking_uri.removeprefix("sqlite:///")
    if store != settings.mlflow_tracking_uri and not Path(store).exists():  # opening it would create it
        raise UserError(f"{uri}: no such model in the registry at {settings.mlflow_tracking_uri} "
                        f"(train one with `attnrec train`)")
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure(settings)
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, ver = ref.split("/", 1)
            mv = client.get_model_version(name, ver)
    except MlflowException as exc:
        versions = client.search_model_versions(f"name = '{name}'", max_results=1, order_by=["version_number DESC"])
        if "@" in ref and versions:  # models exist, none holds the alias: say why the newest does not
            newest = versions[0]
            raise UserError(f"{uri}: no version holds that alias; the newest, {name} v{newest.version}, was not "
                            f"promoted ({(newest.tags or {}).get('gate_reason', 'no gate decision')}): train a better "
                            f"model, or use it anyway with --model models:/{name}/{newest.version}") from exc
        raise UserError(f"{uri}: no such model in the registry at {settings.mlflow_tracking_uri} "
                        f"(train one with `attnrec train`)") from exc
    cache = settings.home / "model_cache" / f"{name}-v{mv.version}"
    expected = (mv.tags or {}).get("model_sha256")
    if not _cached_bundle_intact(cache / "bundle", expected):
        tmp = Path(tempfile.mkdtemp(dir=settings.home))
        try:
            try:
                with _quiet("mlflow"):  # MLflow logs "no artifacts found" at INFO before we say it in one line
                    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}",
                                                                     dst_path=str(tmp)))
                found = next(local.rglob("model.pt")).parent
            except (MlflowException, OSError, StopIteration) as exc:
                where = client.get_model_version_download_uri(name, mv.version)
                raise UserError(f"the files of {name} v{mv.version} are missing from the registry's artefact store "
                                f"({where}): retrain with `attnrec train`, or serve another version with --model") from exc
            if cache.exists():
                shutil.rmtree(cache)
            cache.mkdir(parents=True)
            shutil.move(str(found), cache / "bundle")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not _cached_bundle_intact(cache / "bundle", expected):
            raise UserError(f"the registry's copy of {name} v{mv.version} ({mv.source}) is damaged (its model file does "
                            "not have the hash recorded at registration): retrain with `attnrec train`")
    (cache / "bundle" / "VERSION").write_text(f"{name} v{mv.version}\n")
    return cache / "bundle"


def _current_cached_bundle(settings: Settings, ref: str) -> Path | None:
    """The cached bundle of ``ref`` (``name@alias`` or ``name/version``) when it is current,
    read straight from the embedded SQLite store, without importing MLflow (about a second of a
    warm CLI query). None, so that MLflow resolves ``ref``, when the store is not the embedded
    SQLite file, its tables are not the ones read here, or the cache is missing or damaged."""
    import sqlite3
    from contextlib import closing

    uri = settings.mlflow_tracking_uri
    db = Path(uri.removeprefix("sqlite:///"))
    if not uri.startswith("sqlite:///") or not db.is_file():
        return None
    if "@" in ref:
        name, alias = ref.split("@", 1)
        query, args = ("SELECT a.version, t.value FROM registered_model_aliases a JOIN model_version_tags t ON "
                       "t.name = a.name AND t.version = a.version AND t.key = 'model_sha256' "
                       "WHERE a.name = ? AND a.alias = ?"), (name, alias)
    else:
        name, version = ref.split("/", 1)
        query, args = ("SELECT version, value FROM model_version_tags WHERE name = ? AND version = ? "
                       "AND key = 'model_sha256'"), (name, version)
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as con:
            rows = con.execute(query, args).fetchall()
    except sqlite3.Error:
        return None
    if len(rows) != 1:
        return None
    bundle = settings.home / "model_cache" / f"{name}-v{rows[0][0]}" / "bundle"
    if not (bundle / "VERSION").exists() or not _cached_bundle_intact(bundle, rows[0][1]):
        return None
    return bundle


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Raise ``logger``'s level to WARNING for the block."""
    import logging

    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _cached_bundle_intact(folder: Path, sha256: str | None) -> bool:
    """Whether a cached bundle has its files and, where the registry recorded it, its model's hash."""
    model = folder / "model.pt"
    if not model.exists() or not (folder / "items.parquet").exists() or not (folder / "index" / "index.json").exists():
        return False
    if sha256 is None:
        return True
    digest = hashlib.sha256()
    with open(model, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == sha256


# --------------------------------------------------------------------------------------
# Runs and versions left behind by a killed process


def recover_interrupted(settings: Settings) -> list[str]:
    """Mark the training runs of this host whose process is gone FAILED, and remove the registered
    versions that never got a gate decision (no ``role`` tag) because their run was killed.

    Returns what was done, one line each. Called when a training starts, so a ``kill -9`` is
    cleaned up on the next start at the latest.
    """
    from mlflow import MlflowClient

    experiment = configure(settings)
    client = MlflowClient()
    done = []
    host = platform.node()
    for run in client.search_runs([experiment], "attributes.status = 'RUNNING' AND tags.type = 'train'"):
        tags = run.data.tags
        if tags.get("host") == host and tags.get("pid", "").isdigit() and not _alive(int(tags["pid"])):
            client.set_terminated(run.info.run_id, "FAILED")
            done.append(f"run {run.info.run_id} (process {tags['pid']} is gone): FAILED")
    name = settings.registry.model_name
    for mv in client.search_model_versions(f"name = '{name}'"):
        if "role" in (mv.tags or {}):
            continue
        status = client.get_run(mv.run_id).info.status if mv.run_id else "FAILED"
        if status != "RUNNING":
            client.delete_model_version(name, mv.version)
            done.append(f"{name} v{mv.version} (registered by a run that ended before its gate decision): removed")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
