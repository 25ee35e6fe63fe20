"""The model-agnostic training loop: learning, best-epoch restore, early stopping, resume, precision and
compilation, and the item tables' gradients."""

import platform
import resource
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pipeline.config import TrainSettings
from pipeline.errors import UserError
from pipeline.training.loop import TableGradients, fit, keep_freed_memory_in_process, precision_and_compilation
from tests.pipeline.training.page_fault_probes import run_probe


class Linear1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))


def regression_batches(epoch: int):
    torch.manual_seed(epoch)
    for _ in range(4):
        x = torch.randn(16)
        yield x, 3.0 * x


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model.w * x - y) ** 2).mean()


def test_fit_learns_and_restores_best_epoch(tmp_path: Path) -> None:
    model = Linear1()
    scores = iter([0.1, 0.5, 0.3, 0.2, 0.1, 0.0])  # best at epoch 2, then worse
    seen_weights = {}

    def validate(m: nn.Module) -> dict[str, float]:
        value = next(scores)
        seen_weights[value] = m.w.item()
        return {"ndcg@10": value}

    cfg = TrainSettings(epochs=6, lr=0.1, warmup_steps=0, patience=3)
    result = fit(model, regression_batches, mse, validate, cfg, torch.device("cpu"), steps_per_epoch=4,
                 checkpoint_path=tmp_path / "ck.pt", progress=False)
    assert result.best_epoch == 2
    assert result.stopped_early and result.epochs_run == 5
    assert model.w.item() == seen_weights[0.5]  # weights of the best validation epoch
    assert result.history[0].loss > result.history[-1].loss


def test_resume_continues_from_checkpoint(tmp_path: Path) -> None:
    cfg = TrainSettings(epochs=2, lr=0.05, warmup_steps=0, patience=10)
    first = fit(Linear1(), regression_batches, mse, lambda m: {"ndcg@10": -abs(m.w.item() - 3)}, cfg,
                torch.device("cpu"), 4, checkpoint_path=tmp_path / "ck.pt", progress=False)
    assert first.epochs_run == 2
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ck["epoch"] == 2
    cfg4 = TrainSettings(epochs=4, lr=0.05, warmup_steps=0, patience=10)
    resumed = fit(Linear1(), regression_batches, mse, lambda m: {"ndcg@10": -abs(m.w.item() - 3)}, cfg4,
                  torch.device("cpu"), 4, checkpoint_path=tmp_path / "ck.pt", resume=True, progress=False)
    assert [h.epoch for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[0].loss == first.history[0].loss


QUICK = {"lr": 0.05, "warmup_steps": 0, "patience": 10}


def test_resume_refuses_a_checkpoint_validated_over_other_users(tmp_path: Path) -> None:
    """Found in review: resuming with another ``train.valid_users`` compared the new epochs'
    scores with a best score measured over other users."""
    validate = lambda m: {"ndcg@10": -abs(m.w.item() - 3), "mrr@10": 0.0}  # noqa: E731
    fit(Linear1(), regression_batches, mse, validate, TrainSettings(**QUICK, epochs=1, valid_users=500), torch.device("cpu"), 4,
        checkpoint_path=tmp_path / "ck.pt", progress=False)
    for other, said in ((TrainSettings(**QUICK, epochs=2), "ndcg@10 over every user"),
                        (TrainSettings(**QUICK, epochs=2, valid_users=500, selection_metric="mrr@10"), "mrr@10 over a sample of 500")):
        with pytest.raises(UserError, match=f"its best epoch was chosen on ndcg@10 over a sample of 500 users, these "
                                            f"settings validate on {said}"):
            fit(Linear1(), regression_batches, mse, validate, other, torch.device("cpu"), 4,
                checkpoint_path=tmp_path / "ck.pt", resume=True, progress=False)
    again = fit(Linear1(), regression_batches, mse, validate, TrainSettings(**QUICK, epochs=2, valid_users=500), torch.device("cpu"),
                4, checkpoint_path=tmp_path / "ck.pt", resume=True, progress=False)
    assert [h.epoch for h in again.history] == [1, 2]


class SparseRows(nn.Module):
    """A (20, 3) table read through ``embedding(sparse=True)`` and a dense bias: the loss
    ``sum(table[rows] * x) + bias`` has gradients that do not depend on the weights, so any two
    optimisers given the same batches see the same gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.linspace(-1, 1, 60).reshape(20, 3))
        self.bias = nn.Parameter(torch.zeros(1))


def rows_batches(epoch: int):
    generator = torch.Generator().manual_seed(epoch)
    for _ in range(5):  # each step reads 3 of the 20 rows: most rows miss most steps
        yield torch.randint(0, 20, (3,), generator=generator), torch.randn(3, 3, generator=generator)


def linear_in_rows(model: nn.Module, batch) -> torch.Tensor:
    rows, x = batch
    return (nn.functional.embedding(rows, model.table, sparse=True) * x).sum() + model.bias.sum()


def test_row_updates_validate_and_checkpoint_the_weights_dense_adamw_trains() -> None:
    """``train.table_updates = "rows"``: only the rows a step read are updated, the others' steps
    deferred; before each validation ``fit`` gives every row the steps it missed, so the weights
    validated (and kept as the best epoch's) are dense AdamW's, for gradients that do not depend
    on the weights."""
    validated: dict[str, list[torch.Tensor]] = {"dense": [], "rows": []}
    for updates, seen in validated.items():
        model = SparseRows()

        def validate(m: nn.Module, seen: list[torch.Tensor] = seen) -> dict[str, float]:
            seen.append(m.table.detach().clone())
            return {"ndcg@10": float(len(seen))}  # every epoch the best: the last is restored

        cfg = TrainSettings(epochs=3, lr=0.05, warmup_steps=2, patience=10, table_updates=updates)
        fit(model, rows_batches, linear_in_rows, validate, cfg, torch.device("cpu"), steps_per_epoch=5,
            row_sparse=[model.table], progress=False)
        torch.testing.assert_close(model.table.detach(), seen[-1])
    assert len(validated["rows"]) == 3
    for dense, rows in zip(validated["dense"], validated["rows"], strict=True):
        torch.testing.assert_close(rows, dense, rtol=1e-5, atol=1e-6)
    assert not torch.equal(validated["rows"][0], SparseRows().table.detach())  # it trained


def test_freed_training_memory_is_reused_without_page_faults() -> None:
    """A 256 MB block freed and allocated again (a step's logits) stops being faulted in again.

    Without the setting every allocation faults in all its pages (glibc mmaps and unmaps it);
    with it the heap grows over the first few steps (when it has no big enough free block yet)
    and is then reused.
    """
    pages = (256 << 20) // resource.getpagesize()

    def faults_of_one_step() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(256 << 20, dtype=torch.uint8)
        block.fill_(1)  # touch every page, as a matmul writing its output does
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    if platform.libc_ver()[0] != "glibc":  # mallopt is glibc's: elsewhere nothing is changed
        assert keep_freed_memory_in_process() is False
        return
    assert keep_freed_memory_in_process() is True
    faults = [faults_of_one_step() for _ in range(10)]
    assert sum(faults[-3:]) < pages // 10, faults  # later steps reuse it


def sparse_step(table: nn.Parameter, rows: list[int], scale: float) -> None:
    """Backward of ``scale`` * the sum of ``rows`` of ``table`` (R, D): a sparse gradient, as an
    embedding with ``sparse=True`` leaves it, after the optimiser dropped the last one."""
    table.grad = None
    (scale * nn.functional.embedding(torch.tensor(rows), table, sparse=True).sum()).backward()


def test_table_gradients_reuse_one_buffer_and_clear_the_rows_of_the_step_before() -> None:
    table = nn.Parameter(torch.zeros(12, 3))
    dense = TableGradients([table], group=None)
    sparse_step(table, [1, 2, 2], 1.0)
    dense()
    first = table.grad
    assert not first.is_sparse and first[2].tolist() == [2.0] * 3 and first[[0, *range(3, 12)]].abs().sum() == 0
    torch.nn.utils.clip_grad_norm_([table], 0.5)  # clipping scales the buffer in place

    sparse_step(table, [7], 3.0)
    dense()
    want = torch.zeros(12, 3)
    want[7] = 3.0
    assert table.grad.data_ptr() == first.data_ptr()  # the same buffer, not a new (R, D) block
    torch.testing.assert_close(table.grad, want)  # rows 1 and 2 of the step before are gone


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's thread arenas are Linux's")
def test_table_gradients_do_not_page_fault_a_whole_table_in_every_step_of_a_thread(intra_op_threads: int) -> None:
    """Ray Train runs the training function in a thread; glibc gives a thread its own malloc
    arena, which maps any block over 64 MB afresh: a new dense gradient of a 500,000 x 64 table
    (128 MB) every step was 31,000 page faults and 112 ms (docs/scaling.md)."""
    probe = run_probe("table_gradients", intra_op_threads)  # in a fresh interpreter: see page_fault_probes
    fresh, faults = probe["fresh"], probe["faults"]
    if fresh < probe["pages"] // 2:
        pytest.skip(f"a fresh 128 MB block faults {fresh} pages here: too few to tell a reused block from a new one")
    assert faults[0] > fresh // 10, probe  # the first step maps the buffer: the probe sees faults
    assert max(faults[1:]) < fresh // 100, probe  # later steps write a few rows of it (was half the table)


def test_table_gradients_left_sparse_hold_the_rows_read_once_each() -> None:
    table = nn.Parameter(torch.zeros(12, 3))
    sparse_step(table, [7, 1, 7, 2], 1.0)
    want = torch.zeros(12, 3)
    want[[1, 2]], want[7] = 1.0, 2.0
    TableGradients([table], group=None, dense=False)()
    assert table.grad.is_sparse and table.grad.is_coalesced() and table.grad.indices()[0].tolist() == [1, 2, 7]
    torch.testing.assert_close(table.grad.to_dense(), want)


def _tiny_sasrec_run(precision: str, compile: str, negatives: int = 0) -> list[float]:
    """fit() on a tiny SASRec whose next item is always item + 1; returns the epoch losses.

    The step is the recipe's (``next_item_objective``) behind an assert on the dtype of a
    matmul: bf16 under bf16 autocast, else fp32 (a dtype is static, so under torch.compile the
    assert holds at trace time and adds no guard)."""
    from models.losses import NextItemLoss
    from pipeline.registry.model_store import SASRecShape
    from pipeline.training.recipe import next_item_objective

    torch.manual_seed(0)
    n, t = 30, 6
    model = SASRecShape(num_items=n, dim=16, max_len=t, num_blocks=1, num_heads=2, dropout=0.0, ff_mult=1,
                        use_content=True, id_dropout=0.1, num_categories=3, text_buckets=16, num_numeric=1,
                        max_categories=2, max_tokens=2).build()
    excluded = torch.zeros(n + 1, dtype=torch.bool)
    excluded[0] = True
    objective = next_item_objective(NextItemLoss(excluded, negatives, exclude_history=True))  # the recipe's own step loss
    expected = torch.bfloat16 if precision == "bf16" else torch.float32

    def batches(epoch: int):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(6):
            start = torch.randint(0, n - t, (16, 1), generator=g)
            seq = start + torch.arange(t + 1) + 1  # (16, T+1), items 1..n
            yield seq[:, :-1], seq[:, 1:]

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        probe = m.item_tower.id_embedding.weight[:2]
        assert (probe @ probe.T).dtype == expected  # a matmul inside the step runs in the expected precision
        return objective(m, batch)

    cfg = TrainSettings(epochs=4, lr=1e-2, warmup_steps=0, patience=10, precision=precision, compile=compile)
    result = fit(model, batches, loss_fn, lambda m: {"ndcg@10": 0.0}, cfg, torch.device("cpu"), 6, progress=False)
    return [h.loss for h in result.history]


@pytest.mark.parametrize(("settings", "cpu", "cuda"), [
    ({}, (False, False), (True, False)),
    ({"compile": "auto"}, (False, False), (True, True)),
    ({"compile": "on", "precision": "fp32"}, (False, True), (False, True)),
    ({"precision": "bf16"}, (True, False), (True, False)),
])
def test_bf16_autocast_is_the_cuda_default_and_compilation_is_asked_for(
        settings: dict, cpu: tuple[bool, bool], cuda: tuple[bool, bool]) -> None:
    """(bf16, compiled) per device. Compilation is off by default on the GPU too: measured on an
    H200, it took 32 s to gain 0.25 s per ML-1M epoch (docs/benchmarks.md)."""
    cfg = TrainSettings(**settings)
    assert precision_and_compilation(cfg, torch.device("cpu")) == cpu
    assert precision_and_compilation(cfg, torch.device("cuda")) == cuda


@pytest.mark.slow
@pytest.mark.parametrize("negatives", [0, 8], ids=["full softmax", "sampled softmax"])
def test_the_gpu_path_runs_on_the_cpu_bf16_autocast_and_torch_compile(negatives: int) -> None:
    """bf16 autocast (the CUDA default) and torch.compile (``train.compile``) ran on a GPU once,
    off CI (docs/benchmarks.md); CI has none: the same loop runs with both on the CPU, compiles,
    computes in bf16, and learns as the fp32 loop does."""
    import torch._dynamo

    plain = _tiny_sasrec_run("fp32", "off", negatives)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fast = _tiny_sasrec_run("bf16", "on", negatives)
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] >= 1, "torch.compile traced nothing"
    # The boolean-mask selection of real positions in the loss breaks the graph (a data-dependent
    # shape), so the step is a few graphs; it must not be recompiled step after step (24 steps).
    assert stats["unique_graphs"] <= 12, f"the step recompiles: {dict(stats)}"
    assert fast[-1] < 0.6 * fast[0] and plain[-1] < 0.6 * plain[0], (plain, fast)
    assert abs(fast[-1] - plain[-1]) < 0.1 * plain[0], (plain, fast)
