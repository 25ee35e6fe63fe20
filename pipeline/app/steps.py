"""The pipeline's steps as plain functions of the settings: what the Prefect flows wrap.

Each step opens and closes what it needs (warehouse, feature set, model bundle) and
returns a small JSON-able summary, so a flow's task results stay readable in Prefect.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Settings
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.training.loop import EpochRecord


def inbox_files(settings: Settings) -> list[Path]:
    """Data files waiting in the inbox folder (already-ingested ones are skipped by ingest)."""
    from pipeline.data.ingest_formats import DATA_SUFFIXES

    if not settings.inbox.exists():
        return []
    return sorted(p for p in settings.inbox.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                  and not p.name.startswith("."))


def ingest_events(settings: Settings, paths: list[str | Path]) -> list[dict[str, Any]]:
    from pipeline.data.ingest import IngestOptions, ingest_paths
    from pipeline.data.ingest_formats import expand_paths
    from pipeline.data.warehouse import open_warehouse

    files = expand_paths(paths) if paths else []
    if not files:
        return []
    with open_warehouse(settings.duckdb_path) as con:
        return [r.as_dict() for r in ingest_paths(con, files, IngestOptions(), settings.tmp_dir)]


def ingest_catalog(settings: Settings, paths: list[str | Path], id_map: str | None = None) -> list[dict[str, Any]]:
    from pipeline.data.catalog import ingest_items
    from pipeline.data.warehouse import open_warehouse

    with open_warehouse(settings.duckdb_path) as con:
        return [ingest_items(con, Path(p), id_map=Path(id_map) if id_map else None).as_dict() for p in paths]


def expected_feature_version(settings: Settings) -> str:
    """The version the feature set built from the warehouse as it is now would get."""
    from pipeline.data.feature_store import feature_params, feature_version, source_fingerprint
    from pipeline.data.warehouse import open_warehouse

    with open_warehouse(settings.duckdb_path, read_only=True) as con:
        source = source_fingerprint(con, settings.features.event_types)
    return feature_version(source, feature_params(settings.features))


def build_features(settings: Settings, force: bool = False) -> dict[str, Any]:
    from pipeline.data.feature_store import build_feature_set
    from pipeline.data.warehouse import open_warehouse

    with open_warehouse(settings.duckdb_path, read_only=True) as con:
        path, built = build_feature_set(con, settings, force=force)
    return {"path": str(path), "version": path.name, "built": built}


def set_current_features(settings: Settings, version: str) -> None:
    """Point ``features/CURRENT`` at ``version`` (a cached feature-set result did not)."""
    from pipeline.data.feature_store import set_current

    set_current(settings.features_dir, version)


def champion_feature_version(settings: Settings) -> str | None:
    """The feature set the current champion was trained on (None without a champion)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.registry.tracking import configure

    configure(settings)
    try:
        mv = MlflowClient().get_model_version_by_alias(settings.registry.model_name, settings.registry.champion_alias)
    except MlflowException:
        return None
    return (mv.tags or {}).get("feature_version")


def train(settings: Settings, on_epoch: Callable[[EpochRecord], None] | None = None) -> dict[str, Any]:
    """Train, track and gate a model on the current feature set; ``on_epoch`` sees every epoch's record."""
    from pipeline.data.feature_store import current_feature_set, load_feature_set
    from pipeline.registry.tracking import tracked_train

    fs = load_feature_set(current_feature_set(settings))
    result = tracked_train(settings, fs, progress=False, on_epoch=on_epoch)
    return {"mlflow_run_id": result.run_id, "version": result.version, "promoted": result.promoted,
            "gate_reason": result.gate_reason, "valid_ndcg@10": result.valid["ndcg@10"],
            "test_ndcg@10": result.test["ndcg@10"], "test_hr@10": result.test["hr@10"],
            "epochs_run": result.epochs_run, "seconds": round(result.seconds, 1)}


def evaluate(settings: Settings, split: str = "test", baseline: str | None = None, model: str | None = None) -> dict[str, Any]:
    from pipeline.data.feature_store import current_feature_set, load_feature_set
    from pipeline.registry.resolution import resolve_bundle
    from pipeline.registry.model_store import check_vocabulary, load_model
    from pipeline.training.recipe import baseline_model, evaluate_model, sasrec_scorer
    from pipeline.registry.tracking import tracked_evaluation
    from pipeline.training.loop import resolve_device

    fs = load_feature_set(current_feature_set(settings))
    device = resolve_device(settings.device)
    if baseline:
        scorer, name, max_len = baseline_model(baseline, fs).to(device), baseline, settings.model.max_len
    else:
        path = resolve_bundle(settings, model)
        net, meta = load_model(path / "model.pt", device)
        check_vocabulary(meta, fs)
        label = path / "VERSION"
        name = label.read_text().strip() if label.exists() else str(path)
        scorer, max_len = sasrec_scorer(net), net.max_len
    report = {"model": name, "split": split, "feature_set": fs.version, **evaluate_model(scorer, fs, split, max_len, device)}
    report["mlflow_run_id"] = tracked_evaluation(settings, name, report)
    return report


def build_index(settings: Settings, kind: str = "auto", model: str | None = None,
                params: dict[str, int] | None = None) -> dict[str, Any]:
    """(Re)build the FAISS index next to a model bundle; ``params`` as in ``rebuild_index``."""
    from dataclasses import asdict

    from pipeline.registry.resolution import resolve_bundle
    from pipeline.serving.query import rebuild_index

    path = resolve_bundle(settings, model)
    meta = rebuild_index(path, kind, params=params)
    return {"bundle": str(path), **asdict(meta)}


def recommend_everyone(settings: Settings, k: int = 50, out: str | Path | None = None, model: str | None = None,
                       table: str = "recommendations") -> dict[str, Any]:
    from pipeline.serving.batch import recommend_all
    from pipeline.registry.resolution import resolve_bundle
    from pipeline.serving.query import HistoryStore, ModelBundle

    bundle = ModelBundle(resolve_bundle(settings, model))
    target = Path(out) if out else settings.home / "recommendations.parquet"
    report = recommend_all(bundle, HistoryStore(settings.duckdb_path), k, target.resolve(), settings.duckdb_path, table)
    return {"users": report.users, "rows": report.rows, "fallback_users": report.fallback_users,
            "seconds": round(report.seconds, 2), "parquet": str(report.parquet), "table": report.table,
            "model_version": bundle.version}


def require_events(settings: Settings) -> None:
    if not settings.duckdb_path.exists():
        raise UserError(f"no warehouse at {settings.duckdb_path}: ingest events first")
