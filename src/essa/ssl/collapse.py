"""What the DINO head's outputs say about collapse: the two ways DINO fails, watched step by step.

- **Uniform**: the teacher's distribution over the K prototypes is (nearly) uniform for every image, the DINO loss
  then sits at ln K and no signal reaches the backbone (a fresh head over a pretrained backbone whose CLS features
  are all alike; prototypes that collapsed onto each other).
- **One-hot**: the teacher gives every image the same prototype (the batch's mean distribution is one-hot).

:func:`head_stats` measures both on one step's CLS rows; :class:`CollapseWatch` counts the consecutive steps a run
spends in either state and says when it has been there for ``patience`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


@torch.no_grad()
def head_stats(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float,
               student_logits: torch.Tensor, student_temp: float) -> dict[str, float]:
    """Statistics of (N, K) teacher and student prototype logits of the same N crops (raw scores, before centering
    and temperature), as the DINO loss turns them into distributions.

    Returns (floats, in nats where entropies):
        teacher_entropy: mean over rows of H(softmax((t - center) / teacher_temp)); ln K when uniform.
        teacher_batch_entropy: H of the rows' mean distribution; 0 when every row picks the same prototype.
        student_kl_uniform: mean over rows of KL(softmax(s / student_temp) || uniform) = ln K - H(q).
        prototypes_used: how many distinct prototypes are the teacher's argmax over the rows.
    """
    t = teacher_logits.float()
    p = F.softmax((t - center.reshape(1, -1).float()) / teacher_temp, dim=-1)
    q = F.softmax(student_logits.float() / student_temp, dim=-1)
    log_k = math.log(t.shape[-1])
    return {
        "teacher_entropy": float(_entropy(p).mean()),
        "teacher_batch_entropy": float(_entropy(p.mean(0))),
        "student_kl_uniform": float((log_k - _entropy(q)).mean()),
        "prototypes_used": float(p.argmax(-1).unique().numel()),
    }


@dataclass
class CollapseWatch:
    """Counts consecutive collapsed steps of a run with ``prototypes`` prototypes.

    A step is collapsed when the teacher is uniform (mean entropy within ``tolerance * ln K`` of ln K), when the
    DINO loss sits at ln K (within the same margin), or when the teacher is one-hot over the batch (the mean
    distribution's entropy below ``tolerance * ln K``: one prototype for every image). ``steps`` is the current
    run of collapsed steps; :meth:`update` returns the reason once it reaches ``patience``, else None.
    """

    prototypes: int
    patience: int
    tolerance: float = 0.01
    steps: int = 0

    def state(self, stats: dict[str, float], dino: float) -> str | None:
        """Why this step is collapsed, or None."""
        log_k = math.log(self.prototypes)
        margin = self.tolerance * log_k
        if stats["teacher_entropy"] > log_k - margin:
            return (f"the teacher's distribution over the {self.prototypes} prototypes is uniform (entropy "
                    f"{stats['teacher_entropy']:.3f}, ln K = {log_k:.3f})")
        if abs(dino - log_k) < margin:
            return f"the DINO loss sits at ln K = {log_k:.3f} ({dino:.3f})"
        if stats["teacher_batch_entropy"] < margin:
            return (f"the teacher gives every image the same prototype (entropy of the batch's mean distribution "
                    f"{stats['teacher_batch_entropy']:.4f})")
        return None

    def update(self, stats: dict[str, float], dino: float) -> str | None:
        reason = self.state(stats, dino)
        self.steps = self.steps + 1 if reason else 0
        return reason if reason and self.steps >= self.patience else None
