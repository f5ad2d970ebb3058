"""APLA: train only the attention output projection (``attn.proj``, W_O) of each block, or ``r`` of its rows.

With ``r=None`` (or ``r`` equal to the width) the whole projection, weight and bias, trains: nothing is added.
With ``r < d`` each chosen block's ``attn.proj`` becomes an :class:`APLAProjection` holding the frozen weight, the
``r`` chosen output rows as trainable parameters, and the row indices as a buffer. Its backward computes the weight
gradient of those ``r`` rows only (``r/d`` of the full product). The attention module itself is untouched, so timm's
fused scaled-dot-product attention stays in use.

Rows are drawn per block from a CPU generator seeded with ``seed`` and the block index: the same in every process
and on every rank given the same seed, different between blocks, and stored in the module state so that they
survive ``.to(device)``, ``copy.deepcopy`` and a save/load round trip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from essa.tuners.base import Tuner, TunerError, positive_int, register, replace_module, select_blocks

# Block seeds are seed * _BLOCK_STRIDE + block index: distinct per block for any depth below the stride.
_BLOCK_STRIDE = 1_000_003


def choose_rows(width: int, r: int, seed: int, block: int) -> torch.Tensor:
    """The ``r`` output rows (sorted, int64) that block ``block`` trains."""
    generator = torch.Generator(device="cpu").manual_seed(seed * _BLOCK_STRIDE + block)
    return torch.randperm(width, generator=generator)[:r].sort().values


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _RowSubsetLinear(torch.autograd.Function):
    """y = x W'^T + b' where W', b' are the frozen weight and bias with rows ``rows`` replaced by trainable ones.

    Backward returns the input gradient and the gradient of the ``r`` trainable rows only:
    dW_rows = dY[..., rows]^T X, never the d x d product.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rows, weight_rows, bias_rows):
        dtype = _compute_dtype(x)
        w = weight.index_copy(0, rows, weight_rows).to(dtype)
        b = None if bias is None else bias.index_copy(0, rows, bias_rows).to(dtype)
        x = x.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x, w, b)
        ctx.save_for_backward(x, weight, rows, weight_rows)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rows, weight_rows = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.index_copy(0, rows, weight_rows).to(x.dtype)
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            g = grad_out.index_select(-1, rows).reshape(-1, rows.numel())  # (tokens, r)
            if ctx.needs_input_grad[4]:
                grad_w = (g.t() @ x.reshape(-1, x.shape[-1])).to(weight_rows.dtype)
            if ctx.has_bias and ctx.needs_input_grad[5]:
                grad_b = g.sum(0).to(weight_rows.dtype)
        return grad_x, None, None, None, grad_w, grad_b


class APLAProjection(nn.Module):
    """A linear layer of which only output rows ``rows`` train (weight rows and bias entries)."""

    def __init__(self, base: nn.Linear, rows: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self.register_buffer("rows", rows.to(device=base.weight.device, dtype=torch.long))
        self.weight_rows = nn.Parameter(base.weight.detach()[self.rows].clone())
        self.bias_rows = None if base.bias is None else nn.Parameter(base.bias.detach()[self.rows].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        return _RowSubsetLinear.apply(x, self.weight, self.bias, self.rows, self.weight_rows, self.bias_rows)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.copy_(self.weight.index_copy(0, self.rows, self.weight_rows))
        if self.bias is not None:
            linear.bias.copy_(self.bias.index_copy(0, self.rows, self.bias_rows))
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.rows.numel()}"


@register("apla")
class APLA(Tuner):
    """Options: ``r`` rows per block (None: the whole projection), ``blocks`` (indices, ``"last:N"``; None: all),
    ``seed``."""

    r: int | None = None
    blocks: list[int] | str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.r is not None:
            positive_int(self.r, "r", "apla")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TunerError(f"apla: seed={self.seed!r} must be a non-negative integer")

    def inject(self, model):
        for i in select_blocks(model, self.blocks, "apla"):
            proj = model.blocks[i].attn.proj
            width = proj.out_features
            if self.r is not None and self.r > width:
                raise TunerError(f"apla: r={self.r} exceeds the projection width d={width}; valid: 1..{width}")
            if self.r is None or self.r == width:
                proj.requires_grad_(True)
            else:
                rows = choose_rows(width, self.r, self.seed, i)
                replace_module(model, f"blocks.{i}.attn.proj", APLAProjection(proj, rows))

    def fold(self, model):
        for name, module in list(model.named_modules()):
            if isinstance(module, APLAProjection):
                replace_module(model, name, module.merged())

    def extra_state(self, model):
        return {n: b for n, b in model.named_buffers() if n.endswith("attn.proj.rows")}
