"""What the two masked-image-modelling objectives (:mod:`essa.ssl.mae`, :mod:`essa.ssl.simmim`) share: patches of
pixels, the one-crop view, the collate function that draws the masks, and the picture of reconstructions.

- ``patchify(images, patch)``: (B, C, H, W) -> (B, N, patch * patch * C), patches in row-major grid order, each
  patch's values ordered (row, column, channel); ``unpatchify`` is its inverse.
- ``ReconstructionTransform(size, scale)``: PIL image -> one normalised random resized crop (bicubic) with a
  horizontal flip (MAE and SimMIM's augmentation); ``CenterTransform(size)``: the deterministic view of the picture.
- ``collate_masked(samples, mask_fn, generator)``: ``{"images": (B, 3, S, S), "masks": bool (B, H, W)}``.
- ``save_reconstructions(path, images, masks, reconstructions, patch, mean=, std=)``: a PNG of original, masked
  input and reconstruction per row (matplotlib's Agg canvas, no pyplot), un-normalised with the ``mean`` / ``std``
  the images were normalised with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from essa.ssl.views import IMAGENET_MEAN, IMAGENET_STD


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) with H and W multiples of ``patch`` -> (B, (H / patch) * (W / patch), patch * patch * C)."""
    B, C, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"patchify: image size {H}x{W} is not a multiple of the patch size {patch}")
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch: int, channels: int = 3) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, H * W, patch * patch * C) on a (H, W) grid -> (B, C, H * p, W * p)."""
    B = patches.shape[0]
    H, W = grid
    x = patches.reshape(B, H, W, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, H * patch, W * patch)


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")  # grayscale (L) or 16-bit (I;16) medical images


class ReconstructionTransform:
    """PIL image -> (3, size, size): a random resized crop of area ``scale`` of the image and aspect ratio in
    [3/4, 4/3] (bicubic), a horizontal flip with probability 0.5, normalised with ``mean`` / ``std``.
    MAE: scale (0.2, 1.0); SimMIM: (0.67, 1.0)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), hflip_prob: float = 0.5,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.RandomHorizontalFlip(hflip_prob), T.ToImage(), T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(mean), list(std)),
        ])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(_rgb(image))


class CenterTransform:
    """PIL image -> (3, size, size): resized (shorter side) and centre-cropped, normalised; no randomness."""

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.transform = T.Compose([
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size),
            T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std)),
        ])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(_rgb(image))


def collate_masked(samples: Sequence[torch.Tensor], mask_fn: Callable[..., torch.Tensor],
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Batch B images (3, S, S) and draw their masks: ``mask_fn(B, generator=generator)`` -> bool (B, H, W),
    True = masked. Returns ``{"images": (B, 3, S, S), "masks": (B, H, W)}``."""
    images = torch.stack(list(samples))
    return {"images": images, "masks": mask_fn(len(images), generator=generator)}


def denormalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Normalised (B, 3, H, W) -> pixels in [0, 1] (clipped)."""
    m = torch.tensor(mean, dtype=images.dtype).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).reshape(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def save_reconstructions(path: str | Path, images: torch.Tensor, masks: torch.Tensor, reconstructions: torch.Tensor,
                         patch: int, title: str = "", mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> Path:
    """A PNG with one row per image: the original, the masked input (masked patches grey) and the reconstruction
    (``reconstructions``: the visible patches as given, the masked ones as predicted). ``images`` and
    ``reconstructions``: (B, 3, H, W) normalised with ``mean`` / ``std``; ``masks``: bool (B, H / patch, W / patch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = denormalize(images.detach().float().cpu(), mean, std)
    reconstructions = denormalize(reconstructions.detach().float().cpu(), mean, std)
    pixel_masks = masks.cpu().repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None]  # (B, 1, H, W)
    masked = torch.where(pixel_masks, torch.full_like(images, 0.5), images)
    n = len(images)
    fig = Figure(figsize=(6, 2 * n + (0.4 if title else 0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        for j, (picture, name) in enumerate(((images, "original"), (masked, "masked input"),
                                             (reconstructions, "reconstruction"))):
            ax = axes[i][j]
            ax.imshow(picture[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=80)
    tmp.replace(path)
    return path
