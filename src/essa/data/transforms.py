"""From the 8-bit RGB image of a record to the float tensor a ViT takes.

Both transforms end in: ``ToImage`` -> float32 in 0..1 (``v / 255``) -> ``Normalize(mean, std)`` per channel, giving a
(3, img_size, img_size) tensor. The stages pass the backbone's preprocessing (:mod:`essa.data.normalize`: its
``mean``, ``std`` and ``interpolation``, resolved under ``data.normalize``); the defaults are ImageNet's statistics
and bilinear resizing.
"""

from __future__ import annotations


import torch
from torchvision.transforms import v2

#: ImageNet's statistics: the default (essa.data.normalize resolves each backbone's own).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """``bilinear`` / ``bicubic`` / ``nearest`` -> torchvision's mode."""
    return v2.InterpolationMode(name)


def tensor_steps() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def _stats(preprocessing, mean, std, interpolation: str):
    if preprocessing is None:
        return list(mean), list(std), interpolation_mode(interpolation)
    return list(preprocessing.mean), list(preprocessing.std), interpolation_mode(preprocessing.interpolation)


def eval_transform(img_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = "bilinear", *,
                   preprocessing=None) -> v2.Compose:
    """Resize the shorter side to ``img_size`` (``interpolation``), centre-crop ``img_size`` square, normalise with
    ``mean`` / ``std``. ``preprocessing`` (:class:`essa.data.normalize.Preprocessing`) replaces all three."""
    mean, std, mode = _stats(preprocessing, mean, std, interpolation)
    return v2.Compose([
        v2.Resize(img_size, interpolation=mode, antialias=True), v2.CenterCrop(img_size), *tensor_steps(),
        v2.Normalize(mean, std),
    ])


def train_transform(
    img_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=(0.08, 1.0), hflip: float = 0.5,
    interpolation: str = "bilinear", *, preprocessing=None,
) -> v2.Compose:
    """The supervised recipe: resize the shorter side to ``img_size`` (cheap crops of large images), a random
    resized crop covering ``scale`` of the area, a horizontal flip with probability ``hflip``, normalise (``mean``,
    ``std`` and ``interpolation``, or ``preprocessing``'s)."""
    mean, std, mode = _stats(preprocessing, mean, std, interpolation)
    return v2.Compose([
        v2.Resize(img_size, interpolation=mode, antialias=True),
        v2.RandomResizedCrop(img_size, scale=scale, interpolation=mode, antialias=True),
        v2.RandomHorizontalFlip(hflip),
        *tensor_steps(),
        v2.Normalize(mean, std),
    ])
