"""Evaluation shared among Ray tasks equals the one-process evaluation.

The cluster is the session's ``ray start --head`` on 127.0.0.1. Two Ray tasks each score a
share of ml-latest-small's test users (the scorer through the object store, the feature set
loaded from its folder); the report (metrics, the cold-start section over held-out items, the
seen-items-kept section) equals the one computed in this process, to the bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.item_tower import ItemTower
from models.sasrec import SASRec
from pipeline.config import load_settings
from pipeline.scale.cluster import ray_connection
from pipeline.scale.evaluation import shares_on_ray
from pipeline.training.evaluation import evaluation_report
from pipeline.training.recipe import sasrec_scorer
from tests.pipeline.conftest import movielens_feature_set


def test_the_test_report_scored_in_ray_tasks_equals_the_one_process_report(ray_cluster: str, ml_small: Path,
                                                                           tmp_path: Path) -> None:
    fs = movielens_feature_set(tmp_path / "home", ml_small, **{"features.cold_item_fraction": 0.1})
    torch.manual_seed(0)
    scorer = sasrec_scorer(SASRec(ItemTower(fs.num_items, 16, use_content=False), max_len=20).eval())
    cpu = torch.device("cpu")
    here = evaluation_report(scorer, fs, "test", 20, cpu, keep_seen=True)
    with ray_connection(load_settings(home=tmp_path / "home", engine="ray", ray_address=ray_cluster)):
        apart = evaluation_report(scorer, fs, "test", 20, cpu, keep_seen=True, shares=(shares_on_ray, 2))
    here.pop("seconds"), apart.pop("seconds")
    assert here["users"] == fs.num_users and here["cold_start"]["users"] > 0 and "among_held_out" in here["cold_start"]
    assert apart == here
