"""Evaluation shared among Ray tasks: the test report of a multi-worker training run.

``shares_on_ray`` is a ``ShareRunner`` of ``pipeline.training.evaluation.evaluate``: each share
of the users' batches (``score_share``) is one Ray task, which gets the scorer through the
object store and loads the feature set from its folder (``FeatureSet`` pickles as its path),
so no task holds more than its share's rows of the result. The caller holds the Ray
connection (``pipeline.scale.cluster.ray_connection``); the feature set must be on storage
every worker can read, as for training.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.scale.cluster import import_ray, run_tasks
from pipeline.training.evaluation import ScoredShare


def score_one_share(score: Callable[[int, int], ScoredShare], share: int, shares: int) -> ScoredShare:
    """One Ray task's work: ``score(share, shares)``."""
    return score(share, shares)


def shares_on_ray(score: Callable[[int, int], ScoredShare], shares: int) -> list[ScoredShare]:
    """``score(share, shares)`` for every share, one Ray task (one CPU) each, retried twice if
    its worker dies; the shares in order. ``score`` goes to the object store once (a model's
    tables can pass the size Ray allows a remote function's closure)."""
    ray = import_ray()
    task = ray.remote(num_cpus=1, max_retries=2)(score_one_share)
    ref = ray.put(score)
    return run_tasks(ray, task, [(ref, share, shares) for share in range(shares)])
