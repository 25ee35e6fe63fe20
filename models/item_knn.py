"""Item-kNN baseline: cosine similarity of item co-occurrence over users' training histories.

sim(i, j) = |U_i ∩ U_j| / sqrt(|U_i| |U_j|), keeping each item's ``neighbours`` most similar
items; a user's score for item j is the sum of sim(i, j) over the items i in the history.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn


class ItemKNN(nn.Module):
    """Holds the (N+1, N+1) sparse top-k similarity matrix (row/col 0 = padding)."""

    def __init__(self, similarity: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("similarity", similarity.coalesce())
        self.num_items = similarity.shape[0] - 1

    @classmethod
    def fit(cls, user_index: torch.Tensor, item_index: torch.Tensor, num_users: int, num_items: int,
            neighbours: int = 200, chunk: int = 512) -> "ItemKNN":
        """Build from (user, item) interaction pairs (duplicates count once).

        Args:
            user_index, item_index: (E,) long, items in 1..num_items.
            neighbours: kept per item; chunk: rows of the co-occurrence matrix made at once.
        """
        pairs = torch.unique(torch.stack([user_index, item_index]), dim=1)  # (2, E')
        values = torch.ones(pairs.shape[1])
        ui = torch.sparse_coo_tensor(pairs, values, (num_users, num_items + 1), check_invariants=False).coalesce()  # (U, N+1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            iu = ui.t().coalesce().to_sparse_csr()  # (N+1, U)
            ui_dense_cols = ui.to_sparse_csr()
        degree = torch.zeros(num_items + 1).index_add_(0, pairs[1], values)  # (N+1,)
        norm = degree.clamp(min=1).sqrt()  # (N+1,)
        k = min(neighbours, num_items)
        rows, cols, vals = [], [], []
        for start in range(1, num_items + 1, chunk):
            stop = min(start + chunk, num_items + 1)
            block = torch.sparse.mm(_row_slice(iu, start, stop), ui_dense_cols).to_dense()  # (c, N+1)
            block = block / norm[start:stop, None] / norm[None, :]  # cosine
            block[torch.arange(stop - start), torch.arange(start, stop)] = 0.0  # no self-similarity
            block[:, 0] = 0.0
            top = torch.topk(block, k, dim=1)  # (c, k)
            keep = top.values > 0
            r = torch.arange(start, stop).unsqueeze(1).expand(-1, k)  # (c, k)
            rows.append(r[keep])
            cols.append(top.indices[keep])
            vals.append(top.values[keep])
        idx = torch.stack([torch.cat(rows), torch.cat(cols)])  # (2, nnz)
        sim = torch.sparse_coo_tensor(idx, torch.cat(vals), (num_items + 1, num_items + 1), check_invariants=False)
        return cls(sim)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, T) histories -> (B, N+1) scores = history counts @ similarity."""
        B = seq.shape[0]
        counts = torch.zeros(B, self.num_items + 1, device=seq.device)  # (B, N+1)
        counts.scatter_(1, seq, 1.0)
        counts[:, 0] = 0.0
        return torch.sparse.mm(self.similarity.t(), counts.t()).t()  # (B, N+1)


def _row_slice(csr: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a sparse CSR matrix, as a sparse CSR matrix."""
    crow = csr.crow_indices()
    lo, hi = int(crow[start]), int(crow[stop])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow[start:stop + 1] - lo, csr.col_indices()[lo:hi], csr.values()[lo:hi],
                                       (stop - start, csr.shape[1]), check_invariants=False)
