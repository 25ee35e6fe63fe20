"""Data-parallel training: the gradient two DDP ranks step with is the single-process one.

Two real processes form a gloo group on 127.0.0.1 (``torch.multiprocessing``, no Ray here);
each takes its half of one batch (as each rank packs its own share of a step's batch) and runs
the loss through ``data_parallel``, the hook ``pipeline.training.loop.fit`` uses in a process
group. After backward, every rank must hold the gradient one process computes on the whole
batch, which is the average of the two halves' own gradients (a mean loss over equal halves)
and differs from each of them. ``rank_share`` gives each rank its users' windows.

Tables with sparse gradients (the item tables under a sampled softmax) are left out of DDP and
averaged by ``TableGradients`` over the rows some rank looked up: the same gradient DDP leaves
when it all-reduces them whole (made dense, or kept as those rows for ``RowAdamW``), and in the
recipe the ranks' weights stay equal step by step, the tables updated densely or row by row.

Validation is shared the same way: each rank ranks its share of the users, and every rank ends
with the result one process computes over all of them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import numpy as np

from pipeline.config import load_settings
from pipeline.data.feature_store import FeatureSet, load_feature_set
from pipeline.scale.cluster import free_port
from pipeline.training.batches import Windows, rank_share
from pipeline.training.data_defaults import fit_to_data
from pipeline.training.evaluation import EvalResult, evaluate
from pipeline.training.loop import ProcessGroup, TableGradients, data_parallel, fit
from pipeline.training.recipe import training_setup

ROWS, FEATURES = 8, 5


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """This process as ``rank`` of a gloo group of ``world`` on 127.0.0.1."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort in CI)
    finally:
        dist.destroy_process_group()


def tiny_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(FEATURES, 4), nn.Tanh(), nn.Linear(4, 1))


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(ROWS, FEATURES, generator=g), torch.randn(ROWS, 1, generator=g)


def half(batch: tuple[torch.Tensor, ...], rank: int) -> tuple[torch.Tensor, ...]:
    """Rank ``rank``'s half of every tensor of ``batch`` (2 ranks, ROWS even)."""
    return tuple(t.chunk(2)[rank] for t in batch)


def mse(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    inputs, targets = batch
    return ((model(inputs) - targets) ** 2).mean()


def gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        model = tiny_model()
        if rank == 1:  # a different start: DDP must broadcast rank 0's weights
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        model.register_buffer("content", torch.full((3,), float(rank)))  # a constant buffer, as the item tower's
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step_loss = data_parallel(model, mse, torch.device("cpu"))
        step_loss(model, half(tiny_batch(), rank)).backward()
        torch.save({"grads": gradients(model), "weights": [p.detach().clone() for p in model.parameters()],
                    "content": model.content.clone(), "warnings": [str(w.message) for w in caught]},
                   Path(out) / f"rank{rank}.pt")


def test_two_ranks_step_with_the_single_process_gradient(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    whole = tiny_model()
    mse(whole, tiny_batch()).backward()
    expected = gradients(whole)
    shard_grads = []
    for r in range(2):
        alone = tiny_model()
        mse(alone, half(tiny_batch(), r)).backward()
        shard_grads.append(gradients(alone))

    for rank in ranks:
        assert rank["warnings"] == []  # torch 2.13 deprecated DDP's broadcast_buffers with a FutureWarning
        torch.testing.assert_close(rank["content"], torch.zeros(3))  # rank 0's buffer, broadcast once at the start
        for got, want, a, b, w, w0 in zip(rank["grads"], expected, *shard_grads, rank["weights"], whole.parameters(),
                                          strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)        # = the single-process gradient
            torch.testing.assert_close(got, (a + b) / 2, rtol=1e-5, atol=1e-7)  # = the average of the shards'
            assert not torch.allclose(a, b)                                    # which differ from each other
            torch.testing.assert_close(w, w0.detach())                        # every rank holds rank 0's weights


TABLE_ROWS = 12


class TableModel(nn.Module):
    """A table of TABLE_ROWS rows (row 0 padding) read by a batch of item lists, and a linear map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.table = nn.Embedding(TABLE_ROWS, 4, padding_idx=0)
        self.out = nn.Linear(4, 1)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.out(self.table(items).mean(dim=1))  # (B, L) -> (B, 4) -> (B, 1)


def table_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 lists of 3 items; the first half reads rows 1-5, the second 4-9 (4 and 5 both, some
    rows twice in a half); rows 10 and 11 are read by neither."""
    items = torch.tensor([[1, 2, 3], [4, 5, 1], [2, 2, 0], [5, 3, 4],
                          [4, 6, 7], [8, 9, 5], [9, 9, 6], [7, 0, 8]])
    return items, torch.randn(8, 1, generator=torch.Generator().manual_seed(6))


def _table_rank(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        saved = {}
        for mode in ("ddp", "dense", "rows"):  # DDP's whole table; its rows read, made dense or kept sparse
            model = TableModel()
            if rank == 1:  # a different start: rank 0's weights must reach every rank, the table's too
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
            model.table.sparse = mode != "ddp"
            tables = [model.table.weight] if mode != "ddp" else []
            step_loss = data_parallel(model, mse, torch.device("cpu"), row_sparse=tables)
            step_loss(model, half(table_batch(), rank)).backward()
            TableGradients(tables, ProcessGroup(rank, world), dense=mode != "rows")()
            saved[mode] = {"grads": gradients(model), "weights": [p.detach().clone() for p in model.parameters()]}
        unread = nn.Parameter(torch.zeros(TABLE_ROWS, 2))  # read by rank 0's step only (rows 2 and 3)
        if rank == 0:
            unread.grad = torch.zeros(TABLE_ROWS, 2).index_fill_(0, torch.tensor([2, 3]), 1.0).to_sparse(sparse_dim=1)
        TableGradients([unread], ProcessGroup(rank, world))()
        saved["unread"] = unread.grad
        torch.save(saved, Path(out) / f"rank{rank}.pt")


def test_sparse_tables_get_the_gradient_ddp_gives_them_whole_from_the_rows_read(tmp_path: Path) -> None:
    mp.spawn(_table_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    whole = TableModel()
    mse(whole, table_batch()).backward()

    for rank in ranks:
        dense, sparse = rank["ddp"], rank["dense"]
        for got, ddp, want, w, w0 in zip(sparse["grads"], dense["grads"], gradients(whole), sparse["weights"],
                                         whole.parameters(), strict=True):
            assert not got.is_sparse
            torch.testing.assert_close(got, ddp, rtol=1e-6, atol=1e-8)    # = DDP's all-reduce of the whole table
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)   # = the single-process gradient
            torch.testing.assert_close(w, w0.detach())                    # every rank holds rank 0's weights
        table = sparse["grads"][0]
        assert table[[10, 11]].abs().sum() == 0 and table[1:10].abs().sum(dim=1).gt(0).all()  # read rows only (and 0 = padding)
        rows = rank["rows"]["grads"][0]  # the same gradient kept as the rows read, for RowAdamW
        assert rows.is_sparse and rows.is_coalesced() and set(range(1, 10)) <= set(rows.indices()[0].tolist()) <= set(range(10))
        assert torch.equal(rows.to_dense(), table)
        # a rank whose step did not read a table sends no rows, and the average is the other's half
        assert torch.equal(rank["unread"], torch.zeros(TABLE_ROWS, 2).index_fill_(0, torch.tensor([2, 3]), 0.5))


def _recipe_rank(rank: int, world: int, port: int, feature_set: str, out: str) -> None:
    with gloo_group(rank, world, port):
        torch.set_num_threads(1)
        fs = load_feature_set(Path(feature_set))
        saved = {}
        for sparse, updates in ((False, "dense"), (True, "dense"), (True, "rows")):
            settings = fit_to_data(load_settings(home=Path(out) / "home", **{
                "train.negatives": 16, "train.sparse_item_tables": sparse, "train.table_updates": updates,
                "train.epochs": 1, "train.batch_size": 16,
                "model.max_len": 20, "model.hidden_size": 16, "model.text_encoder": "hashed"}), fs)[0]
            setup = training_setup(settings, fs, torch.device("cpu"))
            fit(setup.model, setup.batches, setup.loss, lambda m: {"ndcg@10": 0.0}, settings.train, torch.device("cpu"),
                setup.steps_per_epoch, param_groups=setup.model.optimizer_groups(0.0), row_sparse=setup.row_sparse,
                progress=False)
            saved[updates if sparse else "ddp"] = {"tables": len(setup.row_sparse), "steps": setup.steps_per_epoch,
                             "weights": {k: v.clone() for k, v in setup.model.state_dict().items()}}
        compiled = settings.model_copy(update={"train": settings.train.model_copy(update={"compile": "on", "table_updates": "dense"})})
        saved["compiled tables"] = len(training_setup(compiled, fs, torch.device("cpu")).row_sparse)
        torch.save(saved, Path(out) / f"rank{rank}.pt")


def test_a_sampled_softmax_recipe_trains_its_item_tables_sparse_with_the_ranks_in_step(
        tiny_fs: FeatureSet, tmp_path: Path) -> None:
    mp.spawn(_recipe_rank, args=(2, free_port(), str(tiny_fs.path), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["dense"]["tables"] for r in ranks] == [3, 3] and [r["ddp"]["tables"] for r in ranks] == [0, 0]  # ID, category, words
    assert [r["rows"]["tables"] for r in ranks] == [3, 3]
    assert [r["compiled tables"] for r in ranks] == [0, 0]  # Inductor cannot compile a sparse backward
    assert ranks[0]["dense"]["steps"] >= 5
    for mode in ("ddp", "dense", "rows"):  # the ranks hold the same weights after the epoch (a rank once apart stays apart)
        for name, weight in ranks[0][mode]["weights"].items():
            assert torch.equal(weight, ranks[1][mode]["weights"][name]), name
    # row-wise updates are another training than the dense one: a forward reads a row before it
    # is given the steps it missed (test_loop checks the weights once caught up)
    ids = "item_tower.id_embedding.weight"
    row_wise, dense = ranks[0]["rows"]["weights"][ids], ranks[0]["dense"]["weights"][ids]
    assert not torch.equal(row_wise, dense)
    # the same training as with DDP's whole tables, up to the order of sums (1e-8 measured); the
    # attention's key bias gets a gradient of rounding noise alone (softmax ignores it), which
    # AdamW turns into steps of its own size: 1.1e-5 apart after the epoch
    for name, weight in ranks[0]["ddp"]["weights"].items():
        torch.testing.assert_close(ranks[0]["dense"]["weights"][name], weight, rtol=1e-5,
                                   atol=1e-4 if name.endswith("attn.qkv.bias") else 1e-7, msg=name)


def test_each_rank_trains_on_its_own_users_windows_in_as_many_steps_as_the_others() -> None:
    users = np.array([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9])  # 13 windows of 10 users (some have several)
    win = Windows(users, np.arange(13), np.arange(13) + 5)
    shares = [rank_share(win, 4, r, 3) for r in range(3)]
    # users dealt whole, most windows first, each to the rank with the fewest windows so far
    # (ties: the lowest rank): 3 (3 windows) -> rank 0, 0 (2) -> 1, 1 -> 2, 2 -> 2, 4 -> 1,
    # 5 -> 2, 6 -> 0 (all at 3), 7 -> 1, 8 -> 2, 9 -> 0 (all at 4)
    assert [sorted(set(share.user.tolist())) for share, _, _ in shares] == [[3, 6, 9], [0, 4, 7], [1, 2, 5, 8]]
    assert [len(share) for share, _, _ in shares] == [5, 4, 4]  # close, although user 3 alone has 3
    assert sorted(np.concatenate([share.start for share, _, _ in shares]).tolist()) == list(range(13))  # each window once
    assert {per_rank for _, per_rank, _ in shares} == {1}  # a global batch of 4 is 1 window per rank (4 // 3)
    assert {steps for _, _, steps in shares} == {4}  # the smallest share's: 4 windows at 1 per step
    mine, per_rank, steps = rank_share(win, 4, 0, 1)  # one process: everything, whole batches
    assert len(mine) == 13 and (per_rank, steps) == (4, 4)
    assert rank_share(win, 4, 0, 11)[2] == 0  # more ranks than users: some rank would have nothing


def test_a_few_very_active_users_do_not_unbalance_the_shares() -> None:
    """Reported at 10M events (a Zipf log whose most active user has 14,608 windows): ranks
    dealt users in a fixed snake order got 230,608 and 224,148 windows, and the larger share
    left 6,372 windows out of every epoch (4.9% with 8 ranks). Here: a head of active users
    and a tail of one-window users, as such a log has."""
    counts = [14, 7, 5, 4, 3, 2, 2] + [1] * 10  # 47 windows of 17 users
    users = np.repeat(np.arange(len(counts)), counts)
    win = Windows(users, np.arange(len(users)), np.arange(len(users)) + 5)
    shares = [rank_share(win, 2, r, 2) for r in range(2)]
    assert sorted(len(share) for share, _, _ in shares) == [23, 24]  # the snake order gave 27 and 20
    assert {steps for _, _, steps in shares} == {23}  # 1 window per rank and step: 46 of 47 trained
    assert sorted(np.concatenate([share.start for share, _, _ in shares]).tolist()) == list(range(47))


def table_scorer(num_items: int, scored: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fixed scorer (the same in every process): a history's summed item vectors against every
    item's; ``scored`` hears how many users each call scored."""
    table = torch.randn(num_items + 1, 8, generator=torch.Generator().manual_seed(7))
    table[0] = 0.0  # padding adds nothing, however long a batch's histories are padded

    def score(seq: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, N+1)
        scored.append(seq.shape[0])
        return table[seq].sum(dim=1) @ table.T  # (B, T, 8) -> (B, 8) -> (B, N+1)
    return score


def _evaluate_rank(rank: int, world: int, port: int, feature_set: str, out: str) -> None:
    with gloo_group(rank, world, port):
        fs = load_feature_set(Path(feature_set))
        scored: list[int] = []
        result = evaluate(table_scorer(fs.num_items, scored), fs, "valid", 20, torch.device("cpu"), ks=(5, 10),
                          batch_size=8, group=ProcessGroup(rank, world))
        arrays = {k: torch.from_numpy(getattr(result, k)) for k in ("users", "targets", "ranks")}
        held_out = None if result.held_out is None else torch.from_numpy(result.held_out)
        torch.save({**arrays, "metrics": result.metrics, "held_out": held_out, "scored": sum(scored)},
                   Path(out) / f"rank{rank}.pt")


def test_ranks_share_the_validation_users_and_each_gets_the_single_process_result(
        tiny_fs: FeatureSet, tmp_path: Path) -> None:
    mp.spawn(_evaluate_rank, args=(2, free_port(), str(tiny_fs.path), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    alone: EvalResult = evaluate(table_scorer(tiny_fs.num_items, []), tiny_fs, "valid", 20, torch.device("cpu"),
                                 ks=(5, 10))
    users = len(alone.users)
    assert users >= 20
    batches = [min(8, users - i) for i in range(0, users, 8)]  # one process's batches of 8, dealt round robin
    assert [r["scored"] for r in ranks] == [sum(batches[0::2]), sum(batches[1::2])]  # each its share, once
    for got in ranks:
        assert np.array_equal(got["users"].numpy(), alone.users) and np.array_equal(got["targets"].numpy(), alone.targets)
        assert np.array_equal(got["ranks"].numpy(), alone.ranks)  # every user's rank, the other rank's users' too
        assert got["metrics"] == alone.metrics  # HR, NDCG and coverage (from both ranks' top items)
        assert (got["held_out"] is None) == (alone.held_out is None)
        if alone.held_out is not None:
            assert np.array_equal(got["held_out"].numpy(), alone.held_out)
    assert alone.metrics["hr@10"] > 0 and len(set(alone.ranks.tolist())) > 3  # a ranking that can differ
