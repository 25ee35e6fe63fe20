"""End to end on real data: train a few CPU epochs on MovieLens-100K and beat most-popular."""

from pathlib import Path

import pytest
import torch

from tests.support import Attnrec, assert_one_line_error

pytestmark = pytest.mark.slow


def test_training_on_ml100k_beats_most_popular_on_validation(cli: Attnrec, shared_data: Path) -> None:
    cli.ingest(shared_data / "ml-100k" / "u.data")
    cli.ingest_items(shared_data / "ml-100k" / "u.item")
    cli.features()
    result = cli.json("train", "--epochs", "4", "--lr", "3e-3", "--hidden-size", "32", "--max-len", "50", "--batch-size", "64",
                      "--device", "cpu", "--seed", "7")
    popular = cli.json("evaluate", "--split", "valid", "--baseline", "popularity")
    assert popular["users"] == 943
    assert result["valid"]["ndcg@10"] > 1.3 * popular["ndcg@10"], (result["valid"], popular["ndcg@10"])
    assert result["promoted"] is True and result["registered_version"] == "1"
    # the saved champion reproduces its validation score when evaluated again
    again = cli.json("evaluate", "--split", "valid")
    assert again["ndcg@10"] == pytest.approx(result["valid"]["ndcg@10"], abs=1e-6)
    # checkpoints are plain tensors, loadable with weights_only=True
    ckpt = torch.load(Path(result["run_dir"]) / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 4 and "best_model" in ckpt


def test_row_updates_on_ml100k_beat_most_popular_and_a_refused_setting_starts_no_run(cli: Attnrec,
                                                                                      shared_data: Path) -> None:
    cli.ingest(shared_data / "ml-100k" / "u.data")
    cli.features()
    refused = cli.run("train", "--table-updates", "rows", "--device", "cpu", ok=False)  # a full softmax by default
    assert_one_line_error(refused, "train.table_updates = rows needs a sampled softmax (train.negatives > 0)")
    assert not (cli.home / "runs").exists()  # refused before a run started: no run folder, no MLflow run
    if (cli.home / "mlflow.db").exists():
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{cli.home / 'mlflow.db'}")
        assert mlflow.search_runs(search_all_experiments=True).empty

    # 256 sampled negatives learn more slowly per epoch than the full softmax: a higher rate (at
    # 3e-3 both updates stayed at most-popular's level after 4 epochs; at 1e-2 dense 0.0648, rows 0.0655)
    result = cli.json("train", "--epochs", "4", "--lr", "1e-2", "--hidden-size", "32", "--max-len", "50",
                      "--batch-size", "64", "--negatives", "256", "--table-updates", "rows", "--device", "cpu",
                      "--seed", "7")
    popular = cli.json("evaluate", "--split", "valid", "--baseline", "popularity")
    assert result["valid"]["ndcg@10"] > 1.5 * popular["ndcg@10"], (result["valid"], popular["ndcg@10"])
