"""From the 8-bit RGB image of a record to the float tensor a ViT takes.

Both transforms end in: ``ToImage`` -> float32 in 0..1 (``v / 255``) -> ``Normalize(mean, std)`` per channel, giving a
(3, img_size, img_size) tensor. ``mean`` / ``std`` default to the ImageNet statistics, which foundation models were
pretrained with; ``essa.data.dataset.dataset_stats`` computes a dataset's own statistics to use instead.
"""

from __future__ import annotations


import torch
from torchvision.transforms import v2


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tensor_steps() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def eval_transform(img_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """Resize the shorter side to ``img_size``, centre-crop ``img_size`` square, normalise."""
    return v2.Compose([
        v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size), *tensor_steps(), v2.Normalize(mean, std),
    ])


def train_transform(
    img_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=(0.08, 1.0), hflip: float = 0.5
) -> v2.Compose:
    """The supervised recipe: resize the shorter side to ``img_size`` (cheap crops of large images), a random
    resized crop covering ``scale`` of the area, a horizontal flip with probability ``hflip``, normalise."""
    return v2.Compose([
        v2.Resize(img_size, antialias=True),
        v2.RandomResizedCrop(img_size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(hflip),
        *tensor_steps(),
        v2.Normalize(mean, std),
    ])
