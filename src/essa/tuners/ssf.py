"""SSF: a learned per-channel scale and shift after every linear layer and LayerNorm of the blocks, and the final
norm: ``y = gamma * op(x) + beta``. It folds exactly into the operation's own weight and bias:
``W' = diag(gamma) W``, ``b' = gamma * b + beta``.

The scale and shift live on the module they follow (``ssf_scale``, ``ssf_shift``) and a forward hook applies them.
"""

from __future__ import annotations

import torch
from torch import nn

from essa.tuners.base import Tuner, register, remove_hooks


def _ssf_hook(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    return out * module.ssf_scale + module.ssf_shift


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
            module.ssf_shift = nn.Parameter(torch.zeros(width, device=like.device, dtype=like.dtype))
            module.register_forward_hook(_ssf_hook)

    @torch.no_grad()
    def fold(self, model):
        for module in list(model.modules()):
            if not hasattr(module, "ssf_scale"):
                continue
            scale, shift = module.ssf_scale, module.ssf_shift
            module.weight.mul_(scale.view(-1, *[1] * (module.weight.dim() - 1)))
            if module.bias is None:
                module.bias = nn.Parameter(shift.detach().clone())
            else:
                module.bias.mul_(scale).add_(shift)
            del module.ssf_scale, module.ssf_shift
            remove_hooks(module, _ssf_hook)
