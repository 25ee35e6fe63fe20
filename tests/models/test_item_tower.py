"""Item tower: ID + content fusion, cold items from content alone, padding."""

import torch

from models.item_tower import ItemTower

N, D = 6, 8


def make_tower(**kw) -> ItemTower:
    torch.manual_seed(0)
    tower = ItemTower(N, D, num_categories=3, text_buckets=10, num_numeric=1, max_categories=2, max_tokens=2, **kw)
    cats = torch.tensor([[0, 0], [1, 2], [2, 0], [3, 0], [1, 3], [0, 0], [2, 3]])
    toks = torch.tensor([[0, 0], [4, 5], [6, 0], [7, 8], [9, 0], [0, 0], [4, 9]])
    tower.set_content(cats, toks, torch.arange(N + 1, dtype=torch.float32).unsqueeze(1))
    return tower.eval()


def test_shapes_and_padding() -> None:
    tower = make_tower()
    assert tower().shape == (N + 1, D)
    assert tower(torch.tensor([[1, 2], [0, 3]])).shape == (2, 2, D)
    assert torch.all(tower(torch.tensor([0])) == 0)


def test_cold_item_vector_comes_from_content_only() -> None:
    tower = make_tower()
    cold = torch.zeros(N + 1, dtype=torch.bool)
    cold[4] = True
    tower.set_cold(cold)
    before = tower(torch.tensor([4, 3]))
    with torch.no_grad():
        tower.id_embedding.weight[4] += 10.0
        tower.id_embedding.weight[3] += 10.0
    after = tower(torch.tensor([4, 3]))
    torch.testing.assert_close(before[0], after[0])  # cold: ID ignored
    assert not torch.allclose(before[1], after[1])  # warm: ID used
    expected = tower.embed_content(tower.category_ids[4:5], tower.token_ids[4:5], tower.numeric[4:5])[0]
    torch.testing.assert_close(after[0], expected)


def test_content_for_a_brand_new_item() -> None:
    tower = make_tower()
    vec = tower.embed_content(torch.tensor([[1, 2]]), torch.tensor([[4, 5]]), torch.tensor([[1.0]]))
    assert vec.shape == (1, D) and torch.isfinite(vec).all()
    # same content as item 1 -> same content vector as item 1's content part
    torch.testing.assert_close(vec[0], tower.embed_content(tower.category_ids[1:2], tower.token_ids[1:2], tower.numeric[1:2])[0])


def test_id_dropout_only_while_training() -> None:
    tower = make_tower(id_dropout=1.0)
    tower.train()
    content = tower.embed_content(tower.category_ids, tower.token_ids, tower.numeric)
    torch.testing.assert_close(tower()[1:], content[1:])
    tower.eval()
    assert not torch.allclose(tower()[1:], content[1:])


def test_pure_id_tower_is_an_embedding() -> None:
    tower = ItemTower(N, D, use_content=False)
    torch.testing.assert_close(tower(torch.tensor([2])), tower.id_embedding.weight[2:3])


def test_sentence_vectors_are_frozen_and_projected() -> None:
    """A text_dim tower reads (N+1, S) sentence vectors through a trained projection; the vectors
    themselves are a buffer (saved, never trained) and items without text get no text part."""
    torch.manual_seed(0)
    tower = ItemTower(N, D, num_categories=3, text_dim=5, max_categories=2)
    sentences = torch.nn.functional.normalize(torch.randn(N + 1, 5), dim=1)
    sentences[0] = 0
    sentences[3] = 0  # item 3 has no text
    tower.set_content(torch.zeros(N + 1, 2, dtype=torch.long), torch.zeros(N + 1, 1, dtype=torch.long),
                      torch.zeros(N + 1, 0), sentences)
    assert tower.text_bag is None and "text_vectors" in dict(tower.named_buffers())
    assert "text_vectors" not in dict(tower.named_parameters())
    assert tower.state_dict()["text_vectors"].shape == (N + 1, 5)
    tower.eval()
    content = tower.embed_content(tower.category_ids, tower.token_ids, tower.numeric, tower.text_vectors)  # (N+1, D)
    torch.testing.assert_close(content[3], tower.content_proj.bias)  # no categories, no text: the bias alone
    tower().sum().backward()
    assert tower.text_proj.weight.grad is not None and tower.text_proj.weight.grad.abs().sum() > 0


def test_text_none_tower_has_no_text_path() -> None:
    tower = ItemTower(N, D, num_categories=3, max_categories=2)
    assert tower.text_bag is None and tower.text_proj is None and tower.text_vectors is None
    assert tower(torch.tensor([1, 2])).shape == (2, D)
