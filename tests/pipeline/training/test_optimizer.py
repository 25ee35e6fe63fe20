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


def _give(table: nn.Parameter, rows: list[int], values: torch.Tensor, sparse: bool) -> None:
    """Set ``table``'s gradient to ``values`` (R, D) at ``rows`` (R,) distinct: sparse and
    coalesced, or dense with zeros elsewhere (as AdamW sees a row a step did not read)."""
    index = torch.tensor(rows)
    dense = torch.zeros_like(table).index_put_((index,), values)
    table.grad = dense.to_sparse(1).coalesce() if sparse else dense


def _pair(schedule) -> tuple[list[nn.Parameter], list[torch.optim.Optimizer], list]:
    """The same (10, 4) table under RowAdamW and fused AdamW (weight decay 0.1), each with
    the LambdaLR ``schedule``."""
    torch.manual_seed(0)
    start = torch.randn(10, 4)
    tables = [nn.Parameter(start.clone()), nn.Parameter(start.clone())]
    optimizers = [RowAdamW([tables[0]], lr=0.05, betas=(0.9, 0.98), weight_decay=0.1, fused=True),
                  torch.optim.AdamW([tables[1]], lr=0.05, betas=(0.9, 0.98), weight_decay=0.1, fused=True)]
    return tables, optimizers, [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in optimizers]


def _run(tables, optimizers, schedules, reads: list[list[int]], seed: int) -> None:
    """One step per entry of ``reads`` on both tables: the same gradient (entries of size 1) on
    the rows read."""
    generator = torch.Generator().manual_seed(seed)
    for rows in reads:
        values = torch.randn(len(rows), 4, generator=generator)
        for table, optimizer, schedule, sparse in zip(tables, optimizers, schedules, (True, False), strict=True):
            _give(table, rows, values, sparse)
            optimizer.step()
            schedule.step()


def test_row_adamw_is_adamw_on_the_rows_read_and_defers_the_others_until_read_or_caught_up() -> None:
    """A row read gets AdamW's weights and moments, the steps it missed included; a row not read
    keeps its weights and moments until then, where AdamW keeps moving it by its momentum and
    decaying it; ``catch_up`` gives every row AdamW's values. The learning rate changes every
    step (a schedule), as the closed form must follow."""
    (lazy, dense), (row_adamw, adamw), schedules = _pair(lambda s: 1.0 / (1 + 0.1 * s))
    every_row = list(range(10))
    _run((lazy, dense), (row_adamw, adamw), schedules, [every_row] * 3, seed=1)
    torch.testing.assert_close(lazy, dense, rtol=1e-5, atol=1e-6)

    before = lazy.detach().clone()
    moments = {k: row_adamw.state[lazy][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    _run((lazy, dense), (row_adamw, adamw), schedules, [[2, 7], [7], [7, 3, 2]], seed=2)
    unread = [r for r in every_row if r not in (2, 3, 7)]
    torch.testing.assert_close(lazy[[2, 3, 7]], dense[[2, 3, 7]], rtol=1e-5, atol=1e-6)  # 7 every step, 2 and 3 after 1 and 2 missed
    assert torch.equal(lazy[unread], before[unread])  # deferred, moments too
    for k, m in moments.items():
        assert torch.equal(row_adamw.state[lazy][k][unread], m[unread]), k
    assert not torch.allclose(dense[unread], before[unread])  # AdamW kept moving them
    assert float(row_adamw.state[lazy]["step"]) == 6.0 and lazy.grad.is_sparse  # the gradient handed back

    row_adamw.catch_up(chunk_rows=3)  # in chunks, as a large table is
    torch.testing.assert_close(lazy, dense, rtol=1e-5, atol=1e-6)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(row_adamw.state[lazy][k], adamw.state[dense][k], rtol=1e-5, atol=1e-9)
    plain = torch.optim.AdamW([lazy], lr=0.05, fused=True)
    plain.load_state_dict(row_adamw.state_dict())  # AdamW's own state layout: checkpoints read either way


def test_row_adamw_catches_up_a_row_missed_for_longer_than_its_horizon() -> None:
    """A row left for 400 steps (past the ~170 the closed form sums over, the rest being under
    1e-7 of its pull), under warm-up and a cosine schedule, with the checkpoint's state reloaded
    half way: AdamW's weights once read again."""
    from pipeline.training.optimizer import warmup_cosine

    (lazy, dense), (row_adamw, adamw), schedules = _pair(lambda s: warmup_cosine(s, 20, 600))
    _run((lazy, dense), (row_adamw, adamw), schedules, [list(range(10))] * 5, seed=3)
    _run((lazy, dense), (row_adamw, adamw), schedules, [[0, 1]] * 200, seed=4)
    saved = row_adamw.state_dict()
    again = RowAdamW([lazy], lr=0.05, betas=(0.9, 0.98), weight_decay=0.1, fused=True)
    schedules[0] = torch.optim.lr_scheduler.LambdaLR(again, lambda s: warmup_cosine(s, 20, 600))
    again.load_state_dict(saved)  # as fit resumes: both built, then both loaded
    schedules[0].load_state_dict(schedules[1].state_dict())
    _run((lazy, dense), (again, adamw), schedules, [[0, 1]] * 200 + [list(range(10))], seed=5)
    torch.testing.assert_close(lazy, dense, rtol=1e-5, atol=1e-6)


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
