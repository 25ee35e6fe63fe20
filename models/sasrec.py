"""Content-aware SASRec: causal self-attention over a user's history of item vectors.

Sequences are left-padded with item 0 and right-aligned, so the newest item is always at
the last position T-1 and positions count back from it. The state at position t predicts
the item at t+1; the score of item i for the next step is <h_{T-1}, item(i)>, with item
vectors shared between input and output (the same vectors go into the FAISS index).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.item_tower import ItemTower


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a key padding mask (SDPA / flash kernels).

    Dropout is applied to the output projection, not to the attention matrix, which keeps
    the fused SDPA kernels usable (and costs a (B, H, T, T) random mask less per step).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        assert dim % num_heads == 0, "hidden size must be divisible by the number of heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), mask (B, 1, T, T) bool (True = may attend) -> (B, T, D)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # 3 x (B, T, D)
        q = q.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, T, Dh)
        v = v.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, Dh)
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # (B, T, D)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)"""
        return self.dropout(self.down(self.dropout(F.gelu(self.up(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, dim: int, num_heads: int, ff_hidden: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.ln_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_hidden, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)"""
        x = x + self.attn(self.ln_attn(x), mask)
        return x + self.ff(self.ln_ff(x))


class SASRec(nn.Module):
    """Self-attentive sequential recommender over an ``ItemTower``.

    Args:
        item_tower: produces item vectors (D) for input and output.
        max_len: longest history read (T); longer histories keep their newest ``max_len`` items.
        num_blocks, num_heads, dropout: encoder shape.
        ff_mult: feed-forward hidden size = ff_mult * D.
    """

    def __init__(self, item_tower: ItemTower, max_len: int, num_blocks: int = 2, num_heads: int = 1,
                 dropout: float = 0.2, ff_mult: int = 1) -> None:
        super().__init__()
        dim = item_tower.dim
        self.item_tower = item_tower
        self.max_len = max_len
        self.position = nn.Embedding(max_len, dim)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, num_heads, ff_mult * dim, dropout) for _ in range(num_blocks))
        self.ln_final = nn.LayerNorm(dim)
        nn.init.normal_(self.position.weight, std=dim ** -0.5)

    @property
    def dim(self) -> int:
        return self.item_tower.dim

    def item_vectors(self) -> torch.Tensor:
        """All item vectors (N+1, D); row 0 (padding) is zero."""
        return self.item_tower()

    def encode(self, seq: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states for left-padded item sequences.

        Args:
            seq: (B, T) long item indices, 0 = padding, T <= max_len, newest item last.
            item_table: (N+1, D) precomputed item vectors (saves recomputing the tower).
        Returns:
            (B, T, D): state t summarises items 0..t and predicts the item after t.
        """
        B, T = seq.shape
        assert T <= self.max_len, f"sequence length {T} > max_len {self.max_len}"
        x = item_table[seq] if item_table is not None else self.item_tower(seq)  # (B, T, D)
        pos = torch.arange(self.max_len - T, self.max_len, device=seq.device)  # (T,) right-aligned
        valid = seq != 0  # (B, T)
        x = (x * math.sqrt(self.dim) + self.position(pos)) * valid.unsqueeze(-1)  # (B, T, D)
        x = self.emb_dropout(x)
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()  # (T, T)
        eye = torch.eye(T, dtype=torch.bool, device=seq.device)  # padded queries see themselves: no NaN rows
        mask = (causal & valid[:, None, :]) | eye  # (B, T, T)
        mask = mask.unsqueeze(1)  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_final(x) * valid.unsqueeze(-1)  # (B, T, D)

    def user_vectors(self, seq: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """State after the newest item: (B, T) -> (B, D). This is the FAISS query vector."""
        return self.encode(seq, item_table)[:, -1, :]

    def forward(self, seq: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """Next-item scores over the catalogue: (B, T) -> (B, N+1) (column 0 = padding).

        score(i) = <h_{T-1}, item(i)>; ``item_table`` (N+1, D) saves recomputing the tower.
        """
        table = item_table if item_table is not None else self.item_vectors()  # (N+1, D)
        return self.user_vectors(seq, table) @ table.T  # (B, N+1)

    def explain(self, seq: torch.Tensor, items: torch.Tensor, item_table: torch.Tensor | None = None,
                states: torch.Tensor | None = None) -> torch.Tensor:
        """Which history items a candidate's score rests on ("attention filtering").

        For candidate c, the weight of history position t is
        softmax_t(<h_t, item(c)> / sqrt(D)) over the non-padding positions, where h_t is
        the encoder state after item t. Weights sum to 1 over the history, 0 on padding.

        Args:
            seq: (B, T) left-padded histories.
            items: (B, K) candidate item indices.
            item_table: (N+1, D) precomputed item vectors (saves recomputing the tower).
            states: (B, T, D) ``encode(seq)`` when the caller has it (saves a second encoder pass).
        Returns:
            (B, K, T) weights.
        """
        table = item_table if item_table is not None else self.item_vectors()  # (N+1, D)
        states = states if states is not None else self.encode(seq, table)  # (B, T, D)
        cand = table[items]  # (B, K, D)
        logits = cand @ states.transpose(1, 2) / math.sqrt(self.dim)  # (B, K, T)
        logits = logits.masked_fill((seq == 0).unsqueeze(1), float("-inf"))  # (B, K, T)
        weights = torch.softmax(logits, dim=-1)  # (B, K, T)
        return torch.nan_to_num(weights, nan=0.0)  # all-padding rows -> 0

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, object]]:
        """AdamW parameter groups: the weight matrices of the linear maps decay; embedding
        tables, biases and norms do not (an item's embedding row is updated only when the item
        occurs, so decay would shrink rare items towards zero between their updates)."""
        matrices = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = list(self.parameters())
        return [{"params": [p for p in params if id(p) in matrices], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) not in matrices], "weight_decay": 0.0}]
