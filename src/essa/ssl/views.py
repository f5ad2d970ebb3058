"""Multi-crop views (DINOv2 recipe) and the collate function that batches them and draws the iBOT masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightly.transforms.dino_transform import DINOViewTransform
from PIL import Image

from essa.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from essa.ssl.masking import block_masks


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
