"""The SASRec recipe: one full validation per validated epoch, and the outcome's metrics are
those of the weights it returns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pipeline.training.recipe as recipe
from pipeline.config import load_settings
from pipeline.data.feature_store import FeatureSet
from pipeline.training.evaluation import evaluate, selection_ks


@pytest.mark.parametrize("epochs", [0, 2])
def test_validation_runs_once_per_epoch_and_the_outcome_holds_the_kept_weights_metrics(
        tiny_fs: FeatureSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, epochs: int) -> None:
    settings = load_settings(home=tmp_path / "home", **{
        "train.epochs": epochs, "train.batch_size": 16, "model.max_len": 20, "model.hidden_size": 16,
        "model.text_encoder": "hashed"})
    calls: list[str] = []

    def counted(*args, **kwargs):
        calls.append(args[2])
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(recipe, "evaluate", counted)
    outcome = recipe.train_sasrec(settings, tiny_fs, progress=False)
    # a full-ranking validation is the costly part of an epoch at scale: each validated epoch
    # runs one, and the outcome reuses the best epoch's (one more only when no epoch ran)
    assert calls == ["valid"] * max(epochs, 1)
    metric = settings.train.selection_metric
    again = evaluate(recipe.sasrec_scorer(outcome.model), tiny_fs, "valid", settings.model.max_len,
                     torch.device("cpu"), ks=selection_ks(metric)).metrics
    assert outcome.valid == again
    if epochs:
        best = next(r for r in outcome.fit.history if r.epoch == outcome.fit.best_epoch)
        assert outcome.valid == best.valid and outcome.valid[metric] == outcome.fit.best_metric
