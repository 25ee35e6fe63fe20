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

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors of ``items`` (U,) -> (U, D), or of all N+1 items (N+1, D) if None; padding is zero."""
        return self.item_tower(items)

    def encode(self, seq: torch.Tensor, item_table: torch.Tensor | None = None,
               block_inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states for left-padded item sequences.

        Args:
            seq: (B, T) long item indices, 0 = padding, T <= max_len, newest item last.
            item_table: (N+1, D) precomputed item vectors (saves recomputing the tower), or any
                (R, D) table whose row numbers ``seq`` holds (row 0 = padding, the zero vector).
            block_inputs: a list that receives each block's input (B, T, D), for ``explain``.
        Returns:
            (B, T, D): state t summarises items 0..t and predicts the item after t.
        """
        x, mask, valid = self._block_inputs(seq, item_table)  # (B, T, D), (B, 1, T, T), (B, T)
        for block in self.blocks:
            if block_inputs is not None:
                block_inputs.append(x)
            x = block(x, mask)
        return self.ln_final(x) * valid.unsqueeze(-1)  # (B, T, D)

    def _block_inputs(self, seq: torch.Tensor, item_table: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(x (B, T, D) item vectors plus positions, mask (B, 1, T, T), valid (B, T)) for the blocks."""
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
        return x, mask.unsqueeze(1), valid  # mask (B, 1, T, T)

    def user_vectors(self, seq: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """State after the newest item: (B, T) -> (B, D). This is the FAISS query vector."""
        return self.encode(seq, item_table)[:, -1, :]

    def forward(self, seq: torch.Tensor, item_table: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Next-item scores over the catalogue: (B, T) -> (B, N+1) (column 0 = padding).

        score(i) = <h_{T-1}, item(i)>; ``item_table`` (N+1, D) saves recomputing the tower;
        ``out`` (B, N+1), without autograd: the scores are written there and it is returned.
        """
        table = item_table if item_table is not None else self.item_vectors()  # (N+1, D)
        return torch.matmul(self.user_vectors(seq, table), table.T, out=out)  # (B, N+1)

    def explain(self, seq: torch.Tensor, items: torch.Tensor, item_table: torch.Tensor | None = None,
                block_inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Which history items a candidate's score rests on, read from the attention that makes it.

        The score is <h, e_c> with h the final state at the newest position T-1. Its last block,
        given the block's input x (one vector per position), is

            y = x_{T-1} + sum_j c_j + b_o,   c_j = W_o concat_heads(a_j v_j)   (a: attention of T-1)
            h = LN_f(y + W_down gelu(W_up LN_ff(y) + b_up) + b_down)

        Every map here is linear in the parts of y once the LayerNorm scales (1 / sigma of the
        actual vector) and the GELU ratios gelu(z) / z (of the actual z) are held at their
        values, so y, the feed-forward output and h split exactly into one part per history
        position j (c_j, plus x_{T-1} for the newest position) and a bias part:

            score(c) = sum_j s_j(c) + s_bias(c),   s_j(c) = <part_j of h, e_c>.

        A position's x_j is its own item read through the earlier blocks. The weight of
        position j is its share of the positive contributions, max(s_j, 0) / sum_t max(s_t, 0):
        the items that push this candidate up, summing to 1 over the history, 0 on padding
        (the mean attention of T-1 over the heads where no contribution is positive).

        Args:
            seq: (B, T) left-padded histories, at least one item each.
            items: (B, K) candidate item indices.
            item_table: (N+1, D) precomputed item vectors (saves recomputing the tower).
            block_inputs: the blocks' inputs from ``encode(seq, block_inputs=...)`` (saves the blocks' pass).
        Returns:
            (B, K, T) weights.
        """
        parts, attention = self.score_parts(seq, item_table, block_inputs)  # (B, T+1, D), (B, T)
        table = item_table if item_table is not None else self.item_vectors()  # (N+1, D)
        contributions = table[items] @ parts[:, :-1].transpose(1, 2)  # (B, K, T) s_j(c), bias part left out
        positive = contributions.clamp(min=0.0) * (seq != 0).unsqueeze(1)  # (B, K, T)
        total = positive.sum(-1, keepdim=True)  # (B, K, 1)
        fallback = attention.unsqueeze(1).expand_as(positive)  # (B, K, T)
        return torch.where(total > 0, positive / total.clamp(min=1e-30), fallback)

    def score_parts(self, seq: torch.Tensor, item_table: torch.Tensor | None = None,
                    block_inputs: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The final state at the newest position split by history position (see ``explain``).

        Block by block, the newest position's state is kept as parts: its input is its own
        item; each block adds, to every position j, what the newest position's attention reads
        from j (a_j W_o v_j, the value of j counted as j's own), and splits its feed-forward
        over the parts. The last LayerNorm is split the same way.

        Returns:
            parts (B, T+1, D): parts[:, j] for position j, parts[:, T] the bias part; they sum
                to ``encode(seq)[:, -1]``.
            attention (B, T): the newest position's attention over the history in the last
                block, averaged over the heads.
        """
        x, mask, valid = self._block_inputs(seq, item_table)  # (B, T, D), (B, 1, T, T), (B, T)
        B, T, D = x.shape
        parts = x.new_zeros(B, T + 1, D)  # (B, T+1, D)
        parts[:, T - 1] = x[:, -1]  # the newest position's input: its own item and position
        attention = x.new_zeros(B, T)
        for i, block in enumerate(self.blocks):
            x = block_inputs[i] if block_inputs is not None else x  # (B, T, D) this block's input
            parts, attention = self._block_parts(block, x, mask, parts)
            if block_inputs is None:
                x = block(x, mask)
        parts = self._layernorm_parts(parts, parts.sum(1), self.ln_final)  # (B, T+1, D): parts of h
        return parts, attention * valid  # (B, T+1, D), (B, T)

    def _block_parts(self, block: Block, x: torch.Tensor, mask: torch.Tensor,
                     parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``block``'s output at the newest position as parts, from its input ``x`` (B, T, D) and
        the parts (B, T+1, D) of that input's newest position; also the newest position's
        attention (B, T), averaged over the heads."""
        B, T, D = x.shape
        H = block.attn.num_heads
        # --- attention at the newest position, every position's value counted as its own
        normed = block.ln_attn(x)  # (B, T, D)
        weight, bias = block.attn.qkv.weight, block.attn.qkv.bias  # (3D, D), (3D,)
        q = normed[:, -1] @ weight[:D].T + bias[:D]  # (B, D) the newest position's query only
        k, v = (normed @ weight[D:].T + bias[D:]).split(D, dim=2)  # 2 x (B, T, D)
        q = q.view(B, H, 1, D // H)  # (B, H, 1, Dh)
        k = k.view(B, T, H, D // H).transpose(1, 2)  # (B, H, T, Dh)
        v = v.view(B, T, H, D // H).transpose(1, 2)  # (B, H, T, Dh)
        logits = (q @ k.transpose(2, 3)).squeeze(2) / math.sqrt(D // H)  # (B, H, T)
        a = torch.softmax(logits.masked_fill(~mask[:, :, -1], float("-inf")), dim=-1)  # (B, H, T)
        mixed = (a.unsqueeze(-1) * v).transpose(1, 2).reshape(B, T, D)  # (B, T, D): head h's a_j v_j in its slice
        read = torch.cat([mixed @ block.attn.proj.weight.T, block.attn.proj.bias.expand(B, 1, D)], dim=1)  # (B, T+1, D)
        parts = parts + read  # (B, T+1, D): the post-attention state at T-1
        # --- the feed-forward on LN_ff(y), split with its LayerNorm scale and GELU ratios held
        normed = self._layernorm_parts(parts, parts.sum(1), block.ln_ff)  # (B, T+1, D)
        up = normed @ block.ff.up.weight.T  # (B, T+1, F)
        up[:, T] += block.ff.up.bias
        z = up.sum(1, keepdim=True)  # (B, 1, F)
        ratio = torch.where(z.abs() > 1e-6, F.gelu(z) / z, torch.full_like(z, 0.5))  # (B, 1, F)
        ff = (ratio * up) @ block.ff.down.weight.T  # (B, T+1, D)
        ff[:, T] += block.ff.down.bias
        return parts + ff, a.mean(1)  # (B, T+1, D), (B, T)

    @staticmethod
    def _layernorm_parts(parts: torch.Tensor, whole: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
        """LayerNorm of ``whole`` (B, D) = sum of ``parts`` (B, P, D), split into the parts' shares
        (scale 1 / sigma of ``whole`` held); the bias (beta) goes to the last part."""
        sigma = torch.sqrt(whole.var(-1, unbiased=False, keepdim=True) + ln.eps)  # (B, 1)
        out = (parts - parts.mean(-1, keepdim=True)) / sigma.unsqueeze(1) * ln.weight  # (B, P, D)
        out[:, -1] += ln.bias
        return out

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, object]]:
        """AdamW parameter groups: the weight matrices of the linear maps decay; embedding
        tables, biases and norms do not (an item's embedding row is updated only when the item
        occurs, so decay would shrink rare items towards zero between their updates)."""
        matrices = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = list(self.parameters())
        return [{"params": [p for p in params if id(p) in matrices], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) not in matrices], "weight_decay": 0.0}]
