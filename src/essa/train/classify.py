"""Supervised adaptation as a LightningModule: a timm ViT classifier (tuner already applied) and its loss.

Single-label tasks (multiclass, binary, ordinal) train C logits with cross-entropy; multilabel tasks train one
logit per label with binary cross-entropy. The bookkeeping, the checkpoint hooks (only what trains: the tuner and
the head) and the step's skeleton are :class:`essa.train.stage.StageModule`'s, as in SSA.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from essa.train.optim import decay_groups
from essa.train.stage import StageModule


def layer_id(name: str, depth: int) -> int:
    """The depth of a ViT parameter for layer-wise lr decay: 0 for the patch embedding, position embedding and
    prefix tokens, ``i + 1`` for anything in ``blocks.i`` (tuner parameters included), ``depth + 1`` for the rest
    (final norm, head)."""
    if name.startswith(("patch_embed.", "cls_token", "reg_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: nn.Module, decay: float) -> list[dict]:
    """AdamW groups (:func:`essa.train.optim.decay_groups`) per layer, each with ``lr_scale`` = ``decay ** (depth +
    1 - layer_id)``: the head trains at the scheduled lr, block i at decay^(depth - i) of it, the embeddings at
    decay^(depth + 1). ``decay == 1``: the two groups of decay_groups, with scale 1."""
    if decay == 1.0:
        return [{**g, "lr_scale": 1.0} for g in decay_groups(model)]
    depth = len(model.blocks)
    layers: dict[int, list] = {}
    for name, p in model.named_parameters():
        layers.setdefault(layer_id(name, depth), []).append((name, p))
    groups = []
    for layer in sorted(layers):
        for group in decay_groups(layers[layer]):
            if group["params"]:
                groups.append({**group, "lr_scale": decay ** (depth + 1 - layer)})
    return groups


def classification_loss(task: str, logits: torch.Tensor, targets: torch.Tensor,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """The fine-tuning loss: mean cross-entropy of (B, C) logits against (B,) class indices (``weights``: per
    class), or for ``task="multilabel"`` binary cross-entropy against (B, L) 0/1 targets (``weights``: per-label
    ``pos_weight``)."""
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=weights)
    return F.cross_entropy(logits.float(), targets, weight=weights)


def class_weights(labels: list, num_classes: int, multilabel: bool) -> torch.Tensor:
    """Loss weights from the training labels: (C,) ``N / (C * n_c)`` per class (inverse frequency, mean 1 over
    the images), or for multilabel (L,) ``negatives / positives`` per label (BCE ``pos_weight``)."""
    if multilabel:
        positives = torch.zeros(num_classes)
        for label in labels:
            positives[list(label)] += 1
        return (len(labels) - positives) / positives.clamp_min(1)
    counts = torch.bincount(torch.tensor(labels), minlength=num_classes).float()
    return len(labels) / (num_classes * counts.clamp_min(1))


class ClassifierModule(StageModule):
    """One fine-tuning run of ``model`` (a timm ViT with a head of C outputs): the network that trains and the tuned
    model, head included.

    Args:
        task: one of ``essa.evaluate.metrics.TASKS``.
        lr: (total_steps,) learning rate of each optimisation step.
        weight_decay: AdamW weight decay of matrices (none on biases, norms and tokens).
        class_weights: (C,) cross-entropy class weights, or (L,) multilabel positive weights; None: unweighted.
        layer_decay: layer-wise lr decay (:func:`layer_decay_groups`); 1: every parameter at the scheduled lr.
    """

    def __init__(self, model: VisionTransformer, task: str, lr: np.ndarray, weight_decay: float,
                 class_weights: torch.Tensor | None = None, layer_decay: float = 1.0):
        super().__init__()
        self.model, self.task = model, task
        self.lr_schedule, self.weight_decay, self.layer_decay = lr, weight_decay, layer_decay
        # Not persistent: rebuilt from the training split, so checkpoints hold only what trains.
        self.register_buffer("class_weights", class_weights, persistent=False)

    @property
    def network(self) -> nn.Module:
        return self.model

    @property
    def tuned(self) -> nn.Module:
        return self.model  # head included

    # ----- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        return torch.optim.AdamW(layer_decay_groups(self.model, self.layer_decay), lr=float(self.lr_schedule[0]),
                                 weight_decay=self.weight_decay)

    def schedule_step(self, optimizer):
        step = min(self.global_step, len(self.lr_schedule) - 1)
        for group in optimizer.param_groups:
            group["lr"] = float(self.lr_schedule[step]) * group.get("lr_scale", 1.0)

    def batch_images(self, batch) -> int:
        (x, _y), _keys = batch
        return len(x)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of (B, C) logits against (B,) class indices or (B, L) 0/1 multilabel targets."""
        return classification_loss(self.task, logits, targets, self.class_weights)

    def training_step(self, batch, batch_idx):
        (x, y), _keys = batch
        loss = self.loss(self.model(x), y)
        self.add_to_epoch({"train_loss": float(loss.detach())})
        self.count_step()
        self.log("loss", loss.detach(), prog_bar=True)
        return loss

    def pop_epoch_means(self) -> dict[str, float]:
        """The epoch's mean training loss and the current learning rate; resets the sums."""
        return {**super().pop_epoch_means(),
                "lr": float(self.lr_schedule[min(self.global_step, len(self.lr_schedule)) - 1])}
