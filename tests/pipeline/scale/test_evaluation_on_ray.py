"""Evaluation shared among Ray tasks equals the one-process evaluation.

The cluster is the session's ``ray start --head`` on 127.0.0.1. Two Ray tasks each score a
share of ml-latest-small's test users (the scorer through the object store, the feature set
loaded from its folder); the report (metrics, the cold-start section over held-out items, the
seen-items-kept section) equals the one computed in this process, to the bit; so does
`attnrec evaluate --engine ray`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models.item_tower import ItemTower
from models.sasrec import SASRec
from pipeline.config import load_settings
from pipeline.scale.cluster import ray_connection
from pipeline.scale.evaluation import shares_on_ray
from pipeline.training.evaluation import ScoredShare, evaluation_report
from pipeline.training.recipe import SasrecScorer
from tests.pipeline.conftest import movielens_feature_set
from tests.support import Attnrec


def test_the_test_report_scored_in_ray_tasks_equals_the_one_process_report(ray_cluster: str, ml_small: Path,
                                                                           tmp_path: Path) -> None:
    fs = movielens_feature_set(tmp_path / "home", ml_small, **{"features.cold_item_fraction": 0.1})
    torch.manual_seed(0)
    scorer = SasrecScorer(SASRec(ItemTower(fs.num_items, 16, use_content=False), max_len=20).eval())
    cpu = torch.device("cpu")
    here = evaluation_report(scorer, fs, "test", 20, cpu, keep_seen=True)
    with ray_connection(load_settings(home=tmp_path / "home", engine="ray", ray_address=ray_cluster)):
        apart = evaluation_report(scorer, fs, "test", 20, cpu, keep_seen=True, shares=(shares_on_ray, 2))
    here.pop("seconds"), apart.pop("seconds")
    assert here["users"] == fs.num_users and here["cold_start"]["users"] > 0 and "among_held_out" in here["cold_start"]
    assert apart == here


def test_attnrec_evaluate_on_the_ray_engine_ranks_in_ray_tasks_as_one_process_does(ray_cluster: str,
                                                                                    small_cli: Attnrec) -> None:
    """`attnrec evaluate --engine ray` ranks the users in `--partitions` Ray tasks and prints
    the report `attnrec evaluate` prints in one process (item-KNN, seen items also kept)."""
    args = ("evaluate", "--split", "test", "--baseline", "itemknn", "--keep-seen")
    here = small_cli.json(*args)
    apart = small_cli.json(*args, "--engine", "ray", "--ray-address", ray_cluster, "--partitions", "3")
    assert (here.pop("scored_on"), apart.pop("scored_on")) == ("this process", "3 Ray tasks")
    for report in (here, apart):
        report.pop("seconds"), report.pop("mlflow_run_id")
    assert here["users"] > 0 and apart == here


def test_the_evaluate_step_on_the_ray_engine_hands_every_share_to_the_ray_runner(
        ray_cluster: str, small_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `attnrec evaluate --engine ray` calls: the Ray runner, with the `partitions` shares
    (both passes of `--keep-seen`), and the users it returns are the report's."""
    from pipeline.app import steps
    from pipeline.scale import evaluation as on_ray

    calls: list[list[int]] = []

    def spy(score: Callable[[int, int], ScoredShare], shares: int) -> list[ScoredShare]:
        parts = shares_on_ray(score, shares)
        calls.append([len(part.rows) for part in parts])
        return parts

    monkeypatch.setattr(on_ray, "shares_on_ray", spy)
    settings = load_settings(home=small_copy, engine="ray", ray_address=ray_cluster, partitions=3)
    report = steps.evaluate(settings, "test", "popularity", keep_seen=True)
    assert report["scored_on"] == "3 Ray tasks"
    assert len(calls) == 2 and all(len(rows) == 3 and sum(rows) == report["users"] for rows in calls)
