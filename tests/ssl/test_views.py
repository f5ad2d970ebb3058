import functools

import pytest
import torch
from PIL import Image

from essa.ssl.views import IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform, collate

COLOUR = (200, 100, 30)


def normalised(rgb, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return (torch.tensor(rgb) / 255 - torch.tensor(mean)) / torch.tensor(std)


def test_crop_count_sizes_and_normalisation():
    # A constant image is unchanged by crops, flips and blur, so every crop is the normalised colour.
    transform = MultiCropTransform(
        n_global=2, n_local=3, global_size=32, local_size=16, color_jitter_prob=0, grayscale_prob=0,
        solarization_prob=0,
    )
    views = transform(Image.new("RGB", (40, 50), COLOUR))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    for view in views:
        assert view.dtype == torch.float32
        assert torch.allclose(view, normalised(COLOUR)[:, None, None].expand_as(view), atol=1e-5)


def test_solarisation_only_on_global_crops_after_the_first():
    # Solarisation (threshold 128) turns 200 into 255 - 200 = 55 and leaves 100 and 30 alone.
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    transform = MultiCropTransform(
        n_global=3, n_local=2, global_size=16, local_size=8, color_jitter_prob=0, grayscale_prob=0,
        solarization_prob=1.0, mean=mean, std=std,
    )
    views = transform(Image.new("RGB", (20, 20), COLOUR))
    firsts = [views[0]] + views[3:]
    for view in firsts:
        assert torch.allclose(view[:, 0, 0], torch.tensor(COLOUR) / 255, atol=1e-6)
    for view in views[1:3]:
        assert torch.allclose(view[:, 0, 0], torch.tensor((55, 100, 30)) / 255, atol=1e-6)


def test_grayscale_input_gives_three_channels():
    views = MultiCropTransform(n_local=1, global_size=16, local_size=8)(Image.new("L", (20, 20), 90))
    assert [v.shape[0] for v in views] == [3, 3, 3]


def test_default_recipe_on_a_real_looking_image():
    image = Image.fromarray(torch.randint(0, 256, (64, 48, 3), dtype=torch.uint8).numpy())
    views = MultiCropTransform()(image)
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 98, 98)] * 8


def fake_samples(batch, n_global, n_local, g=16, l=8):
    """Crop c of image b is filled with 10 * b + c, so the batch layout can be read back."""
    return [
        [torch.full((3, g, g), 10.0 * b + c) for c in range(n_global)]
        + [torch.full((3, l, l), 10.0 * b + n_global + c) for c in range(n_local)]
        for b in range(batch)
    ]


def test_collate_is_crop_major():
    batch = collate(fake_samples(3, 2, 4), patch_size=4, generator=torch.Generator().manual_seed(0))
    assert batch["global_crops"].shape == (6, 3, 16, 16)
    assert batch["local_crops"].shape == (12, 3, 8, 8)
    # row c * B + b holds crop c of image b
    assert batch["global_crops"][:, 0, 0, 0].tolist() == [0, 10, 20, 1, 11, 21]
    assert batch["local_crops"][:, 0, 0, 0].tolist() == [2, 12, 22, 3, 13, 23, 4, 14, 24, 5, 15, 25]


def test_collate_masks_half_of_the_global_crops():
    samples = fake_samples(8, 2, 0, g=56)
    make = functools.partial(collate, patch_size=4, mask_ratio=(0.2, 0.4))
    batch = make(samples, generator=torch.Generator().manual_seed(0))
    masks = batch["masks"]
    assert masks.shape == (16, 14, 14) and masks.dtype == torch.bool
    counts = masks.flatten(1).sum(1)
    assert int((counts > 0).sum()) == 8
    assert counts.max() <= int(196 * 0.4) and counts[counts > 0].min() >= int(196 * 0.2) - 8
    assert batch["local_crops"] is None
    assert torch.equal(make(samples, generator=torch.Generator().manual_seed(0))["masks"], masks)


def test_collate_rejects_ragged_samples():
    samples = fake_samples(2, 2, 1)
    samples[1] = samples[1][:2]
    with pytest.raises(ValueError, match="same number"):
        collate(samples, patch_size=4)
