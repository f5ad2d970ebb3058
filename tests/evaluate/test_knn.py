import math

import pytest
import torch

from essa.evaluate.knn import knn_scores


def test_weighted_votes_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_scores(bank, labels, query, k=2, temperature=0.5)
    # neighbours: bank 0 (cos 1) and bank 2 (cos 1/sqrt 2); weights exp(cos / 0.5)
    w0, w2 = math.exp(1 / 0.5), math.exp((1 / math.sqrt(2)) / 0.5)
    assert torch.allclose(scores, torch.tensor([[w0 / (w0 + w2), w2 / (w0 + w2)]]), atol=1e-6)


def test_leave_one_out_never_uses_the_item_itself():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    scores = knn_scores(bank, labels, k=1, temperature=0.1)
    assert scores.argmax(1).tolist() == [0, 0, 1, 1]
    flipped = knn_scores(bank, torch.tensor([0, 1, 0, 1]), k=1, temperature=0.1)
    assert flipped.argmax(1).tolist() == [1, 0, 1, 0]  # each item takes its neighbour's label, not its own


def test_k_is_clipped_and_bad_input_is_explained():
    bank, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    assert knn_scores(bank, labels, torch.randn(2, 3), k=200).shape == (2, 3)
    with pytest.raises(ValueError, match="must be positive"):
        knn_scores(bank, labels, k=0)
    with pytest.raises(ValueError, match=r"bank must be \(N, D\)"):
        knn_scores(bank, labels[:3])


def test_balanced_votes_divide_each_class_by_its_share_of_the_bank():
    # 6 of class 0 near (1, 0), 2 of class 1 near (0.8, 0.6): a query at (0.8, 0.6) sees 4 neighbours
    bank = torch.tensor([[1.0, 0.0]] * 6 + [[0.8, 0.6]] * 2)
    labels = torch.tensor([0] * 6 + [1] * 2)
    query = torch.tensor([[0.8, 0.6]])
    plain = knn_scores(bank, labels, query, k=8, temperature=1.0)
    balanced = knn_scores(bank, labels, query, k=8, temperature=1.0, balanced=True)
    w0, w1 = math.exp(0.8), math.exp(1.0)
    assert torch.allclose(plain, torch.tensor([[6 * w0, 2 * w1]]) / (6 * w0 + 2 * w1), atol=1e-6)
    assert plain.argmax().item() == 0  # the majority outvotes the closer minority
    assert torch.allclose(balanced, torch.tensor([[w0, w1]]) / (w0 + w1), atol=1e-6)  # 6 w0 / 6 vs 2 w1 / 2
    assert balanced.argmax().item() == 1
    # a balanced bank: the same scores either way; a class absent from the bank gets no votes
    even = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert torch.allclose(knn_scores(bank, even, query, k=8), knn_scores(bank, even, query, k=8, balanced=True))
    assert knn_scores(bank, labels, query, k=8, num_classes=3, balanced=True)[0, 2] == 0
