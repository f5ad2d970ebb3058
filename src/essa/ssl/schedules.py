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


def length_steps(value: float | str, total_steps: int, iters_per_epoch: int, name: str = "length") -> int:
    """Optimisation steps of a schedule length ``value`` in a config: a fraction of the run (a number in [0, 1)),
    a number of optimisation steps (a whole number >= 1), or epochs (a string: "10 epochs", "1.5 ep"), in a run of ``total_steps`` steps of
    ``iters_per_epoch`` per epoch. Raises ValueError with the key ``name`` on anything else."""
    if isinstance(value, str):
        text = value.strip().lower()
        for unit in ("epochs", "epoch", "ep"):
            if text.endswith(unit):
                try:
                    epochs = float(text[: -len(unit)])
                except ValueError:
                    break
                if epochs < 0:
                    break
                return round(epochs * iters_per_epoch)
        raise ValueError(f"{name}={value!r}: give a fraction of the run in [0, 1) (0.1), a whole number of steps "
                         "(200) or epochs ('10 epochs')")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r}: give a fraction of the run in [0, 1) (0.1), a whole number of steps "
                         "(200) or epochs ('10 epochs')")
    if value < 1:
        return round(value * total_steps)
    if value != int(value):
        raise ValueError(f"{name}={value!r}: a fraction of the run is below 1 and a number of steps is whole; "
                         "use e.g. 0.1 or 200")
    return int(value)


@dataclass(frozen=True)
class SSASchedules:
    """Every per-step value of an SSA run; each array has one entry per optimisation step.

    ``lr`` (the backbone's tuner), ``head_lr`` (the DINO head), ``weight_decay``, ``teacher_temp``,
    ``teacher_momentum``: float64 (total_iters,). ``freeze_prototypes``: bool (total_iters,), True on steps whose
    prototype gradients are dropped (``DINOHead.cancel_last_layer_gradients``). ``head_warmup``: bool
    (total_iters,), True on the steps where only the head trains (the backbone and its tuner frozen).
    ``low_res``: bool (total_iters,), True on the steps of the low-resolution phase of the curriculum (the crops
    at their low sizes; all False without one). ``warnings``: what could not finish inside the run (clamped).
    """

    lr: np.ndarray
    head_lr: np.ndarray
    weight_decay: np.ndarray
    teacher_temp: np.ndarray
    teacher_momentum: np.ndarray
    freeze_prototypes: np.ndarray
    head_warmup: np.ndarray
    low_res: np.ndarray
    warnings: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.lr)

    @property
    def head_warmup_steps(self) -> int:
        return int(self.head_warmup.sum())

    @property
    def switch_step(self) -> int:
        """The first step at the full crop sizes (0 without a low-resolution phase)."""
        return int(self.low_res.sum())


def ssa_schedules(
    epochs: int,
    iters_per_epoch: int,
    lr: float,
    *,
    head_lr: float | None = None,
    min_lr: float = 1e-6,
    warmup=1 / 30,
    head_warmup=0,
    weight_decay: tuple[float, float] = (1e-5, 1e-4),
    teacher_temp: tuple[float, float] = (0.04, 0.07),
    teacher_temp_warmup=0.1,
    teacher_momentum: tuple[float, float] = (0.994, 1.0),
    freeze_prototypes=1 / 300,
    curriculum=0,
) -> SSASchedules:
    """The SSA recipe of method.md as arrays over ``epochs * iters_per_epoch`` steps. Every length (``warmup``,
    ``head_warmup``, ``teacher_temp_warmup``, ``freeze_prototypes``, ``curriculum``) is a length
    (:func:`length_steps`): a fraction of the run, steps, or epochs; the defaults are the reference's 10, 30 and 1 of 300 epochs as fractions.

    - Head warm-up: the first ``head_warmup`` steps train the head alone (``head_warmup`` True, backbone lr 0).
    - Backbone lr: 0 during the head warm-up, then a linear ramp from 0 over ``warmup`` steps, then a cosine from
      ``lr`` to ``min_lr`` at the last step.
    - Head lr (``head_lr``, default ``lr``): a linear ramp from 0 over ``warmup`` steps from step 0, then a cosine
      to ``min_lr``.
    - Weight decay and teacher momentum: cosine from the first to the second value over the run.
    - Teacher temperature: linear from the first to the second value over ``teacher_temp_warmup``, then constant.
    - Prototypes frozen for the first ``freeze_prototypes`` steps.
    - Low resolution first (FastDINOv2's curriculum): the first ``curriculum`` steps are ``low_res``.

    A length that cannot finish inside the run is clamped (the warm-ups end one step before the last; the head
    warm-up and the backbone's ramp share the run; the low-resolution phase leaves the last step at the full size)
    and named in ``warnings``.
    """
    if epochs < 1 or iters_per_epoch < 1:
        raise ValueError(
            f"ssa_schedules: epochs and iters_per_epoch must be at least 1, got {epochs} and {iters_per_epoch}"
        )
    total = epochs * iters_per_epoch
    notes: list[str] = []

    def steps(value, name: str, limit: int) -> int:
        n = length_steps(value, total, iters_per_epoch, name)
        if n > limit:
            notes.append(f"{name}={value!r} is {n} steps, longer than this run of {total} steps allows: "
                         f"clamped to {limit}")
            return limit
        return n

    head = steps(head_warmup, "ssl.head_warmup", max(total - 1, 0))
    ramp = steps(warmup, "optim.warmup", max(total - head - 1, 0))
    temp = steps(teacher_temp_warmup, "ssl.teacher_temp_warmup", total - 1)
    frozen = steps(freeze_prototypes, "ssl.freeze_prototypes", total)
    low = steps(curriculum, "ssl.curriculum", max(total - 1, 0))
    head_ramp = min(ramp, total - 1)

    backbone_lr = np.zeros(total)
    backbone_lr[head:] = cosine(lr, min_lr, total - head, warmup_iters=ramp, warmup_start=0.0)
    freeze = np.zeros(total, dtype=bool)
    freeze[:frozen] = True
    warm = np.zeros(total, dtype=bool)
    warm[:head] = True
    low_res = np.zeros(total, dtype=bool)
    low_res[:low] = True
    return SSASchedules(
        lr=backbone_lr,
        head_lr=cosine(lr if head_lr is None else head_lr, min_lr, total, warmup_iters=head_ramp, warmup_start=0.0),
        weight_decay=cosine(*weight_decay, total),
        teacher_temp=cosine(teacher_temp[1], teacher_temp[1], total, temp, teacher_temp[0]),
        teacher_momentum=cosine(*teacher_momentum, total),
        freeze_prototypes=freeze,
        head_warmup=warm,
        low_res=low_res,
        warnings=tuple(notes),
    )


@dataclass(frozen=True)
class TunerSchedules:
    """The per-step values of an objective without the DINO parts (no head warm-up, prototypes or teacher): ``lr``
    (the backbone's tuner), ``head_lr`` (the objective's own new parts, e.g. a decoder), ``weight_decay``: float64
    (total_iters,). ``warnings``: what could not finish inside the run (clamped)."""

    lr: np.ndarray
    head_lr: np.ndarray
    weight_decay: np.ndarray
    warnings: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.lr)


def tuner_schedules(
    epochs: int,
    iters_per_epoch: int,
    lr: float,
    *,
    head_lr: float | None = None,
    min_lr: float = 1e-6,
    warmup=1 / 30,
    weight_decay: tuple[float, float] = (1e-5, 1e-4),
) -> TunerSchedules:
    """Schedules for an objective whose new parts train with the tuner from step 0 (MAE, SimMIM): the tuner's lr
    and the new parts' lr (``head_lr``, default ``lr``) each a linear ramp from 0 over ``warmup`` steps (a length,
    :func:`length_steps`; clamped to end before the last step, with a warning) then a cosine to ``min_lr`` at the
    last step; weight decay a cosine from the first to the second value over the run. These are
    :func:`ssa_schedules`' without a head warm-up (its other, DINO-only arrays left out)."""
    s = ssa_schedules(epochs, iters_per_epoch, lr, head_lr=head_lr, min_lr=min_lr, warmup=warmup, head_warmup=0,
                      weight_decay=weight_decay, freeze_prototypes=0, teacher_temp_warmup=0)
    return TunerSchedules(lr=s.lr, head_lr=s.head_lr, weight_decay=s.weight_decay, warnings=s.warnings)
