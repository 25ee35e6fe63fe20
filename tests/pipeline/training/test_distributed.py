"""Data-parallel training: the gradient two DDP ranks step with is the single-process one.

Two real processes form a gloo group on 127.0.0.1 (``torch.multiprocessing``, no Ray here);
each takes its ``batch_shard`` of the same batch and runs the loss through ``data_parallel``,
the hook ``pipeline.training.loop.fit`` uses in a process group. After backward, every rank
must hold the gradient one process computes on the whole batch, which is the average of the
two shards' own gradients (a mean loss over equal shards) and differs from each of them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from pipeline.scale.cluster import free_port
from pipeline.training.loop import ProcessGroup, batch_shard, data_parallel

ROWS, FEATURES = 8, 5


def tiny_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(FEATURES, 4), nn.Tanh(), nn.Linear(4, 1))


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(ROWS, FEATURES, generator=g), torch.randn(ROWS, 1, generator=g)


def mse(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    inputs, targets = batch
    return ((model(inputs) - targets) ** 2).mean()


def gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny_model()
        if rank == 1:  # a different start: DDP must broadcast rank 0's weights
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        step_loss = data_parallel(model, mse, torch.device("cpu"))
        step_loss(model, batch_shard(tiny_batch(), ProcessGroup(rank, world))).backward()
        torch.save({"grads": gradients(model), "weights": [p.detach().clone() for p in model.parameters()]},
                   Path(out) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort in CI)
    finally:
        dist.destroy_process_group()


def test_two_ranks_step_with_the_single_process_gradient(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    whole = tiny_model()
    mse(whole, tiny_batch()).backward()
    expected = gradients(whole)
    shard_grads = []
    for r in range(2):
        alone = tiny_model()
        mse(alone, batch_shard(tiny_batch(), ProcessGroup(r, 2))).backward()
        shard_grads.append(gradients(alone))

    for rank in ranks:
        for got, want, a, b, w, w0 in zip(rank["grads"], expected, *shard_grads, rank["weights"], whole.parameters(),
                                          strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)        # = the single-process gradient
            torch.testing.assert_close(got, (a + b) / 2, rtol=1e-5, atol=1e-7)  # = the average of the shards'
            assert not torch.allclose(a, b)                                    # which differ from each other
            torch.testing.assert_close(w, w0.detach())                        # every rank holds rank 0's weights


def test_a_batch_shard_splits_rows_evenly() -> None:
    batch = (torch.arange(7), torch.arange(7) * 10)
    parts = [batch_shard(batch, ProcessGroup(r, 3)) for r in range(3)]
    assert [p[0].tolist() for p in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [p[1].tolist() for p in parts] == [[0, 10, 20], [30, 40], [50, 60]]
