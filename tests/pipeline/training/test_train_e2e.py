"""End to end on real data: train a few CPU epochs on MovieLens-100K and beat most-popular."""

from pathlib import Path

import pytest
import torch

from tests.support import Attnrec

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
