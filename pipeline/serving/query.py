"""The one query path: histories in, top-k items with scores and reasons out.

Every front end calls ``recommend`` (the Python API ``Recommender``, and through it the
CLI, the HTTP API and batch scoring; the MLflow pyfunc; the run report's examples; the
benchmarks)::

    histories (model item indices, oldest first)
      -> padded once (newest max_len items, ``left_pad``) -> the encoder, once per batch
      -> user vector = the state after the newest item; all states kept for the reasons
      -> per query, the items it may not get (seen, filtered) -> the bundle's FAISS index
         searched for k + excluded neighbours (or, under a narrow filter, the allowed items
         scored exactly) -> excluded items dropped -> top k
      -> reasons: each candidate's attention over the history states of the same pass

How many neighbours are fetched depends on the query alone (k plus its excluded items,
doubled until k remain; ``top_k`` says more), never on the batch it came in: a
user gets the same top-k from a single API call and from ``recommend_all``, with an exact
or an approximate index. A query without usable history gets the most popular allowed
items, flagged ``fallback="popular"``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch

from pipeline.data.identity import canonical_id
from pipeline.errors import UserError
from pipeline.registry.model_store import Bundle
from pipeline.training.batches import left_pad

MAX_K = 1000
REASONS_PER_ITEM = 3
NARROW_FILTER = 0.2  # below this share of allowed items, score them exactly instead of searching the index
ENCODER_BATCH = 256  # queries per encoder pass, fewer where their exclusion masks would pass MASK_BUDGET
FETCH_STEP = 32  # exact and IVF searches fetch neighbours in multiples of this (see ``top_k``)
GPU_MAX_K = 2048  # the most neighbours a FAISS GPU index returns per query
MASK_BUDGET = 64 << 20  # bytes of (N+1,) bool masks held at once (64 queries of a 1M-item catalogue)


@dataclass
class Reason:
    """A history item a recommendation rests on, with its share of the attention (0..1)."""

    item_id: str
    title: str | None
    weight: float


@dataclass
class Recommendation:
    item_id: str
    score: float
    title: str | None
    reasons: list[Reason] = field(default_factory=list)


@dataclass
class Recommendations:
    """One query's answer. ``history_length``: history items the model read (known to it).
    ``known_user``: whether the warehouse knows the user (None for an ad-hoc history)."""

    recommendations: list[Recommendation]
    fallback: str | None
    model_version: str
    history_length: int = 0
    known_user: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ItemInfo:
    """An item of the model's catalogue as a person reads it: ``popularity`` is its training
    interaction count, ``popularity_rank`` its place among all items by that count (1 = most)."""

    item_id: str
    title: str | None
    categories: list[str]
    popularity: int
    popularity_rank: int


@dataclass
class Filters:
    """What a query may not get, besides padding: its own history (``exclude_seen``), items
    outside ``include_categories``, inside ``exclude_categories``, or in ``exclude_items`` (ids)."""

    exclude_seen: bool = True
    include_categories: list[str] | None = None
    exclude_categories: list[str] | None = None
    exclude_items: list[str] | None = None


def set_threads(n: int) -> None:
    """Threads for torch and FAISS (each ships its own OpenMP runtime, so set both)."""
    import faiss

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise UserError(f"k must be between 1 and {MAX_K}")


def recommend(bundle: Bundle, histories: Sequence[np.ndarray | Sequence[int]], k: int, explain: bool = False,
              filters: Filters | Sequence[Filters] | None = None, reasons: int | None = REASONS_PER_ITEM) -> list[Recommendations]:
    """Top ``k`` for each history, in input order, as answer objects.

    Args:
        histories: model item indices per query, oldest first (0 = unknown item, dropped).
        explain: attach reasons: the ``reasons`` history items (None: all of them) with the
            largest attention weight of each recommendation.
        filters: one ``Filters`` for every query, or one per query.
    """
    out: list[Recommendations | None] = [None] * len(histories)
    for i, ranked, why in _ranked(bundle, histories, k, filters, explain, reasons):
        recs = [_item(bundle, int(j), float(s)) for j, s in zip(ranked.items, ranked.scores, strict=True)]
        for rec, rs in zip(recs, why or [], strict=False):
            rec.reasons = rs
        out[i] = Recommendations(recs, ranked.fallback, bundle.version, ranked.history_length)
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]


@dataclass
class Ranked:
    """One query's top-k as arrays (batch scoring keeps these, not answer objects)."""

    items: np.ndarray   # (<= k,) model item indices, best first
    scores: np.ndarray  # (<= k,) float32
    fallback: str | None
    history_length: int


def rank(bundle: Bundle, histories: Sequence[np.ndarray | Sequence[int]], k: int,
         filters: Filters | Sequence[Filters] | None = None) -> list[Ranked]:
    """``recommend`` without answer objects or reasons: the same items and scores, as arrays."""
    out: list[Ranked | None] = [None] * len(histories)
    for i, ranked, _ in _ranked(bundle, histories, k, filters, False, None):
        out[i] = ranked
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]


def _ranked(bundle: Bundle, histories: Sequence[np.ndarray | Sequence[int]], k: int,
            filters: Filters | Sequence[Filters] | None, explain: bool,
            reasons: int | None) -> Iterator[tuple[int, Ranked, list[list[Reason]] | None]]:
    """The query path: (input position, ranked items, reasons per item or None) for every history."""
    check_k(k)
    per_query = [filters or Filters()] * len(histories) if filters is None or isinstance(filters, Filters) else list(filters)
    if len(per_query) != len(histories):
        raise ValueError("give one Filters per history, or one for all")
    cleaned = [_known(h, bundle.num_items) for h in histories]
    static: dict[int, np.ndarray] = {}  # id(Filters) -> its mask, shared by the queries that share it
    with bundle.lock, torch.no_grad():
        max_len = bundle.model.max_len
        for chunk in _encoder_batches([padded_width(min(len(h), max_len), max_len) for h in cleaned], bundle.num_items):
            masks = {i: _excluded(bundle, cleaned[i], per_query[i], static) for i in chunk}
            for i in chunk:
                if not len(cleaned[i]):
                    yield i, _popular(bundle, masks[i], k), None
            scored = [i for i in chunk if len(cleaned[i])]
            if not scored:
                continue
            block_inputs: list[torch.Tensor] | None = [] if explain else None
            seq, states = encode(bundle, [cleaned[i] for i in scored], block_inputs)
            users = np.ascontiguousarray(states[:, -1].cpu().numpy(), dtype=np.float32)  # (B, D)
            tops = top_k(bundle, users, [masks[i] for i in scored], k)
            why = _reasons(bundle, seq, block_inputs, [idx for idx, _ in tops], reasons) if explain else None
            for row, i in enumerate(scored):
                idx, scores = tops[row]
                yield i, Ranked(idx, scores.astype(np.float32), None, int(len(cleaned[i]))), why[row] if why else None


def padded_width(length: int, max_len: int) -> int:
    """The width a history of ``length`` items (at most ``max_len``) is padded to: the next
    power of two, at most ``max_len``. Padding changes the float rounding of the states (by
    about 1e-7), so a width fixed by the query alone makes its scores the same in a batch of
    any users, in a partition of them, or alone."""
    return min(max_len, 1 << max(0, length - 1).bit_length())


def _encoder_batches(widths: Sequence[int], num_items: int) -> Iterator[list[int]]:
    """Query positions grouped into encoder passes of one padded width each (at most
    ``ENCODER_BATCH`` queries, fewer under ``MASK_BUDGET``)."""
    batch = max(1, min(ENCODER_BATCH, MASK_BUDGET // (num_items + 1)))
    order = np.argsort(widths, kind="stable")
    bounds = np.flatnonzero(np.diff(np.asarray(widths, dtype=np.int64)[order])) + 1
    for same in np.split(order, bounds) if len(order) else []:
        for start in range(0, len(same), batch):
            yield [int(i) for i in same[start:start + batch]]


def encode(bundle: Bundle, histories: Sequence[np.ndarray],
           block_inputs: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The one encoder pass of the query path: (seq (B, T), states (B, T, D)).

    ``histories``: model item indices, oldest first, no zeros; each is cut to its newest
    ``max_len`` items and left-padded (``left_pad``) to the ``padded_width`` of the longest.
    ``states[:, -1]`` are the user vectors the index is searched with. ``block_inputs``
    receives each encoder block's input, which the reasons read (``SASRec.explain``).
    """
    max_len = bundle.model.max_len
    width = padded_width(max([1, *(min(len(h), max_len) for h in histories)]), max_len)
    seq = torch.from_numpy(left_pad([h[-max_len:] for h in histories], width)).to(bundle.device)  # (B, T)
    with torch.no_grad():
        return seq, bundle.model.encode(seq, bundle.table, block_inputs)  # (B, T, D)


def exclusion_mask(bundle: Bundle, history: np.ndarray, filters: Filters) -> np.ndarray:
    """(N+1,) bool: the items a query with ``history`` (model item indices) and ``filters`` may not get."""
    return _excluded(bundle, _known(history, bundle.num_items), filters, {})


def similar(bundle: Bundle, items: Sequence[int], k: int) -> list[Recommendations]:
    """For each item index, the ``k`` items whose vectors have the highest inner product with its vector."""
    check_k(k)
    masks = []
    for idx in items:
        mask = np.zeros(bundle.num_items + 1, dtype=bool)
        mask[[0, idx]] = True
        masks.append(mask)
    with bundle.lock:
        tops = top_k(bundle, bundle.vectors[list(items)], masks, k)
    return [Recommendations([_item(bundle, int(j), float(s)) for j, s in zip(idx, sc, strict=True)], None, bundle.version, 1)
            for idx, sc in tops]


def item_info(bundle: Bundle, idx: int) -> ItemInfo:
    """The catalogue facts of model item index ``idx`` (1..N)."""
    rank = int(np.flatnonzero(bundle.popular == idx)[0]) + 1
    return ItemInfo(bundle.item_ids[idx - 1], bundle.titles[idx - 1], bundle.categories[idx - 1],
                    int(bundle.train_counts[idx - 1]), rank)


def search_titles(bundle: Bundle, text: str, limit: int) -> list[ItemInfo]:
    """At most ``limit`` items whose title contains ``text`` (any case), or whose id is ``text``
    (first), the most popular first."""
    needle = text.strip().lower()
    if not needle:
        return []
    found = (bundle.items
             .filter(pl.col("title").str.to_lowercase().str.contains(needle, literal=True) | (pl.col("item_id") == text.strip()))
             .sort([pl.col("item_id") != text.strip(), pl.col("train_count")], descending=[False, True], maintain_order=True)
             .head(limit))
    return [item_info(bundle, int(idx)) for idx in found["item_idx"]]


def top_k(bundle: Bundle, users: np.ndarray, excluded: Sequence[np.ndarray], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(item indices, scores) of the top ``k`` allowed items for each query vector.

    A query fetches k + its excluded items from the index, doubled until k allowed items
    remain. Exact and IVF searches return the same leading neighbours whatever the number
    fetched, so their fetch is rounded up to a multiple of ``FETCH_STEP`` (a batch then needs
    few searches); HNSW widens its search with the number fetched, so its fetch is never
    rounded. Either way it depends on the query alone, not on its batch. A narrow filter, or
    a fetch beyond what a GPU index can return, scores the allowed items exactly.

    Args:
        users: (B, D) float32 query vectors.
        excluded: B masks (N+1,) bool of items the query may not get (index 0 always).
    """
    n = bundle.num_items
    step = 1 if bundle.index_meta.kind == "hnsw" else FETCH_STEP
    limit = n if bundle.index_meta.device == "cpu" else min(n, GPU_MAX_K)
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(users)
    wanted: list[int] = [0] * len(users)
    pending: dict[int, list[int]] = {}  # neighbours to fetch -> queries
    for b, mask in enumerate(excluded):
        n_excluded = int(np.count_nonzero(mask[1:]))
        allowed = n - n_excluded
        wanted[b] = min(k, allowed)
        fetch = min(n, -(-(wanted[b] + n_excluded) // step) * step)
        if wanted[b] <= 0:
            results[b] = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        elif allowed < NARROW_FILTER * n or fetch > limit:  # score the allowed items exactly
            results[b] = _exact(bundle, users[b], mask, wanted[b])
        else:
            pending.setdefault(fetch, []).append(b)
    while pending:
        fetch, rows = pending.popitem()
        scores, ids = bundle.index.search(np.ascontiguousarray(users[rows]), fetch)  # (R, fetch) each
        for r, b in enumerate(rows):
            keep = (ids[r] > 0) & ~excluded[b][np.maximum(ids[r], 0)]
            if keep.sum() >= wanted[b] or fetch >= n:
                results[b] = (ids[r][keep][:wanted[b]], scores[r][keep][:wanted[b]])
            elif 2 * fetch > limit:
                results[b] = _exact(bundle, users[b], excluded[b], wanted[b])
            else:
                pending.setdefault(min(n, 2 * fetch), []).append(b)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _exact(bundle: Bundle, user: np.ndarray, excluded: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` allowed items by exact inner product with ``user`` (D,)."""
    cand = np.nonzero(~excluded)[0]
    s = bundle.vectors[cand] @ user  # (A,)
    top = np.argsort(-s, kind="stable")[:k]
    return cand[top], s[top]


def indices_of_ids(bundle: Bundle, ids: Sequence[object]) -> tuple[list[int], list[str]]:
    """Item ids in the user's terms -> (model item indices of the known ones, the unknown ids).

    Ids are read by the identity rule (``pipeline.data.identity``): ``" 1 "`` is item ``"1"``.
    """
    known, unknown = [], []
    for raw in ids:
        iid = canonical_id(raw, "item id")
        idx = bundle.index_of_id.get(iid)
        (known.append(idx) if idx else unknown.append(iid))
    return known, unknown


def _known(history: np.ndarray | Sequence[int], num_items: int) -> np.ndarray:
    """The known items of a history of model item indices (0 = unknown, dropped)."""
    h = np.asarray(history, dtype=np.int64)
    if len(h) and (h.min() < 0 or h.max() > num_items):
        raise ValueError(f"item indices must be model indices in 0..{num_items} (Bundle.indices_of_keys / "
                         f"indices_of_ids); got {int(h.min())}..{int(h.max())}: warehouse keys or item ids?")
    return h[h > 0]


def _excluded(bundle: Bundle, history: np.ndarray, filters: Filters, static: dict[int, np.ndarray]) -> np.ndarray:
    """(N+1,) bool mask of the items this query may not get."""
    if not (filters.exclude_items or filters.exclude_categories or filters.include_categories):
        mask = np.zeros(bundle.num_items + 1, dtype=bool)  # the common case: padding and, maybe, the history
        mask[0] = True
        if filters.exclude_seen:
            mask[history] = True
        return mask
    if id(filters) not in static:
        _check_categories(bundle, filters)
        mask = np.zeros(bundle.num_items + 1, dtype=bool)
        mask[0] = True
        if filters.exclude_items:
            mask[indices_of_ids(bundle, filters.exclude_items)[0]] = True
        if filters.exclude_categories:
            for name in filters.exclude_categories:
                mask[bundle.items_in_category(name)] = True
        if filters.include_categories:
            wanted = np.zeros(bundle.num_items + 1, dtype=bool)
            for name in filters.include_categories:
                wanted[bundle.items_in_category(name)] = True
            mask |= ~wanted
        static[id(filters)] = mask
    mask = static[id(filters)]
    if filters.exclude_seen and len(history):
        mask = mask.copy()
        mask[history] = True
    return mask


def _check_categories(bundle: Bundle, filters: Filters) -> None:
    """A category the catalogue does not have is an error, never an empty or unfiltered list."""
    for field_name, names in (("include_categories", filters.include_categories),
                              ("exclude_categories", filters.exclude_categories)):
        for name in names or []:
            if not len(bundle.items_in_category(name)):
                known = bundle.category_names()
                close = difflib.get_close_matches(name, known, n=3)
                hint = (f"did you mean {' or '.join(close)}?" if close
                        else f"the catalogue has {len(known)} categories" + (f", e.g. {', '.join(known[:5])}" if known else ""))
                raise UserError(f"{field_name}: unknown category {name!r} ({hint})")


def _popular(bundle: Bundle, excluded: np.ndarray, k: int) -> Ranked:
    """The most popular allowed items (training interaction counts as scores): the fallback."""
    picks = bundle.popular[~excluded[bundle.popular]][:k]
    return Ranked(picks, bundle.train_counts[picks - 1].astype(np.float32), "popular", 0)


def _item(bundle: Bundle, idx: int, score: float) -> Recommendation:
    return Recommendation(bundle.item_ids[idx - 1], score, bundle.titles[idx - 1])


def _reasons(bundle: Bundle, seq: torch.Tensor, block_inputs: list[torch.Tensor] | None, tops: list[np.ndarray],
             limit: int | None) -> list[list[list[Reason]]]:
    """For each query and each of its recommendations, the history items its score rests on
    most (``SASRec.explain``: shares of the score made through the attention).

    ``seq`` (B, T) and ``block_inputs`` come from the query's encoder pass.
    """
    K = max(1, max(len(t) for t in tops))
    cand = torch.from_numpy(left_pad(tops, K)).to(seq.device)  # (B, K), left-padded with 0
    with torch.no_grad():
        weights = bundle.model.explain(seq, cand, bundle.table, block_inputs).cpu().numpy()  # (B, K, T)
    hist = seq.cpu().numpy()  # (B, T)
    out = []
    for b, top in enumerate(tops):
        rows = []
        for w in weights[b, K - len(top):]:  # (T,) per recommendation
            share: dict[int, float] = {}
            for item, weight in zip(hist[b], w, strict=True):
                if item:
                    share[int(item)] = share.get(int(item), 0.0) + float(weight)
            best = sorted(share.items(), key=lambda kv: -kv[1])[:limit]
            rows.append([Reason(bundle.item_ids[i - 1], bundle.titles[i - 1], round(x, 4)) for i, x in best])
        out.append(rows)
    return out
