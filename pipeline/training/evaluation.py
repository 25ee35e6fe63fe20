"""Full-ranking evaluation: HR@K, NDCG@K, MRR@K and catalogue coverage@K.

Every user with a target in the split is scored against the whole catalogue; items the
user already interacted with (the whole history before the target) are excluded from the
ranking, except the target itself; item 0 (padding) is never ranked. With ``keep_seen``
the seen items are ranked too (the protocol of catalogues where people buy or watch again). The rank of the
target is the number of items with a strictly higher score (ties favour the target, as
in the reference implementations). Scoring runs in batches on the model's device; in a
data-parallel process group (Ray Train's workers) the ranks score a share of the users each and
exchange the results, so every rank holds what one process would have computed; a runner can
score the shares elsewhere (Ray tasks: the test report of a multi-worker run).

When the feature set holds items out of training (``cold_item_fraction``), the report adds
a cold-start section for the targets among them: their ranks in the whole catalogue, and
their ranks among the held-out items alone (``among_held_out``: can the model tell which new
item a user will take?). There, tied items are taken in random order (the metrics are their
expectation), so a model that scores every new item alike, as most-popular does, scores
what chance does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.data.feature_store import FeatureSet
from pipeline.errors import UserError
from pipeline.training.batches import prefix_batch, seen_pairs
from pipeline.training.loop import ProcessGroup

Scorer = Callable[[torch.Tensor], torch.Tensor]  # (B, T) histories -> (B, N+1) scores
DEFAULT_KS = (5, 10, 20, 50)


def rank_metrics(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """HR@K, NDCG@K, MRR@K from 0-based target ranks (U,)."""
    out: dict[str, float] = {}
    r = ranks.to(torch.float64)
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = hit.double().mean().item()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean().item()
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / (r + 1.0), torch.zeros_like(r)).mean().item()
    return out


def tied_rank_metrics(higher: torch.Tensor, ties: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Expected HR@K, NDCG@K, MRR@K when each target's ``ties`` (U,) equal-scored items are
    ordered at random after the ``higher`` (U,) items scored above it (rank uniform in
    higher..higher+ties)."""
    h, t = higher.to(torch.float64), ties.to(torch.float64)
    out: dict[str, float] = {}
    for k in ks:
        hr = torch.zeros_like(h)
        ndcg = torch.zeros_like(h)
        mrr = torch.zeros_like(h)
        for r in range(k):
            p = ((h <= r) & (r <= h + t)).double() / (t + 1.0)  # (U,) probability that the rank is r
            hr += p
            ndcg += p / math.log2(r + 2.0)
            mrr += p / (r + 1.0)
        out[f"hr@{k}"], out[f"ndcg@{k}"], out[f"mrr@{k}"] = hr.mean().item(), ndcg.mean().item(), mrr.mean().item()
    return out


COUNT_CHUNK_SCORES = 8_000_000  # scores compared at a time when counting per row (a 64 MB int64 copy)


def count_per_row(compare: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scores: torch.Tensor,
                  thresholds: torch.Tensor) -> torch.Tensor:
    """(B,) long: in each row of ``scores`` (B, C), how many scores ``compare`` (``torch.gt``,
    ``torch.eq``) holds for against the row's threshold (``thresholds`` (B, 1)).

    Summing a (B, C) bool copies it to int64 first, 8 bytes per score: 410 MB for 512 users and
    100,001 items, allocated anew every batch and, with freed memory kept in the process, a
    heap that grew to 11 GB over one validation at 10M events. Rows are counted in chunks of
    at most ``COUNT_CHUNK_SCORES`` scores, so the copy stays small and the same size."""
    rows = max(1, COUNT_CHUNK_SCORES // scores.shape[1])
    return torch.cat([compare(s, t).sum(dim=1) for s, t in zip(scores.split(rows), thresholds.split(rows))])  # (B,)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, seen_rows: torch.Tensor, seen_items: torch.Tensor,
                 keep_seen: bool = False) -> torch.Tensor:
    """0-based rank of each target among unseen items (``keep_seen``: among all items).

    Args:
        scores: (B, N+1) float, modified in place (seen items and padding set to -inf).
        targets: (B,) long.
        seen_rows, seen_items: (S,) long pairs of already-seen (row, item).
    Returns:
        (B,) long ranks.
    """
    target_scores = scores.gather(1, targets.unsqueeze(1))  # (B, 1)
    if not keep_seen:
        scores[seen_rows, seen_items] = float("-inf")
    scores[:, 0] = float("-inf")
    scores.scatter_(1, targets.unsqueeze(1), target_scores)  # the target is never excluded
    return count_per_row(torch.gt, scores, target_scores)  # (B,)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    ranks: np.ndarray      # (U_eval,) 0-based rank of each user's target
    users: np.ndarray      # (U_eval,) user_idx evaluated
    targets: np.ndarray    # (U_eval,) target item_idx
    seconds: float
    held_out: np.ndarray | None = None  # (U_eval, 2) long: held-out items scored above the target, tied with it

    def restricted(self, mask: np.ndarray, ks: Sequence[int]) -> dict[str, Any]:
        """Metrics over the users selected by ``mask`` (U_eval,) bool (e.g. cold targets), with
        ``among_held_out`` when the held-out ranks were measured."""
        if not mask.any():
            return {}
        out: dict[str, Any] = rank_metrics(torch.from_numpy(self.ranks[mask]), ks)
        out["users"] = int(mask.sum())
        if self.held_out is not None:
            out["among_held_out"] = tied_rank_metrics(*torch.from_numpy(self.held_out[mask]).T, ks)
        return out


SAMPLE_SEED = 0  # a sample of users depends on the feature set and its size alone


def split_targets(fs: FeatureSet, split: str, sample: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(users, target positions) with a target in ``split`` ('valid' | 'test'), in user order;
    ``sample``: a fixed random subset of that many of them (all where there are no more), the
    same for the same feature set and size, so that scores measured apart compare."""
    pos = fs.valid_pos if split == "valid" else fs.test_pos
    users = np.nonzero(pos >= 0)[0]
    if sample is not None and sample < len(users):
        users = np.sort(np.random.default_rng(SAMPLE_SEED).choice(users, sample, replace=False))
    return users, pos[users].astype(np.int64)


@dataclass
class ScoredShare:
    """What one share of an evaluation's batches found: ``rows`` (S,) are positions in the
    split's user order (``split_targets``), the per-user arrays are theirs; ``covered`` is
    the catalogue's, one bit per item and K, so that a share's size does not grow with its
    users' top lists."""

    rows: np.ndarray      # (S,) int64
    ranks: np.ndarray     # (S,) 0-based rank of each target
    targets: np.ndarray   # (S,) target item_idx
    covered: np.ndarray   # (len(ks), ceil((N+1)/8)) uint8 packed bits: item_idx i is in some user's top ks[j]
    held_out: np.ndarray | None  # (S, 2) held-out items scored above the target, tied with it


# (score, shares) -> every share's rows: ``score(share, shares)`` run once for each share, anywhere
ShareRunner = Callable[[Callable[[int, int], ScoredShare], int], list[ScoredShare]]


@torch.no_grad()
def score_share(scorer: Scorer, fs: FeatureSet, users: np.ndarray, positions: np.ndarray, max_len: int,
                device: torch.device, ks: Sequence[int], batch_size: int, keep_seen: bool, share: int,
                shares: int) -> ScoredShare:
    """Score share ``share`` of ``shares`` of the targets at ``positions`` (U,) of ``users`` (U,).

    Users are batched by history length (shortest first) so attention cost tracks real
    lengths; share r takes every ``shares``-th batch from the r-th (the batches one process
    scores, so every user's scores are the same to the bit however many shares there are;
    about equal shares, the batches' lengths growing slowly)."""
    order = np.argsort(np.minimum(positions, max_len), kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][share::shares]
    rows = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)  # (S,)
    ranks_out, targets_out = np.empty(len(rows), dtype=np.int64), np.empty(len(rows), dtype=np.int64)
    kmax = min(max(ks), fs.num_items + 1)  # a K beyond the catalogue: all of it
    covered = torch.zeros((len(ks), fs.num_items + 1), dtype=torch.bool, device=device)  # (len(ks), N+1)
    held_mask = torch.from_numpy(fs.cold_mask).to(device)  # (N+1,) bool
    held_out = torch.nonzero(held_mask).squeeze(1)  # (C,) item_idx
    held_out_counts = np.zeros((len(rows), 2), dtype=np.int64) if len(held_out) else None
    at = 0
    for sel in batches:
        here = slice(at, at + len(sel))  # this batch's rows of the share
        at += len(sel)
        u, p = users[sel], positions[sel]
        seq = torch.from_numpy(prefix_batch(fs.sequences, u, p, max_len)).to(device)
        targets = torch.from_numpy(fs.sequences.values[fs.sequences.offsets[u] + p].astype(np.int64)).to(device)
        seen_rows, seen_items = seen_pairs(fs.sequences, u, p)
        scores = scorer(seq).float().contiguous()  # (B, N+1), modified in place below
        ranks = target_ranks(scores, targets, torch.from_numpy(seen_rows).to(device),
                             torch.from_numpy(seen_items).to(device), keep_seen)
        ranks_out[here] = ranks.cpu().numpy()
        if held_out_counts is not None:
            held_scores = scores[:, held_out]  # (B, C)
            target_scores = scores.gather(1, targets.unsqueeze(1))  # (B, 1)
            higher = count_per_row(torch.gt, held_scores, target_scores)  # (B,)
            ties = count_per_row(torch.eq, held_scores, target_scores) - held_mask[targets].long()  # (B,) the target is no tie of its own
            held_out_counts[here] = torch.stack([higher, ties], dim=1).cpu().numpy()
        targets_out[here] = targets.cpu().numpy()
        top = torch.topk(scores, kmax, dim=1).indices  # (B, K) best first
        for j, k in enumerate(ks):
            covered[j, top[:, :k].flatten()] = True
    return ScoredShare(rows, ranks_out, targets_out, np.packbits(covered.cpu().numpy(), axis=1), held_out_counts)


def evaluate(scorer: Scorer, fs: FeatureSet, split: str, max_len: int, device: torch.device,
             ks: Sequence[int] = DEFAULT_KS, batch_size: int = 512, keep_seen: bool = False,
             group: ProcessGroup | None = None, sample: int | None = None,
             shares: tuple[ShareRunner, int] | None = None) -> EvalResult:
    """Full-ranking metrics of ``scorer`` on the validation or test targets of ``fs``.

    Returns metrics plus ``coverage@K`` (share of the catalogue appearing in any user's top
    K), over every user with a target or a fixed ``sample`` of that many (``split_targets``).
    The users' batches (``score_share``) are scored here, or shared: in a process ``group``
    (``pipeline.training.loop.process_group``; every rank must call this) rank r scores share r
    of ``world`` and the ranks exchange their rows, each returning the whole result; with
    ``shares`` = (runner, n) the runner scores the n shares (on Ray:
    ``pipeline.scale.evaluation.shares_on_ray``). Every user is scored as one process scores
    it, so the result is the same.
    """
    if split not in ("valid", "test"):
        raise ValueError("split must be 'valid' or 'test'")
    if group is not None and shares is not None:
        raise ValueError("evaluate: a process group's ranks share the users already; give group or shares, not both")
    started = time.perf_counter()
    users, positions = split_targets(fs, split, sample)
    if len(users) == 0:
        raise UserError(f"the feature set {fs.version} has no {split} targets (split {fs.manifest.get('split', {}).get('kind')}): "
                        "build one that has, e.g. `attnrec features --split loo`")

    def score(share: int, of: int) -> ScoredShare:
        return score_share(scorer, fs, users, positions, max_len, device, ks, batch_size, keep_seen, share, of)

    if group is not None:
        import torch.distributed as dist

        parts: list[Any] = [None] * group.world
        dist.all_gather_object(parts, score(group.rank, group.world))
    elif shares is not None:
        runner, n = shares
        parts = runner(score, n)
    else:
        parts = [score(0, 1)]
    rows = np.concatenate([part.rows for part in parts])  # (U,) each position once
    if not np.array_equal(np.sort(rows), np.arange(len(users))):
        raise RuntimeError(f"the shares of the {split} evaluation scored {len(rows)} rows for {len(users)} users")

    def whole(field: str) -> np.ndarray:
        values = np.concatenate([getattr(part, field) for part in parts])
        out = np.empty_like(values)
        out[rows] = values
        return out

    all_ranks, all_targets = whole("ranks"), whole("targets")
    held_out_counts = whole("held_out") if parts[0].held_out is not None else None
    covered = parts[0].covered.copy()  # (len(ks), ceil((N+1)/8)): folded share by share, never stacked
    for part in parts[1:]:
        np.bitwise_or(covered, part.covered, out=covered)
    metrics = rank_metrics(torch.from_numpy(all_ranks), ks)
    for j, k in enumerate(ks):  # the items in some user's top k
        metrics[f"coverage@{k}"] = int(np.unpackbits(covered[j]).sum()) / fs.num_items
    metrics["users"] = len(users)
    return EvalResult(metrics, all_ranks, users, all_targets, time.perf_counter() - started, held_out_counts)


def evaluation_report(scorer: Scorer, fs: FeatureSet, split: str, max_len: int, device: torch.device,
                      ks: Sequence[int] = DEFAULT_KS, keep_seen: bool = False, sample: int | None = None,
                      shares: tuple[ShareRunner, int] | None = None) -> dict[str, Any]:
    """``evaluate``'s metrics and seconds (seen items excluded), plus the cold-start section
    (targets among held-out items) and, with ``keep_seen``, a ``keep_seen`` section: the same
    metrics with seen items ranked too, beside the default; over a fixed ``sample`` of the
    users (``split_targets``) or all of them, scored here or in ``shares`` (``evaluate``)."""
    result = evaluate(scorer, fs, split, max_len, device, ks, sample=sample, shares=shares)
    report: dict[str, Any] = dict(result.metrics)
    report["seconds"] = round(result.seconds, 3)
    cold = fs.cold_mask
    if cold.any():
        report["cold_start"] = result.restricted(cold[result.targets], ks)
    if keep_seen:
        report["keep_seen"] = evaluate(scorer, fs, split, max_len, device, ks, keep_seen=True, sample=sample,
                                       shares=shares).metrics
    return report


def selection_ks(metric: str) -> tuple[int, ...]:
    """The cut-offs validation computes: 10 (always logged) and the selection metric's K ('ndcg@20' -> 20)."""
    return tuple(sorted({10, int(metric.split("@")[1])}))
