"""Most-popular and item-kNN baselines against hand-computed values."""

import math

import torch

from models.item_knn import ItemKNN
from models.popularity import MostPopular


def test_most_popular_scores_are_counts() -> None:
    model = MostPopular(torch.tensor([0.0, 5.0, 1.0, 3.0]))
    scores = model(torch.tensor([[1, 2], [0, 3]]))
    assert scores.shape == (2, 4)
    assert scores[1].tolist() == [0.0, 5.0, 1.0, 3.0]


def test_item_knn_cosine_by_hand() -> None:
    # users: u0 = {1, 2}, u1 = {1, 2, 3}, u2 = {3}
    users = torch.tensor([0, 0, 1, 1, 1, 2])
    items = torch.tensor([1, 2, 1, 2, 3, 3])
    knn = ItemKNN.fit(users, items, num_users=3, num_items=3, neighbours=3)
    sim = knn.similarity.to_dense()
    assert math.isclose(sim[1, 2].item(), 2 / math.sqrt(2 * 2), rel_tol=1e-6)  # |{u0,u1}| / sqrt(2*2)
    assert math.isclose(sim[1, 3].item(), 1 / math.sqrt(2 * 2), rel_tol=1e-6)  # |{u1}| / sqrt(2*2)
    assert sim[1, 1].item() == 0.0 and sim[0].abs().sum().item() == 0.0
    scores = knn(torch.tensor([[0, 1, 1]]))  # history {1} (repeat counted once)
    torch.testing.assert_close(scores[0, 2:], sim[1, 2:])


def test_item_knn_keeps_top_neighbours_only() -> None:
    users = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    items = torch.tensor([1, 2, 3, 1, 2, 1, 3])
    knn = ItemKNN.fit(users, items, num_users=3, num_items=3, neighbours=1)
    dense = knn.similarity.to_dense()
    assert ((dense[1:] > 0).sum(dim=1) <= 1).all()
