"""PatchDropout (Liu et al., WACV 2023): the student sees a random subset of each view's patch tokens.

A view that only its CLS token is scored on (the DINO term) needs no particular patch: dropping a fraction ``p`` of
its patch tokens (the class and register tokens always kept) cuts the blocks' work on it by about ``p`` (more in
attention). The kept count is timm's ``PatchDropout``'s, ``max(1, floor(N * (1 - p)))`` of ``N`` patches, and the
kept patches keep their position embeddings (the gather comes after them, where timm's ``PatchDropout`` sits).

Unlike timm's module, which draws from torch's global RNG in train mode, the kept patches are drawn here from a
``torch.Generator`` in the collate function, after the iBOT masks and from the same generator: a resumed run draws
the same (:func:`essa.adaptation._seeded_collate`) and the batch carries them to the training step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def check_drop(drop: float, what: str = "patch_drop") -> float:
    """``drop`` if it is a fraction in [0, 1), else ValueError naming ``what``."""
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1:
        raise ValueError(f"{what}={drop!r} must be a fraction in [0, 1): the share of patch tokens dropped "
                         "(0: none; 1 would leave no patch)")
    return float(drop)


def kept_count(num_patches: int, drop: float) -> int:
    """Patches a view of ``num_patches`` keeps: ``max(1, floor(num_patches * (1 - drop)))`` (timm's)."""
    return max(1, int(num_patches * (1.0 - check_drop(drop))))


def draw_kept(n: int, num_patches: int, drop: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Kept patch indices of ``n`` views: int64 (n, kept_count), each row a uniform random subset, sorted."""
    keep = kept_count(num_patches, drop)
    return torch.rand(n, num_patches, generator=generator).argsort(dim=1)[:, :keep].sort(dim=1).values


def keep_patches(tokens: torch.Tensor, kept: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """(B, prefix + N, D) tokens -> (B, prefix + kept, D): the prefix tokens, then the patches ``kept`` (B, kept)
    indexes (0-based among the patches)."""
    prefix, patches = tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens:]
    index = kept.to(tokens.device).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.cat([prefix, patches.gather(1, index)], dim=1)


def collate_kept(samples, *, collate: Callable, patch_size: int, drop: float,
                 generator: torch.Generator | None = None) -> dict:
    """``collate(samples, generator=generator)`` (the multi-crop batch and its iBOT masks), then the kept patches
    drawn from the same generator: ``kept_global`` (n_global * B, kept) for every global crop (the training step
    uses those of crops without an iBOT mask) and ``kept_local`` (n_local * B, kept), or None without local crops."""
    batch = collate(samples, generator=generator)
    return {**batch, **draw_batch_kept(batch, patch_size, drop, generator)}


def draw_batch_kept(batch: dict, patch_size: int, drop: float, generator: torch.Generator | None = None) -> dict:
    """``kept_global`` and ``kept_local`` (see :func:`collate_kept`) for a multi-crop ``batch``."""
    def kept(crops):
        if crops is None:
            return None
        return draw_kept(len(crops), (crops.shape[-2] // patch_size) * (crops.shape[-1] // patch_size), drop,
                         generator)

    return {"kept_global": kept(batch["global_crops"]), "kept_local": kept(batch["local_crops"])}
