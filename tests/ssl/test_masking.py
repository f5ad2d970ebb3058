import random

import pytest
import torch
from torch import nn

from essa import backbones
from essa.ssl.masking import block_mask, block_masks, forward_masked

# block_mask never exceeds its target but stops short when no block adding at most the remaining patches fits in 10
# tries. Measured over 60,000 draws (grids 4x4, 7x7, 8x12, 14x14, 16x16, 37x37; ratios U(0.1, 0.5)): exact in 93 %,
# 1 short in 6.6 %, 2 short in 0.2 %, at most 8 short (once, on 37x37). So a masked crop's measured ratio lies in
# [ratio_min - 8 / (H * W), ratio_max]: on DINOv2's 16x16 grid at most 3 points below 0.1.
SHORTFALL_BOUND = 8


def test_block_mask_never_exceeds_target_and_falls_short_by_at_most_the_bound():
    rng = random.Random(0)
    for grid in [(16, 16), (14, 14), (7, 7), (4, 6)]:
        n = grid[0] * grid[1]
        for _ in range(200):
            target = int(n * rng.uniform(0.1, 0.5))
            mask = block_mask(grid, target, rng)
            assert mask.shape == grid and mask.dtype == torch.bool
            assert target - SHORTFALL_BOUND <= int(mask.sum()) <= target


def test_block_mask_is_made_of_blocks():
    # A single block of at least min_block patches: the masked cells form one filled rectangle.
    mask = block_mask((16, 16), 12, random.Random(3), min_block=12)
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all() and int(mask.sum()) == box.numel() == 12


def test_block_masks_ratio_count_and_shape():
    grid, n = (16, 16), 64
    masks = block_masks(n, grid, ratio=(0.1, 0.5), probability=0.5, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (n, 16, 16) and masks.dtype == torch.bool
    counts = masks.flatten(1).sum(1)
    assert int((counts > 0).sum()) == n // 2  # half of the crops masked, the rest empty
    masked = counts[counts > 0]
    assert masked.min() >= int(256 * 0.1) - SHORTFALL_BOUND and masked.max() <= 256 * 0.5
    assert masked.float().mean() / 256 == pytest.approx(0.3, abs=0.05)  # mean of U(0.1, 0.5)
    # The masked crops sit at random rows, not always the first half.
    assert not (counts[: n // 2] > 0).all()


def test_block_masks_is_deterministic_given_a_generator():
    def draw(seed):
        return block_masks(32, (14, 14), generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_block_masks_rounds_the_masked_count_down():
    masks = block_masks(5, (8, 8), probability=0.5, generator=torch.Generator().manual_seed(0))
    assert int((masks.flatten(1).sum(1) > 0).sum()) == 2
    assert not block_masks(4, (8, 8), probability=0.0).any()


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    vit = backbones.create("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, **kwargs)
    return vit.eval()  # no dropout; forward_features is deterministic


def replace_in_patch_embed(vit, masks, token):
    """Independent reference: forward_features with a hook that puts ``token`` into masked patch embeddings."""

    def hook(module, args, out):
        m = masks.reshape(out.shape[:-1]).unsqueeze(-1)
        return torch.where(m, token, out)

    return vit.patch_embed.register_forward_hook(hook)


@pytest.mark.parametrize("dynamic", [False, True])
def test_forward_masked_without_mask_equals_forward_features(dynamic):
    vit = tiny_vit(dynamic_img_size=dynamic)
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    out = forward_masked(vit, images, masks, torch.randn(vit.embed_dim))
    assert out.shape == (2, 1 + 16, vit.embed_dim)
    assert torch.equal(out, vit.forward_features(images))


@pytest.mark.parametrize("dynamic", [False, True])
def test_forward_masked_puts_the_token_in_masked_patches(dynamic):
    vit = tiny_vit(dynamic_img_size=dynamic)
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 0] = True
    token = nn.Parameter(torch.randn(vit.embed_dim))
    out = forward_masked(vit, images, masks, token)
    with torch.no_grad():
        handle = replace_in_patch_embed(vit, masks, token)
        expected = vit.forward_features(images)
        handle.remove()
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, vit.forward_features(images), atol=1e-3)
    # Flat (B, H*W) masks and a (1, 1, D) token are accepted too.
    assert torch.equal(forward_masked(vit, images, masks.flatten(1), token.reshape(1, 1, -1)), out)
    out.sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


def test_forward_masked_dynamic_non_square_and_registers():
    vit = tiny_vit(dynamic_img_size=True, reg_tokens=2, no_embed_class=True)
    images = torch.randn(2, 3, 48, 24)  # a 6 x 3 grid, unlike the 4 x 4 the model was built for
    masks = torch.zeros(2, 6, 3, dtype=torch.bool)
    masks[:, 4:, :2] = True
    token = torch.randn(vit.embed_dim)
    out = forward_masked(vit, images, masks, token)
    assert out.shape == (2, 1 + 2 + 18, vit.embed_dim)
    handle = replace_in_patch_embed(vit, masks, token)
    expected = vit.forward_features(images)
    handle.remove()
    assert torch.allclose(out, expected, atol=1e-6)


def test_forward_masked_runs_hooks_on_blocks_and_norm():
    # VPT-style hooks: each block inserts prompt tokens after the class token, the final norm strips them.
    vit = tiny_vit()
    prompts = torch.randn(1, 3, vit.embed_dim)

    def insert(block, args):
        x = args[0]
        return (torch.cat([x[:, :1], prompts.expand(len(x), -1, -1), x[:, 1:]], dim=1),)

    def strip(norm, args):
        x = args[0]
        return (torch.cat([x[:, :1], x[:, 1 + 3 * len(vit.blocks) :]], dim=1),)

    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    plain = vit.forward_features(images)
    for block in vit.blocks:
        block.register_forward_pre_hook(insert)
    vit.norm.register_forward_pre_hook(strip)
    out = forward_masked(vit, images, masks, torch.zeros(vit.embed_dim))
    assert out.shape == (2, 17, vit.embed_dim)
    assert torch.equal(out, vit.forward_features(images))
    assert not torch.allclose(out, plain, atol=1e-3)  # the prompts were really inserted


def test_forward_masked_with_gradient_checkpointing():
    vit = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    masks = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.3
    token = torch.randn(vit.embed_dim)
    expected = forward_masked(vit, images, masks, token)
    vit.set_grad_checkpointing(True)
    assert torch.allclose(forward_masked(vit, images, masks, token), expected, atol=1e-6)


def test_forward_masked_rejects_masks_off_the_grid():
    vit = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"masks must be bool .* got torch.bool \(2, 3, 3\)"):
        forward_masked(vit, images, torch.zeros(2, 3, 3, dtype=torch.bool), torch.zeros(vit.embed_dim))
    with pytest.raises(ValueError, match="masks must be bool"):
        forward_masked(vit, images, torch.zeros(2, 4, 4), torch.zeros(vit.embed_dim))
