"""Next-item losses: full and sampled softmax, excluded items, the window's own items left out (tiny shapes)."""

import torch
import torch.nn as nn

from models.losses import NextItemLoss, window_items_among


class TinySeqModel(nn.Module):
    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n + 1, d)

    def item_vectors(self) -> torch.Tensor:
        return self.emb.weight

    def encode(self, seq: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return table[seq]


def loss_of(loss: NextItemLoss, model: "TinySeqModel", inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss of ``model``'s states for (inputs, targets), as the training recipe computes it."""
    table = model.item_vectors()
    return loss(model.encode(inputs, table), table, inputs, targets)


def test_full_and_sampled_softmax_never_predict_excluded_items() -> None:
    torch.manual_seed(0)
    model = TinySeqModel(6, 4)
    excluded = torch.tensor([True, False, False, True, False, False, False])
    inputs = torch.tensor([[1, 2, 4]])
    targets = torch.tensor([[2, 4, 5]])
    full = loss_of(NextItemLoss(excluded), model, inputs, targets)
    assert torch.isfinite(full)
    sampled = NextItemLoss(excluded, negatives=50, sampling_probs=torch.ones(7))
    assert torch.isfinite(loss_of(sampled, model, inputs, targets))
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
    loss = loss_of(NextItemLoss(excluded, exclude_history=True), model, inputs, targets)

    table = model.emb.weight
    expected = []
    for b, t in [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]:
        window = set(inputs[b].tolist()) | set(targets[b].tolist())
        y = int(targets[b, t])
        allowed = [i for i in range(1, 6) if i == y or i not in window]  # 0 and 6 are excluded
        logits = table[allowed] @ table[inputs[b, t]]
        expected.append(-torch.log_softmax(logits, 0)[allowed.index(y)])
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-6)
    assert loss < loss_of(NextItemLoss(excluded), model, inputs, targets)  # fewer negatives, lower loss


def test_sampled_negatives_from_the_window_are_dropped() -> None:
    """Negatives drawn only from the window's own items all drop out: each position's loss is 0."""
    model = TinySeqModel(6, 4)
    excluded = torch.tensor([True] + [False] * 6)
    probs = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # items 1, 2, 4 only
    inputs, targets = torch.tensor([[1, 2]]), torch.tensor([[2, 4]])
    kept = loss_of(NextItemLoss(excluded, negatives=20, sampling_probs=probs), model, inputs, targets)
    dropped = loss_of(NextItemLoss(excluded, negatives=20, sampling_probs=probs, exclude_history=True), model, inputs, targets)
    assert kept > 0.1
    assert dropped.item() == 0.0
