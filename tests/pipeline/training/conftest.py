"""Fixtures of the training tests: torch's intra-op thread count."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(params=[1, 4], ids=lambda n: f"{n}-threads")
def intra_op_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """torch's intra-op thread count, 1 and then 4, set for one test and restored after it: at
    4 the kernels' worker threads, not the calling one, do most of the writes."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
