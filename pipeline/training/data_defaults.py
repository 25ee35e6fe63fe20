"""Settings fitted to the data: the ``auto`` values of the model and training settings, read
from the feature set's history lengths, each with the reason it was chosen.

Short histories (a median under ``SHORT_HISTORY`` items, as in most shops' logs) overfit in a
few epochs: they get more dropout and less patience, and a shorter cosine at a higher peak
learning rate, so that a sparse catalogue trains in minutes (docs/benchmarks.md, Amazon
Toys). The encoder reads as many positions as nearly every history has (the 99th
percentile, rounded up to ``LENGTH_STEP``, at most ``MAX_LEN``), so a catalogue of
5-to-40-item histories does not pay for 200 positions. MovieLens keeps the benchmark
configuration (200 positions, dropout 0.2, 80 epochs at 1e-3, patience 20).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.config import ModelSettings, Settings, TrainSettings
from pipeline.data.feature_store import FeatureSet

SHORT_HISTORY = 20  # median training-history length (items) below which histories count as short
MAX_LEN = 200
LENGTH_STEP = 25
DROPOUT = {"short": 0.5, "long": 0.2}
PATIENCE = {"short": 5, "long": 20}
EPOCHS = {"short": 10, "long": 80}
LR = {"short": 3e-3, "long": 1e-3}


def fit_to_data(settings: Settings, fs: FeatureSet) -> tuple[Settings, list[str]]:
    """``settings`` with every ``auto`` model / training value chosen from ``fs``, and one line
    per choice saying what was chosen and why (explicit values are kept and not mentioned)."""
    model, model_notes = fit_model(settings.model, fs)
    train, train_notes = fit_train(settings.train, fs)
    return settings.model_copy(update={"model": model, "train": train}), model_notes + train_notes


def fit_model(ms: ModelSettings, fs: FeatureSet) -> tuple[ModelSettings, list[str]]:
    """The model settings' ``auto`` values (``max_len``, ``dropout``) chosen from ``fs``."""
    stats = _HistoryStats.of(fs)
    update: dict[str, object] = {}
    notes = []
    if ms.max_len == "auto":
        update["max_len"] = min(MAX_LEN, max(LENGTH_STEP, math.ceil(stats.p99 / LENGTH_STEP) * LENGTH_STEP))
        notes.append(f"model.max_len = {update['max_len']}: 99% of the training histories have at most {stats.p99:g} "
                     f"items" + (f" (capped at {MAX_LEN})" if stats.p99 > MAX_LEN else ""))
    if ms.dropout == "auto":
        update["dropout"] = DROPOUT[stats.kind]
        notes.append(f"model.dropout = {update['dropout']}: {stats.why}")
    return ms.model_copy(update=update), notes


def fit_train(ts: TrainSettings, fs: FeatureSet) -> tuple[TrainSettings, list[str]]:
    """The training settings' ``auto`` values (``epochs``, ``lr``, ``patience``) chosen from ``fs``."""
    stats = _HistoryStats.of(fs)
    chosen = {"epochs": EPOCHS[stats.kind], "lr": LR[stats.kind], "patience": PATIENCE[stats.kind]}
    update = {name: value for name, value in chosen.items() if getattr(ts, name) == "auto"}
    return ts.model_copy(update=update), [f"train.{name} = {value:g}: {stats.why}" for name, value in update.items()]


@dataclass(frozen=True)
class _HistoryStats:
    median: float  # items per training history
    p99: float

    @classmethod
    def of(cls, fs: FeatureSet) -> _HistoryStats:
        lengths = np.asarray(fs.train_end, dtype=np.int64)  # (U,) training events per user
        lengths = lengths[lengths > 0]
        if not len(lengths):
            return cls(0.0, 0.0)
        return cls(float(np.median(lengths)), float(np.percentile(lengths, 99)))

    @property
    def kind(self) -> str:
        return "short" if self.median < SHORT_HISTORY else "long"

    @property
    def why(self) -> str:
        side = "under" if self.kind == "short" else "at least"
        return f"median training history {self.median:g} items ({side} {SHORT_HISTORY}: {self.kind} histories)"
