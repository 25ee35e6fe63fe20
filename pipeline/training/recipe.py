"""Train attnrec's SASRec on a feature set, and fit the baselines, with the shared loop and metrics."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.item_knn import ItemKNN
from models.popularity import MostPopular
from models.sasrec import SASRec
from pipeline.training.batches import epoch_batches, training_sequences, training_windows
from pipeline.config import Settings
from pipeline.training.evaluation import DEFAULT_KS, EvalResult, Scorer, evaluate
from pipeline.data.feature_store import FeatureSet
from pipeline.registry.model_store import build_sasrec, save_model
from pipeline.serving.query import write_bundle
from pipeline.training.loop import EpochRecord, FitResult, NextItemLoss, fit, resolve_device, seed_everything

BASELINES = ("popularity", "itemknn")


def sasrec_scorer(model: SASRec) -> Scorer:
    """Scores over the catalogue for a batch of histories; item vectors computed once."""
    with torch.no_grad():
        table = model.item_vectors()  # (N+1, D)

    def score(seq: torch.Tensor) -> torch.Tensor:
        return model.user_vectors(seq, table) @ table.T  # (B, N+1)

    return score


def new_run_dir(settings: Settings) -> Path:
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
    path = settings.runs_dir / run_id
    path.mkdir(parents=True, exist_ok=False)
    return path


@dataclass
class TrainOutcome:
    model: SASRec
    fit: FitResult
    valid: dict[str, float]
    run_dir: Path
    model_path: Path
    model_sha256: str
    device: str


def train_sasrec(settings: Settings, fs: FeatureSet, run_dir: Path | None = None, resume: bool = False,
                 progress: bool = True, on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainOutcome:
    """Train on ``fs``'s training events, early-stop on validation NDCG@10, save ``model.pt``.

    Checkpoints are chosen on the validation split only; the test split is never read here.
    """
    cfg, ms = settings.train, settings.model
    seed_everything(cfg.seed)
    device = resolve_device(settings.device)
    run_dir = run_dir or new_run_dir(settings)
    model = build_sasrec(fs, ms)

    cold = fs.cold_mask
    train = training_sequences(fs.sequences, fs.train_end, cold)
    windows = training_windows(train, ms.max_len, cfg.all_windows)
    steps = (len(windows) + cfg.batch_size - 1) // cfg.batch_size

    def batches(epoch: int):
        rng = np.random.default_rng(cfg.seed * 1_000_003 + epoch)
        for inputs, targets in epoch_batches(train, windows, cfg.batch_size, rng, cfg.group_by_length):
            yield torch.from_numpy(inputs), torch.from_numpy(targets)

    excluded = torch.from_numpy(cold).clone()
    excluded[0] = True
    counts = torch.from_numpy(np.bincount(train.values, minlength=fs.num_items + 1).astype(np.float64))
    loss = NextItemLoss(excluded, cfg.negatives, counts.clamp(min=1.0) ** 0.75 if cfg.negatives else None,
                        exclude_history=cfg.exclude_history)

    def validate(m: torch.nn.Module) -> dict[str, float]:
        return evaluate(sasrec_scorer(m), fs, "valid", ms.max_len, device, ks=(10,)).metrics

    result = fit(model, batches, loss, validate, cfg, device, steps, metric="ndcg@10",
                 checkpoint_path=run_dir / "checkpoint.pt", resume=resume, on_epoch=on_epoch, progress=progress)
    valid = validate(model)
    model_path = run_dir / "model.pt"
    sha = save_model(model_path, model, ms, fs, extra={"best_epoch": result.best_epoch, "epochs_run": result.epochs_run})
    write_bundle(run_dir, fs, model, sha)  # items.parquet + FAISS index next to the model
    (run_dir / "training.json").write_text(json.dumps({
        "feature_version": fs.version, "device": str(device), "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run, "stopped_early": result.stopped_early, "seconds": result.seconds,
        "valid": valid, "settings": settings.model_dump(mode="json", include={"model", "train", "features"}),
        "history": [vars(h) for h in result.history],
    }, indent=2, default=str))
    (settings.runs_dir / "LATEST").write_text(run_dir.name + "\n")
    return TrainOutcome(model, result, valid, run_dir, model_path, sha, str(device))


def latest_run_dir(settings: Settings) -> Path:
    """The folder of the most recent ``attnrec train`` run in this state folder."""
    pointer = settings.runs_dir / "LATEST"
    if not pointer.exists():
        from pipeline.errors import UserError

        raise UserError(f"no trained model in {settings.runs_dir}: run `attnrec train` first")
    return settings.runs_dir / pointer.read_text().strip()


def latest_model_path(settings: Settings) -> Path:
    return latest_run_dir(settings) / "model.pt"


def baseline_model(name: str, fs: FeatureSet) -> torch.nn.Module:
    """Most-popular or item-kNN fitted on the training events (cold items excluded)."""
    train = training_sequences(fs.sequences, fs.train_end, fs.cold_mask)
    if name == "popularity":
        return MostPopular(torch.from_numpy(np.bincount(train.values, minlength=fs.num_items + 1).astype(np.float32)))
    if name == "itemknn":
        users = np.repeat(np.arange(len(train.lengths())), train.lengths())
        return ItemKNN.fit(torch.from_numpy(users), torch.from_numpy(train.values), fs.num_users, fs.num_items)
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")


def evaluate_model(scorer: Scorer, fs: FeatureSet, split: str, max_len: int, device: torch.device,
                   ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, Any]:
    """Metrics on ``split`` plus the cold-start report (targets among held-out items)."""
    result: EvalResult = evaluate(scorer, fs, split, max_len, device, ks)
    report: dict[str, Any] = dict(result.metrics)
    report["seconds"] = round(result.seconds, 3)
    cold = fs.cold_mask
    if cold.any():
        report["cold_start"] = result.restricted(cold[result.targets], ks)
    return report
