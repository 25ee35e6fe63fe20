"""Are the reasons the model's own? The deletion test, side by side for five ways to pick 3 items.

    python bench/explain_faithfulness.py --home .attnrec                 # the champion, 300 users
    python bench/explain_faithfulness.py --home /tmp/toys --users 300 --model models:/attnrec/1

For each of ``--users`` users with at least 5 history items (spread over the warehouse), the
top-10 comes from the one query path with ``explain`` (``pipeline.serving.query.recommend``).
For each of the 10 items, three of the user's history items are removed (every occurrence,
within the newest ``max_len`` the model reads) and the item's score recomputed. The three are:

* ``reasons``: the three items with the largest reason weights (what attnrec answers);
* ``state similarity (before)``: the reasons attnrec gave before, softmax_t <h_t, e_c> / sqrt(D)
  over the history states, computed here for comparison;
* ``newest 3``: the three most recent distinct items;
* ``random 3``: three distinct items drawn at random (seeded);
* ``occlusion top-3``: the three items whose removal alone lowers the score most (leave-one-out,
  one encoder pass per history item): the best any explanation can do by this test, nearly.

Printed per method: the mean drop of the item's score (over users x 10 items), that drop as a
share of occlusion's, and for how many users the first item leaves the top-10 (seen items,
the removed ones included, stay excluded). Then the cost of ``explain``: the median latency of
a top-10 request with and without it, one query at a time (``--threads``, default 1).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.quality import machine  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.serving.query import recommend, set_threads  # noqa: E402
from pipeline.serving.recommender import Recommender  # noqa: E402

METHODS = ("reasons", "state similarity (before)", "newest 3", "random 3", "occlusion top-3")


def without(history: np.ndarray, removed: set[int]) -> np.ndarray:
    return history[~np.isin(history, list(removed))] if removed else history


def padded(histories: list[np.ndarray]) -> torch.Tensor:
    T = max(1, max(len(h) for h in histories))
    out = np.zeros((len(histories), T), dtype=np.int64)
    for row, h in enumerate(histories):
        if len(h):
            out[row, T - len(h):] = h
    return torch.from_numpy(out)


@torch.no_grad()
def scores_of(model: torch.nn.Module, table: torch.Tensor, histories: list[np.ndarray]) -> torch.Tensor:
    """(len(histories), N+1) scores, in chunks."""
    out = []
    for start in range(0, len(histories), 256):
        out.append(model(padded(histories[start:start + 256]), table))
    return torch.cat(out)


@torch.no_grad()
def state_similarity_top3(model: torch.nn.Module, table: torch.Tensor, history: np.ndarray, item: int) -> set[int]:
    seq = padded([history])
    states = model.encode(seq, table)[0]  # (T, D)
    weights = torch.softmax(states @ table[item] / math.sqrt(model.dim), dim=0).numpy()  # (T,)
    share: dict[int, float] = {}
    for i, w in zip(history.tolist(), weights.tolist(), strict=True):
        share[i] = share.get(i, 0.0) + w
    return {i for i, _ in sorted(share.items(), key=lambda kv: -kv[1])[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--model", default=None, help="model reference (default: the champion)")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("command:", " ".join(sys.argv))
    print("machine:", machine())
    set_threads(args.threads)
    rec = Recommender.load(args.model, settings=load_settings(home=args.home))
    bundle, model, table = rec.bundle, rec.bundle.model, rec.bundle.table
    user_ids, keys = rec._store().all_histories()
    histories = [bundle.indices_of_keys(k) for k in keys]
    histories = [h[h > 0][-model.max_len:] for h in histories]
    eligible = [i for i, h in enumerate(histories) if len(np.unique(h)) >= 5]
    picks = [eligible[int(j)] for j in np.linspace(0, len(eligible) - 1, num=min(args.users, len(eligible)))]
    print(f"model {bundle.version} ({bundle.num_items:,} items, max_len {model.max_len}); {len(picks)} users "
          f"of {len(eligible):,} with at least 5 distinct items; {rec._store().db_path}")
    rng = np.random.default_rng(args.seed)
    drops = {m: [] for m in METHODS}
    exits = dict.fromkeys(METHODS, 0)
    for u in picks:
        h = histories[u]
        answer = recommend(bundle, [h], k=10, explain=True, reasons=None)[0]
        top = [bundle.index_of_id[r.item_id] for r in answer.recommendations]
        distinct = list(dict.fromkeys(h[::-1].tolist()))  # newest first
        occluded = scores_of(model, table, [without(h, {i}) for i in distinct])  # (U, N+1)
        base = scores_of(model, table, [h])[0]  # (N+1,)
        removal_sets: list[tuple[str, int, set[int]]] = []
        for rank, (item, r) in enumerate(zip(top, answer.recommendations, strict=True)):
            by_reason = [bundle.index_of_id[x.item_id] for x in sorted(r.reasons, key=lambda x: -x.weight)]
            loo = base[item] - occluded[:, item]  # (U,) each item's own removal
            removal_sets += [
                ("reasons", rank, set(by_reason[:3])),
                ("state similarity (before)", rank, state_similarity_top3(model, table, h, item)),
                ("newest 3", rank, set(distinct[:3])),
                ("random 3", rank, set(rng.choice(distinct, size=3, replace=False).tolist())),
                ("occlusion top-3", rank, {distinct[j] for j in torch.argsort(loo, descending=True)[:3].tolist()}),
            ]
        after = scores_of(model, table, [without(h, s) for _, _, s in removal_sets])  # (5 x 10, N+1)
        seen = np.unique(h)
        for (method, rank, _), row in zip(removal_sets, after, strict=True):
            item = top[rank]
            drops[method].append(float(base[item] - row[item]))
            if rank == 0:
                row = row.clone()
                row[0] = float("-inf")
                row[torch.from_numpy(seen)] = float("-inf")
                exits[method] += int(item not in torch.topk(row, 10).indices.tolist())
    best = float(np.mean(drops["occlusion top-3"]))
    print(f"\n{'3 items removed by':<28} {'mean score drop':>15} {'of occlusion':>13} {'first item leaves top-10':>25}")
    for m in METHODS:
        mean = float(np.mean(drops[m]))
        print(f"{m:<28} {mean:15.3f} {mean / best:13.0%} {exits[m]:>14} of {len(picks)}")

    # --- the cost of explain on a top-10 request, one query at a time
    sample = [histories[u] for u in picks[:100]]
    for h in sample[:5]:
        recommend(bundle, [h], k=10, explain=True)
    timings = {}
    for flag in (False, True):
        times = []
        for h in sample:
            started = time.perf_counter()
            recommend(bundle, [h], k=10, explain=flag)
            times.append(time.perf_counter() - started)
        timings[flag] = float(np.median(times)) * 1000
    print(f"\ntop-10 request, median of {len(sample)}: {timings[False]:.2f} ms without explain, {timings[True]:.2f} ms "
          f"with it (+{timings[True] - timings[False]:.2f} ms), {args.threads} thread(s)")


if __name__ == "__main__":
    main()
