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
    """AdamW groups of ``module``'s trainable parameters (or of (name, parameter) pairs): weight decay on weight
    matrices; none on biases, norms and other 1-D parameters, on tokens (``cls_token``, ``reg_token``,
    ``mask_token``), on the position embedding and on VPT's prompts. That is timm's rule
    (``timm.optim.param_groups_weight_decay`` with the ViT's ``no_weight_decay()`` names, which also spares
    ``pos_embed``) extended to the tokens essa adds; it is written here because the SSA stage groups name lists
    of several modules, and each group keeps an ``apply_decay`` flag for the weight-decay schedule."""
    decay, no_decay = [], []
    named = module.named_parameters() if isinstance(module, nn.Module) else module
    for name, p in named:
        if not p.requires_grad:
            continue
        leaf = name.rpartition(".")[2]
        spared = p.ndim <= 1 or leaf == "bias" or "token" in leaf or leaf == "pos_embed" or "prompt" in leaf
        (no_decay if spared else decay).append(p)
    return [{"params": decay, "apply_decay": True}, {"params": no_decay, "apply_decay": False, "weight_decay": 0.0}]


def precision(setting: str) -> str:
    """Lightning precision for a config's ``precision``: ``auto`` is bf16-mixed on GPU, 32-true on CPU."""
    if setting != "auto":
        return setting
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"
