"""The application layer: one function per pipeline step, called by the CLI and the Prefect flows alike.

Each step takes the settings, opens and closes what it needs (warehouse, feature set, model
bundle, MLflow store) and returns a small JSON-able summary, so a flow's task results stay
readable in Prefect. The training orchestration (train -> bundle -> test metrics and
baselines -> MLflow run -> registry -> promotion gate) and the gate itself live here;
``pipeline.registry.tracking`` only does the MLflow I/O they ask for.

Imports are made inside the steps, so a light command (``attnrec stats``) loads neither
torch nor MLflow.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pipeline.config import Baseline, EvalSplit, Settings
from pipeline.errors import UserError

if TYPE_CHECKING:
    import polars as pl

    from pipeline.data.catalog import CatalogReport
    from pipeline.data.feature_store import FeatureSet
    from pipeline.data.histories import UserRange
    from pipeline.data.ingest import IngestOptions, IngestReport
    from pipeline.data.warehouse import WarehouseStats
    from pipeline.registry.model_store import Bundle
    from pipeline.training.evaluation import Scorer, ShareRunner
    from pipeline.training.loop import EpochRecord

TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
ATTENTION_EXAMPLE_USERS = 3     # heatmaps in a training run's report
ATTENTION_EXAMPLE_ITEMS = 15    # the history items with the most attention each heatmap shows
ATTENTION_CANDIDATE_USERS = 200  # users the informative examples are chosen from
SPLIT_WORDS = {"loo": "leave-one-out: each user's last event is the test item, the one before it the validation item",
               "temporal": "temporal: events from the split time on are the test items"}


# --------------------------------------------------------------------------------------
# Data


def inbox_files(settings: Settings) -> list[Path]:
    """Data files waiting in the inbox folder (already-ingested ones are skipped by ingest)."""
    from pipeline.data.ingest_formats import DATA_SUFFIXES

    if not settings.inbox.exists():
        return []
    return sorted(p for p in settings.inbox.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                  and not p.name.startswith("."))


def ingest_events(settings: Settings, paths: list[str | Path], options: IngestOptions | None = None,
                  progress: bool = False, on_report: Callable[[IngestReport], None] | None = None) -> list[IngestReport]:
    """Load event files (paths, folders, globs) exactly once; one transaction per file. Under
    ``engine = "ray"`` the files are read and checked in parallel, one Ray task each
    (``pipeline.scale.ingest``), committed here in order, and the new events are then also
    copied into the partitioned event dataset (``pipeline.data.event_dataset``)."""
    from pipeline.data.ingest import IngestOptions, ingest_paths
    from pipeline.data.ingest_formats import expand_paths
    from pipeline.data.warehouse import open_warehouse

    files = expand_paths(paths) if paths else []
    if not files:
        return []
    options = options or IngestOptions()
    with open_warehouse(settings.duckdb_path) as con:
        if settings.engine == "ray":
            from pipeline.data.event_dataset import sync
            from pipeline.scale.cluster import ray_connection
            from pipeline.scale.ingest import stage_on_ray

            with ray_connection(settings):
                reports = ingest_paths(con, files, options, settings.tmp_dir, on_report=on_report, stage=stage_on_ray)
            sync(con, settings.events_dir, settings.event_buckets)  # Ray workers read the events by user bucket
        else:
            reports = ingest_paths(con, files, options, settings.tmp_dir, progress=progress, on_report=on_report)
    return reports


def ingest_catalog(settings: Settings, paths: list[str | Path], fmt: str = "auto", id_map: str | Path | None = None,
                   item_col: str | None = None, numeric_cols: list[str] | None = None, strict: bool = False,
                   on_report: Callable[[CatalogReport], None] | None = None) -> list[CatalogReport]:
    """Load item content files (titles, categories, text, numeric fields)."""
    from pipeline.data.catalog import ingest_items
    from pipeline.data.warehouse import open_warehouse

    reports = []
    with open_warehouse(settings.duckdb_path) as con:
        for p in paths:
            report = ingest_items(con, Path(p), fmt, Path(id_map) if id_map else None, item_col, numeric_cols, strict)
            reports.append(report)
            if on_report:
                on_report(report)
    return reports


def warehouse_summary(settings: Settings) -> WarehouseStats:
    from pipeline.data.warehouse import open_warehouse, warehouse_stats

    with open_warehouse(settings.duckdb_path, read_only=True) as con:
        return warehouse_stats(con)


def expected_feature_version(settings: Settings) -> str:
    """The version the feature set built from the warehouse as it is now would get."""
    from pipeline.data.feature_store import feature_params, feature_version, source_fingerprint
    from pipeline.data.warehouse import open_warehouse

    with open_warehouse(settings.duckdb_path, read_only=True) as con:
        source = source_fingerprint(con, settings.features.event_types)
    return feature_version(source, feature_params(settings.features))


def build_features(settings: Settings, force: bool = False) -> dict[str, Any]:
    """Build (or reuse, for an unchanged warehouse) the feature set; it becomes the current one.
    Under ``engine = "ray"`` the histories are built on Ray, one task per user bucket of the
    event dataset (synced first)."""
    from pipeline.data.feature_store import build_feature_set
    from pipeline.data.warehouse import open_warehouse

    with open_warehouse(settings.duckdb_path, read_only=True) as con:
        if settings.engine == "ray":
            from functools import partial

            from pipeline.data.event_dataset import sync
            from pipeline.scale.cluster import ray_connection
            from pipeline.scale.features import history_pieces_on_ray

            sync(con, settings.events_dir, settings.event_buckets)  # events ingested before engine = ray too
            with ray_connection(settings):
                path, built = build_feature_set(con, settings, force=force, pieces_of=partial(
                    history_pieces_on_ray, settings.events_dir, settings.event_buckets, settings.features.event_types))
        else:
            path, built = build_feature_set(con, settings, force=force)
    manifest = json.loads((path / "manifest.json").read_text())
    return {"path": str(path), "version": path.name, "built": built, "manifest": manifest}


def set_current_features(settings: Settings, version: str) -> None:
    """Point ``features/CURRENT`` at ``version`` (a cached feature-set result did not)."""
    from pipeline.data.feature_store import set_current

    set_current(settings.features_dir, version)


def _current_feature_set(settings: Settings) -> FeatureSet:
    from pipeline.data.feature_store import current_feature_set, load_feature_set

    return load_feature_set(current_feature_set(settings))


# --------------------------------------------------------------------------------------
# Training, tracking and the promotion gate


def training_fingerprint(settings: Settings) -> str:
    """A hash of the settings that shape a trained model (``model``, ``train`` but the test
    report's ``test_users``, ``device``)."""
    import hashlib

    shaping = settings.model_dump(mode="json", include={"model", "train", "device"}, exclude={"train": {"test_users"}})
    blob = json.dumps(shaping, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def why_train(settings: Settings, feature_version: str) -> str | None:
    """Why the pipeline should train now, or None when the champion already is this training:
    no champion, a changed feature set (new data), or changed training settings."""
    from pipeline.registry.tracking import champion

    current = champion(settings)
    if current is None:
        return "no champion yet"
    version, tags = current
    if tags.get("feature_version") != feature_version:
        return f"the data changed: feature set {feature_version}, champion v{version} has {tags.get('feature_version')}"
    if tags.get("training_settings", training_fingerprint(settings)) != training_fingerprint(settings):
        return f"the training settings differ from champion v{version}'s"
    return None


def train(settings: Settings, resume: Path | None = None, progress: bool = False,
          on_epoch: Callable[[EpochRecord], None] | None = None, index_kind: str = "auto",
          baselines: bool = True, register: bool = True, on_note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train on the current feature set, write the bundle (with its index, built once), measure
    test metrics next to the baselines, track it all in one MLflow run, register the model and
    apply the promotion gate. ``resume``: a run folder to continue from its checkpoint.
    ``on_note`` hears, before the first epoch, each setting fitted to the data and why, and
    whether item texts were encoded. ``train.workers`` > 1 trains on the engine's Ray cluster
    (``pipeline.scale.training``) and, on the CPU, scores the test report's users there too,
    in as many Ray tasks (``pipeline.scale.evaluation``), over one connection."""
    from pipeline.registry import tracking
    from pipeline.registry.model_store import BUNDLE_DIR, write_bundle
    from pipeline.training.evaluation import evaluation_report
    from pipeline.training.loop import resolve_device
    from pipeline.training.data_defaults import fit_to_data
    from pipeline.training.recipe import (
        BASELINES,
        baseline_model,
        check_table_updates,
        SasrecScorer,
        train_sasrec,
        validation_queries,
    )

    fs = _current_feature_set(settings)
    fingerprint = training_fingerprint(settings)  # of the settings as given ("auto" included)
    settings, fitted = fit_to_data(settings, fs)
    for note in fitted:
        if on_note:
            on_note(f"fitted to the data: {note}")
    if resume is not None and not (resume / "checkpoint.pt").exists():
        raise UserError(f"--resume {resume}: no checkpoint.pt in that folder")
    device = resolve_device(settings.device)
    check_table_updates(settings.train, device)
    tracking.recover_interrupted(settings)
    metric = settings.train.selection_metric
    tags = {**tracking.system_tags(str(device)), "type": "train", "feature_version": fs.version,
            "fitted_to_data": "; ".join(fitted) or "nothing: every setting given"}
    data = f"{fs.num_users:,} users x {fs.num_items:,} items"
    on_ray = settings.train.workers > 1
    shares: tuple[ShareRunner, int] | None = None
    if on_ray and device.type == "cpu":  # one GPU ranks as fast as several CPU tasks
        from pipeline.scale.evaluation import shares_on_ray

        shares = (shares_on_ray, settings.train.workers)
    with ExitStack() as cluster, tracking.tracked_run(settings, f"train {data}, features {fs.version[:8]}", tags) as run_id:
        if shares:  # one connection for training and the test report (on a GPU training opens its own)
            from pipeline.scale.cluster import ray_connection

            cluster.enter_context(ray_connection(settings))
        tracking.log_feature_set(fs.path, fs.version, fs.manifest["counts"])
        params = tracking.flatten(settings.model_dump(mode="json", include={"model", "train", "features", "device"}))
        params.update({"feature_set.version": fs.version, "feature_set.fingerprint": fs.manifest["source"]["fingerprint"],
                       **{f"feature_set.{k}": v for k, v in fs.manifest["counts"].items()},
                       "feature_set.split": fs.manifest["split"]["kind"], "index.kind": index_kind})
        tracking.log_params(params)

        def log_epoch(rec: EpochRecord) -> None:
            metrics = {"loss": rec.loss, "throughput_seq_per_s": rec.samples_per_s, "epoch_seconds": rec.seconds,
                       "valid_seconds": rec.valid_seconds}
            metrics.update({tracking.metric_name(k, "valid_"): v for k, v in rec.valid.items() if k != "users"})
            tracking.log_metrics(metrics, step=rec.epoch)
            if on_epoch:
                on_epoch(rec)

        # --- train, then write the bundle: model, item table, FAISS index (recall on real queries)
        if settings.train.workers > 1:  # torch DDP on Ray Train, the same recipe in every worker
            from pipeline.scale.training import train_sasrec_on_ray

            outcome = train_sasrec_on_ray(settings, fs, run_dir=resume, resume=resume is not None, on_epoch=log_epoch,
                                          note=on_note or (lambda line: None))
        else:
            outcome = train_sasrec(settings, fs, run_dir=resume, resume=resume is not None, progress=progress,
                                   on_epoch=log_epoch, note=on_note or (lambda line: None))
        fit = outcome.fit
        bundle = write_bundle(outcome.run_dir / BUNDLE_DIR, outcome.model, outcome.shape, fs.items, fs.version,
                              validation_queries(outcome.model, fs), index_kind,
                              extra={"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run})
        (outcome.run_dir / "training.json").write_text(json.dumps({
            "feature_version": fs.version, "device": str(device), "best_epoch": fit.best_epoch,
            "epochs_run": fit.epochs_run, "stopped_early": fit.stopped_early, "seconds": fit.seconds,
            "valid": outcome.valid, "settings": settings.model_dump(mode="json", include={"model", "train", "features"}),
            "history": [vars(h) for h in fit.history],
        }, indent=2, default=str))
        (settings.runs_dir / "LATEST").write_text(outcome.run_dir.name + "\n")
        tracking.set_tags({"run_dir": str(outcome.run_dir)})
        tracking.log_metrics({tracking.metric_name(k, "valid_"): v for k, v in outcome.valid.items() if k != "users"})
        tracking.log_metrics({"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run, "train_seconds": fit.seconds})

        # --- test metrics, side by side with the champion and the baselines (checkpoint chosen on validation)
        test_users = settings.train.test_users  # every row ranks the same users: all, or this fixed sample
        test = evaluation_report(SasrecScorer(outcome.model), fs, "test", settings.model.max_len, device, sample=test_users,
                                 shares=shares)
        scored_on = scored_where(shares)
        tracking.set_tags({"test_users": "all" if test_users is None else str(test["users"]), "test_scored_on": scored_on})
        tested_on = "" if test_users is None else f" on a sample of {test['users']:,} users"
        tracking.log_metrics({tracking.metric_name(k, "test_"): v for k, v in test.items() if isinstance(v, float)})
        others: dict[str, dict[str, Any]] = {}
        current = tracking.champion(settings) if register else None
        if current is not None and (champion := registered_scorer(settings, fs, current[0])) is not None:
            others[f"champion v{current[0]}"] = evaluation_report(champion[0], fs, "test", champion[1], device,
                                                                  sample=test_users, shares=shares)
        if baselines:
            for name in BASELINES:
                others[name] = evaluation_report(baseline_model(name, fs).to(device), fs, "test", settings.model.max_len,
                                                 device, sample=test_users, shares=shares)
                tracking.log_metrics({f"baseline_{name}_test_ndcg_at_10": others[name]["ndcg@10"]})

        # --- register, then the gate decides who serves
        version, promoted, reason = None, False, "not registered"
        if register:
            version = tracking.log_bundle_model(bundle.path, settings.registry.model_name)
            tracking.set_version_tags(settings, version, {"model_sha256": bundle.meta["sha256"],
                                                          "training_settings": fingerprint})
            promoted, reason = promotion_gate(settings, fs, version, outcome.valid[metric])
            tracking.set_tags({"registered_version": str(version), "promoted": str(promoted), "gate_reason": reason})
            tracking.set_run_name(f"train {data}, features {fs.version[:8]} -> {settings.registry.model_name} v{version}")
            tracking.describe_version(settings, version, (
                f"Trained on feature set {fs.version} ({data}, split {fs.manifest['split']['kind']}), "
                f"best epoch {fit.best_epoch} of {fit.epochs_run}. Validation {metric.upper()} "
                f"{outcome.valid[metric]:.4f}; test NDCG@10 {test['ndcg@10']:.4f}, HR@10 {test['hr@10']:.4f}{tested_on}. "
                f"Gate: {'champion' if promoted else 'challenger'} ({reason})."))
        label = f"attnrec v{version} (this run)" if version else "attnrec (this run)"
        rows = {label: test, **others}
        _log_run_artefacts(fs, bundle, rows, fit.history,
                           gate=f"{'champion' if promoted else 'challenger'}: {reason}" if register else None)
        run_url = tracking.run_url(settings, run_id)
    return {"mlflow_run_id": run_id, "mlflow_run_url": run_url, "version": version, "promoted": promoted, "gate_reason": reason,
            "run_dir": str(outcome.run_dir), "bundle": str(bundle.path), "best_epoch": fit.best_epoch,
            "epochs_run": fit.epochs_run, "seconds": round(fit.seconds, 1), "valid": outcome.valid,
            "test": {k: v for k, v in test.items() if k != "cold_start"}, "cold_start": test.get("cold_start"),
            "test_scored_on": scored_on,
            "index": {"kind": bundle.index_meta.kind, "recall_at_10": bundle.index_meta.recall_at_10},
            "valid_ndcg@10": outcome.valid["ndcg@10"], "test_ndcg@10": test["ndcg@10"], "test_hr@10": test["hr@10"],
            "selection_metric": metric, "feature_version": fs.version, "fitted_to_data": fitted,
            "report": {name: {k: m[k] for k in ("ndcg@10", "hr@10", "mrr@10")} for name, m in rows.items()},
            "baselines": {k: others[k]["ndcg@10"] for k in BASELINES if k in others}}


def _log_run_artefacts(fs: FeatureSet, bundle: Bundle, rows: dict[str, dict[str, Any]],
                       history: list[EpochRecord], gate: str | None) -> None:
    """The evaluation report (this model beside the champion and the baselines, on the test split),
    the training curve, attention heatmaps of informative users (answered by the query path) and
    the index description, as artefacts of the active MLflow run."""
    import tempfile

    from pipeline.registry.model_store import INDEX_DIR
    from pipeline.registry.run_report import plot_attention, plot_training_curve, write_evaluation_report
    from pipeline.registry.tracking import log_artifact

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        context = {"split": "test", "protocol": SPLIT_WORDS.get(fs.manifest["split"]["kind"], fs.manifest["split"]["kind"]),
                   "feature_version": fs.version, "users": fs.num_users, "items": fs.num_items, "gate": gate}
        for path in write_evaluation_report(folder / "evaluation", rows, context):
            log_artifact(path, "evaluation")
        log_artifact(plot_training_curve(folder / "training_curve.png", history), "plots")
        examples = attention_examples(fs, bundle)
        if examples:
            log_artifact(plot_attention(folder / "attention.png", examples), "plots")
        log_artifact(bundle.path / INDEX_DIR / "index.json", "index")


def attention_examples(fs: FeatureSet, bundle: Bundle) -> list[Any]:
    """Heatmap rows for the users whose recommendations show attention filtering best.

    Among up to ``ATTENTION_CANDIDATE_USERS`` users with at least 5 history items (spread over
    the user table), each gets its top-5 with the attention over its whole history (what a
    request with ``explain`` answers, through the query path); the columns kept are the
    ``ATTENTION_EXAMPLE_ITEMS`` history items with the most attention, in time order. Chosen:
    the users whose recommendations rest on the most distinct items, then whose shown items
    hold the largest share of the attention.
    """
    import numpy as np

    from pipeline.registry.run_report import AttentionExample
    from pipeline.serving.query import recommend

    eligible = np.nonzero(fs.test_pos >= 5)[0]
    if len(eligible) == 0:
        return []
    spread = np.linspace(0, len(eligible) - 1, num=min(len(eligible), ATTENTION_CANDIDATE_USERS)).astype(int)
    users = [int(u) for u in np.unique(eligible[spread])]
    histories = [fs.sequences.row(u)[:fs.test_pos[u]].astype(np.int64) for u in users]
    answers = recommend(bundle, histories, k=5, explain=True, reasons=None)
    candidates = []
    for u, hist, answer in zip(users, histories, answers, strict=True):
        read = hist[-bundle.model.max_len:]  # the items the model reads, oldest first
        ids = [bundle.item_ids[i - 1] for i in read]
        full = np.array([[{r.item_id: r.weight for r in rec.reasons}.get(i, 0.0) for i in ids]
                         for rec in answer.recommendations])  # (K, L) attention shares, rows sum to 1
        if full.size == 0:
            continue
        keep = np.sort(np.argsort(-full.max(axis=0), kind="stable")[:ATTENTION_EXAMPLE_ITEMS])  # time order
        weights = full[:, keep]  # (K, <= ATTENTION_EXAMPLE_ITEMS)
        distinct = len(set(full.argmax(axis=1).tolist()))
        captured = float(weights.sum(axis=1).mean())
        candidates.append(((distinct, captured), AttentionExample(
            fs.user_ids[u], [bundle.titles[read[j] - 1] or ids[j] for j in keep],
            [r.title or r.item_id for r in answer.recommendations], weights, len(read))))
    candidates.sort(key=lambda c: c[0], reverse=True)
    return [example for _, example in candidates[:ATTENTION_EXAMPLE_USERS]]


def promotion_gate(settings: Settings, fs: FeatureSet, version: str, valid_score: float) -> tuple[bool, str]:
    """Give ``version`` the champion alias if its validation score (the selection metric) is not
    worse than the champion's on ``fs``, within ``registry.promotion_tolerance``, and not below
    the most-popular baseline's on ``fs`` (the floor, for the first model too).

    The champion's score is its tag when it was measured on ``fs`` over the same users (all, or
    the same ``train.valid_users`` sample); otherwise the champion is re-evaluated on ``fs`` once
    (kept as the tag ``valid_<metric>_on_<feature set>``, ``..._<N>_users`` for a sample). A champion
    trained on another catalogue cannot be compared and is replaced. Every version gets the
    tags ``role`` and ``gate_reason``.
    """
    from pipeline.registry import tracking

    reg, metric = settings.registry, settings.train.selection_metric
    score_tag = tracking.metric_name(metric, "valid_")
    users = "all" if settings.train.valid_users is None else str(settings.train.valid_users)  # whom the scores rank
    tracking.set_version_tags(settings, version, {score_tag: f"{valid_score:.6f}", "feature_version": fs.version,
                                                  "selection_metric": metric, "valid_users": users})
    current = tracking.champion(settings)
    label = metric.upper()
    floor = popularity_score(settings, fs)
    tracking.set_version_tags(settings, version, {f"popularity_{score_tag}": f"{floor:.6f}"})
    if valid_score < floor and reg.popularity_floor:
        promoted, reason = False, (f"valid {label} {valid_score:.4f} < most-popular's {floor:.4f}: below the "
                                   f"popularity floor" + ("" if current else " (no champion yet, none promoted)"))
    elif current is None:
        promoted, reason = True, (f"first model: no champion yet; valid {label} {valid_score:.4f}, most-popular's "
                                  f"{floor:.4f}" + ("" if reg.popularity_floor else " (popularity floor off)"))
    else:
        champ_version, champ_tags = current
        measured_tag = f"{score_tag}_on_{fs.version}" + ("" if users == "all" else f"_{users}_users")  # re-measured here
        if (champ_tags.get("feature_version") == fs.version and score_tag in champ_tags
                and champ_tags.get("valid_users", "all") == users):
            champ_score: float | None = float(champ_tags[score_tag])
        elif measured_tag in champ_tags:
            champ_score = None if champ_tags[measured_tag] == "other catalogue" else float(champ_tags[measured_tag])
        else:
            champ_score = champion_score(settings, fs, champ_version)
            tracking.set_version_tags(settings, champ_version, {
                measured_tag: "other catalogue" if champ_score is None else f"{champ_score:.6f}"})
        if champ_score is None:
            promoted, reason = True, f"champion v{champ_version} was trained on another catalogue; replaced"
        elif valid_score >= champ_score - reg.promotion_tolerance:
            promoted, reason = True, (f"valid {label} {valid_score:.4f} >= champion v{champ_version} "
                                      f"{champ_score:.4f} - tolerance {reg.promotion_tolerance}")
        else:
            promoted, reason = False, (f"valid {label} {valid_score:.4f} < champion v{champ_version} "
                                       f"{champ_score:.4f} - tolerance {reg.promotion_tolerance} on feature set {fs.version}")
    if promoted:
        tracking.set_champion(settings, version)
        tracking.set_version_tags(settings, version, {"role": "champion"})
        if current is not None:
            tracking.set_version_tags(settings, current[0], {"role": "retired"})
    else:
        tracking.set_version_tags(settings, version, {"role": "challenger"})
    tracking.set_version_tags(settings, version, {"gate_reason": reason})
    return promoted, reason


def popularity_score(settings: Settings, fs: FeatureSet) -> float:
    """The most-popular baseline's validation score (the selection metric) on ``fs``: the gate's floor."""
    from pipeline.training.evaluation import evaluate, selection_ks
    from pipeline.training.loop import resolve_device
    from pipeline.training.recipe import baseline_model

    from pipeline.training.data_defaults import fit_model

    device = resolve_device(settings.device)
    metric = settings.train.selection_metric
    max_len = fit_model(settings.model, fs)[0].max_len
    return evaluate(baseline_model("popularity", fs).to(device), fs, "valid", max_len, device,
                    ks=selection_ks(metric), sample=settings.train.valid_users).metrics[metric]


def registered_scorer(settings: Settings, fs: FeatureSet, version: str) -> tuple[Scorer, int] | None:
    """Registered ``version`` as a scorer of ``fs`` and its history length; None when it was
    trained on another catalogue (its item indices mean other items)."""
    from pipeline.registry.model_store import MODEL_FILE, check_vocabulary, load_model
    from pipeline.registry.tracking import download_bundle
    from pipeline.training.loop import resolve_device
    from pipeline.training.recipe import SasrecScorer

    path = download_bundle(settings, f"models:/{settings.registry.model_name}/{version}")
    model, meta = load_model(path / MODEL_FILE, resolve_device(settings.device))
    try:
        check_vocabulary(meta, fs)
    except UserError:
        return None
    return SasrecScorer(model), model.max_len


def champion_score(settings: Settings, fs: FeatureSet, version: str) -> float | None:
    """Registered ``version``'s validation score (the selection metric) re-measured on ``fs``;
    None when it was trained on another catalogue."""
    from pipeline.training.evaluation import evaluate, selection_ks
    from pipeline.training.loop import resolve_device

    scorer = registered_scorer(settings, fs, version)
    if scorer is None:
        return None
    metric = settings.train.selection_metric
    return evaluate(scorer[0], fs, "valid", scorer[1], resolve_device(settings.device), ks=selection_ks(metric),
                    sample=settings.train.valid_users).metrics[metric]


# --------------------------------------------------------------------------------------
# Evaluation, index, recommendations


def scored_where(shares: tuple[ShareRunner, int] | None) -> str:
    """Where an evaluation's users were ranked, for its report and run tag: "N Ray tasks" or
    "this process"."""
    return f"{shares[1]} Ray tasks" if shares else "this process"


def evaluate(settings: Settings, split: EvalSplit = "test", baseline: Baseline | None = None, model: str | None = None,
             keep_seen: bool = False) -> dict[str, Any]:
    """Full-ranking metrics of a model (default: the champion) on the feature set it was trained
    on, or of a baseline on the current one, recorded as an MLflow run.

    When the model's own feature set is gone from the store, the current one is used if its
    items match the model's, and ``feature_set_note`` says so. ``keep_seen`` adds the metrics
    with seen items ranked too (section ``keep_seen``). With ``engine = "ray"`` on the CPU the
    users are ranked in ``partitions`` Ray tasks (``pipeline.scale.evaluation``; auto: one per
    CPU of the cluster), the metrics the same as in this process; ``scored_on`` says where.
    """
    from pipeline.data.feature_store import load_feature_set
    from pipeline.registry import tracking
    from pipeline.registry.model_store import MODEL_FILE, check_vocabulary, load_model, model_label, resolve_bundle
    from pipeline.training.evaluation import evaluation_report
    from pipeline.training.loop import resolve_device
    from pipeline.training.data_defaults import fit_model
    from pipeline.training.recipe import SasrecScorer, baseline_model

    if split not in get_args(EvalSplit):
        raise UserError(f"--split must be one of {', '.join(get_args(EvalSplit))}")
    if baseline is not None and baseline not in get_args(Baseline):
        raise UserError(f"--baseline must be one of {', '.join(get_args(Baseline))}")
    device = resolve_device(settings.device)
    if baseline:
        fs = _current_feature_set(settings)
        scorer, name = baseline_model(baseline, fs).to(device), baseline
        max_len = fit_model(settings.model, fs)[0].max_len
        note = "the current feature set"
    else:
        path = resolve_bundle(settings, model)
        net, meta = load_model(path / MODEL_FILE, device)
        own = settings.features_dir / str(meta.get("feature_version"))
        if (own / "manifest.json").exists():
            fs, note = load_feature_set(own), "the model's own feature set"
        else:
            fs = _current_feature_set(settings)
            note = (f"the model's feature set {meta.get('feature_version')} is no longer in {settings.features_dir}, "
                    "so the current one (same items)")
        check_vocabulary(meta, fs)
        name = model_label(path, meta["sha256"])
        scorer, max_len = SasrecScorer(net), net.max_len
    shares: tuple[ShareRunner, int] | None = None
    with ExitStack() as cluster:
        if settings.engine == "ray" and device.type == "cpu":  # one GPU ranks as fast as several CPU tasks
            from pipeline.scale.cluster import partition_count, ray_connection
            from pipeline.scale.evaluation import shares_on_ray

            ray = cluster.enter_context(ray_connection(settings))
            shares = (shares_on_ray, partition_count(settings, ray))
        scored = evaluation_report(scorer, fs, split, max_len, device, keep_seen=keep_seen, shares=shares)
    report = {"model": name, "split": split, "feature_set": fs.version, "feature_set_note": note, **scored,
              "scored_on": scored_where(shares)}
    with tracking.tracked_run(settings, f"evaluate {name} on {split}, features {fs.version[:8]}",
                              {"type": "evaluate", "model": name, "feature_version": fs.version,
                               "scored_on": report["scored_on"]}) as run_id:
        tracking.log_params({"split": split, "model": name, "feature_set.version": fs.version, "keep_seen": keep_seen})
        tracking.log_metrics({tracking.metric_name(k, f"{split}_"): v for k, v in report.items()
                              if isinstance(v, float) and k != "seconds"})
        tracking.log_metrics({tracking.metric_name(k, f"{split}_keep_seen_"): v
                              for k, v in report.get("keep_seen", {}).items() if isinstance(v, float)})
    report["mlflow_run_id"] = run_id
    return report


def build_index(settings: Settings, kind: str = "auto", model: str | None = None,
                params: dict[str, int] | None = None) -> dict[str, Any]:
    """(Re)build the FAISS index of a model's bundle (``params``: FAISS parameters, see
    ``pipeline.registry.model_store.rebuild_index``); its recall is measured with the
    bundle's own validation queries, as at training time."""
    from pipeline.registry.model_store import rebuild_index, resolve_bundle

    path = resolve_bundle(settings, model)
    meta = rebuild_index(path, kind, params=params)
    return {"bundle": str(path), "rebuilt": True, **asdict(meta)}


def ensure_index(settings: Settings, kind: str = "auto", model: str | None = None) -> dict[str, Any]:
    """The bundle's index as it is when it is of ``kind`` ('auto': whatever kind it has), else rebuilt.

    The pipeline flow calls this after training, so an index is built once per run.
    """
    from pipeline.registry.index import KINDS, read_index_meta
    from pipeline.registry.model_store import INDEX_DIR, resolve_bundle

    if kind not in KINDS:
        raise UserError(f"index kind must be one of {', '.join(KINDS)}")
    path = resolve_bundle(settings, model)
    if (path / INDEX_DIR / "index.json").exists():
        meta = read_index_meta(path / INDEX_DIR)
        if kind in ("auto", meta.kind):
            return {"bundle": str(path), "rebuilt": False, **asdict(meta)}
    return build_index(settings, kind, model)


RECOMMENDATION_FORMATS = (".parquet", ".csv", ".ndjson", ".jsonl")


PartitionRunner = Callable[[Settings, str, int, "list[UserRange]", "list[Path]"], "list[dict[str, Any]]"]


def recommend_everyone(settings: Settings, k: int = 50, out: str | Path | None = None, model: str | None = None,
                       table: str = "recommendations", run_partitions: PartitionRunner | None = None) -> dict[str, Any]:
    """Top ``k`` for every warehouse user through the query path (``Recommender.recommend_chunks``),
    written to the DuckDB table ``table`` and to ``out`` in the format its extension names
    (Parquet, CSV, or newline-delimited JSON; default ``recommendations.parquet`` in the state folder).

    The users are scored in chunks (``CHUNK_USERS``) streamed into Parquet, and the file and the
    table are written from there, so no process holds every user's answers. With ``engine =
    "ray"`` the users are cut into ``partitions`` ranges of user keys, each scored by
    ``recommend_partition`` on the cluster (``run_partitions``: how they are run; by default one
    Ray task each) into ``<out stem>.parts/part-NNNNN.parquet``; the parts, in key order, are
    the same rows as the local run's (the query path scores each user alone).
    """
    import shutil
    import time

    from pipeline.data.warehouse import replace_table
    from pipeline.registry.model_store import resolve_bundle
    from pipeline.serving.recommender import Recommender

    if not TABLE_NAME.fullmatch(table):
        raise UserError(f"--table {table!r}: a table name is letters, digits and _ (not starting with a digit), "
                        "at most 63 characters")
    target = Path(out).resolve() if out else settings.home / "recommendations.parquet"
    if target.suffix.lower() not in RECOMMENDATION_FORMATS:
        raise UserError(f"--out {out}: the extension names the format; use one of {', '.join(RECOMMENDATION_FORMATS)}")
    started = time.perf_counter()
    partitions: dict[str, Any] | None = None
    staging: Path | None = None
    try:
        if settings.engine == "ray":
            from functools import partial

            from pipeline.data.histories import HistoryStore, UserRange
            from pipeline.scale.batch_scoring import run_on_ray
            from pipeline.scale.cluster import partition_count, ray_connection

            bundle = str(resolve_bundle(settings, model))
            folder = target.with_name(target.stem + ".parts")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            with ray_connection(settings) as ray:
                parts = partition_count(settings, ray)
                # an empty warehouse is one empty partition (the file keeps the columns)
                ranges = HistoryStore(settings.duckdb_path).user_ranges(parts) or [UserRange(0, -1)]
                files = [folder / f"part-{i:05d}.parquet" for i in range(len(ranges))]
                reports = (run_partitions or partial(run_on_ray, recommend_partition))(settings, bundle, k, ranges, files)
            version = reports[0]["model_version"]
            partitions = {"folder": str(folder), "count": len(files), "rows": [r["rows"] for r in reports]}
        else:
            recommender = Recommender.load(model, settings=settings)
            if target.suffix.lower() != ".parquet":  # staged as Parquet, then written in the target's format
                staging = settings.tmp_dir / f"recommendations-{os.getpid()}.parquet"
            files, version = [staging or target], recommender.version
            write_parquet_pieces(recommender.recommend_chunks(k), files[0])
        if files != [target]:
            _write_recommendations(files, target)
        counts = _recommendation_counts(files)
        replace_table(settings.duckdb_path, table, files)
    finally:
        if staging is not None:
            staging.unlink(missing_ok=True)
    return {**counts, "seconds": round(time.perf_counter() - started, 2), "file": str(target), "table": table,
            "model_version": version, "engine": settings.engine, "partitions": partitions}


def recommend_partition(settings: Settings, bundle: str, k: int, users: UserRange, out: Path) -> dict[str, Any]:
    """One partition of ``recommend_everyone`` on Ray (a Ray task, or a Prefect task on Ray's
    task runner): the bundle at ``bundle`` loaded once, the top ``k`` of the users in
    ``users`` through ``Recommender.recommend_chunks``, streamed into the Parquet file ``out``."""
    from pipeline.serving.recommender import Recommender

    recommender = Recommender.load(bundle, settings=settings)
    rows = write_parquet_pieces(recommender.recommend_chunks(k, users), out)
    return {"file": str(out), "rows": rows, "first_user_key": users.first, "last_user_key": users.last,
            "model_version": recommender.version}


@contextmanager
def _replaced_atomically(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target`` to write; renamed onto ``target`` when the block
    ends, removed when it fails: a reader sees the old file or the new one, never half of one,
    and a failed write leaves nothing behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_pieces(frames: Iterable[pl.DataFrame], target: Path) -> int:
    """Write ``frames`` (one schema, at least one frame) one after the other into the Parquet
    file ``target``, holding one at a time, atomically; the rows written."""
    import pyarrow.parquet as pq

    rows = 0
    with _replaced_atomically(target) as tmp:
        writer: pq.ParquetWriter | None = None
        try:
            for frame in frames:
                piece = frame.to_arrow()
                writer = writer or pq.ParquetWriter(tmp, piece.schema, compression="zstd")
                writer.write_table(piece)
                rows += frame.height
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ValueError("write_parquet_pieces needs at least one frame (its schema)")
    return rows


def _write_recommendations(files: list[Path], target: Path) -> None:
    """The rows of the Parquet ``files``, in order, written in the format of ``target``'s
    extension, streamed and atomically."""
    import polars as pl

    rows = pl.scan_parquet(files)
    with _replaced_atomically(target) as tmp:
        suffix = target.suffix.lower()
        if suffix == ".parquet":
            rows.sink_parquet(tmp)
        elif suffix == ".csv":
            rows.sink_csv(tmp)
        else:
            rows.sink_ndjson(tmp)


def _recommendation_counts(files: list[Path]) -> dict[str, int]:
    """The users (those with a rank-1 row), the rows, and the users served the fallback in the
    recommendations of the Parquet ``files``."""
    import polars as pl

    first = pl.col("rank") == 1  # one row per user with any answer
    counts = pl.scan_parquet(files).select(pl.len().alias("rows"), first.sum().alias("users"),
                                           (first & pl.col("fallback").is_not_null()).sum().alias("fallback_users")).collect()
    return {name: int(counts[name][0]) for name in ("users", "rows", "fallback_users")}


def check_port_free(host: str, port: int, hint: str) -> None:
    """Refuse a busy port before anything says it is serving (exit 1 with ``hint``)."""
    import socket

    with socket.socket() as probe:
        if probe.connect_ex((host, port)) == 0:
            raise UserError(f"{host}:{port} is in use: {hint}")


def serve(settings: Settings, model: str | None = None, announce: Callable[[str], None] | None = None) -> None:
    """Run the HTTP API and the web page (uvicorn) over ``Recommender.load(model)`` until interrupted."""
    import uvicorn

    check_port_free(settings.serve.host, settings.serve.port, "stop what runs there, or choose another with --port")
    from pipeline.registry.tracking import registered_versions
    from pipeline.serving.http import create_app
    from pipeline.serving.recommender import Recommender

    recommender = Recommender.load(model, settings=settings, cache_histories=True, threads=settings.serve.threads)
    token = settings.serve.api_token or os.environ.get("ATTNREC_API_TOKEN")
    if settings.serve.follow_model_s > 0:
        recommender.follow(settings, model, settings.serve.follow_model_s,
                           on_swap=lambda old, new: announce(f"now serving model {new} (was {old})") if announce else None)
    if announce:
        announce(f"serving model {recommender.version} ({recommender.num_items:,} items) on "
                 f"http://{settings.serve.host}:{settings.serve.port} (web page at /, docs at /docs)"
                 f"{' with bearer token' if token else ''}")
    app = create_app(recommender, token, settings.serve, list_versions=lambda: registered_versions(settings))
    uvicorn.run(app, host=settings.serve.host, port=settings.serve.port,
                timeout_keep_alive=settings.serve.keep_alive_s, log_level="warning")
