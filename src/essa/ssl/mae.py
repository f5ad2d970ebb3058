"""Masked autoencoder (MAE; He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners") pieces for a timm
ViT: random masks, the encoder on the visible tokens only, a light decoder and the loss. Written from the paper;
nothing here knows about tuners.

- ``random_masks(n, grid, ratio=0.75, generator=None)``: bool (n, H, W), True = masked, the same number of masked
  patches in every row (``num_masked``), their places drawn per row.
- ``encode_visible(vit, images, masks)``: (B, prefix + K, D), the ViT's normalised output tokens when its blocks
  see only the prefix tokens (class, registers) and the K visible patches (in grid order).
- ``MAEDecoder(encoder_dim, patch_size, width=256, depth=2, heads=8)``: encoder tokens -> (B, N, patch^2 * 3)
  pixel predictions of every patch.
- ``mae_loss(pred, images, masks, patch_size, norm_pix=True)``: MSE on the masked patches only.
- ``MAE(vit, decoder, norm_pix_loss=True)``: the whole objective: ``forward(images, masks)`` -> (loss, pred).
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from essa import families
from essa.ssl.mim import patchify, unpatchify


def num_masked(num_patches: int, ratio: float) -> int:
    """Patches masked per image: ``num_patches - int(num_patches * (1 - ratio))``, at least 1 and leaving at least
    one visible."""
    return min(num_patches - 1, max(1, num_patches - int(num_patches * (1 - ratio))))


def random_masks(n: int, grid: tuple[int, int], ratio: float = 0.75,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random masks on a (H, W) patch grid: each of the ``n`` rows masks :func:`num_masked` patches,
    chosen uniformly (the ranks of uniform noise). Deterministic given ``generator``. Returns bool (n, H, W)."""
    if not 0 < ratio < 1:
        raise ValueError(f"random_masks: ratio must be in (0, 1), got {ratio}")
    H, W = grid
    count = num_masked(H * W, ratio)
    noise = torch.rand(n, H * W, generator=generator)
    ranks = noise.argsort(1).argsort(1)
    return (ranks < count).reshape(n, H, W)


def visible_indices(masks: torch.Tensor) -> torch.Tensor:
    """int64 (B, K): the visible (False) patches of bool masks (B, H, W) or (B, N), in grid order. Every row must
    have the same number K of them."""
    keep = ~masks.flatten(1)
    counts = keep.sum(1)
    if len(counts) and not bool((counts == counts[0]).all()):
        raise ValueError(f"MAE masks must hide the same number of patches in every image, got visible counts "
                         f"{sorted(set(counts.tolist()))}")
    return keep.nonzero()[:, 1].reshape(len(keep), -1)


def encode_visible(vit: VisionTransformer, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``vit.forward_features`` on the visible patches only.

    The patch embedding and ``vit._pos_embed`` (timm's own step: position embeddings resampled for the grid with
    ``dynamic_img_size``, class and register tokens, ``no_embed_class``) run on the whole image; then only the
    prefix tokens and the visible patch tokens go on, through ``norm_pre``, the blocks and ``norm`` (forward hooks
    on them, such as VPT's prompts, still run; ``grad_checkpointing`` is honoured). ``patch_drop`` is not applied:
    the mask takes its place. An Eva's (DINOv3, EVA-02) blocks get the RoPE embedding of the visible patches only.

    Args:
        masks: bool (B, H, W) or (B, H * W) on the patch grid, True = masked, the same count in every row.

    Returns (B, num_prefix_tokens + K, D): the prefix tokens, then the K visible patches in grid order.
    """
    x = vit.patch_embed(images)  # (B, H, W, D) with dynamic_img_size, else (B, N, D)
    B, D = x.shape[0], x.shape[-1]
    num_patches = x[0, ..., 0].numel()
    if masks.dtype != torch.bool or masks.shape[0] != B or masks[0].numel() != num_patches:
        raise ValueError(f"encode_visible: masks must be bool (B, H, W) or (B, H*W) matching the patch grid of the "
                         f"images, here B={B} and H*W={num_patches}; got {masks.dtype} {tuple(masks.shape)}")
    x, rope = families.embed(vit, x, patch_drop=False)
    prefix = vit.num_prefix_tokens
    ids = visible_indices(masks.to(x.device))
    visible = x[:, prefix:].gather(1, ids.unsqueeze(-1).expand(-1, -1, D))
    x = vit.norm_pre(torch.cat([x[:, :prefix], visible], dim=1))
    # an Eva's blocks rotate the visible patches with their own positions: the RoPE rows of the kept patches,
    # gathered as timm's Eva does after patch dropout
    return vit.norm(families.run_blocks(vit, x, families.keep_rope(rope, x, ids)))


class MAEDecoder(nn.Module):
    """The light decoder: a linear map from the encoder's width to ``width``, a learned mask token in place of every
    masked patch, a fixed 2-D sine-cosine position embedding of the patch grid (computed for the grid of each
    batch, so any image size works; the prefix tokens get none), ``depth`` timm ``Block``s of ``heads`` heads,
    a LayerNorm and a linear map to each patch's ``patch_size^2 * channels`` pixels.

    Initialisation (own choice): linear layers Xavier-uniform with zero biases, the mask token normal(0.02)."""

    def __init__(self, encoder_dim: int, patch_size: int, width: int = 256, depth: int = 2, heads: int = 8,
                 mlp_ratio: float = 4.0, channels: int = 3):
        super().__init__()
        if width % 4 or width % heads:
            raise ValueError(f"MAEDecoder: width={width} must be a multiple of 4 (the 2-D sine-cosine position "
                             f"embedding) and of heads={heads}")
        self.width, self.patch_size = width, patch_size
        self.embed = nn.Linear(encoder_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, patch_size * patch_size * channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def position_embedding(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """(H * W, width) fixed sine-cosine embedding of a (H, W) grid (timm's ``build_sincos2d_pos_embed``)."""
        return build_sincos2d_pos_embed(list(grid), dim=self.width, device=like.device, dtype=like.dtype)

    def forward(self, tokens: torch.Tensor, masks: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        """``tokens`` (B, prefix + K, D): :func:`encode_visible`'s output; ``masks`` bool (B, H, W), True = masked.
        Returns (B, H * W, patch_size^2 * channels): a prediction for every patch (the loss reads the masked)."""
        B, H, W = masks.shape
        x = self.embed(tokens)
        ids = visible_indices(masks)
        full = x.new_zeros(B, H * W, self.width).scatter(1, ids.unsqueeze(-1).expand(-1, -1, self.width),
                                                          x[:, num_prefix_tokens:])
        full = torch.where(masks.reshape(B, H * W, 1), self.mask_token.to(x.dtype), full)
        full = full + self.position_embedding((H, W), full)
        x = self.blocks(torch.cat([x[:, :num_prefix_tokens], full], dim=1))
        return self.pred(self.norm(x))[:, num_prefix_tokens:]


def patch_targets(images: torch.Tensor, patch_size: int, norm_pix: bool = True, eps: float = 1e-6):
    """(target, mean, std) of every patch (B, N, patch^2 * C): the pixels, normalised per patch by their mean and
    (population) standard deviation with ``norm_pix`` (mean 0 and std 1 otherwise)."""
    target = patchify(images.float(), patch_size)
    if not norm_pix:
        return target, torch.zeros_like(target[..., :1]), torch.ones_like(target[..., :1])
    mean = target.mean(-1, keepdim=True)
    std = (target.var(-1, keepdim=True, unbiased=False) + eps).sqrt()
    return (target - mean) / std, mean, std


def mae_loss(pred: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, patch_size: int,
             norm_pix: bool = True) -> torch.Tensor:
    """The MAE loss: per masked patch, the mean squared error over its ``patch^2 * C`` values between ``pred``
    (B, N, patch^2 * C) and the patch's pixels of ``images`` (B, C, H, W) (normalised per patch with ``norm_pix``:
    the paper's normalised-pixel target); averaged over the masked patches of the batch (``masks`` bool (B, H, W),
    True = masked). Computed in float32."""
    target, _, _ = patch_targets(images, patch_size, norm_pix)
    per_patch = (pred.float() - target).pow(2).mean(-1)  # (B, N)
    m = masks.flatten(1).to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum()


class MAE(nn.Module):
    """A timm ViT (``backbone``, the encoder, tuned or not) with an :class:`MAEDecoder`."""

    def __init__(self, backbone: VisionTransformer, decoder: MAEDecoder, norm_pix_loss: bool = True):
        super().__init__()
        self.backbone, self.decoder, self.norm_pix_loss = backbone, decoder, norm_pix_loss
        self.patch_size = backbone.patch_embed.patch_size[0]

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, pred (B, N, patch^2 * 3), the encoder's output tokens (B, prefix + K, D))."""
        tokens = encode_visible(self.backbone, images, masks)
        pred = self.decoder(tokens, masks, self.backbone.num_prefix_tokens)
        return mae_loss(pred, images, masks, self.patch_size, self.norm_pix_loss), pred, tokens

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in the input's normalisation: visible patches as given, masked patches as predicted (the
        normalised-pixel predictions mapped back with each patch's own mean and standard deviation)."""
        _, pred, _ = self(images, masks)
        target, mean, std = patch_targets(images, self.patch_size, self.norm_pix_loss)
        pixels = torch.where(masks.flatten(1).unsqueeze(-1), pred.float(), target) * std + mean
        return unpatchify(pixels, masks.shape[1:], self.patch_size, images.shape[1])
