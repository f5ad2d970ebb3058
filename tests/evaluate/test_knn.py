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
