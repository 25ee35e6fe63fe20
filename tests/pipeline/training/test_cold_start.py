"""Cold-start report: held-out items never train, are scored from content alone, and get their own metrics."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_settings
from pipeline.data.catalog import ingest_items
from pipeline.data.feature_store import build_feature_set, load_feature_set
from pipeline.data.ingest import IngestOptions, ingest_paths
from pipeline.data.warehouse import connect
from pipeline.training.batches import training_sequences
from pipeline.training.evaluation import evaluate, evaluation_report, rank_metrics
from pipeline.training.recipe import build_sasrec, sasrec_scorer

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def cold_fs(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("cold") / "home"
    settings = load_settings(home=home, **{"features.cold_item_fraction": 0.05})
    data = REPO / "datasets" / "ml-latest-small"
    con = connect(settings.duckdb_path)
    try:
        ingest_paths(con, [data / "ratings.csv"], IngestOptions(), settings.tmp_dir)
        ingest_items(con, data / "movies.csv")
        path, _ = build_feature_set(con, settings)
    finally:
        con.close()
    return settings, load_feature_set(path)


def test_five_percent_of_items_are_held_out_of_training(cold_fs) -> None:
    _, fs = cold_fs
    cold = fs.cold_mask
    in_events = fs.items["in_events"].to_numpy()
    share = cold[1:][in_events].mean()
    assert 0.035 < share < 0.065
    train = training_sequences(fs.sequences, fs.train_end, cold)
    assert not cold[train.values].any(), "a cold item appears in the training sequences"
    assert (fs.items.filter(fs.items["cold"])["train_count"] == 0).all()
    assert fs.manifest["counts"]["cold_items"] == int(cold.sum())


def test_cold_items_are_scored_from_content_only(cold_fs) -> None:
    settings, fs = cold_fs
    torch.manual_seed(0)
    model = build_sasrec(fs, settings.model.model_copy(update={"hidden_size": 16, "max_len": 20}))[0].eval()
    cold_idx = torch.from_numpy(np.nonzero(fs.cold_mask)[0])
    before = model.item_vectors()[cold_idx].detach().clone()
    with torch.no_grad():
        model.item_tower.id_embedding.weight[cold_idx] += 3.0  # IDs of cold items must not matter
    torch.testing.assert_close(model.item_vectors()[cold_idx].detach(), before)


def test_cold_start_report_is_restricted_to_cold_targets(cold_fs) -> None:
    settings, fs = cold_fs
    torch.manual_seed(0)
    model = build_sasrec(fs, settings.model.model_copy(update={"hidden_size": 16, "max_len": 20}))[0].eval()
    report = evaluation_report(sasrec_scorer(model), fs, "test", 20, torch.device("cpu"), ks=(10, 50))
    cold = report["cold_start"]
    full = evaluate(sasrec_scorer(model), fs, "test", 20, torch.device("cpu"), ks=(10, 50))
    mask = fs.cold_mask[full.targets]
    assert cold["users"] == int(mask.sum()) > 0
    expected = rank_metrics(torch.from_numpy(full.ranks[mask]), (10, 50))
    assert cold["ndcg@50"] == pytest.approx(expected["ndcg@50"]) and cold["hr@10"] == pytest.approx(expected["hr@10"])
