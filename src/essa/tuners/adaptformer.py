"""AdaptFormer: a bottleneck adapter parallel to each block's MLP, ``mlp(x) + scale * up(relu(down(x)))``.

``up`` starts at zero, so the tuned model equals the base model at initialisation. The ReLU bottleneck cannot be
folded into ViT weights: a merged model keeps the adapters and its export records the tuner.
"""

from __future__ import annotations

import torch
from torch import nn

from essa.tuners.base import Tuner, TunerError, positive_int, register


class Bottleneck(nn.Module):
    def __init__(self, dim: int, hidden: int, scale: float):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim)."""
        return self.up(torch.relu(self.down(x))) * self.scale


def _add_adapter(mlp: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    return out + mlp.adaptformer(args[0])


@register("adaptformer")
class AdaptFormer(Tuner):
    """Options: ``bottleneck`` (hidden width), ``scale``."""

    mergeable = False

    bottleneck: int = 64
    scale: float = 0.1

    def __post_init__(self):
        positive_int(self.bottleneck, "bottleneck", "adaptformer")
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool):
            raise TunerError(f"adaptformer: scale={self.scale!r} must be a number")

    def inject(self, model):
        like = next(model.parameters())
        for block in model.blocks:
            if hasattr(block.mlp, "adaptformer"):
                raise TunerError("adaptformer: the model already carries AdaptFormer adapters")
            block.mlp.adaptformer = Bottleneck(model.embed_dim, self.bottleneck, float(self.scale))
            block.mlp.adaptformer.to(device=like.device, dtype=like.dtype)
            block.mlp.register_forward_hook(_add_adapter)
