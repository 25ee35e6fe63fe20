"""Most-popular baseline: every user gets the items with the most training interactions."""

from __future__ import annotations

import torch
import torch.nn as nn


class MostPopular(nn.Module):
    """Scores = training interaction counts (N+1,), the same for every history."""

    def __init__(self, counts: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("counts", counts.to(torch.float32))

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, T) histories (ignored) -> (B, N+1) scores."""
        return self.counts.unsqueeze(0).expand(seq.shape[0], -1)  # (B, N+1)
