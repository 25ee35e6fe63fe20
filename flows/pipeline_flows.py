"""Prefect flows: thin wrappers of the step functions in ``pipeline.app.steps`` (the ones the CLI calls).

Flows: ``ingest``, ``build-features``, ``train``, ``evaluate``, ``build-index``,
``recommend-all`` and ``attnrec-pipeline``, which chains them: ingest new files from the
inbox -> features (cached while the warehouse is unchanged) -> train + promotion gate (the
bundle's index is built there) -> the champion's index kept, or rebuilt when another kind is
asked for -> batch recommendations. Tasks that do I/O retry; the training task does not.

With ``engine = "ray"`` (in ``overrides`` or the settings) the fan-out runs on Ray: batch
scoring is one ``recommend-partition`` task per user partition on ``prefect_ray``'s
``RayTaskRunner`` (subflow ``recommend-partitions``), and ``train.workers`` > 1 trains with
torch DDP on Ray Train.

Every flow takes ``home`` (the attnrec state folder) and ``overrides`` (settings, e.g.
``{"train.epochs": 5}``), so one Prefect server can drive several installations.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.app import steps
from pipeline.config import Baseline, EvalSplit, IndexKind, Settings, load_settings
from pipeline.data.histories import UserRange

if TYPE_CHECKING:
    from pipeline.training.loop import EpochRecord


def _settings(home: str | None, overrides: dict[str, Any] | None) -> Settings:
    return load_settings(home=home, **(overrides or {}))


@task(name="ingest-events", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def ingest_events_task(settings: Settings, paths: list[str]) -> list[dict[str, Any]]:
    reports = [r.as_dict() for r in steps.ingest_events(settings, paths)]
    log = get_run_logger()
    for r in reports:
        log.info("%s: %s loaded, %s duplicate, %s quarantined", r["path"], r["loaded"], r["duplicates"], r["quarantined"])
    return reports


@task(name="ingest-items", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def ingest_items_task(settings: Settings, paths: list[str], id_map: str | None = None) -> list[dict[str, Any]]:
    return [r.as_dict() for r in steps.ingest_catalog(settings, paths, id_map=id_map)]


def _features_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Same warehouse content + same feature parameters in the same state folder = same key."""
    settings: Settings = parameters["settings"]
    version = steps.expected_feature_version(settings)
    return "features-" + hashlib.sha256(f"{settings.home}|{version}".encode()).hexdigest()[:32]


@task(name="build-features", retries=2, retry_delay_seconds=5, cache_key_fn=_features_cache_key, persist_result=True)
def build_features_task(settings: Settings) -> dict[str, Any]:
    result = {k: v for k, v in steps.build_features(settings).items() if k != "manifest"}
    get_run_logger().info("feature set %s %s", result["version"], "built" if result["built"] else "reused")
    return result


def features_for(settings: Settings) -> dict[str, Any]:
    """The feature set for the warehouse as it is: Prefect's cache while unchanged, rebuilt if deleted."""
    result = build_features_task(settings)
    if not (Path(result["path"]) / "manifest.json").exists():
        result = build_features_task.with_options(refresh_cache=True)(settings)
    steps.set_current_features(settings, result["version"])
    return result


@task(name="train-and-gate", cache_policy=NO_CACHE)
def train_task(settings: Settings, index_kind: IndexKind = "auto") -> dict[str, Any]:
    log = get_run_logger()

    def log_epoch(rec: EpochRecord) -> None:
        valid = rec.valid.get("ndcg@10")
        log.info("epoch %d/%d: loss %.4f, %.0f sequences/s%s", rec.epoch, rec.max_epochs, rec.loss,
                 rec.samples_per_s, f", valid NDCG@10 {valid:.4f}" if valid is not None else "")

    result = steps.train(settings, on_epoch=log_epoch, index_kind=index_kind,
                         on_note=log.info)
    role = "champion" if result["promoted"] else "challenger"
    log.info("MLflow run %s: test NDCG@10 %.4f; %s v%s %s (%s)", result["mlflow_run_url"], result["test_ndcg@10"],
             settings.registry.model_name, result["version"], "promoted" if result["promoted"] else "not promoted",
             result["gate_reason"])
    create_table_artifact(
        key="training-metrics",
        table=[{"model": name, **{k: round(v, 4) for k, v in m.items()}} for name, m in result["report"].items()],
        description=(f"{settings.registry.model_name} v{result['version']} ({role}: {result['gate_reason']}) on the test "
                     "split beside the champion and the baselines; full ranking, seen items excluded"),
    )
    create_link_artifact(key="training-mlflow-run", link=result["mlflow_run_url"], link_text=f"MLflow run of v{result['version']}",
                         description=f"the MLflow run (store {settings.mlflow_tracking_uri})")
    return result


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(settings: Settings, split: str, baseline: str | None, model: str | None,
                  keep_seen: bool = False) -> dict[str, Any]:
    report = steps.evaluate(settings, split, baseline, model, keep_seen=keep_seen)
    get_run_logger().info("%s on %s: NDCG@10 %.4f (MLflow run %s)", report["model"], split, report["ndcg@10"],
                          report["mlflow_run_id"])
    return report


@task(name="build-index", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def build_index_task(settings: Settings, kind: str, model: str | None, rebuild: bool = True,
                     shards: int = 1) -> dict[str, Any]:
    meta = (steps.build_index(settings, kind, model, {"shards": shards}) if rebuild
            else steps.ensure_index(settings, kind, model))
    get_run_logger().info("%s index of %s items, recall@10 %.4f (%s)", meta["kind"], meta["num_items"],
                          meta["recall_at_10"], "built" if meta["rebuilt"] else "kept: built with the model")
    return meta


@task(name="recommend-partition", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def recommend_partition_task(settings: Settings, bundle: str, k: int, users: UserRange, out: Path) -> dict[str, Any]:
    report = steps.recommend_partition(settings, bundle, k, users, out)
    get_run_logger().info("users %s-%s: %s rows -> %s", users.first, users.last, report["rows"], report["file"])
    return report


@flow(name="recommend-partitions")
def recommend_partitions_flow(settings: Settings, bundle: str, k: int, ranges: list[UserRange],
                              files: list[Path]) -> list[dict[str, Any]]:
    """The fan-out of batch scoring on Ray: one ``recommend-partition`` task per user range,
    run on Ray's task runner (``ray_task_runner_partitions`` gives it that runner)."""
    futures = recommend_partition_task.map(unmapped(settings), unmapped(bundle), unmapped(k), ranges, files)
    return [f.result() for f in futures]


def ray_task_runner_partitions(settings: Settings, bundle: str, k: int, ranges: list[UserRange],
                               files: list[Path]) -> list[dict[str, Any]]:
    """``steps.recommend_everyone``'s partition runner in the flows: ``recommend-partitions`` on
    ``prefect_ray.RayTaskRunner`` (it uses the Ray connection the step opened)."""
    from prefect_ray import RayTaskRunner

    runner = RayTaskRunner(address=settings.ray_address)
    return recommend_partitions_flow.with_options(task_runner=runner)(settings, bundle, k, ranges, files)


@task(name="recommend-all", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def recommend_all_task(settings: Settings, k: int, out: str | None, model: str | None) -> dict[str, Any]:
    report = steps.recommend_everyone(settings, k, out, model,
                                      run_partitions=ray_task_runner_partitions if settings.engine == "ray" else None)
    get_run_logger().info("%s recommendations for %s users from %s -> %s and table %s", report["rows"], report["users"],
                          report["model_version"], report["file"], report["table"])
    return report


@flow(name="ingest")
def ingest_flow(paths: list[str] | None = None, item_files: list[str] | None = None, id_map: str | None = None,
                home: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ingest event files and item catalogue files into the warehouse, each file exactly once.

    Args:
        paths: event files, folders or globs (default: everything waiting in the inbox).
        item_files: item catalogue files (titles, categories, text).
        id_map: a file mapping the catalogue's ids to the events' ids, when they differ.
        home: the attnrec state folder (default: $ATTNREC_HOME or ./.attnrec).
        overrides: settings by dotted name, e.g. {"train.epochs": 5}; an unknown name fails the run.
    """
    s = _settings(home, overrides)
    files = paths if paths is not None else [str(p) for p in steps.inbox_files(s)]
    events = ingest_events_task(s, files) if files else []
    items = ingest_items_task(s, item_files, id_map) if item_files else []
    return {"events": events, "items": items}


@flow(name="build-features")
def build_features_flow(home: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the versioned feature set of the warehouse as it is (reused while it is unchanged).

    Args:
        home: the attnrec state folder (default: $ATTNREC_HOME or ./.attnrec).
        overrides: settings by dotted name, e.g. {"train.epochs": 5}; an unknown name fails the run.
    """
    return features_for(_settings(home, overrides))


@flow(name="train")
def train_flow(index_kind: IndexKind = "auto", home: str | None = None,
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train on the current feature set, register the model and apply the promotion gate.

    Args:
        index_kind: the FAISS index of the model's bundle (auto: exact up to 50,000 items, else HNSW).
        home: the attnrec state folder (default: $ATTNREC_HOME or ./.attnrec).
        overrides: settings by dotted name, e.g. {"train.epochs": 5}; an unknown name fails the run.
    """
    s = _settings(home, overrides)
    features_for(s)
    return train_task(s, index_kind)


@flow(name="evaluate")
def evaluate_flow(split: EvalSplit = "test", baseline: Baseline | None = None, model: str | None = None,
                  keep_seen: bool = False, home: str | None = None,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Full-ranking HR, NDCG, MRR and coverage at K of a model or a baseline, kept as an MLflow run.

    Args:
        split: the split to measure on.
        baseline: measure this baseline instead of a model.
        keep_seen: also rank the items each user has seen (repeat consumption), beside the default.
        model: a model URI such as models:/attnrec/3, or a bundle folder (default: the champion).
        home: the attnrec state folder (default: $ATTNREC_HOME or ./.attnrec).
        overrides: settings by dotted name, e.g. {"train.epochs": 5}; an unknown name fails the run.
    """
    return evaluate_task(_settings(home, overrides), split, baseline, model, keep_seen)


@flow(name="build-index")
def build_index_flow(kind: IndexKind = "auto", model: str | None = None, home: str | None = None,
                     overrides: dict[str, Any] | None = None, shards: int = 1) -> dict[str, Any]:
    """Rebuild the FAISS index of a model's bundle; its recall@10 is measured against exact search.

    Args:
        kind: the FAISS index (auto: exact up to 50,000 items, else HNSW).
        shards: split the items over this many indexes, searched together (one per GPU when
            FAISS sees GPUs; in parallel threads on the CPU).
        model: a model URI such as models:/attnrec/3, or a bundle folder (default: the champion).
        home: the attnrec state folder (default: $ATTNREC_HOME or ./.attnrec).
        overrides: settings by dotted name, e.g. {"train.epochs": 5}; an unknown name fails the run.
    """
    return build_index_task(_settings(home, overrides), kind, model, shards=shards)


@flow(name="recommend-all")
def recommend_all_flow(k: int = 50, out: str | None = None, model: str | None = None, home: str | None = None,
                       overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Top-k recommendations for every user, to the DuckDB table and a file.

    Args:
        k: recommendations per user.
        out: the file to write (.parquet, .csv or .ndjson; default: recommendations.parquet in the state folder).
        model: a model URI such as models:/attnrec/3, or a bundle folder (default: the champion).
        home: the attnrec state folder (default: $ATTNREC_HOME or ./.attnrec).
        overrides: settings by dotted name, e.g. {"train.epochs": 5}; an unknown name fails the run.
    """
    return recommend_all_task(_settings(home, overrides), k, out, model)


@flow(name="attnrec-pipeline")
def attnrec_pipeline(event_files: list[str] | None = None, item_files: list[str] | None = None,
                     id_map: str | None = None, k: int = 50, index_kind: IndexKind = "auto", force_train: bool = False,
                     home: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ingest new files -> features -> train + gate -> index -> batch recommendations.

    Training is skipped when the champion was trained on this feature set with these training
    settings (unless ``force_train``); the champion then keeps serving and is re-indexed /
    re-scored. Changed data or changed ``train.*`` / ``model.*`` overrides train.

    Args:
        event_files: event files, folders or globs (default: everything waiting in the inbox).
        item_files: item catalogue files (titles, categories, text).
        id_map: a file mapping the catalogue's ids to the events' ids, when they differ.
        k: recommendations per user in the batch output.
        index_kind: the FAISS index of the model's bundle (auto: exact up to 50,000 items, else HNSW).
        force_train: train even when the champion was trained on this data with these settings.
        home: the attnrec state folder (default: $ATTNREC_HOME or ./.attnrec).
        overrides: settings by dotted name, e.g. {"train.epochs": 5}; an unknown name fails the run.
    """
    log = get_run_logger()
    s = _settings(home, overrides)
    files = event_files if event_files is not None else [str(p) for p in steps.inbox_files(s)]
    ingested = ingest_events_task(s, files) if files else []
    if item_files:
        ingest_items_task(s, item_files, id_map)
    features = features_for(s)
    trained: dict[str, Any] | None = None
    reason = "force_train" if force_train else steps.why_train(s, features["version"])
    if reason:
        log.info("training: %s", reason)
        trained = train_task(s, index_kind)
    else:
        log.info("training skipped: the champion was trained on feature set %s with these settings "
                 "(force_train=true trains anyway)", features["version"])
    index = build_index_task(s, index_kind, None, rebuild=False)
    recs = recommend_all_task(s, k, None, None)
    return {"ingested": ingested, "features": features, "trained": trained, "index": index, "recommendations": recs,
            "mlflow_run_id": trained["mlflow_run_id"] if trained else None, "home": str(Path(s.home))}
