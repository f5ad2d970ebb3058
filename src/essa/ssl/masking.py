"""Block-wise patch masks for the iBOT term, and a timm ViT forward pass that puts a mask token in masked patches.

The mask algorithm is the one of BEiT / iBOT / DINOv2: add rectangles of random area and log-uniform aspect
ratio until the target number of patches is masked, never exceeding it. Written here rather than taken from
``lightly.models.utils.random_block_mask`` because that draws from Python's global ``random`` state, so its masks
cannot be reproduced from a ``torch.Generator``.

``forward_masked`` is written here rather than taken from lightly's ``MaskedVisionTransformerTIMM``, which
re-initialises the wrapped ViT's weights unless told to skip, assumes a square patch grid when resampling position
embeddings for dynamic sizes, re-implements the position embedding step and skips ``patch_drop``.
"""

from __future__ import annotations

import math
import random

import torch
from timm.models.vision_transformer import VisionTransformer

from essa import families


def _rng(generator: torch.Generator | None) -> random.Random:
    """A Python RNG seeded from ``generator`` (or torch's global RNG, which DataLoader seeds per worker)."""
    return random.Random(torch.randint(2**62, (), generator=generator).item())


def _add_block(
    mask: torch.Tensor, budget: int, rng: random.Random, min_block: int, min_aspect: float, attempts: int
) -> int:
    """Mask one random rectangle adding between 1 and ``budget`` new patches; return how many it added (0: none fit)."""
    H, W = mask.shape
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    for _ in range(attempts):
        area = rng.uniform(min_block, budget)
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if h < H and w < W:
            top, left = rng.randint(0, H - h), rng.randint(0, W - w)
            added = h * w - int(mask[top : top + h, left : left + w].sum())
            if 0 < added <= budget:
                mask[top : top + h, left : left + w] = True
                return added
    return 0


def block_mask(
    grid: tuple[int, int],
    num_masked: int,
    rng: random.Random,
    *,
    min_block: int = 4,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    attempts: int = 10,
) -> torch.Tensor:
    """One block-wise mask of about ``num_masked`` patches on a (H, W) patch grid, drawn from ``rng``.

    Blocks have a random area in [``min_block``, ``max_block``] patches (default max: half the grid, as DINOv2)
    and an aspect ratio log-uniform in [``min_aspect``, 1 / ``min_aspect``]. The count never exceeds
    ``num_masked``; it falls short when no block adding at most the remaining count fits within ``attempts``
    tries (the last few patches on a crowded grid: tests/ssl/test_masking.py measures the shortfall).

    Returns bool (H, W), True = masked.
    """
    H, W = grid
    if not 0 <= num_masked <= H * W:
        raise ValueError(f"block_mask: num_masked must be in [0, {H * W}] for a {H}x{W} grid, got {num_masked}")
    max_block = max(1, H * W // 2) if max_block is None else max_block
    mask = torch.zeros(H, W, dtype=torch.bool)
    count = 0
    while count < num_masked:
        added = _add_block(mask, min(num_masked - count, max_block), rng, min_block, min_aspect, attempts)
        if added == 0:
            break
        count += added
    return mask


def block_masks(
    n: int,
    grid: tuple[int, int],
    ratio: tuple[float, float] = (0.1, 0.5),
    probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Masks for ``n`` crops: ``int(n * probability)`` of them, at random positions, get a block mask of
    ``int(H * W * r)`` patches with r uniform in ``ratio`` (one r per crop); the others get an empty mask.

    Deterministic given ``generator``. Returns bool (n, H, W), True = masked.
    """
    lo, hi = ratio
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"block_masks: ratio must satisfy 0 <= min <= max <= 1, got {ratio}")
    if not 0 <= probability <= 1:
        raise ValueError(f"block_masks: probability must be in [0, 1], got {probability}")
    H, W = grid
    rng = _rng(generator)
    n_masked = int(n * probability)
    masks = [block_mask(grid, int(H * W * rng.uniform(lo, hi)), rng) for _ in range(n_masked)]
    masks += [torch.zeros(H, W, dtype=torch.bool)] * (n - n_masked)
    rng.shuffle(masks)
    return torch.stack(masks)


def forward_masked(
    vit: VisionTransformer, images: torch.Tensor, masks: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """``vit.forward_features`` with the embeddings of masked patches replaced by ``mask_token``.

    Args:
        vit: a timm VisionTransformer or Eva (DINOv3, EVA-02), with ``dynamic_img_size`` or without (then
            ``images`` must have its ``img_size``); tuners may have changed or hooked its modules.
        images: (B, 3, H_img, W_img).
        masks: bool (B, H, W) or (B, H * W), True = masked, on the patch grid (H = H_img // patch size).
        mask_token: (D,) or (1, 1, D), the learnable embedding put in place of masked patches, before position
            embeddings are added (as BEiT / iBOT / DINOv2). timm ViTs have none: the caller owns it, e.g.
            ``nn.Parameter(torch.zeros(vit.embed_dim))`` as DINOv2.

    Returns the normalised tokens (B, num_prefix_tokens + H * W, D): class token, register tokens, patches.

    The steps are forward_features' own and call the ViT's modules (``vit.blocks``, ``vit.norm``), so forward
    hooks a tuner registers on them (VPT's prompt insertion and stripping) still run; with an all-False mask
    the output equals ``vit.forward_features(images)``.
    """
    x = vit.patch_embed(images)  # (B, H, W, D) with dynamic_img_size, else (B, N, D)
    B, D = x.shape[0], x.shape[-1]
    num_patches = x[0, ..., 0].numel()
    if masks.dtype != torch.bool or masks.shape[0] != B or masks[0].numel() != num_patches:
        raise ValueError(
            f"forward_masked: masks must be bool (B, H, W) or (B, H*W) matching the patch grid of the images, "
            f"here B={B} and H*W={num_patches} ({tuple(x.shape[1:-1])}); got {masks.dtype} {tuple(masks.shape)}"
        )
    masks = masks.to(x.device).reshape(x.shape[:-1]).unsqueeze(-1)
    x = torch.where(masks, mask_token.to(x.dtype).reshape(D), x)
    # timm's own step: dynamic resampling, registers and no_embed_class stay exact; an Eva's RoPE embedding is the
    # patch grid's, so a mask token keeps the position of the patch it replaces
    x, rope = families.embed(vit, x)
    x = vit.norm_pre(x)
    return vit.norm(families.run_blocks(vit, x, rope))
