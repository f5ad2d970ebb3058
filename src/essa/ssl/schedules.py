"""Per-iteration schedules for SSA, precomputed as arrays (DINOv2 style: data the training loop indexes).

``schedule[it]`` is the value to use at optimisation step ``it`` (0-based).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def cosine(
    start: float, end: float, total_iters: int, warmup_iters: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``start``, then a half cosine from ``start`` to ``end``.

    Warm-up: iteration ``i < warmup_iters`` gets ``warmup_start + (start - warmup_start) * i / warmup_iters``,
    so the value reaches ``start`` exactly when the cosine begins. Cosine: its first iteration is ``start`` and
    the last iteration of the run is exactly ``end``. ``start == end`` gives a warm-up followed by a constant.

    Returns float64 array (total_iters,).
    """
    if total_iters < 1:
        raise ValueError(f"cosine: total_iters must be at least 1, got {total_iters}")
    if not 0 <= warmup_iters < total_iters:
        raise ValueError(
            f"cosine: warmup_iters must be in [0, total_iters), got {warmup_iters} with total_iters={total_iters}"
        )
    warmup = warmup_start + (start - warmup_start) * np.arange(warmup_iters) / max(warmup_iters, 1)
    n = total_iters - warmup_iters
    progress = np.arange(n) / max(n - 1, 1)
    decay = end + 0.5 * (start - end) * (1.0 + np.cos(np.pi * progress))
    return np.concatenate([warmup, decay])


@dataclass(frozen=True)
class SSASchedules:
    """Every per-step value of an SSA run; each array has one entry per optimisation step.

    ``lr``, ``weight_decay``, ``teacher_temp``, ``teacher_momentum``: float64 (total_iters,).
    ``freeze_prototypes``: bool (total_iters,), True on steps whose prototype gradients are dropped
    (``DINOHead.cancel_last_layer_gradients``).
    """

    lr: np.ndarray
    weight_decay: np.ndarray
    teacher_temp: np.ndarray
    teacher_momentum: np.ndarray
    freeze_prototypes: np.ndarray

    def __len__(self) -> int:
        return len(self.lr)


def ssa_schedules(
    epochs: int,
    iters_per_epoch: int,
    lr: float,
    *,
    min_lr: float = 1e-6,
    warmup_epochs: float = 10,
    weight_decay: tuple[float, float] = (1e-5, 1e-4),
    teacher_temp: tuple[float, float] = (0.04, 0.07),
    teacher_temp_warmup_epochs: float = 30,
    teacher_momentum: tuple[float, float] = (0.994, 1.0),
    freeze_prototypes_epochs: float = 1,
    max_warmup_fraction: float = 0.5,
) -> SSASchedules:
    """The SSA recipe of method.md as arrays over ``epochs * iters_per_epoch`` steps.

    lr: linear warm-up from 0 over ``warmup_epochs``, then cosine from ``lr`` to ``min_lr``. Weight decay and
    teacher momentum: cosine from the first to the second value. Teacher temperature: linear from the first to the
    second value over ``teacher_temp_warmup_epochs``, then constant. Prototypes frozen for
    ``freeze_prototypes_epochs``.

    Every epoch-based length (the two warm-ups and the prototype freeze) is clamped to at most
    ``max_warmup_fraction`` of the run (rounded down to whole steps), so a run shorter than the reference's
    warm-ups (a 2-epoch test) still reaches its peak lr and final teacher temperature and trains its prototypes
    for the second half.
    """
    if epochs < 1 or iters_per_epoch < 1:
        raise ValueError(
            f"ssa_schedules: epochs and iters_per_epoch must be at least 1, got {epochs} and {iters_per_epoch}"
        )
    if not 0 <= max_warmup_fraction < 1:
        raise ValueError(f"ssa_schedules: max_warmup_fraction must be in [0, 1), got {max_warmup_fraction}")
    total = epochs * iters_per_epoch
    limit = math.floor(max_warmup_fraction * total)

    def steps(n_epochs: float) -> int:
        return min(round(n_epochs * iters_per_epoch), limit)

    freeze = np.zeros(total, dtype=bool)
    freeze[: steps(freeze_prototypes_epochs)] = True
    return SSASchedules(
        lr=cosine(lr, min_lr, total, warmup_iters=steps(warmup_epochs), warmup_start=0.0),
        weight_decay=cosine(*weight_decay, total),
        teacher_temp=cosine(
            teacher_temp[1], teacher_temp[1], total, steps(teacher_temp_warmup_epochs), teacher_temp[0]
        ),
        teacher_momentum=cosine(*teacher_momentum, total),
        freeze_prototypes=freeze,
    )
