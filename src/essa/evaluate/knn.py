"""Weighted k-nearest-neighbour classification on cosine similarity (as in DINO's kNN monitor).

Each of the ``k`` most similar bank features votes for its class with weight ``exp(similarity / temperature)``;
the class scores are the normalised vote sums. ``balanced``: each class's votes are divided by its share of the bank
first, so that a class holding most of the bank does not win every vote by its numbers alone (on nearly parallel
features an imbalanced bank otherwise predicts its majority class for every query).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor | None = None,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    balanced: bool = False,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores of each query.

    Args:
        bank: (N, D) features with labels ``bank_labels`` (N,) in 0..C-1.
        queries: (Q, D) features; None means leave-one-out on the bank (each bank item is classified by the others).
        k: neighbours (clipped to the number available).
        balanced: divide each class's votes by its count in the bank (a class absent from the bank gets none).
    Returns:
        (Q, C) scores that sum to 1 per row.
    """
    if bank.ndim != 2 or bank_labels.shape != (bank.shape[0],):
        raise ValueError(f"bank must be (N, D) with labels (N,), got {tuple(bank.shape)} and {tuple(bank_labels.shape)}")
    if temperature <= 0 or k <= 0:
        raise ValueError(f"k={k} and temperature={temperature} must be positive")
    leave_one_out = queries is None
    num_classes = int(num_classes or int(bank_labels.max()) + 1)
    bank = F.normalize(bank.float(), dim=1)
    queries = bank if leave_one_out else F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0] - int(leave_one_out))
    if k <= 0:
        raise ValueError("kNN needs at least two bank items for leave-one-out")
    one_hot = F.one_hot(bank_labels.long(), num_classes).float()
    if balanced:
        counts = one_hot.sum(0)
        one_hot = one_hot / counts.clamp(min=1) * counts.sum() / (counts > 0).sum()
    out = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ bank.T  # (q, N)
        if leave_one_out:
            idx = torch.arange(start, start + sim.shape[0])
            sim[torch.arange(sim.shape[0]), idx] = -float("inf")
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()  # (q, k)
        votes = (weights.unsqueeze(-1) * one_hot[top_idx]).sum(1)  # (q, C)
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out)
