"""Reasons are the model's own: removing a recommendation's top-3 reasons lowers its score far
more than removing three random history items (the deletion test of bench/explain_faithfulness.py,
small), on a model trained by `attnrec train`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import Recommender


def test_removing_the_reasons_lowers_the_score_far_more_than_random_items(champion_home: Path) -> None:
    rec = Recommender.load(home=champion_home)
    bundle = rec.bundle
    model, table = bundle.model, bundle.table
    rng = np.random.default_rng(0)
    by_reasons, by_random = [], []
    for user in [str(u) for u in range(1, 611, 12)]:  # 51 users across the warehouse
        answer = rec.recommend(user=user, k=3, explain=True)
        history = bundle.indices_of_keys(rec._store().history(user))
        history = history[history > 0][-model.max_len:]
        distinct = np.unique(history)
        if len(distinct) < 6:
            continue
        for r in answer.recommendations:
            item = bundle.index_of_id[r.item_id]
            assert abs(sum(x.weight for x in r.reasons)) <= 1 + 1e-6 and len(r.reasons) == 3
            reasons = [bundle.index_of_id[x.item_id] for x in r.reasons]
            random3 = rng.choice(distinct, size=3, replace=False)
            with torch.no_grad():
                seqs = [history, history[~np.isin(history, reasons)], history[~np.isin(history, random3)]]
                T = len(history)
                batch = torch.zeros(3, T, dtype=torch.long)
                for row, h in enumerate(seqs):
                    batch[row, T - len(h):] = torch.from_numpy(h)
                scores = model(batch, table)[:, item]  # (3,)
            assert scores[0].item() == pytest.approx(r.score, abs=1e-3)  # the served score
            by_reasons.append((scores[0] - scores[1]).item())
            by_random.append((scores[0] - scores[2]).item())
    assert len(by_reasons) >= 60
    assert np.mean(by_reasons) > 3 * max(np.mean(by_random), 1e-6), (np.mean(by_reasons), np.mean(by_random))
