"""Next-item objectives for sequence models: full softmax and sampled softmax over the catalogue.

At every non-padding position t of a training window the encoder state h_t predicts the
next item y_t with logits <h_t, item(i)> over the catalogue:

    full:     loss_t = -log softmax_i(<h_t, item(i)>)[y_t]              over allowed items i
    sampled:  loss_t = -log softmax([<h_t, item(y_t)> - log q(y_t),
                                     <h_t, item(n_s)> - log q(n_s)]_s)[0]  for S negatives n_s ~ q

(logQ correction: Yi et al., RecSys 2019). Items marked ``excluded`` (padding, cold items)
are never predicted. With ``exclude_history`` the items of a training window are never
negatives at its positions (only each position's own target counts): ranking leaves out
what the user has already seen, so training need not push those items down (the published
3,000-negative SASRec samples its negatives outside the user's sequence in the same way).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def window_items_among(windows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Which candidates occur in each window.

    Args:
        windows: (B, L) long item ids (padding 0 may occur).
        candidates: (C,) long item ids, sorted ascending, no repeats.

    Returns:
        (B, C) bool: ``out[b, c]`` is True when ``candidates[c]`` is one of ``windows[b]``.
    """
    C = candidates.shape[0]
    idx = torch.searchsorted(candidates, windows).clamp(max=C - 1)  # (B, L)
    found = candidates[idx] == windows  # (B, L)
    out = torch.zeros(windows.shape[0], C + 1, dtype=torch.bool, device=windows.device)  # last column: no match
    out.scatter_(1, torch.where(found, idx, C), True)
    return out[:, :C]


class NextItemLoss(nn.Module):
    """Cross-entropy of the next item at every non-padding position (see the module docstring).

    Args:
        excluded: (N+1,) bool, items never predicted (index 0 = padding must be True).
        negatives: 0 = full softmax; S > 0 = sampled softmax with S negatives per step,
            shared by the batch, drawn from ``sampling_probs`` (N+1,) (uniform if None).
        exclude_history: a window's own items are never negatives at its positions.
    """

    def __init__(self, excluded: torch.Tensor, negatives: int = 0, sampling_probs: torch.Tensor | None = None,
                 exclude_history: bool = False) -> None:
        super().__init__()
        self.negatives = negatives
        self.exclude_history = exclude_history
        self.register_buffer("excluded_items", torch.nonzero(excluded).squeeze(1))  # (E,) never predicted
        if negatives:
            probs = sampling_probs if sampling_probs is not None else torch.ones(excluded.shape[0])
            probs = probs.clone().to(torch.float64).masked_fill(excluded, 0.0)
            self.register_buffer("probs", (probs / probs.sum()).to(torch.float32))  # (N+1,)
            self.register_buffer("log_q", torch.log(self.probs.clamp(min=1e-12)))  # (N+1,)

    def draw_negatives(self) -> torch.Tensor:
        """(S,) long: one step's shared negatives, drawn with replacement from ``sampling_probs``."""
        return torch.multinomial(self.probs, self.negatives, replacement=True)

    def forward(self, hidden: torch.Tensor, table: torch.Tensor, inputs: torch.Tensor,
                targets: torch.Tensor, negatives: torch.Tensor | None = None,
                table_items: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss over the non-padding positions.

        Args:
            hidden: (B, T, D) encoder states.
            table: (N+1, D) vectors of every item, or (U, D) vectors of ``table_items`` only.
            inputs, targets: (B, T) long, left-padded with 0; targets[b, t] follows inputs[b, t].
            negatives: (S,) long, this step's negatives (default: drawn here); sampled softmax only.
            table_items: (U,) long, the items of ``table``'s rows, sorted ascending without
                repeats; they must hold every target and negative (the sampled softmax reads no
                other rows). The full softmax needs the whole table.
        Returns:
            scalar loss.
        """
        valid = targets != 0  # (B, T)
        h = hidden[valid]  # (M, D)
        y = targets[valid]  # (M,)
        if self.negatives == 0:
            if table_items is not None:
                raise ValueError("the full softmax scores the whole catalogue: pass every item's vector, not table_items")
            logits = (h @ table.T).float()  # (M, N+1)
            logits.index_fill_(1, self.excluded_items, float("-inf"))
            if self.exclude_history:
                in_window = _in_window(inputs, targets, valid, torch.arange(table.shape[0], device=h.device))  # (M, N+1)
                in_window[torch.arange(len(y), device=h.device), y] = False
                logits.masked_fill_(in_window, float("-inf"))
            return F.cross_entropy(logits, y)
        neg = self.draw_negatives() if negatives is None else negatives  # (S,)
        y_row, neg_row = (y, neg) if table_items is None else (torch.searchsorted(table_items, y), torch.searchsorted(table_items, neg))
        pos_logit = (h * table[y_row]).sum(-1) - self.log_q[y]  # (M,)
        neg_logit = h @ table[neg_row].T - self.log_q[neg]  # (M, S)
        drop = neg.unsqueeze(0) == y.unsqueeze(1)  # (M, S) accidental hits
        if self.exclude_history:
            distinct, which = torch.unique(neg, return_inverse=True)  # (U,), (S,)
            drop |= _in_window(inputs, targets, valid, distinct)[:, which]  # (M, S)
        neg_logit = neg_logit.masked_fill(drop, float("-inf"))
        logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], dim=1)  # (M, 1+S)
        return F.cross_entropy(logits.float(), torch.zeros_like(y))


def _in_window(inputs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(M, C) bool: for each valid position of (B, T) ``valid``, which ``candidates`` are in its window."""
    windows = torch.cat([inputs, targets], dim=1)  # (B, 2T) every item of each window
    return window_items_among(windows, candidates)[valid.nonzero()[:, 0]]  # (M, C)
