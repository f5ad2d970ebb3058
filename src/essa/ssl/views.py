"""Multi-crop views (DINOv2 recipe) and the collate function that batches them and draws the iBOT masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightly.transforms.dino_transform import DINOViewTransform
from PIL import Image

from essa.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from essa.ssl.masking import block_masks


def local_crop_size(global_size: int, patch_size: int, local_size: int | None = None) -> int:
    """``local_size``, or 7/16 of ``global_size`` (98 for 224) rounded to the patch size (at least one patch)."""
    if local_size is not None:
        return local_size
    return max(patch_size, round(global_size * 7 / 16 / patch_size) * patch_size)


def low_resolution_sizes(global_size: int, local_size: int, patch_size: int,
                         low_size: int | None = None) -> tuple[int, int]:
    """(global, local) crop sizes of a low-resolution phase (FastDINOv2's curriculum) before ``global_size`` and
    ``local_size``: ``low_size`` (default: half of ``global_size`` rounded to the patch size, at least one patch),
    and ``local_size`` scaled by the same ratio, rounded to the patch size, at least one patch. ValueError when
    ``low_size`` is not a multiple of the patch size or not smaller than ``global_size``."""
    def to_patch(size: float) -> int:
        return max(patch_size, round(size / patch_size) * patch_size)

    low = to_patch(global_size / 2) if low_size is None else low_size
    if low % patch_size:
        raise ValueError(f"ssl.curriculum_size={low} is not a multiple of the backbone's patch size {patch_size}: "
                         f"use {to_patch(low)}")
    if low >= global_size:
        raise ValueError(f"ssl.curriculum_size={low} is not smaller than ssl.global_size={global_size}"
                         + (f" (one patch of {patch_size} px: there is no lower size)" if low_size is None else ""))
    return low, to_patch(local_size * low / global_size)


class MultiCropTransform:
    """PIL image -> ``n_global`` global crops, then ``n_local`` local crops, as normalised float tensors.

    Each crop: random resized crop (bicubic), horizontal flip, colour jitter (brightness 0.4, contrast 0.4,
    saturation 0.2, hue 0.1, applied with ``color_jitter_prob``), grayscale, Gaussian blur (sigma 0.1-2), then
    normalisation with ``mean`` / ``std``. Blur probabilities ``blur_probs`` are (first global crop, other global
    crops, local crops); solarisation (``solarization_prob``) only on global crops after the first. Built from
    lightly's ``DINOViewTransform``; ``lightly.transforms.DINOTransform`` itself fixes the number of global crops
    at 2.

    Returns a list of ``n_global`` tensors (3, global_size, global_size) followed by ``n_local`` tensors
    (3, local_size, local_size).
    """

    def __init__(
        self,
        n_global: int = 2,
        n_local: int = 8,
        global_size: int = 224,
        local_size: int = 98,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        hflip_prob: float = 0.5,
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5),
        solarization_prob: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if n_global < 1 or n_local < 0:
            raise ValueError(f"MultiCropTransform: need n_global >= 1 and n_local >= 0, got {n_global}, {n_local}")
        common = dict(
            hf_prob=hflip_prob,
            cj_prob=color_jitter_prob,
            random_gray_scale=grayscale_prob,
            normalize={"mean": list(mean), "std": list(std)},
        )
        first, other, local = (
            DINOViewTransform(global_size, global_scale, gaussian_blur=blur_probs[0], solarization_prob=0, **common),
            DINOViewTransform(
                global_size, global_scale, gaussian_blur=blur_probs[1], solarization_prob=solarization_prob, **common
            ),
            DINOViewTransform(local_size, local_scale, gaussian_blur=blur_probs[2], solarization_prob=0, **common),
        )
        self.transforms = [first] + [other] * (n_global - 1) + [local] * n_local

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        # Medical images often come as grayscale (L) or 16-bit (I;16); the ViT expects 3 channels.
        if image.mode != "RGB":
            image = image.convert("RGB")
        return [transform(image) for transform in self.transforms]


def collate(
    samples: Sequence[Sequence[torch.Tensor]],
    *,
    patch_size: int,
    n_global: int = 2,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor | None]:
    """Batch the crop lists of B images (``MultiCropTransform`` outputs) and draw the iBOT masks.

    Use as ``DataLoader(..., collate_fn=functools.partial(collate, patch_size=vit.patch_embed.patch_size[0]))``.
    Leave ``generator`` None there: a generator would be copied into every worker and repeat the same masks;
    torch's global RNG, from which the masks are then drawn, is seeded differently per worker.

    Returns, crop-major (row ``c * B + b`` is crop ``c`` of image ``b``):
        ``global_crops``: (n_global * B, 3, G, G);
        ``local_crops``: (n_local * B, 3, L, L), or None without local crops;
        ``masks``: bool (n_global * B, G // patch_size, G // patch_size), True = masked; ``int(n_global * B *
        mask_probability)`` crops at random rows have a block mask of a ratio uniform in ``mask_ratio``.
    """
    n_crops = {len(views) for views in samples}
    if len(n_crops) != 1 or n_global > min(n_crops):
        raise ValueError(
            f"collate: every sample must be a list of the same number (>= n_global={n_global}) of crops, got "
            f"lengths {sorted(n_crops)}"
        )
    crops = [torch.stack(views) for views in zip(*samples)]  # per crop index: (B, 3, S, S)
    global_crops = torch.cat(crops[:n_global])
    grid = (global_crops.shape[-2] // patch_size, global_crops.shape[-1] // patch_size)
    return {
        "global_crops": global_crops,
        "local_crops": torch.cat(crops[n_global:]) if len(crops) > n_global else None,
        "masks": block_masks(len(global_crops), grid, mask_ratio, mask_probability, generator),
    }
