"""Full-ranking metrics against tiny hand-computed examples, and shared among scorers."""

import dataclasses
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.data.feature_store import FeatureSet, Ragged
from models.item_tower import ItemTower
from models.sasrec import SASRec
from pipeline.training.evaluation import ScoredShare, evaluate, rank_metrics, target_ranks
from pipeline.training.recipe import SasrecScorer

NUM_ITEMS = 5


def tiny_feature_set(histories: list[list[int]], valid_pos: list[int], test_pos: list[int]) -> FeatureSet:
    lengths = [len(h) for h in histories]
    offsets = np.zeros(len(histories) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.array([i for h in histories for i in h], dtype=np.int32)
    empty = Ragged(np.zeros(NUM_ITEMS + 2, dtype=np.int64), np.zeros(0, dtype=np.int32))
    items = pl.DataFrame({"item_idx": list(range(1, NUM_ITEMS + 1)), "cold": [False] * NUM_ITEMS})
    return FeatureSet(
        path=Path("."), manifest={"version": "tiny", "counts": {"items": NUM_ITEMS}}, items=items,
        categories=pl.DataFrame(), item_categories=empty, item_tokens=empty, item_numeric=np.zeros((NUM_ITEMS + 1, 0)),
        sequences=Ragged(offsets, values), times=Ragged(offsets, values.astype(np.int64)),
        user_keys=np.arange(len(histories)), user_ids=[str(u) for u in range(len(histories))],
        train_end=np.array([max(0, n - 2) for n in lengths], dtype=np.int32),
        valid_pos=np.array(valid_pos, dtype=np.int32), test_pos=np.array(test_pos, dtype=np.int32),
    )


class FixedScorer:
    """Scores item i as table[i], the same for every history."""

    def __init__(self, table: list[float]) -> None:
        self.table = torch.tensor(table)

    def __call__(self, seq: torch.Tensor) -> torch.Tensor:
        return self.table.unsqueeze(0).repeat(seq.shape[0], 1)


def test_rank_metrics_by_hand() -> None:
    m = rank_metrics(torch.tensor([0, 1, 3, 12]), ks=(1, 2, 10))
    assert m["hr@1"] == pytest.approx(1 / 4)
    assert m["hr@2"] == pytest.approx(2 / 4)
    assert m["hr@10"] == pytest.approx(3 / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 4)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 4)


def test_seen_items_are_excluded_but_never_the_target() -> None:
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    # seen: items 1 and 4 (4 is the target itself: must stay rankable)
    rank = target_ranks(scores.clone(), torch.tensor([4]), torch.tensor([0, 0]), torch.tensor([1, 4]))
    assert rank.item() == 2  # items 2 and 3 score higher; item 1 was seen, item 0 is padding


def test_evaluate_hand_example() -> None:
    # scores: item 1 > 2 > 3 > 4 > 5 for everyone
    scorer = FixedScorer([100.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    fs = tiny_feature_set(
        histories=[[1, 2, 3], [4, 5, 1, 2], [5, 4]],
        valid_pos=[1, 2, -1], test_pos=[2, 3, 1],
    )
    # test: u0 history [1,2] -> target 3; unseen ranking 3,4,5 -> rank 0
    #       u1 history [4,5,1] -> target 2; unseen 2,3 -> rank 0
    #       u2 history [5] -> target 4; unseen 1,2,3,4 -> rank 3
    res = evaluate(scorer, fs, "test", max_len=10, device=torch.device("cpu"), ks=(1, 3, 5))
    assert res.metrics["users"] == 3
    assert res.metrics["hr@1"] == pytest.approx(2 / 3)
    assert res.metrics["hr@3"] == pytest.approx(2 / 3)
    assert res.metrics["hr@5"] == pytest.approx(1.0)
    assert res.metrics["ndcg@5"] == pytest.approx((1 + 1 + 1 / math.log2(5)) / 3)
    assert res.metrics["mrr@5"] == pytest.approx((1 + 1 + 1 / 4) / 3)
    # valid: u0 history [1] -> target 2, rank 0; u1 history [4,5] -> target 1, rank 0
    val = evaluate(scorer, fs, "valid", max_len=10, device=torch.device("cpu"), ks=(1,))
    assert val.metrics["users"] == 2 and val.metrics["hr@1"] == 1.0
    # coverage@1: top-1 lists are u0 -> 3, u1 -> 2, u2 -> 1 on test: 3 distinct of 5 items
    assert res.metrics["coverage@1"] == pytest.approx(3 / 5)


def test_evaluate_respects_max_len_for_input_but_excludes_whole_history() -> None:
    seen_inputs = []

    def scorer(seq: torch.Tensor) -> torch.Tensor:
        seen_inputs.append(seq.clone())
        return torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0]]).repeat(seq.shape[0], 1)

    fs = tiny_feature_set(histories=[[1, 2, 3, 4, 5]], valid_pos=[-1], test_pos=[4])
    res = evaluate(scorer, fs, "test", max_len=2, device=torch.device("cpu"), ks=(1,))
    assert seen_inputs[0].tolist() == [[3, 4]]  # newest two events
    assert res.ranks.tolist() == [0]  # items 1..4 excluded although outside the window


def test_keep_seen_ranks_the_seen_items_too_by_hand() -> None:
    scorer = FixedScorer([100.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    fs = tiny_feature_set(histories=[[1, 2, 3], [4, 5, 1, 2], [5, 4]], valid_pos=[1, 2, -1], test_pos=[2, 3, 1])
    # seen items ranked too: u0 [1,2] -> 3: items 1, 2 above it -> rank 2
    #                        u1 [4,5,1] -> 2: item 1 above -> rank 1
    #                        u2 [5] -> 4: items 1, 2, 3 above -> rank 3 (as before: 5 scores lower)
    res = evaluate(scorer, fs, "test", max_len=10, device=torch.device("cpu"), ks=(1, 3, 5), keep_seen=True)
    assert res.ranks.tolist() == [2, 1, 3]
    assert res.metrics["hr@1"] == 0.0 and res.metrics["hr@3"] == pytest.approx(2 / 3)
    assert res.metrics["ndcg@5"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(3) + 1 / math.log2(5)) / 3)
    # padding is never ranked, with or without seen items
    rank = target_ranks(torch.tensor([[9.0, 5.0, 4.0]]), torch.tensor([2]), torch.tensor([0]), torch.tensor([1]),
                        keep_seen=True)
    assert rank.item() == 1


def test_ranks_over_a_large_catalogue_take_no_catalogue_wide_int64_copy() -> None:
    """Counting the items above each target summed a (B, N+1) bool with ``.sum``, which copies
    it to int64 first: 410 MB for 512 users x 100,001 items, allocated and freed every batch
    (with freed memory kept in the process, validation at 10M events grew to 11 GB). Counted in
    row chunks, the extra peak stays a fraction of that, with the same ranks."""
    script = (
        "import resource, torch\n"
        "from pipeline.training.evaluation import target_ranks\n"
        "g = torch.Generator().manual_seed(0)\n"
        "scores = torch.randn(512, 100_001, generator=g)\n"
        "targets = torch.randint(1, 100_001, (512,), generator=g)\n"
        "none = torch.zeros(0, dtype=torch.long)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "target_ranks(scores, targets, none, none)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) < 175, f"target_ranks raised the peak by {out.stdout.strip()} MB"  # 351 before, 80 now


def test_ranks_counted_in_row_chunks_equal_the_whole_count() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(300, 50_000, generator=g)  # more rows than one chunk holds at this width
    scores[:, 7] = scores[:, 3]  # ties with a target never count as above it
    targets = torch.full((300,), 3)
    expected = (scores > scores[:, 3:4]).sum(dim=1)
    none = torch.zeros(0, dtype=torch.long)
    ranks = target_ranks(scores.clone(), targets, none, none)
    torch.testing.assert_close(ranks, expected - (scores[:, 0] > scores[:, 3]).long())  # padding is never ranked


def test_a_sample_of_users_is_fixed_and_ranks_each_sampled_user_as_the_whole_evaluation_does() -> None:
    rng = np.random.default_rng(2)
    histories = [rng.integers(1, NUM_ITEMS + 1, size=int(rng.integers(3, 8))).tolist() for _ in range(60)]
    fs = tiny_feature_set(histories, [len(h) - 2 for h in histories], [len(h) - 1 for h in histories])
    fs.valid_pos[::7] = -1  # some users have no validation target: never sampled
    scorer = FixedScorer([0.0, 0.5, 0.1, 0.9, 0.3, 0.7])
    whole = evaluate(scorer, fs, "valid", max_len=10, device=torch.device("cpu"), ks=(1, 3))
    sample = evaluate(scorer, fs, "valid", max_len=10, device=torch.device("cpu"), ks=(1, 3), sample=20)
    again = evaluate(scorer, fs, "valid", max_len=10, device=torch.device("cpu"), ks=(1, 3), sample=20)
    assert len(sample.users) == sample.metrics["users"] == 20 and whole.metrics["users"] == len(whole.users) == 51
    assert np.array_equal(sample.users, again.users) and sample.metrics == again.metrics  # the same sample each time
    assert set(sample.users) < set(whole.users) and np.all(np.diff(sample.users) > 0)
    at = np.searchsorted(whole.users, sample.users)
    assert np.array_equal(sample.ranks, whole.ranks[at]) and np.array_equal(sample.targets, whole.targets[at])
    mask = np.isin(whole.users, sample.users)
    assert sample.metrics["ndcg@3"] == pytest.approx(whole.restricted(mask, (1, 3))["ndcg@3"], abs=1e-12)
    larger = evaluate(scorer, fs, "valid", max_len=10, device=torch.device("cpu"), ks=(1, 3), sample=1000)
    assert np.array_equal(larger.users, whole.users)  # a sample beyond the users: all of them


def _shares_here_last_first(score: Callable[[int, int], ScoredShare], shares: int) -> list[ScoredShare]:
    """A share runner that scores the shares in this process, the last first."""
    return [score(share, shares) for share in reversed(range(shares))]


def test_shares_scored_apart_give_the_one_process_result(small_fs: FeatureSet) -> None:
    torch.manual_seed(0)
    fs = dataclasses.replace(small_fs, items=small_fs.items.with_columns(cold=pl.col("item_idx") % 7 == 0))
    scorer = SasrecScorer(SASRec(ItemTower(fs.num_items, 8, use_content=False), max_len=20).eval())
    here = evaluate(scorer, fs, "test", 20, torch.device("cpu"), batch_size=64)
    apart = evaluate(scorer, fs, "test", 20, torch.device("cpu"), batch_size=64, shares=(_shares_here_last_first, 3))
    assert here.metrics == apart.metrics and here.metrics["users"] > 3 * 64  # every share had batches
    for field in ("ranks", "users", "targets", "held_out"):
        np.testing.assert_array_equal(getattr(here, field), getattr(apart, field), err_msg=field)
    assert here.held_out is not None and here.held_out.any()


def test_a_share_runner_that_loses_a_share_is_an_error(small_fs: FeatureSet) -> None:
    def lossy(score: Callable[[int, int], ScoredShare], shares: int) -> list[ScoredShare]:
        return [score(share, shares) for share in range(shares - 1)]

    with pytest.raises(RuntimeError, match="scored .* rows for 610 users"):
        evaluate(FixedScorer([0.0] + [1.0] * small_fs.num_items), small_fs, "test", 20, torch.device("cpu"),
                 batch_size=64, shares=(lossy, 3))


def test_coverage_counts_the_items_in_some_users_top_k_as_the_whole_top_lists_do(small_fs: FeatureSet) -> None:
    """Coverage comes from one bit per item and K per share (not every user's top K): the same
    counts as the distinct items of the top lists."""
    torch.manual_seed(0)
    inner = SasrecScorer(SASRec(ItemTower(small_fs.num_items, 8, use_content=False), max_len=20).eval())
    scored: list[torch.Tensor] = []  # each batch's scores, masked in place by the evaluation as it ranks

    def keeping(seq: torch.Tensor) -> torch.Tensor:
        scored.append(inner(seq).clone())
        return scored[-1]

    ks = (1, 5, 10, 50)
    result = evaluate(keeping, small_fs, "test", 20, torch.device("cpu"), ks=ks, batch_size=64)
    top = torch.cat([torch.topk(scores, 50, dim=1).indices for scores in scored]).numpy()  # (U, 50)
    assert len(top) == result.metrics["users"]
    for k in ks:
        assert result.metrics[f"coverage@{k}"] == len(np.unique(top[:, :k])) / small_fs.num_items, k
    assert 0 < result.metrics["coverage@1"] < result.metrics["coverage@50"]


def test_a_process_group_and_a_share_runner_together_are_refused(small_fs: FeatureSet) -> None:
    from pipeline.training.loop import ProcessGroup

    with pytest.raises(ValueError, match="group or shares, not both"):
        evaluate(FixedScorer([0.0] + [1.0] * small_fs.num_items), small_fs, "test", 20, torch.device("cpu"),
                 group=ProcessGroup(0, 2), shares=(_shares_here_last_first, 2))
