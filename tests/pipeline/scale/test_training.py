"""Ray Train smoke test: 2 DDP workers on the session's real Ray cluster train the recipe.

The workers run ``train_sasrec`` in a gloo group (``TorchTrainer``), with a sampled softmax, so
the item tables' gradients are sparse and the workers exchange their rows looked up
(``loop.TableGradients``); the driver gets back
rank 0's weights and record. Checked: every epoch was run and reported, and the model the
driver rebuilt scores the validation split exactly as rank 0 measured it (the weights
came back intact). Gradient equivalence itself: tests/pipeline/training/test_distributed.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_settings
from pipeline.data.feature_store import FeatureSet
from pipeline.errors import UserError
from pipeline.scale.training import train_sasrec_on_ray
from pipeline.training.data_defaults import fit_to_data
from pipeline.training.evaluation import evaluate, selection_ks
from pipeline.training.recipe import SasrecScorer
from tests.support import Attnrec, assert_one_line_error

TINY = ["--epochs", "1", "--hidden-size", "16", "--max-len", "20", "--batch-size", "256", "--negatives", "128"]


def test_two_ray_train_workers_train_the_recipe(ray_cluster: str, tiny_fs: FeatureSet, tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path / "home", engine="ray", ray_address=ray_cluster, **{
        "train.workers": 2, "train.epochs": 2, "train.batch_size": 16, "model.max_len": 20, "model.hidden_size": 16,
        "model.text_encoder": "hashed", "train.negatives": 16})
    settings = fit_to_data(settings, tiny_fs)[0]
    heard = []
    outcome = train_sasrec_on_ray(settings, tiny_fs, on_epoch=heard.append)
    assert [r.epoch for r in heard] == [1, 2] == [r.epoch for r in outcome.fit.history]
    assert all("ndcg@10" in r.valid and r.samples_per_s > 0 for r in heard)
    assert outcome.fit.epochs_run == 2 and (outcome.run_dir / "checkpoint.pt").exists()
    metric = settings.train.selection_metric
    again = evaluate(SasrecScorer(outcome.model), tiny_fs, "valid", settings.model.max_len, torch.device("cpu"),
                     ks=selection_ks(metric)).metrics
    assert again[metric] == outcome.valid[metric] == outcome.fit.best_metric


def test_more_workers_than_the_cluster_has_cpus_is_one_error_not_a_wait(ray_cluster: str, tiny_fs: FeatureSet,
                                                                         tmp_path: Path) -> None:
    # reported: `attnrec train --workers 3` on a 2-CPU cluster waited for resources forever, silently
    settings = load_settings(home=tmp_path / "home", engine="ray", ray_address=ray_cluster, **{
        "train.workers": 3, "train.epochs": 1, "model.max_len": 20, "model.hidden_size": 16, "model.text_encoder": "hashed"})
    settings = fit_to_data(settings, tiny_fs)[0]
    with pytest.raises(UserError, match=r"train.workers = 3: the Ray cluster at .* has 2 CPUs"):
        train_sasrec_on_ray(settings, tiny_fs)


def test_attnrec_train_on_two_workers_ranks_the_test_users_in_ray_tasks_as_one_process_does(
        ray_cluster: str, small_cli: Attnrec) -> None:
    """The test report of a 2-worker run is scored in 2 Ray tasks; `attnrec evaluate`, one
    process, gives the same metrics for the model it wrote and for the popularity baseline."""
    result = small_cli.json("train", *TINY, "--workers", "2", "--engine", "ray", "--ray-address", ray_cluster)
    assert result["test_scored_on"] == "2 Ray tasks"
    alone = small_cli.json("evaluate", "--split", "test", "--model", result["run_dir"])
    popularity = small_cli.json("evaluate", "--split", "test", "--baseline", "popularity")
    for k in ("ndcg@10", "hr@10", "mrr@10", "coverage@10", "ndcg@50", "users"):
        assert result["test"][k] == alone[k], k
    assert result["baselines"]["popularity"] == popularity["ndcg@10"]


def test_a_user_error_in_a_ray_train_worker_is_one_line(ray_cluster: str, cli: Attnrec, tmp_path: Path) -> None:
    """One user with windows and two workers: the workers refuse in the recipe. Ray Train's
    WorkerGroupError printed 63 lines, both ranks' tracebacks, around the one line that says why."""
    events = tmp_path / "events.csv"
    rows = [f"1,{i},{1000 + i}" for i in range(1, 12)] + [f"{u},5,{2000 + u}" for u in range(2, 6)]
    events.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    cli.run("ingest", events)
    cli.run("features")
    refused = cli.run("train", "--workers", "2", "--epochs", "1", "--engine", "ray", "--ray-address", ray_cluster, ok=False)
    assert_one_line_error(refused, "train.workers = 2: some workers would get no training windows", "use fewer workers")
