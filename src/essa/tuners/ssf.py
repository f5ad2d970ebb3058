"""SSF: a learned per-channel scale and shift after every linear layer and LayerNorm of the blocks, and the final
norm: ``y = gamma * op(x) + beta``. It folds exactly into the operation's own weight and bias:
``W' = diag(gamma) W``, ``b' = gamma * b + beta``.

The scale and shift live on the module they follow (``ssf_scale``, ``ssf_shift``) and a forward hook applies them.
A layer without a bias (DINOv3's ``attn.qkv``, EVA-02's ``attn.k_proj``) gets the scale only: a shift would fold
into a bias the architecture does not have, so the merged weights would not load into it (and an Eva's key bias is
fixed at zero: with RoPE a shift of the keys is not absorbed by the softmax).
"""

from __future__ import annotations

import torch
from torch import nn

from essa.tuners.base import Tuner, register, remove_hooks


def _ssf_hook(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    shift = getattr(module, "ssf_shift", None)
    return out * module.ssf_scale if shift is None else out * module.ssf_scale + shift


def _targets(model: nn.Module) -> list[nn.Module]:
    inner = [m for m in model.blocks.modules() if isinstance(m, (nn.Linear, nn.LayerNorm))]
    final = [model.norm] if isinstance(model.norm, nn.LayerNorm) else []
    return [m for m in inner + final if not isinstance(m, nn.LayerNorm) or m.elementwise_affine]


@register("ssf")
class SSF(Tuner):
    def inject(self, model):
        for module in _targets(model):
            width = module.weight.shape[0]
            like = module.weight
            module.ssf_scale = nn.Parameter(torch.ones(width, device=like.device, dtype=like.dtype))
            if module.bias is not None:
                module.ssf_shift = nn.Parameter(torch.zeros(width, device=like.device, dtype=like.dtype))
            module.register_forward_hook(_ssf_hook)

    @torch.no_grad()
    def fold(self, model):
        for module in list(model.modules()):
            if not hasattr(module, "ssf_scale"):
                continue
            scale, shift = module.ssf_scale, getattr(module, "ssf_shift", None)
            module.weight.mul_(scale.view(-1, *[1] * (module.weight.dim() - 1)))
            if module.bias is not None:
                module.bias.mul_(scale).add_(shift)
                del module.ssf_shift
            del module.ssf_scale
            remove_hooks(module, _ssf_hook)
