"""SimMIM pieces (essa.ssl.simmim): cell masks, the mask-cell size, the L1 loss on masked pixels only, and the
encoder with the learned mask token."""

import math

import pytest
import torch

from essa import backbones
from essa.ssl.masking import forward_masked
from essa.ssl.simmim import SimMIM, cell_masks, mask_cell, simmim_loss


def test_cell_masks_are_squares_of_patches_and_hide_the_ratio_of_cells():
    masks = cell_masks(32, (8, 8), cell=2, ratio=0.6, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (32, 8, 8) and masks.dtype == torch.bool
    cells = masks[:, ::2, ::2]
    # every 2 x 2 square is all masked or all visible
    assert torch.equal(cells.repeat_interleave(2, 1).repeat_interleave(2, 2), masks)
    assert cells.flatten(1).sum(1).tolist() == [math.ceil(16 * 0.6)] * 32
    assert len({tuple(m.flatten().tolist()) for m in cells}) > 25
    assert torch.equal(masks, cell_masks(32, (8, 8), 2, 0.6, generator=torch.Generator().manual_seed(0)))
    # a cell that does not divide the grid: the edge squares are cut off
    edge = cell_masks(4, (5, 7), cell=2, ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert edge.shape == (4, 5, 7) and edge.any() and not edge.all()


def test_the_mask_cell_is_32_px_or_what_fits_the_image():
    assert mask_cell(192, 16) == 2 and mask_cell(224, 16) == 2  # 32 px, the paper's
    assert mask_cell(224, 14) == 2  # 28 px: the multiple of 14 up to 32
    assert mask_cell(32, 4) == 2 and mask_cell(32, 8) == 1  # 8 px: at least 4 cells across a 32 px image
    assert mask_cell(224, 16, 64) == 4
    with pytest.raises(ValueError, match="simmim.mask_patch_size=12 must be a multiple of the backbone's patch size 8"):
        mask_cell(32, 8, 12)


def test_the_loss_counts_only_the_masked_pixels():
    torch.manual_seed(0)
    images, pred = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 8 * 8 * 3)
    masks = torch.tensor([[[True, False], [False, False]], [[True, True], [False, True]]])
    loss = simmim_loss(pred, images, masks, 8)
    pixel_masks = masks.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand_as(images)
    # the mean absolute error over the masked pixels' values (4 masked patches x 64 pixels x 3 channels)
    from essa.ssl.mim import unpatchify

    diff = (unpatchify(pred, (2, 2), 8) - images).abs()
    assert loss.item() == pytest.approx(diff[pixel_masks].sum().item() / (4 * 64 * 3), rel=1e-6)
    # changing unmasked target pixels leaves the loss as it is; changing a masked one changes it
    visible_changed = torch.where(pixel_masks, images, torch.randn_like(images))
    assert torch.equal(simmim_loss(pred, visible_changed, masks, 8), loss)
    masked_changed = images.clone()
    masked_changed[0, 1, 3, 5] += 1.0  # patch (0, 0) of image 0: masked
    assert simmim_loss(pred, masked_changed, masks, 8) != loss
    # and the visible patches' predictions do not count either
    assert torch.equal(simmim_loss(torch.where(masks.flatten(1)[..., None], pred, 0.0), images, masks, 8), loss)


def test_the_encoder_gets_the_mask_token_and_the_decoder_predicts_every_patch():
    torch.manual_seed(0)
    vit = backbones.create("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                           dynamic_img_size=True).eval()
    model = SimMIM(vit)
    images = torch.randn(2, 3, 32, 32)
    masks = cell_masks(2, (4, 4), cell=2, ratio=0.5, generator=torch.Generator().manual_seed(0))
    loss, pred, tokens = model(images, masks)
    assert torch.equal(tokens, forward_masked(vit, images, masks, model.mask_token))
    assert pred.shape == (2, 16, 8 * 8 * 3) and torch.equal(pred, model.decoder(tokens[:, 1:]))
    assert torch.equal(loss, simmim_loss(pred, images, masks, 8))
    loss.backward()
    assert model.mask_token.grad.abs().sum() > 0 and model.decoder.weight.grad.abs().sum() > 0
    recon = model.reconstruct(images, masks)
    keep = ~masks.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand_as(images)
    assert torch.equal(recon[keep], images[keep])
