"""The EMA teacher, sharing the student's frozen weights.

With a parameter-efficient tuner most of the backbone is frozen, so the teacher's copy of those weights would be
identical to the student's forever. :func:`make_teacher` therefore deep-copies the student but *shares* every
frozen parameter: only the parameters that can change (tuner parameters, heads) are held twice, and only they are
updated by the momentum rule ``teacher = m * teacher + (1 - m) * student``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A copy of ``student`` (in eval mode) that shares its frozen parameters; buffers and the parameters that
    train are copied. No parameter of the teacher requires gradients."""
    memo = {id(p): p for p in student.parameters() if not p.requires_grad}
    teacher = copy.deepcopy(student, memo)
    for p in teacher.parameters():
        p.requires_grad_(False)  # shared frozen ones already are
    return teacher.eval()


def ema_pairs(student: nn.Module, teacher: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(teacher, student) parameters that the momentum update moves: those the teacher does not share."""
    pairs = [(t, s) for s, t in zip(student.parameters(), teacher.parameters(), strict=True) if t is not s]
    return [t for t, _ in pairs], [s for _, s in pairs]


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, in place."""
    if teacher_params:
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, [s.detach() for s in student_params], alpha=1.0 - momentum)
