"""The truncated backward of an SSA step: where the student's frozen prefix ends, and whether the EMA teacher can
share it.

When the tuner trains nothing before block ``k`` (APLA on ``blocks=[k..depth-1]``; any tuner: what counts is which
parameters require a gradient), no gradient of a parameter needs the activations of the patch embedding, the
position embedding or blocks ``0..k-1``. The student then runs that prefix without autograd on every view whose
input holds nothing trainable (local crops, the global crops without an iBOT mask), so their backward pass stops at
block ``k``; only the iBOT-masked global crops keep autograd through the prefix, for the mask token inserted at the
input, when it trains (as without truncation: the gradients are unchanged).

The teacher shares the student's frozen parameters (:func:`essa.ssl.teacher.make_teacher`), so on a global crop
without a mask (and without PatchDropout) the prefix is the same computation in both: it runs once, in the teacher's
``torch.no_grad()``, and the student's blocks ``k..`` continue from it. That holds when every parameter of the
prefix is one tensor shared by both, their buffers are equal, and no prefix module behaves differently in the
student's train mode and the teacher's eval mode (dropout, drop-path, PatchDropout with a non-zero rate; batch norm).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from timm.layers import DropPath, PatchDropout
from torch import nn

from essa.ssl.prefix import unsplittable

#: ``ssl.truncated_backward`` values.
MODES = ("auto", "off")
#: Parameters after the blocks, which read the blocks' output (timm's names).
_AFTER_BLOCKS = ("norm.", "fc_norm.", "head.", "attn_pool.")


def frozen_prefix_blocks(backbone: nn.Module) -> int:
    """How many leading blocks of ``backbone.blocks`` train nothing, when nothing before the blocks trains (the
    patch and position embeddings, class and register tokens, a pre-norm or any parameter a tuner added outside the
    blocks); else 0. A backbone that trains nothing at all gives its depth."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        return 0
    depth = len(blocks)
    trained = {name for name, p in backbone.named_parameters() if p.requires_grad}
    if any(not name.startswith(("blocks.", *_AFTER_BLOCKS)) for name in trained):
        return 0
    return next((i for i, block in enumerate(blocks) if any(p.requires_grad for p in block.parameters())), depth)


def prefix_modules(backbone: nn.Module, k: int) -> list[nn.Module]:
    """The modules that compute the tokens entering block ``k`` of a timm ViT."""
    return [backbone.patch_embed, backbone.pos_drop, backbone.patch_drop, backbone.norm_pre, *backbone.blocks[:k]]


def _mode_dependent(module: nn.Module) -> str | None:
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p:
            return f"dropout {m.p}"
        if isinstance(m, DropPath) and m.drop_prob:
            return f"drop-path {m.drop_prob}"
        if isinstance(m, PatchDropout) and m.prob:
            return f"PatchDropout {m.prob}"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "batch norm"
    return None


def _same_prefix(student: nn.Module, teacher: nn.Module, k: int) -> str | None:
    """Why the teacher's prefix would not compute what the student's computes, or None."""
    params = [p for m in prefix_modules(student, k) for p in m.parameters()]
    t_params = [p for m in prefix_modules(teacher, k) for p in m.parameters()]
    if len(params) != len(t_params) or any(s is not t for s, t in zip(params, t_params)):
        return "the teacher does not share the prefix's parameters"
    for s, t in zip(prefix_modules(student, k), prefix_modules(teacher, k)):
        if any(not torch.equal(a, b) for a, b in zip(s.buffers(), t.buffers(), strict=True)):
            return "the teacher's prefix buffers differ"
        why = _mode_dependent(s)
        if why:
            return f"the prefix has {why}, which differs between the student (train mode) and the teacher (eval)"
    # the pieces of the parameters the tuner trains (cls_token, pos_embed...) live outside these modules
    for name in ("cls_token", "reg_token", "pos_embed"):
        if getattr(student, name, None) is not getattr(teacher, name, None):
            return f"the teacher does not share {name}"
    return None


@dataclass(frozen=True)
class Truncation:
    """What an SSA step does with the frozen prefix (recorded in ``resources.json``).

    ``frozen_blocks``: k, the blocks the student runs without autograd on views without a mask token (0: no
    truncation); ``shared_prefix``: whether the teacher's prefix of the global crops is reused for the student's
    unmasked, undropped ones; ``reason``: why truncation or sharing does not apply, or None."""

    mode: str
    frozen_blocks: int
    shared_prefix: bool
    reason: str | None = None

    def record(self) -> dict:
        return asdict(self)


def plan(mode: str, student: nn.Module, teacher: nn.Module, patch_drop: float) -> Truncation:
    """The truncation of the student backbone ``student`` with its teacher's backbone ``teacher`` under
    ``ssl.truncated_backward`` ``mode`` and ``ssl.patch_drop``. Decided once: which parameters train does not
    change during a run (the head warm-up runs the whole backbone without autograd)."""
    if mode == "off":
        return Truncation(mode, 0, False, "ssl.truncated_backward=off")
    why = unsplittable(student)
    k = frozen_prefix_blocks(student) if why is None else 0
    if why is None and k == 0:
        why = "the tuner trains a parameter in block 0 or before the blocks: the gradient must reach the input"
    if why:
        return Truncation(mode, 0, False, why)
    if patch_drop:
        return Truncation(mode, k, False, "ssl.patch_drop: the student's unmasked global crops are dropped, the "
                                          "teacher's are not")
    why = _same_prefix(student, teacher, k)
    return Truncation(mode, k, why is None, why)
