"""What both training stages set up the same way: default learning rates, AdamW groups, precision."""

from __future__ import annotations

import torch
from torch import nn


def default_lr(tuner: str, lr: float | None) -> float:
    """``lr`` if given, else the reference: 1e-4 for full training, 1e-3 for parameter-efficient tuners."""
    if lr is not None:
        return lr
    return 1e-4 if tuner == "full" else 1e-3


def decay_groups(module: nn.Module | list[tuple[str, nn.Parameter]]) -> list[dict]:
    """AdamW groups of ``module``'s parameters (or of (name, parameter) pairs): weight decay on matrices, none on
    biases, norms, tokens and other 1-D parameters."""
    decay, no_decay = [], []
    named = module.named_parameters() if isinstance(module, nn.Module) else module
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "token" in name else decay).append(p)
    return [{"params": decay, "apply_decay": True}, {"params": no_decay, "apply_decay": False, "weight_decay": 0.0}]


def precision(setting: str) -> str:
    """Lightning precision for a config's ``precision``: ``auto`` is bf16-mixed on GPU, 32-true on CPU."""
    if setting != "auto":
        return setting
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"
