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
        # Isotropic Gaussian rows point in uniformly random directions once normalised. Their scale sets how fast
        # AdamW turns them (a step moves each entry by about lr, whatever its size): std 0.02, as DINO's
        # weight-normalised layer (its direction v initialised like the MLP), turns them 50x faster than std 1,
        # fast enough for fresh prototypes to find the data within a short run.
        self.weight = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_prototypes, in_dim), std=0.02))

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


class HeadInputNorm(nn.Module):
    """Standardises the backbone tokens before the DINO head, per feature, with running statistics of the teacher's
    tokens: one mean and variance for CLS tokens (global and local crops), one for patch tokens (iBOT).

    Why: a pretrained backbone's CLS features of one medical domain are nearly parallel (cosine 0.95 between chest
    X-rays for the shared ViT), so a fresh head maps every image to almost the same point, the centred teacher is
    uniform over the prototypes and the DINO loss sits at ln K. Standardised, the head sees what differs between
    images from the first step. Student and teacher share the statistics (the teacher's targets and the student's
    inputs are scaled alike); gradients flow through the fixed affine map to the backbone.

    ``mean``, ``var``: (2, D) buffers (row 0 CLS, row 1 patches), saved in checkpoints; they start from the first
    batch's statistics and then move by ``momentum`` per :meth:`update`, averaged over the processes of a
    distributed run (as the DINO center). Input (N, D), ``kind`` 0 (CLS) or 1 (patches); output (N, D).
    """

    CLS, PATCH = 0, 1

    def __init__(self, dim: int, momentum: float = 0.9, eps: float = 1e-6):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(2, dim))
        self.register_buffer("var", torch.ones(2, dim))
        self.register_buffer("started", torch.zeros(2, dtype=torch.bool))

    def forward(self, x: torch.Tensor, kind: int) -> torch.Tensor:
        return (x - self.mean[kind].to(x.dtype)) * torch.rsqrt(self.var[kind] + self.eps).to(x.dtype)

    @torch.no_grad()
    def update(self, x: torch.Tensor, kind: int) -> None:
        """Move the statistics of ``kind`` towards those of ``x`` (N, D), the rows of every process together."""
        if x.shape[0] == 0:
            return
        x = x.float()
        stats = torch.stack([x.mean(0), (x * x).mean(0)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
            stats /= torch.distributed.get_world_size()
        mean, var = stats[0], (stats[1] - stats[0] ** 2).clamp_min(0)
        m = self.momentum if bool(self.started[kind]) else 0.0
        self.mean[kind] = m * self.mean[kind] + (1 - m) * mean
        self.var[kind] = m * self.var[kind] + (1 - m) * var
        self.started[kind] = True
