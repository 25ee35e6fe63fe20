"""Settings fitted to the data: what ``auto`` picks for short and long histories, and that
explicit values win."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import load_settings
from pipeline.data.feature_store import FeatureSet
from pipeline.training.data_defaults import fit_to_data
from tests.pipeline.training.test_evaluation import tiny_feature_set


def with_lengths(lengths: list[int]) -> FeatureSet:
    histories = [[1 + (i % 5) for i in range(n + 2)] for n in lengths]  # n training events + valid + test
    return tiny_feature_set(histories, [n for n in lengths], [n + 1 for n in lengths])


def test_short_histories_get_few_positions_more_dropout_a_short_fast_schedule_and_less_patience(tmp_path: Path) -> None:
    fs = with_lengths([4] * 50 + [6] * 40 + [12] * 9 + [38])  # median 5, 99th percentile about 12
    settings, notes = fit_to_data(load_settings(home=tmp_path), fs)
    assert (settings.model.max_len, settings.model.dropout) == (25, 0.5)
    assert (settings.train.epochs, settings.train.lr, settings.train.patience) == (10, 3e-3, 5)  # Amazon Toys' measured schedule
    assert notes[0].startswith("model.max_len = 25: 99% of the training histories have at most")
    assert "median training history 5 items (under 20: short histories)" in notes[1]
    assert [n.split(" = ")[0] for n in notes] == ["model.max_len", "model.dropout", "train.epochs", "train.lr",
                                                  "train.patience"]


def test_long_histories_keep_the_movielens_benchmark_shape(tmp_path: Path, small_fs: FeatureSet) -> None:
    settings, notes = fit_to_data(load_settings(home=tmp_path), small_fs)  # ml-latest-small: median 68 items
    assert (settings.model.max_len, settings.model.dropout, settings.train.patience) == (200, 0.2, 20)
    assert (settings.train.epochs, settings.train.lr) == (80, 1e-3)  # the ML-1M benchmark schedule
    assert "(capped at 200)" in notes[0] and "at least 20: long histories" in notes[1]
    lengths = np.asarray(small_fs.train_end)
    assert np.median(lengths[lengths > 0]) >= 20


def test_explicit_values_are_kept_and_not_mentioned(tmp_path: Path) -> None:
    fs = with_lengths([4] * 10)
    given = load_settings(home=tmp_path, **{"model.max_len": 77, "model.dropout": 0.1, "train.patience": 9,
                                            "train.epochs": 3, "train.lr": 5e-4, "model.hidden_size": 32})
    settings, notes = fit_to_data(given, fs)
    assert (settings.model.max_len, settings.model.dropout, settings.train.patience) == (77, 0.1, 9) and notes == []
    assert (settings.train.epochs, settings.train.lr) == (3, 5e-4)
    assert settings.model.hidden_size == 32
    assert fit_to_data(settings, fs) == (settings, [])  # fitting twice changes nothing
