"""Top-k recommendations: the one query path behind the CLI, the HTTP API and batch scoring.

history (item keys, oldest first) -> encoder -> user vector -> FAISS top-(k + excluded)
-> seen / excluded items removed -> top-k, each with its reasons (attention weights of the
history items, from ``SASRec.explain``). No history: most-popular, and the answer says so.

A *model bundle* is a folder holding ``model.pt``, ``items.parquet`` (the model's item
vocabulary with titles and categories) and ``index/`` (FAISS). Histories come from the
warehouse through ``HistoryStore``, so new events change recommendations without retraining.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import torch

from models.sasrec import SASRec
from pipeline.errors import UserError
from pipeline.data.feature_store import FeatureSet
from pipeline.registry.index import IndexMeta, build_index, load_index, save_index, to_device
from pipeline.registry.model_store import load_model
from pipeline.data.warehouse import DICT_KEY_BASE, lookup_keys

MAX_K = 1000
REASONS_PER_ITEM = 3


@dataclass
class Reason:
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
class RecommendationResponse:
    recommendations: list[Recommendation]
    fallback: str | None
    model_version: str
    history_length: int = 0
    unknown_items: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Filters:
    exclude_seen: bool = True
    include_categories: list[str] | None = None
    exclude_categories: list[str] | None = None
    exclude_items: list[str] | None = None


def set_threads(n: int) -> None:
    """Threads for torch and FAISS (each ships its own OpenMP runtime, so set both)."""
    import faiss

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def write_bundle(run_dir: Path, fs: FeatureSet, model: SASRec, model_sha256: str, kind: str = "auto",
                 params: dict[str, Any] | None = None) -> IndexMeta:
    """Add ``items.parquet`` and the FAISS index next to ``run_dir/model.pt``.

    Recall of an approximate index is measured with real queries: the user vectors of up
    to 1,000 users' validation inputs.
    """
    fs.items.select("item_idx", "item_key", "item_id", "title", "categories", "train_count").write_parquet(
        run_dir / "items.parquet")
    with torch.no_grad():
        table = model.item_vectors()
        users = np.nonzero(fs.valid_pos >= 0)[0][:1000]
        from pipeline.training.batches import prefix_batch

        queries = None
        if len(users):
            seq = torch.from_numpy(prefix_batch(fs.sequences, users, fs.valid_pos[users].astype(np.int64), model.max_len))
            queries = model.user_vectors(seq.to(table.device), table).cpu().numpy()
    index, meta = build_index(table.cpu().numpy(), model_sha256, kind, queries, params)
    save_index(run_dir / "index", index, meta)
    return meta


class ModelBundle:
    """A loaded model with its vocabulary, catalogue metadata, item vectors and index."""

    def __init__(self, path: Path, device: torch.device | str = "cpu") -> None:
        self.path = path
        self.device = torch.device(device)
        self.model, self.meta = load_model(path / "model.pt", self.device)
        label = path / "VERSION"  # written for registry models: "attnrec v3"
        self.version = label.read_text().strip() if label.exists() else self.meta["sha256"][:12]
        items_path = path / "items.parquet"
        if not items_path.exists():
            raise UserError(f"{path} has no items.parquet: rebuild the bundle with `attnrec index`")
        self.items = pl.read_parquet(items_path).sort("item_idx")
        self.item_keys = self.meta["item_keys"].numpy()
        if len(self.item_keys) != self.items.height:
            raise UserError(f"{path}: items.parquet does not match model.pt ({self.items.height} vs {len(self.item_keys)} items)")
        self.item_ids: list[str] = self.items["item_id"].to_list()
        self.titles: list[str | None] = self.items["title"].to_list()
        self.id_to_idx = {iid: i + 1 for i, iid in enumerate(self.item_ids)}
        self.categories: list[list[str]] = [c or [] for c in self.items["categories"].to_list()]
        counts = self.items["train_count"].to_numpy()
        self.popular = np.argsort(-counts, kind="stable") + 1  # item_idx by popularity
        with torch.no_grad():
            self.table = self.model.item_vectors()  # (N+1, D)
        self.vectors = self.table.cpu().numpy()
        self.index, self.index_meta = load_index(path / "index", self.meta["sha256"])
        self.lock = threading.Lock()  # torch and faiss calls are serialised per bundle

    @property
    def num_items(self) -> int:
        return len(self.item_keys)

    def indices_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Warehouse item keys -> model item indices (0 for items the model does not know)."""
        pos = np.searchsorted(self.item_keys, keys)
        pos = np.minimum(pos, len(self.item_keys) - 1)
        return np.where(self.item_keys[pos] == keys, pos + 1, 0)

    def indices_of_ids(self, ids: list[str]) -> tuple[list[int], list[str]]:
        """External item ids -> indices; also returns the ids the model does not know."""
        known, unknown = [], []
        for i in ids:
            idx = self.id_to_idx.get(str(i))
            (known.append(idx) if idx else unknown.append(str(i)))
        return known, unknown

    def _excluded(self, history: np.ndarray, filters: Filters) -> np.ndarray:
        mask = np.zeros(self.num_items + 1, dtype=bool)
        mask[0] = True
        if filters.exclude_seen:
            mask[history] = True
        if filters.exclude_items:
            idx, _ = self.indices_of_ids(filters.exclude_items)
            mask[idx] = True
        if filters.exclude_categories:
            banned = set(filters.exclude_categories)
            mask[1:] |= np.array([bool(banned.intersection(c)) for c in self.categories])
        if filters.include_categories:
            wanted = set(filters.include_categories)
            mask[1:] |= ~np.array([bool(wanted.intersection(c)) for c in self.categories])
        return mask

    def _item(self, idx: int, score: float) -> Recommendation:
        return Recommendation(self.item_ids[idx - 1], float(score), self.titles[idx - 1])

    def recommend(self, history: np.ndarray, k: int = 10, explain: bool = False, filters: Filters | None = None,
                  unknown_items: list[str] | None = None) -> RecommendationResponse:
        """Top ``k`` for a history of model item indices (oldest first, 0s dropped)."""
        if not 1 <= k <= MAX_K:
            raise UserError(f"k must be between 1 and {MAX_K}")
        filters = filters or Filters()
        history = np.asarray(history, dtype=np.int64)
        history = history[history > 0]
        excluded = self._excluded(history, filters)
        if len(history) == 0:
            picks = [int(i) for i in self.popular if not excluded[i]][:k]
            counts = self.items["train_count"].to_numpy()
            recs = [self._item(i, float(counts[i - 1])) for i in picks]
            return RecommendationResponse(recs, "popular", self.version, 0, unknown_items or [])
        seq = torch.from_numpy(history[-self.model.max_len:]).unsqueeze(0).to(self.device)  # (1, T)
        with self.lock, torch.no_grad():
            user = self.model.user_vectors(seq, self.table).cpu().numpy().astype(np.float32)  # (1, D)
            idx, scores = self._top(user, excluded, k)
            recs = [self._item(int(i), s) for i, s in zip(idx, scores, strict=True)]
            if explain and recs:
                self._explain(seq, idx, recs)
        return RecommendationResponse(recs, None, self.version, int(len(history)), unknown_items or [])

    def _top(self, user: np.ndarray, excluded: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n_excluded = int(np.count_nonzero(excluded[1:]))
        allowed = self.num_items - n_excluded
        k = min(k, allowed)
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if allowed < 0.2 * self.num_items:  # a narrow filter: score the allowed items exactly
            cand = np.nonzero(~excluded)[0]
            s = self.vectors[cand] @ user[0]
            top = np.argsort(-s, kind="stable")[:k]
            return cand[top], s[top]
        want = k + n_excluded
        while True:
            fetch = min(self.num_items, want)
            scores, ids = self.index.search(user, fetch)
            keep = (ids[0] > 0) & ~excluded[np.maximum(ids[0], 0)]
            if keep.sum() >= k or fetch >= self.num_items:
                return ids[0][keep][:k], scores[0][keep][:k]
            want *= 2

    def _explain(self, seq: torch.Tensor, idx: np.ndarray, recs: list[Recommendation]) -> None:
        cand = torch.from_numpy(idx).unsqueeze(0).to(self.device)  # (1, K)
        weights = self.model.explain(seq, cand, self.table)[0].cpu().numpy()  # (K, T)
        hist = seq[0].cpu().numpy()
        for rec, w in zip(recs, weights, strict=True):
            agg: dict[int, float] = {}
            for item, weight in zip(hist, w, strict=True):
                if item:
                    agg[int(item)] = agg.get(int(item), 0.0) + float(weight)
            top = sorted(agg.items(), key=lambda kv: -kv[1])[:REASONS_PER_ITEM]
            rec.reasons = [Reason(self.item_ids[i - 1], self.titles[i - 1], round(w_, 4)) for i, w_ in top]

    def similar(self, item_id: str, k: int = 10) -> RecommendationResponse:
        """Items whose vectors have the highest inner product with ``item_id``'s vector."""
        if not 1 <= k <= MAX_K:
            raise UserError(f"k must be between 1 and {MAX_K}")
        idx = self.id_to_idx.get(str(item_id))
        if idx is None:
            raise UserError(f"unknown item id {item_id!r}")
        excluded = np.zeros(self.num_items + 1, dtype=bool)
        excluded[[0, idx]] = True
        with self.lock:
            top, scores = self._top(self.vectors[idx:idx + 1].astype(np.float32), excluded, k)
        return RecommendationResponse([self._item(int(i), s) for i, s in zip(top, scores, strict=True)], None, self.version, 1)


def rebuild_index(bundle_dir: Path, kind: str = "auto", device: str = "cpu",
                  params: dict[str, Any] | None = None) -> IndexMeta:
    """(Re)build the index of a bundle whose model and items are in place.

    ``params``: FAISS parameters (HNSW ``M``, ``efConstruction``, ``efSearch``; IVF ``nlist``,
    ``nprobe``); the ones not given keep their defaults.
    """
    model, meta = load_model(bundle_dir / "model.pt", device)
    with torch.no_grad():
        vectors = model.item_vectors().cpu().numpy()
    index, imeta = build_index(vectors, meta["sha256"], kind, params=params)
    save_index(bundle_dir / "index", to_device(index, imeta), imeta)
    return imeta


# --------------------------------------------------------------------------------------
# Histories from the warehouse


class HistoryStore:
    """User histories (item keys, oldest first) read from the warehouse.

    The DuckDB file is opened read-only only while reading, so ``attnrec ingest`` can
    write meanwhile. With ``cache=True`` (the HTTP server) all histories are held in
    memory and re-read for the users touched by new sources once the warehouse file
    changes (checked at most every ``refresh_seconds``); while a writer holds the file,
    the cached histories keep being served.
    """

    def __init__(self, db_path: Path, cache: bool = False, refresh_seconds: float = 0.5) -> None:
        self.db_path = db_path
        self.cache = cache
        self.refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._histories: dict[int, np.ndarray] = {}
        self._ids: dict[str, int] = {}
        self._last_source = 0
        self._stamp: tuple[float, ...] = ()
        self._checked = 0.0
        if cache:
            self._refresh(force=True)

    def _file_stamp(self) -> tuple[float, ...]:
        stamp = []
        for p in (self.db_path, self.db_path.with_name(self.db_path.name + ".wal")):
            try:
                st = p.stat()
                stamp += [st.st_mtime_ns, st.st_size]
            except FileNotFoundError:
                stamp += [0, 0]
        return tuple(stamp)

    def _connect(self) -> duckdb.DuckDBPyConnection | None:
        if not self.db_path.exists():
            return None
        try:
            return duckdb.connect(str(self.db_path), read_only=True)
        except duckdb.IOException:  # a writer holds the file right now
            return None

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.refresh_seconds:
            return
        self._checked = now
        stamp = self._file_stamp()
        if not force and stamp == self._stamp:
            return
        con = self._connect()
        if con is None:
            return
        try:
            last = con.execute("SELECT coalesce(max(source_id), 0) FROM sources WHERE kind = 'events'").fetchall()[0][0]
            users_sql = "SELECT DISTINCT user_key FROM events WHERE source_id > ?"
            rows = con.execute(
                f"""SELECT user_key, item_key FROM events WHERE user_key IN ({users_sql})
                    ORDER BY user_key, ts, source_id, line""", [self._last_source],
            ).fetchnumpy()
            dict_rows = con.execute("SELECT user_id, user_key FROM user_dict").fetchall()
        finally:
            con.close()
        users, items = rows["user_key"], rows["item_key"]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(users)]
        with self._lock:
            for s, e in zip(starts, ends, strict=True):
                self._histories[int(users[s])] = items[s:e].copy()
            self._ids = {uid: int(k) for uid, k in dict_rows}
            self._last_source = int(last)
            self._stamp = stamp

    def user_key(self, user_id: str) -> int | None:
        text = str(user_id).strip()
        if text.isdigit() and (text == "0" or not text.startswith("0")) and int(text) < DICT_KEY_BASE:
            return int(text)
        return self._ids.get(text)

    def history(self, user_id: str) -> np.ndarray | None:
        """Item keys of ``user_id`` oldest first, or None for a user the warehouse does not know."""
        if self.cache:
            self._refresh()
            key = self.user_key(user_id)
            with self._lock:
                return None if key is None else self._histories.get(key)
        con = self._connect()
        if con is None:
            raise UserError(f"cannot read the warehouse {self.db_path} (missing, or locked by a writer): try again")
        try:
            keys = lookup_keys(con, "user", [str(user_id)])
            if not keys:
                return None
            rows = con.execute(
                "SELECT item_key FROM events WHERE user_key = ? ORDER BY ts, source_id, line", [keys[str(user_id)]]
            ).fetchnumpy()
        finally:
            con.close()
        return rows["item_key"]

    def all_histories(self) -> tuple[list[str], list[np.ndarray]]:
        """Every user's (id, item keys) from the warehouse (batch scoring)."""
        con = self._connect()
        if con is None:
            raise UserError(f"cannot read the warehouse {self.db_path} (missing, or locked by a writer)")
        try:
            rows = con.execute(
                f"""SELECT e.user_key, CASE WHEN e.user_key < {DICT_KEY_BASE} THEN e.user_key::VARCHAR ELSE d.user_id END AS uid,
                           e.item_key
                    FROM events e LEFT JOIN user_dict d USING (user_key)
                    ORDER BY e.user_key, e.ts, e.source_id, e.line"""
            ).fetchnumpy()
        finally:
            con.close()
        users, items, uids = rows["user_key"], rows["item_key"], rows["uid"]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(users)]
        return [str(uids[s]) for s in starts], [items[s:e] for s, e in zip(starts, ends, strict=True)]
