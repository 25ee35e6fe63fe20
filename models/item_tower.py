"""Item tower: one vector per item from its ID embedding plus its content.

    item(i) = keep_id(i) * E_id[i] + W_c (mean E_cat[cats(i)] + text(i) + W_num num(i))
    text(i) = mean E_txt[tokens(i)]      hashed words (text_buckets > 0), or
              W_s s(i)                   a frozen sentence vector s(i) (text_dim > 0), or nothing

``keep_id`` is 0 for items without a trained ID (held-out / brand-new items), so they are
represented by content alone; during training a share of IDs is hidden at random (ID
dropout) so that the content path learns to stand in for the ID. The sentence vectors are
buffers, never trained: only their projection W_s is. With ``use_content=False`` the tower
is a plain ID embedding (the SASRec item table).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ItemTower(nn.Module):
    """Item vectors of size ``dim``; item index 0 is padding (always the zero vector).

    Content of the catalogue is held in buffers, padded with 0 ids:
        category_ids (N+1, Kc) long, token_ids (N+1, Kt) long, numeric (N+1, F) float,
        text_vectors (N+1, S) float (S = text_dim; zero rows for items without text).
    """

    def __init__(self, num_items: int, dim: int, num_categories: int = 0, text_buckets: int = 0,
                 num_numeric: int = 0, use_content: bool = True, id_dropout: float = 0.0,
                 max_categories: int = 1, max_tokens: int = 1, text_dim: int = 0) -> None:
        super().__init__()
        self.num_items = num_items
        self.dim = dim
        self.use_content = use_content
        self.id_dropout = id_dropout
        self.id_embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)
        # 1 where the item's ID embedding is trained and used, 0 for cold items (content only).
        self.register_buffer("keep_id", torch.ones(num_items + 1))
        if use_content:
            self.category_bag = nn.EmbeddingBag(num_categories + 1, dim, mode="mean", padding_idx=0)
            self.text_bag = nn.EmbeddingBag(text_buckets, dim, mode="mean", padding_idx=0) if text_buckets > 0 else None
            self.text_proj = nn.Linear(text_dim, dim, bias=False) if text_dim > 0 else None
            self.numeric_proj = nn.Linear(num_numeric, dim) if num_numeric > 0 else None
            self.content_proj = nn.Linear(dim, dim)
            self.register_buffer("category_ids", torch.zeros(num_items + 1, max_categories, dtype=torch.long))
            self.register_buffer("token_ids", torch.zeros(num_items + 1, max_tokens, dtype=torch.long))
            self.register_buffer("numeric", torch.zeros(num_items + 1, num_numeric))
            self.register_buffer("text_vectors", torch.zeros(num_items + 1, text_dim) if text_dim > 0 else None)
        std = dim ** -0.5  # item vectors start with norm ~1, like the ID embedding
        nn.init.normal_(self.id_embedding.weight, std=std)
        if use_content:
            nn.init.normal_(self.category_bag.weight, std=std)
            if self.text_bag is not None:
                nn.init.normal_(self.text_bag.weight, std=std)
            if self.text_proj is not None:
                nn.init.normal_(self.text_proj.weight, std=std)  # unit-length sentence vectors -> norm ~1
            nn.init.normal_(self.content_proj.weight, std=std)
            nn.init.zeros_(self.content_proj.bias)
            if self.numeric_proj is not None:
                nn.init.normal_(self.numeric_proj.weight, std=std)
                nn.init.zeros_(self.numeric_proj.bias)
        with torch.no_grad():
            self.id_embedding.weight[0].zero_()
            if use_content:
                self.category_bag.weight[0].zero_()
                if self.text_bag is not None:
                    self.text_bag.weight[0].zero_()

    def set_content(self, category_ids: torch.Tensor, token_ids: torch.Tensor, numeric: torch.Tensor,
                    text_vectors: torch.Tensor | None = None) -> None:
        """Load the catalogue's content: (N+1, Kc) long, (N+1, Kt) long, (N+1, F) float and, with
        a text projection, (N+1, S) float sentence vectors."""
        if not self.use_content:
            return
        device = self.id_embedding.weight.device
        self.category_ids = category_ids.to(device, torch.long)
        self.token_ids = token_ids.to(device, torch.long)
        self.numeric = numeric.to(device, torch.float32)
        if self.text_proj is not None and text_vectors is not None:
            self.text_vectors = text_vectors.to(device, torch.float32)

    def set_cold(self, cold: torch.Tensor) -> None:
        """Mark items (bool (N+1,)) whose ID embedding must not be used."""
        self.keep_id = (~cold.to(torch.bool)).to(self.keep_id)
        self.keep_id[0] = 0.0

    def make_tables_sparse(self) -> list[nn.Parameter]:
        """Give the embedding tables (IDs, categories, hashed words) sparse gradients and return
        them: backward then keeps only the rows a step looked up ((R, D) sparse COO tensors), so
        a data-parallel step under a sampled softmax can send those rows alone."""
        tables = [self.id_embedding] + ([self.category_bag, self.text_bag] if self.use_content else [])
        tables = [table for table in tables if table is not None]
        for table in tables:
            table.sparse = True
        return [table.weight for table in tables]

    def embed_content(self, category_ids: torch.Tensor, token_ids: torch.Tensor, numeric: torch.Tensor,
                      text_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Content-only vectors for any items, known or not: (M, Kc), (M, Kt), (M, F), (M, S) -> (M, D)."""
        x = self.category_bag(category_ids)  # (M, D)
        if self.text_bag is not None:
            x = x + self.text_bag(token_ids)
        if self.text_proj is not None and text_vectors is not None:
            x = x + self.text_proj(text_vectors)
        if self.numeric_proj is not None and numeric.shape[-1] > 0:
            x = x + self.numeric_proj(numeric)
        return self.content_proj(x)

    def forward(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors of ``items`` (any shape of indices, -> (..., D)), or of all N+1 items if None."""
        idx = items if items is not None else torch.arange(self.num_items + 1, device=self.keep_id.device)
        flat = idx.reshape(-1)  # (M,)
        keep = self.keep_id[flat]  # (M,)
        if self.training and self.id_dropout > 0:
            keep = keep * (torch.rand_like(keep) >= self.id_dropout).to(keep)
        if not self.use_content:
            keep = (flat != 0).to(keep)  # pure-ID model: IDs are all there is
        vec = self.id_embedding(flat) * keep.unsqueeze(-1)  # (M, D)
        if self.use_content:
            text = self.text_vectors[flat] if self.text_vectors is not None else None  # (M, S)
            content = self.embed_content(self.category_ids[flat], self.token_ids[flat], self.numeric[flat], text)  # (M, D)
            vec = vec + content * (flat != 0).unsqueeze(-1).to(vec)
        return vec.reshape(*idx.shape, self.dim)  # (..., D)
