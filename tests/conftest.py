"""Shared fixtures: tiny random ViTs and the paths of the shared real data and pretrained model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from essa import backbones

REPO = Path(__file__).resolve().parents[1]
# The shared folder sits beside the repository (../shared); ESSA_SHARED overrides.
SHARED = Path(os.environ.get("ESSA_SHARED", REPO.parent / "shared"))
PRETRAINED = SHARED / "models" / "vit_tiny_p4_32_cifar10.safetensors"


def tiny_vit(**kwargs):
    """A 4-block ViT-Ti (width 192, 3 heads) on 32 px images in 8 px patches: 16 patch tokens."""
    args = dict(img_size=32, patch_size=8, depth=4)
    args.update(kwargs)
    torch.manual_seed(0)
    return backbones.create("vit_tiny_patch16_224", **args)


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def pretrained_path():
    if not PRETRAINED.is_file():
        pytest.skip(f"shared pretrained model not found at {PRETRAINED} (set ESSA_SHARED)")
    return PRETRAINED


@pytest.fixture
def make_vit():
    return tiny_vit
