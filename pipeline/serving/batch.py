"""Batch scoring: top-k for every user of the warehouse, to Parquet and a DuckDB table."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline.registry.index import FLAT_MAX_ITEMS
from pipeline.serving.query import HistoryStore, ModelBundle
from pipeline.data.warehouse import connect, transaction


@dataclass
class BatchReport:
    users: int
    rows: int
    fallback_users: int
    seconds: float
    parquet: Path
    table: str


def recommend_all(bundle: ModelBundle, store: HistoryStore, k: int, out: Path, db_path: Path | None,
                  table: str = "recommendations", batch_size: int = 512) -> BatchReport:
    """Top ``k`` unseen items per user; users the model cannot score get most-popular.

    Exact scoring (one matmul per batch) for catalogues up to ``FLAT_MAX_ITEMS`` or a flat
    index, FAISS search for ``k`` + the batch's longest history otherwise.
    """
    started = time.perf_counter()
    user_ids, key_lists = store.all_histories()
    histories = [bundle.indices_of_keys(keys) for keys in key_lists]
    histories = [h[h > 0] for h in histories]
    n = bundle.num_items
    k = min(k, n)
    out_users, out_items, out_scores, out_ranks = [], [], [], []
    fallback = 0
    exact = n <= FLAT_MAX_ITEMS or bundle.index_meta.kind == "flat"
    order = np.argsort([min(len(h), bundle.model.max_len) for h in histories], kind="stable")
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            sel = [int(i) for i in order[start:start + batch_size]]
            scored = [i for i in sel if len(histories[i])]
            for i in sel:
                if not len(histories[i]):
                    fallback += 1
                    top = bundle.popular[:k]
                    out_users += [user_ids[i]] * len(top)
                    out_items.append(top)
                    out_scores.append(bundle.items["train_count"].to_numpy()[top - 1].astype(np.float32))
                    out_ranks.append(np.arange(1, len(top) + 1))
            if not scored:
                continue
            T = min(bundle.model.max_len, max(len(histories[i]) for i in scored))
            seq = np.zeros((len(scored), T), dtype=np.int64)
            for row, i in enumerate(scored):
                h = histories[i][-T:]
                seq[row, T - len(h):] = h
            seq_t = torch.from_numpy(seq).to(bundle.device)
            users = bundle.model.user_vectors(seq_t, bundle.table)  # (B, D)
            if exact:
                scores = users @ bundle.table.T  # (B, N+1)
                scores[:, 0] = float("-inf")
                rows = np.concatenate([np.full(len(histories[i]), r) for r, i in enumerate(scored)])
                cols = np.concatenate([histories[i] for i in scored])
                scores[torch.from_numpy(rows), torch.from_numpy(cols)] = float("-inf")
                top_s, top_i = torch.topk(scores, k, dim=1)
                top_i, top_s = top_i.cpu().numpy(), top_s.cpu().numpy()
            else:
                want = min(n, k + max(len(set(histories[i].tolist())) for i in scored))
                top_s, top_i = bundle.index.search(users.cpu().numpy().astype(np.float32), want)
            for r, i in enumerate(scored):
                seen = set(histories[i].tolist())
                ids, sc = top_i[r], top_s[r]
                keep = np.array([j > 0 and int(j) not in seen and np.isfinite(s) for j, s in zip(ids, sc, strict=True)], dtype=bool)
                ids, sc = ids[keep][:k], sc[keep][:k]
                out_users += [user_ids[i]] * len(ids)
                out_items.append(ids)
                out_scores.append(sc.astype(np.float32))
                out_ranks.append(np.arange(1, len(ids) + 1))
    items = np.concatenate(out_items) if out_items else np.zeros(0, np.int64)
    item_ids = np.array(bundle.item_ids, dtype=object)
    frame = pl.DataFrame({
        "user_id": out_users,
        "rank": np.concatenate(out_ranks).astype(np.int32) if out_ranks else np.zeros(0, np.int32),
        "item_id": item_ids[items - 1].tolist() if len(items) else [],
        "score": np.concatenate(out_scores) if out_scores else np.zeros(0, np.float32),
    }, schema={"user_id": pl.String, "rank": pl.Int32, "item_id": pl.String, "score": pl.Float32})
    frame = frame.with_columns(pl.lit(bundle.version).alias("model_version"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    frame.write_parquet(tmp)
    tmp.replace(out)
    if db_path is not None:
        con = connect(db_path)
        try:
            con.register("batch_recs", frame.to_arrow())
            with transaction(con):
                con.execute(f'CREATE OR REPLACE TABLE "{table}" AS SELECT *, now()::TIMESTAMP AS created_at FROM batch_recs')
            con.unregister("batch_recs")
        finally:
            con.close()
    return BatchReport(len(user_ids), frame.height, fallback, time.perf_counter() - started, out, table)
