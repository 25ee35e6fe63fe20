"""Cold-start report: held-out items never train, are scored from content alone, and get their own metrics."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_settings
from pipeline.training.batches import training_sequences
from pipeline.training.evaluation import evaluate, evaluation_report, rank_metrics, tied_rank_metrics
from pipeline.training.recipe import SasrecScorer, build_sasrec
from tests.pipeline.conftest import movielens_feature_set

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def cold_fs(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("cold") / "home"
    overrides = {"features.cold_item_fraction": 0.05}
    fs = movielens_feature_set(home, REPO / "datasets" / "ml-latest-small", **overrides)
    return load_settings(home=home, **overrides), fs


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
    report = evaluation_report(SasrecScorer(model), fs, "test", 20, torch.device("cpu"), ks=(10, 50))
    cold = report["cold_start"]
    full = evaluate(SasrecScorer(model), fs, "test", 20, torch.device("cpu"), ks=(10, 50))
    mask = fs.cold_mask[full.targets]
    assert cold["users"] == int(mask.sum()) > 0
    expected = rank_metrics(torch.from_numpy(full.ranks[mask]), (10, 50))
    assert cold["ndcg@50"] == pytest.approx(expected["ndcg@50"]) and cold["hr@10"] == pytest.approx(expected["hr@10"])



def test_tied_rank_metrics_by_hand() -> None:
    """Target 1 is first outright; target 2 has 3 items above it and 1 tie: rank 3 or 4, each half."""
    m = tied_rank_metrics(torch.tensor([0, 3]), torch.tensor([0, 1]), (1, 4, 5))
    assert m["hr@1"] == pytest.approx(0.5) and m["hr@4"] == pytest.approx((1 + 0.5) / 2) and m["hr@5"] == pytest.approx(1.0)
    assert m["ndcg@5"] == pytest.approx((1.0 + (1 / np.log2(5) + 1 / np.log2(6)) / 2) / 2)
    assert m["mrr@5"] == pytest.approx((1.0 + (1 / 4 + 1 / 5) / 2) / 2)
    assert tied_rank_metrics(torch.tensor([2]), torch.tensor([0]), (5,)) == rank_metrics(torch.tensor([2]), (5,))


def test_among_held_out_a_constant_scorer_scores_chance(cold_fs) -> None:
    """Every held-out item scored alike (most-popular's view of new items): chance's expected
    metrics among them; the ties are the held-out items the user has not seen."""
    _, fs = cold_fs
    held = fs.cold_mask
    constant = lambda seq: torch.zeros(seq.shape[0], fs.num_items + 1)  # noqa: E731
    report = evaluation_report(constant, fs, "test", 20, torch.device("cpu"), ks=(10,))
    full = evaluate(constant, fs, "test", 20, torch.device("cpu"), ks=(10,))
    is_held = held[full.targets]
    for row in np.nonzero(is_held)[0]:
        u = full.users[row]
        seen = fs.sequences.row(u)[:fs.test_pos[u]]
        unseen_held = held.sum() - len(set(seen[held[seen]].tolist()) - {int(full.targets[row])})
        assert tuple(full.held_out[row]) == (0, unseen_held - 1)
    ties = full.held_out[is_held, 1]
    among = report["cold_start"]["among_held_out"]
    assert among["hr@10"] == pytest.approx(np.mean(np.minimum(1.0, 10 / (ties + 1))))
    assert among["ndcg@10"] == pytest.approx(np.mean([sum(1 / np.log2(r + 2) for r in range(min(10, t + 1))) / (t + 1) for t in ties]))
