"""MAE pieces (essa.ssl.mae) on tiny random-weight ViTs: masks, the encoder on visible tokens only, the decoder and
the loss against formulas written out by hand; the reconstruction module with tuners (APLA rows, LoRA, VPT, the
frozen-stretch recompute) and a loss that falls."""

import pytest
import torch

from essa import backbones, tuners
from essa.adaptation import resolve_config
from essa.ssl.mae import MAE, MAEDecoder, encode_visible, mae_loss, num_masked, random_masks
from essa.ssl.mim import patchify, unpatchify


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    args = {"img_size": 32, "patch_size": 8, "depth": 2, **kwargs}
    return backbones.create("vit_tiny_patch16_224", pretrained=False, **args).eval()


def test_random_masks_hide_the_same_count_in_every_image_at_random_places():
    masks = random_masks(64, (4, 5), 0.75, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (64, 4, 5) and masks.dtype == torch.bool
    assert masks.flatten(1).sum(1).tolist() == [15] * 64 == [num_masked(20, 0.75)] * 64
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 50  # drawn per image
    assert masks.float().mean(0).min() > 0.4  # every place gets masked in some image
    assert torch.equal(masks, random_masks(64, (4, 5), 0.75, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(masks, random_masks(64, (4, 5), 0.75, generator=torch.Generator().manual_seed(1)))
    assert num_masked(4, 0.1) == 1 and num_masked(4, 0.99) == 3  # at least one masked and one visible
    with pytest.raises(ValueError, match="ratio must be in"):
        random_masks(2, (4, 4), 1.0)


def test_patchify_orders_patches_row_major_and_inverts():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 8 * 8 * 3)
    # patch (row 1, column 2) is the 5th of a 2 x 3 grid; its values ordered (row, column, channel)
    assert torch.equal(patches[1, 5], images[1, :, 8:16, 16:24].permute(1, 2, 0).flatten())
    assert torch.equal(unpatchify(patches, (2, 3), 8), images)


@pytest.mark.parametrize("options", [{}, {"reg_tokens": 2, "no_embed_class": True, "class_token": True}],
                         ids=["cls", "registers-no-embed-class"])
def test_the_encoder_receives_exactly_the_prefix_and_visible_tokens(options):
    vit = tiny_vit(dynamic_img_size=True, **options)
    images = torch.randn(3, 3, 24, 40)  # a 3 x 5 grid, not the 4 x 4 the model was built for
    masks = random_masks(3, (3, 5), 0.6, generator=torch.Generator().manual_seed(0))
    seen = []
    handle = vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        out = encode_visible(vit, images, masks)
        handle.remove()
        prefix = vit.num_prefix_tokens
        full = vit._pos_embed(vit.patch_embed(images))  # every token with its position, as forward_features has it
    K = 15 - num_masked(15, 0.6)
    assert prefix == 1 + options.get("reg_tokens", 0)
    assert seen[0].shape == out.shape == (3, prefix + K, vit.embed_dim)
    for b in range(3):
        visible = [i for i in range(15) if not masks[b].flatten()[i]]
        expected = torch.cat([full[b, :prefix], full[b, prefix + torch.tensor(visible)]])
        assert torch.equal(seen[0][b], expected)
    # the masked patches' pixels do not reach the encoder at all
    pixel_masks = masks.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    with torch.no_grad():
        other = encode_visible(vit, torch.where(pixel_masks, torch.randn_like(images), images), masks)
    assert torch.allclose(other, out, atol=1e-6)
    uneven = torch.zeros(3, 3, 5, dtype=torch.bool)
    uneven[0, 0, 0] = True
    with pytest.raises(ValueError, match="same number of patches in every image"):
        encode_visible(vit, images, uneven)


def _naive_loss(pred, images, masks, p, norm_pix):
    """Per image, per masked patch: cut the patch out by hand, normalise, mean squared error; mean over them."""
    errors = []
    B, _, H, W = images.shape
    for b in range(B):
        for r in range(H // p):
            for c in range(W // p):
                if not masks[b, r, c]:
                    continue
                patch = images[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1).double()
                if norm_pix:
                    patch = (patch - patch.mean()) / (patch.var(unbiased=False) + 1e-6).sqrt()
                errors.append(((pred[b, r * (W // p) + c].double() - patch) ** 2).mean())
    return torch.stack(errors).mean()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_the_loss_is_the_mean_squared_error_of_the_masked_patches(norm_pix):
    torch.manual_seed(1)
    images, pred = torch.randn(3, 3, 16, 24), torch.randn(3, 6, 192)
    masks = random_masks(3, (2, 3), 0.5, generator=torch.Generator().manual_seed(0))
    loss = mae_loss(pred, images, masks, 8, norm_pix)
    assert loss.item() == pytest.approx(_naive_loss(pred, images, masks, 8, norm_pix).item(), rel=1e-6)
    # the visible patches' predictions do not count
    other = torch.where(masks.flatten(1)[..., None], pred, torch.randn_like(pred))
    assert torch.equal(mae_loss(other, images, masks, 8, norm_pix), loss)


def test_the_whole_mae_loss_from_images_equals_the_naive_formula_on_its_predictions():
    vit = tiny_vit(dynamic_img_size=True)
    model = MAE(vit, MAEDecoder(vit.embed_dim, 8, width=32, depth=1, heads=4))
    images = torch.randn(2, 3, 32, 32)
    masks = random_masks(2, (4, 4), 0.75, generator=torch.Generator().manual_seed(0))
    loss, pred, tokens = model(images, masks)
    assert pred.shape == (2, 16, 8 * 8 * 3) and tokens.shape == (2, 1 + 4, vit.embed_dim)
    assert loss.item() == pytest.approx(_naive_loss(pred.detach(), images, masks, 8, True).item(), rel=1e-6)
    loss.backward()
    assert model.decoder.mask_token.grad.abs().sum() > 0 and vit.blocks[0].attn.proj.weight.grad.abs().sum() > 0
    recon = model.reconstruct(images, masks)  # the visible patches as given
    keep = ~masks.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand_as(images)
    assert recon.shape == images.shape and torch.allclose(recon[keep], images[keep], atol=1e-5)


def test_the_decoder_puts_the_mask_token_in_masked_places_and_sees_positions():
    decoder = MAEDecoder(12, 4, width=16, depth=1, heads=2)
    masks = torch.tensor([[[True, False], [True, True]]])
    tokens = torch.randn(1, 1 + 1, 12)  # the class token and one visible patch
    seen = []
    decoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    out = decoder(tokens, masks, num_prefix_tokens=1)
    assert out.shape == (1, 4, 4 * 4 * 3)
    pos = decoder.position_embedding((2, 2), tokens)
    x = seen[0][0]
    assert torch.allclose(x[0], decoder.embed(tokens)[0, 0])  # the class token, no position
    assert torch.allclose(x[2], decoder.embed(tokens)[0, 1] + pos[1], atol=1e-6)  # the visible patch at place 1
    for place in (0, 2, 3):  # masked: the mask token at its place
        assert torch.allclose(x[1 + place], decoder.mask_token[0, 0] + pos[place], atol=1e-6)
    assert not torch.allclose(x[1], x[3])  # the mask tokens differ by position


# ----- the reconstruction module with tuners -------------------------------------------------------------------
def _module(objective, tuner, options=None, **sections):
    from essa.objectives import get

    cfg = resolve_config(None, sections={
        "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False, "model_args": {"patch_size": 8, "depth": 2}},
        "tuner": {"name": tuner, "options": options or {}}, "objective": objective, "data": {"root": "unused"},
        "ssl": {"global_size": 32}, "mae": {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 4},
        "optim": {"warmup": 0, "epochs": 1}, **sections,
    })
    torch.manual_seed(0)
    backbone = cfg.backbone.build(img_size=32, dynamic_img_size=True)
    tuners.apply(backbone, tuner, **(options or {}))
    module = get(objective).module(cfg, backbone, iters_per_epoch=100)
    module.train()
    return module, cfg


def _batch(objective, cfg, n=4, seed=0):
    from essa.objectives import get

    torch.manual_seed(seed)
    images = list(torch.randn(n, 3, 32, 32))
    return get(objective).collate(cfg, 8)(images, generator=torch.Generator().manual_seed(seed))


def test_apla_rows_inside_mae_change_alone_after_a_step():
    module, cfg = _module("mae", "apla", {"r": 5})
    backbone = module.model.backbone
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    merged_before = [block.attn.proj.merged().weight.detach().clone() for block in backbone.blocks]
    opt = module.configure_optimizers()
    module.standalone_step(_batch("mae", cfg), opt, cfg.optim.grad_clip)
    for name, p in backbone.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name  # what trains moved, nothing else did
    for block, old in zip(backbone.blocks, merged_before):
        changed = (block.attn.proj.merged().weight != old).any(1).nonzero().flatten()
        assert changed.tolist() == block.attn.proj.rows.tolist()  # exactly the chosen rows of W_O


@pytest.mark.parametrize("tuner, options, extra", [("apla", {"r": 5}, 0), ("lora", {"r": 2}, 0),
                                                   ("vpt", {"tokens": 3}, 3), ("full", {}, 0)])
@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_every_block_of_the_tuned_encoder_sees_only_the_visible_tokens(objective, tuner, options, extra):
    module, cfg = _module(objective, tuner, options)
    backbone = module.model.backbone
    recomputed = [n for n, b in enumerate(backbone.blocks) if "forward" in vars(b)]
    assert recomputed == [0, 1]  # optim.recompute_frozen's forward is in place (it recomputes nothing for full)
    counts = []
    for block in backbone.blocks:
        block.register_forward_pre_hook(lambda module, args: counts.append(args[0].shape[1]))
    opt = module.configure_optimizers()
    module.standalone_step(_batch(objective, cfg), opt, cfg.optim.grad_clip)
    # MAE: the class token and the 4 visible patches; SimMIM: every patch (mask tokens in the masked ones); and
    # VPT's prompts
    patches = 16 - num_masked(16, 0.75) if objective == "mae" else 16
    assert counts == [1 + patches + extra] * 2
    trained = [p for p in backbone.parameters() if p.requires_grad]
    # every trained tensor got its gradient (LoRA's A starts at a zero gradient: its B starts at zero)
    assert trained and all(p.grad is not None for p in trained) and any(p.grad.abs().sum() > 0 for p in trained)


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_the_reconstruction_loss_falls_on_a_few_images(objective):
    module, cfg = _module(objective, "full", optim={"warmup": 0, "epochs": 1, "lr": 1e-3, "min_lr": 1e-3})
    from PIL import Image
    from tests.conftest import SHARED

    folder = SHARED / "data" / "chest_xray_pneumonia" / "train" / "NORMAL"
    if not folder.is_dir():
        pytest.skip(f"shared chest X-rays not found at {folder}")
    from essa.data import normalize
    from essa.objectives import get

    view = get(objective).preview_transform(cfg, normalize.IMAGENET)
    images = [view(Image.open(path)) for path in sorted(folder.iterdir())[:4]]
    batch = get(objective).collate(cfg, 8)(images, generator=torch.Generator().manual_seed(0))
    opt = module.configure_optimizers()
    losses = [float(module.standalone_step(batch, opt, 1.0)) for _ in range(25)]
    # the same images and masks each step: the loss must fall well below where it started, not wander
    assert losses[-1] < 0.6 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_a_non_finite_loss_stops_the_run_with_a_message(objective):
    from essa.train.ssa import CollapseError

    module, cfg = _module(objective, "apla", {"r": 5})
    with torch.no_grad():
        (module.model.decoder.pred if objective == "mae" else module.model.decoder).weight.fill_(float("nan"))
    with pytest.raises(CollapseError, match=rf"SSA \({objective}\) diverged at epoch 0, step 0: non-finite loss nan"):
        module.standalone_step(_batch(objective, cfg), module.configure_optimizers(), 1.0)
