"""Shape, masking, causality and explain tests for the SASRec encoder (B=2, T=5, D=8)."""

import torch

from models.item_tower import ItemTower
from models.sasrec import SASRec

N, D, T = 12, 8, 5


def make_model(use_content: bool = True, **kw) -> SASRec:
    torch.manual_seed(0)
    tower = ItemTower(N, D, num_categories=3, text_buckets=16, num_numeric=2, use_content=use_content,
                      max_categories=2, max_tokens=3)
    tower.set_content(torch.randint(0, 4, (N + 1, 2)), torch.randint(0, 16, (N + 1, 3)), torch.randn(N + 1, 2))
    model = SASRec(tower, max_len=T, num_blocks=2, num_heads=2, dropout=0.1, **kw)
    return model.eval()


def test_shapes() -> None:
    model = make_model()
    seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    assert model.encode(seq).shape == (2, T, D)
    assert model.user_vectors(seq).shape == (2, D)
    assert model(seq).shape == (2, N + 1)
    assert model.item_vectors().shape == (N + 1, D)
    assert torch.all(model.item_vectors()[0] == 0), "padding item vector must be zero"


def test_padding_does_not_change_valid_positions() -> None:
    model = make_model()
    padded = model.encode(torch.tensor([[0, 0, 3, 4, 5]]))
    short = model.encode(torch.tensor([[3, 4, 5]]))
    torch.testing.assert_close(padded[:, 2:], short, rtol=1e-5, atol=1e-5)
    assert torch.all(padded[:, :2] == 0), "padded positions output zeros"


def test_padding_item_content_cannot_leak() -> None:
    model = make_model()
    a = model.encode(torch.tensor([[0, 0, 3, 4, 5]]))
    with torch.no_grad():
        model.item_tower.id_embedding.weight[0].fill_(5.0)  # even a corrupted padding row must not matter
    b = model.encode(torch.tensor([[0, 0, 3, 4, 5]]))
    torch.testing.assert_close(a, b)


def test_causality_future_item_does_not_change_earlier_outputs() -> None:
    model = make_model()
    a = model.encode(torch.tensor([[1, 2, 3, 4, 5]]))
    b = model.encode(torch.tensor([[1, 2, 3, 4, 9]]))
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4], b[:, 4]), "the changed position itself must change"


def test_explain_weights_sum_to_one_and_zero_on_padding() -> None:
    model = make_model()
    seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    items = torch.tensor([[7, 8, 9], [1, 10, 11]])
    w = model.explain(seq, items)
    assert w.shape == (2, 3, T)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))
    assert torch.all(w[0, :, :2] == 0)
    assert torch.all(w >= 0)


def test_score_parts_add_up_to_the_state_and_the_score() -> None:
    model = make_model()
    model.eval()
    seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 0, 0, 0, 7]])
    with torch.no_grad():
        parts, attention = model.score_parts(seq)  # (B, T+1, D), (B, T)
        state = model.encode(seq)[:, -1]  # (B, D)
        scores = model(seq)  # (B, N+1)
        table = model.item_vectors()
    assert parts.shape == (3, T + 1, D) and attention.shape == (3, T)
    torch.testing.assert_close(parts.sum(1), state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((parts @ table.T).sum(1), scores, atol=1e-4, rtol=1e-4)  # score = sum of the parts' scores
    assert torch.all(parts[0, :2] == 0) and torch.all(parts[2, :4] == 0)  # padding holds no part
    torch.testing.assert_close(attention.sum(-1), torch.ones(3))


def test_explain_weights_are_the_shares_of_the_positive_contributions() -> None:
    model = make_model()
    model.eval()
    seq = torch.tensor([[0, 1, 2, 3, 4]])
    with torch.no_grad():
        parts, _ = model.score_parts(seq)
        contributions = parts[0, :T] @ model.item_vectors()[6]  # (T,) s_j for candidate 6
        weights = model.explain(seq, torch.tensor([[6]]))[0, 0]
    positive = contributions.clamp(min=0)
    assert positive.sum() > 0
    torch.testing.assert_close(weights, positive / positive.sum())


def test_pure_id_model_has_no_content_parameters() -> None:
    model = make_model(use_content=False)
    assert not any("bag" in n for n, _ in model.named_parameters())
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, N + 1)


def test_dropout_only_in_training() -> None:
    model = make_model()
    seq = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(model.encode(seq), model.encode(seq))
    model.train()
    torch.manual_seed(1)
    a = model.encode(seq)
    torch.manual_seed(2)
    assert not torch.allclose(a, model.encode(seq))
