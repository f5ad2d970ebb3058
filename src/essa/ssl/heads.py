"""The SSL head shared by the DINO (CLS) and iBOT (patch) terms: an MLP, L2 normalisation, prototype scores.

Written here rather than taken from ``lightly.models.modules.heads.DINOProjectionHead`` because that head uses the
deprecated ``torch.nn.utils.weight_norm``, whose module cannot be ``copy.deepcopy``-ed after a forward pass
(the EMA teacher is usually made by deep-copying the student), and it fixes the MLP at 3 layers.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeLayer(nn.Module):
    """Bias-free linear layer whose rows (the prototypes) are L2-normalised on every forward pass.

    Equal to DINO's weight-normalised last layer with the norm ``g`` fixed at 1 (``weight_norm`` with ``g`` = 1
    and frozen), without the ``g`` parameter that would have to be kept at 1.

    ``weight``: (num_prototypes, in_dim). Input (..., in_dim), output (..., num_prototypes).
    """

    def __init__(self, in_dim: int, num_prototypes: int):
        super().__init__()
        # Isotropic Gaussian rows point in uniformly random directions once normalised.
        self.weight = nn.Parameter(torch.randn(num_prototypes, in_dim))

    def norms(self) -> torch.Tensor:
        """(num_prototypes,) row norms, clamped at 1e-12 as ``F.normalize``."""
        return self.weight.norm(dim=1).clamp_min(1e-12)

    def forward(self, x: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ normalize(weight).T``, computed as ``(x @ weight.T) / norms``: the same maths, without a
        normalised (num_prototypes, in_dim) copy of the weight (64 MiB at 65,536 x 256) kept for the backward.
        ``norms``: ``self.norms()``, passed by callers that score many chunks of rows (:meth:`scorer`)."""
        return F.linear(x, self.weight) / (self.norms() if norms is None else norms)

    def scorer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This layer as a function of ``x`` alone, the prototype norms computed once now: for a loss that scores
        its rows chunk by chunk (:class:`essa.ssl.losses.DINOv2Loss` with ``student_prototypes``)."""
        return partial(self, norms=self.norms())


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> prototype scores (logits), as in DINO / DINOv2 / iBOT.

    Args:
        in_dim: width of the backbone tokens (``vit.embed_dim``).
        out_dim: number of prototypes K (65,536 in the reference; fewer suits small datasets).
        hidden_dim: width of the hidden MLP layers.
        bottleneck_dim: width of the MLP output, the space the prototypes live in.
        nlayers: number of linear layers in the MLP (GELU between them, none after the last).

    Input (..., in_dim) -> output (..., out_dim). Use the same head for CLS tokens (N, in_dim) and for
    masked patch tokens (M, in_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be at least 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                layers.append(nn.GELU())
            layers.append(nn.Linear(d_in, d_out))
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = PrototypeLayer(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(self.bottleneck(x))

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., bottleneck_dim): the L2-normalised MLP output that the prototypes score;
        ``forward(x) == prototypes(bottleneck(x))``."""
        # eps 1e-6 rather than F.normalize's 1e-12, which is 0 in float16 under autocast.
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)

    def cancel_last_layer_gradients(self) -> None:
        """Drop the prototype layer's gradient (sets ``prototypes.weight.grad`` to None).

        Call after ``backward()`` and before ``optimizer.step()`` on every step of the first epoch: optimisers
        (AdamW included) skip parameters whose gradient is None, so the prototypes neither move nor decay, while
        ``requires_grad`` stays untouched (toggling it would upset DDP and the optimiser's parameter groups).
        """
        self.prototypes.weight.grad = None
