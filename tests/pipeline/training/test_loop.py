"""The model-agnostic training loop: learning, best-epoch restore, early stopping, resume."""

import platform
import resource
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.config import TrainSettings
from pipeline.training.loop import NextItemLoss, fit, keep_freed_memory_in_process, warmup_cosine, window_items_among


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


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 10, 100) == 0.1
    assert warmup_cosine(9, 10, 100) == 1.0
    assert abs(warmup_cosine(100, 10, 100) - 0.1) < 1e-9


class TinySeqModel(nn.Module):
    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n + 1, d)

    def item_vectors(self) -> torch.Tensor:
        return self.emb.weight

    def encode(self, seq: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return table[seq]


def test_full_and_sampled_softmax_never_predict_excluded_items() -> None:
    torch.manual_seed(0)
    model = TinySeqModel(6, 4)
    excluded = torch.tensor([True, False, False, True, False, False, False])
    inputs = torch.tensor([[1, 2, 4]])
    targets = torch.tensor([[2, 4, 5]])
    full = NextItemLoss(excluded)(model, (inputs, targets))
    assert torch.isfinite(full)
    sampled = NextItemLoss(excluded, negatives=50, sampling_probs=torch.ones(7))
    assert torch.isfinite(sampled(model, (inputs, targets)))
    assert sampled.probs[0] == 0 and sampled.probs[3] == 0


def test_window_items_among_marks_exactly_the_candidates_in_each_window() -> None:
    windows = torch.tensor([[0, 0, 5, 2, 5], [9, 1, 1, 3, 4]])
    candidates = torch.tensor([1, 2, 4, 5, 7])
    assert window_items_among(windows, candidates).tolist() == [
        [False, True, False, True, False],
        [True, False, True, False, False],
    ]


def test_excluding_history_leaves_each_window_items_out_of_its_softmax() -> None:
    """Full softmax: every position's denominator is its target plus the items outside the window."""
    torch.manual_seed(0)
    model = TinySeqModel(6, 4)
    excluded = torch.tensor([True, False, False, False, False, False, True])  # padding and item 6
    inputs = torch.tensor([[0, 1, 2], [3, 1, 4]])
    targets = torch.tensor([[0, 2, 4], [1, 4, 5]])
    loss = NextItemLoss(excluded, exclude_history=True)(model, (inputs, targets))

    table = model.emb.weight
    expected = []
    for b, t in [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]:
        window = set(inputs[b].tolist()) | set(targets[b].tolist())
        y = int(targets[b, t])
        allowed = [i for i in range(1, 6) if i == y or i not in window]  # 0 and 6 are excluded
        logits = table[allowed] @ table[inputs[b, t]]
        expected.append(-torch.log_softmax(logits, 0)[allowed.index(y)])
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-6)
    assert loss < NextItemLoss(excluded)(model, (inputs, targets))  # fewer negatives, lower loss


def test_sampled_negatives_from_the_window_are_dropped() -> None:
    """Negatives drawn only from the window's own items all drop out: each position's loss is 0."""
    model = TinySeqModel(6, 4)
    excluded = torch.tensor([True] + [False] * 6)
    probs = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # items 1, 2, 4 only
    inputs, targets = torch.tensor([[1, 2]]), torch.tensor([[2, 4]])
    kept = NextItemLoss(excluded, negatives=20, sampling_probs=probs)(model, (inputs, targets))
    dropped = NextItemLoss(excluded, negatives=20, sampling_probs=probs, exclude_history=True)(model, (inputs, targets))
    assert kept > 0.1
    assert dropped.item() == 0.0


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
