"""SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling") pieces for a timm ViT: random
masks of coarse square cells, the encoder with a learned mask token in masked patches
(:func:`essa.ssl.masking.forward_masked`), a one-layer linear decoder and the L1 loss on masked pixels. Written from
the paper; nothing here knows about tuners.

- ``cell_masks(n, grid, cell=2, ratio=0.6, generator=None)``: bool (n, H, W) patch masks made of ``cell x cell``
  patch squares, ``ceil(cells * ratio)`` squares masked per image.
- ``mask_cell(img_size, patch_size, mask_patch_size=None)``: the cell side in patches for a mask patch size in px.
- ``simmim_loss(pred, images, masks, patch_size)``: mean absolute error over the masked pixels' values.
- ``SimMIM(vit, mask_token_init=0.02)``: ``forward(images, masks)`` -> (loss, pred, tokens).
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from essa.ssl.masking import forward_masked
from essa.ssl.mim import patchify, unpatchify

#: SimMIM's mask patch size (px) for ViTs.
DEFAULT_MASK_PATCH = 32


def mask_cell(img_size: int, patch_size: int, mask_patch_size: int | None = None) -> int:
    """The side of a mask cell in patches. ``mask_patch_size`` (px) must be a multiple of ``patch_size``; None:
    the largest multiple of the patch size up to 32 px that leaves at least 4 cells across the image (32 px at
    192-224 px with patch 16; 28 at 224 with patch 14; 8 px at 32 with patch 4), at least one patch. Raises
    ValueError naming ``simmim.mask_patch_size`` otherwise."""
    if mask_patch_size is not None:
        if mask_patch_size < patch_size or mask_patch_size % patch_size:
            raise ValueError(f"simmim.mask_patch_size={mask_patch_size} must be a multiple of the backbone's patch "
                             f"size {patch_size}")
        return mask_patch_size // patch_size
    k = max(1, min(DEFAULT_MASK_PATCH, img_size // 4) // patch_size)
    return k


def cell_masks(n: int, grid: tuple[int, int], cell: int = 2, ratio: float = 0.6,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Masks on a (H, W) patch grid made of ``cell x cell`` squares of patches (the edge squares cut off where
    ``cell`` does not divide the grid): ``ceil(squares * ratio)`` squares, chosen uniformly per image, are masked.
    Deterministic given ``generator``. Returns bool (n, H, W), True = masked."""
    if not 0 < ratio <= 1:
        raise ValueError(f"cell_masks: ratio must be in (0, 1], got {ratio}")
    H, W = grid
    ch, cw = math.ceil(H / cell), math.ceil(W / cell)
    count = min(ch * cw, math.ceil(ch * cw * ratio))
    ranks = torch.rand(n, ch * cw, generator=generator).argsort(1).argsort(1)
    squares = (ranks < count).reshape(n, ch, cw)
    return squares.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :H, :W].contiguous()


def simmim_loss(pred: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """L1 between ``pred`` (B, N, patch^2 * C) and the pixels of ``images`` (B, C, H, W) (the normalised input, the
    paper's target), summed over the masked patches' pixels and channels and divided by their number (masked
    pixels x C): visible pixels count for nothing. ``masks`` bool (B, H / patch, W / patch), True = masked.
    Computed in float32."""
    target = patchify(images.float(), patch_size)
    m = masks.flatten(1).unsqueeze(-1).to(target.dtype)  # (B, N, 1)
    return ((pred.float() - target).abs() * m).sum() / (m.sum() * target.shape[-1])


class SimMIM(nn.Module):
    """A timm ViT (``backbone``, tuned or not), the learned mask token its masked patches get (before position
    embeddings, as :func:`essa.ssl.masking.forward_masked` puts it), and the one-layer linear decoder from each
    output patch token to its patch's ``patch^2 * 3`` pixels (the paper's 1x1 convolution and pixel shuffle)."""

    def __init__(self, backbone: VisionTransformer, channels: int = 3):
        super().__init__()
        self.backbone = backbone
        self.patch_size = backbone.patch_embed.patch_size[0]
        like = next(backbone.parameters())
        self.mask_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(backbone.embed_dim, device=like.device),
                                                             std=0.02))
        self.decoder = nn.Linear(backbone.embed_dim, self.patch_size * self.patch_size * channels,
                                 device=like.device)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, pred (B, N, patch^2 * 3), the encoder's output tokens (B, prefix + N, D))."""
        tokens = forward_masked(self.backbone, images, masks, self.mask_token)
        pred = self.decoder(tokens[:, self.backbone.num_prefix_tokens:])
        return simmim_loss(pred, images, masks, self.patch_size), pred, tokens

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W): visible patches as given, masked patches as predicted."""
        _, pred, _ = self(images, masks)
        pixels = torch.where(masks.flatten(1).unsqueeze(-1), pred.float(), patchify(images.float(), self.patch_size))
        return unpatchify(pixels, masks.shape[1:], self.patch_size, images.shape[1])
