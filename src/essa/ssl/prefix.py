"""A timm ViT's ``forward_features`` in two parts around block ``k``: the tokens entering block ``k`` (of all
patches, or of kept ones: :mod:`essa.ssl.patch_dropout`), and the blocks from ``k`` on with the final norm.

The steps are ``VisionTransformer.forward_features``' own, in its order, and call the ViT's modules (so hooks a tuner
registers on a block or on the norm still run, and ``recompute_frozen``'s block forwards are used):
``tokens_after(vit, tokens_before(vit, x, k), k)`` equals ``vit.forward_features(x)``, bit for bit. What this
split is for: the frozen blocks ``0..k-1`` of a student whose tuner trains nothing there run once, without autograd,
for the student and the EMA teacher that shares their weights (:mod:`essa.train.truncation`).
"""

from __future__ import annotations

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer

from essa.ssl.patch_dropout import keep_patches


def unsplittable(vit) -> str | None:
    """Why :func:`tokens_before` / :func:`tokens_after` would not compute what ``vit.forward_features`` computes
    (a reason to say in ``resources.json``), or None when they do."""
    if not isinstance(vit, VisionTransformer) or type(vit).forward_features is not VisionTransformer.forward_features:
        return f"{type(vit).__name__} is not a timm VisionTransformer with its own forward_features"
    if vit.blocks._forward_hooks or vit.blocks._forward_pre_hooks:
        return "the blocks container has forward hooks, which a split forward would skip"
    return None


def _blocks(vit: VisionTransformer, x: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
    blocks = vit.blocks[start:stop]
    if vit.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
        return checkpoint_seq(blocks, x)
    return blocks(x)


def tokens_before(vit: VisionTransformer, images: torch.Tensor, stop: int,
                  kept: torch.Tensor | None = None) -> torch.Tensor:
    """The tokens entering block ``stop``: (B, prefix + N, D), or (B, prefix + kept, D) with ``kept`` (B, kept)
    patch indices (PatchDropout, after the position embeddings). images: (B, 3, H, W)."""
    x = vit._pos_embed(vit.patch_embed(images))
    if kept is not None:
        x = keep_patches(x, kept, vit.num_prefix_tokens)
    x = vit.norm_pre(vit.patch_drop(x))
    return _blocks(vit, x, 0, stop)


def tokens_after(vit: VisionTransformer, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Blocks ``start..`` and the final norm on the tokens entering block ``start``: (B, T, D) -> (B, T, D)."""
    return vit.norm(_blocks(vit, tokens, start, None))
