"""The optimiser: AdamW's row-wise form for sparse table gradients, clipping that counts sparse rows,
and the warm-up + cosine schedule."""

import torch
import torch.nn as nn

from pipeline.training.optimizer import RowAdamW, clip_gradients, warmup_cosine


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 10, 100) == 0.1
    assert warmup_cosine(9, 10, 100) == 1.0
    assert abs(warmup_cosine(100, 10, 100) - 0.1) < 1e-9


def _table_and_linear() -> tuple[nn.Parameter, nn.Linear]:
    torch.manual_seed(0)
    return nn.Parameter(torch.randn(10, 4)), nn.Linear(4, 2)


def _step(table: nn.Parameter, linear: nn.Linear, rows: list[int], seed: int, sparse: bool) -> None:
    """The gradients of one step reading ``rows`` of ``table`` (sparse, coalesced, or dense)."""
    x = torch.randn(len(rows), 4, generator=torch.Generator().manual_seed(seed))
    table.grad, linear.weight.grad, linear.bias.grad = None, None, None
    linear(nn.functional.embedding(torch.tensor(rows), table, sparse=sparse) * x).pow(2).sum().backward()
    if sparse:
        table.grad = table.grad.coalesce()


def test_row_adamw_is_adamw_on_the_rows_read_and_leaves_the_others_as_they_were() -> None:
    """A row in the gradient gets AdamW's update (a row's update depends on its own gradient and
    moments alone); a row not read keeps its weights and moments, where AdamW moves it on with
    its old momentum."""
    lazy_table, lazy_linear = _table_and_linear()
    dense_table, dense_linear = _table_and_linear()
    decay = [{"params": [lazy_table], "weight_decay": 0.1}, {"params": list(lazy_linear.parameters()), "weight_decay": 0.01}]
    lazy = RowAdamW(decay, lr=0.05, betas=(0.9, 0.98), fused=True)
    dense = torch.optim.AdamW([{"params": [dense_table], "weight_decay": 0.1},
                               {"params": dense_linear.parameters(), "weight_decay": 0.01}],
                              lr=0.05, betas=(0.9, 0.98), fused=True)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (lazy, dense)]
    every_row = list(range(10))
    for seed in range(3):  # every row read: the same steps as AdamW's
        _step(lazy_table, lazy_linear, every_row, seed, sparse=True)
        _step(dense_table, dense_linear, every_row, seed, sparse=False)
        for optimizer, schedule in zip((lazy, dense), schedules, strict=True):
            optimizer.step()
            schedule.step()
    torch.testing.assert_close(lazy_table, dense_table, rtol=1e-5, atol=1e-6)
    before = lazy_table.detach().clone()
    moments = {k: lazy.state[lazy_table][k].clone() for k in ("exp_avg", "exp_avg_sq")}

    read = [2, 7]
    _step(lazy_table, lazy_linear, read, 9, sparse=True)
    _step(dense_table, dense_linear, read, 9, sparse=False)
    lazy.step()
    dense.step()
    unread = [r for r in every_row if r not in read]
    torch.testing.assert_close(lazy_table[read], dense_table[read], rtol=1e-5, atol=1e-6)  # AdamW's update
    torch.testing.assert_close(lazy_linear.weight, dense_linear.weight, rtol=1e-5, atol=1e-6)  # dense: AdamW's own
    assert torch.equal(lazy_table[unread], before[unread])  # untouched, moments too
    for k, m in moments.items():
        assert torch.equal(lazy.state[lazy_table][k][unread], m[unread]), k
        assert not torch.equal(lazy.state[lazy_table][k][read], m[read]), k
    assert not torch.allclose(dense_table[unread], before[unread])  # AdamW kept moving them
    assert float(lazy.state[lazy_table]["step"]) == 4.0 and lazy_table.grad.is_sparse  # the gradient handed back
    plain = torch.optim.AdamW(decay, lr=0.05, fused=True)
    plain.load_state_dict(lazy.state_dict())  # AdamW's own state layout: checkpoints read either way


def test_clipping_counts_the_rows_of_a_sparse_gradient_as_its_dense_form() -> None:
    sparse_table, sparse_linear = _table_and_linear()
    dense_table, dense_linear = _table_and_linear()
    _step(sparse_table, sparse_linear, [1, 4, 4], 0, sparse=True)
    _step(dense_table, dense_linear, [1, 4, 4], 0, sparse=False)
    params = [sparse_table, *sparse_linear.parameters()]
    norm = clip_gradients(params, 0.5)
    want = torch.nn.utils.clip_grad_norm_([dense_table, *dense_linear.parameters()], 0.5)
    torch.testing.assert_close(norm, want)
    assert norm > 0.5  # it did clip
    torch.testing.assert_close(sparse_table.grad.to_dense(), dense_table.grad)
    torch.testing.assert_close(sparse_linear.weight.grad, dense_linear.weight.grad)
