"""Ray Train smoke test: 2 DDP workers on the session's real Ray cluster train the recipe.

The workers run ``train_sasrec`` in a gloo group (``TorchTrainer``), with a sampled softmax, so
the item tables' gradients are sparse and the workers exchange their rows looked up
(``loop.dense_gradients``); the driver gets back
rank 0's weights and record. Checked: every epoch was run and reported, and the model the
driver rebuilt scores the validation split exactly as rank 0 measured it (the weights
came back intact). Gradient equivalence itself: tests/pipeline/training/test_distributed.py.
A Ray Train worker's training thread reuses the memory it frees, as a local run does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import load_settings
from pipeline.data.feature_store import FeatureSet
from pipeline.errors import UserError
from pipeline.scale.cluster import ray_connection
from pipeline.scale.training import torch_trainer, train_sasrec_on_ray
from pipeline.training.data_defaults import fit_to_data
from pipeline.training.evaluation import evaluate, selection_ks
from pipeline.training.recipe import sasrec_scorer


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
    again = evaluate(sasrec_scorer(outcome.model), tiny_fs, "valid", settings.model.max_len, torch.device("cpu"),
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


def test_a_training_worker_reuses_the_memory_it_frees(ray_cluster: str, tmp_path: Path) -> None:
    """Found at 50M events: one DDP rank spent 30% of its steps allocating the 128 MB dense
    gradient of the item table, page-faulting all of it in again each step, because Ray Train
    runs the training function in a thread, whose malloc arena maps large blocks afresh."""
    def allocate(config: dict[str, Any]) -> None:  # what a step does with a 500,000 x 64 gradient
        import resource
        import threading

        import ray.train
        import torch

        from pipeline.training.loop import keep_freed_memory_in_process

        keep_freed_memory_in_process()  # as fit does
        faults = []
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            block = torch.zeros(500_000, 64)
            block[0] = 1.0
            del block
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(
            {"faults": faults, "main_thread": threading.current_thread() is threading.main_thread()}))

    settings = load_settings(home=tmp_path / "home", engine="ray", ray_address=ray_cluster, **{"train.workers": 2})
    with ray_connection(settings):
        torch_trainer(allocate, {"out": str(tmp_path)}, settings, "allocate").fit()
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert not seen["main_thread"]  # the premise: Ray Train's workers train in a thread
        assert seen["faults"][0] > 20_000  # the first block is fresh memory: 31,250 pages of 4 kB
        assert max(seen["faults"][-2:]) < 1_000, seen["faults"]  # later ones reuse it (31,000 each before)
