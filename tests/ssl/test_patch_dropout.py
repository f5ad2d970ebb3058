"""essa.ssl.patch_dropout (kept counts, seeded draws, the gather, the collate) and essa.ssl.prefix (a timm ViT's
forward split around a block)."""

import functools

import pytest
import torch

from essa import tuners
from essa.ssl import collate
from essa.ssl.patch_dropout import check_drop, collate_kept, draw_kept, keep_patches, kept_count
from essa.ssl.prefix import tokens_after, tokens_before, unsplittable
from tests.conftest import tiny_vit


@pytest.mark.parametrize("patches,drop,kept", [(16, 0.0, 16), (16, 0.5, 8), (16, 0.3, 11), (4, 0.3, 2),
                                               (4, 0.9, 1), (256, 0.75, 64)])
def test_the_kept_count_is_timms_floor_with_at_least_one(patches, drop, kept):
    assert kept_count(patches, drop) == kept


@pytest.mark.parametrize("bad", [1, 1.0, -0.1, True, "0.5", None])
def test_a_drop_outside_zero_to_one_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"ssl.patch_drop=.* must be a fraction in \[0, 1\)"):
        check_drop(bad, "ssl.patch_drop")


def test_draws_are_sorted_distinct_subsets_fixed_by_the_generator():
    kept = draw_kept(50, 16, 0.5, torch.Generator().manual_seed(3))
    assert kept.shape == (50, 8) and kept.dtype == torch.int64
    assert all(row.unique().numel() == 8 and torch.equal(row, row.sort().values) for row in kept)
    assert 0 <= int(kept.min()) and int(kept.max()) < 16
    assert torch.equal(kept, draw_kept(50, 16, 0.5, torch.Generator().manual_seed(3)))
    assert not torch.equal(kept, draw_kept(50, 16, 0.5, torch.Generator().manual_seed(4)))
    assert len({tuple(row.tolist()) for row in kept}) > 40  # rows drawn apart, not one subset repeated
    # every patch is kept about half the time
    share = torch.bincount(draw_kept(4000, 16, 0.5, torch.Generator().manual_seed(0)).flatten(), minlength=16) / 4000
    assert (share - 0.5).abs().max() < 0.05


def test_the_gather_keeps_the_prefix_then_the_indexed_patches():
    tokens = torch.randn(2, 2 + 6, 3)  # 2 prefix tokens (class + register)
    kept = torch.tensor([[0, 4], [1, 5]])
    out = keep_patches(tokens, kept, num_prefix_tokens=2)
    assert torch.equal(out[:, :2], tokens[:, :2])
    assert torch.equal(out[0, 2:], tokens[0, [2, 6]]) and torch.equal(out[1, 2:], tokens[1, [3, 7]])


def test_collate_adds_kept_patches_after_the_unchanged_masks():
    g = torch.Generator().manual_seed(0)
    samples = [[torch.randn(3, 32, 32, generator=g), torch.randn(3, 32, 32, generator=g),
                torch.randn(3, 16, 16, generator=g)] for _ in range(3)]
    base = functools.partial(collate, patch_size=8, n_global=2)
    plain = base(samples, generator=torch.Generator().manual_seed(7))
    batch = collate_kept(samples, collate=base, patch_size=8, drop=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(batch["masks"], plain["masks"]) and torch.equal(batch["global_crops"], plain["global_crops"])
    assert batch["kept_global"].shape == (6, 8) and batch["kept_local"].shape == (3, 2)  # 16 and 4 patches
    again = collate_kept(samples, collate=base, patch_size=8, drop=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again["kept_global"], batch["kept_global"]) and torch.equal(again["kept_local"],
                                                                                  batch["kept_local"])
    no_local = collate_kept([s[:2] for s in samples], collate=base, patch_size=8, drop=0.5)
    assert no_local["local_crops"] is None and no_local["kept_local"] is None


def test_the_dinov2_collate_draws_kept_patches_only_with_patch_drop():
    from essa.adaptation import resolve_config
    from essa.objectives import DINOv2

    samples = [[torch.randn(3, 32, 32), torch.randn(3, 32, 32), torch.randn(3, 16, 16)] for _ in range(2)]
    for drop, keys in ((0.0, {"global_crops", "local_crops", "masks"}),
                       (0.25, {"global_crops", "local_crops", "masks", "kept_global", "kept_local"})):
        cfg = resolve_config(None, sections={"data": {"root": "unused"}, "ssl": {"patch_drop": drop, "n_local": 1}})
        batch = DINOv2().collate(cfg, 8)(samples, generator=torch.Generator().manual_seed(0))
        assert set(batch) == keys
    assert batch["kept_global"].shape == (4, 12)


# ----- the split forward ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tuner,options", [(None, {}), ("vpt", {"tokens": 2}), ("apla", {"r": 8})])
def test_the_split_forward_is_forward_features_bit_for_bit(tuner, options, images):
    vit = tiny_vit(dynamic_img_size=True, reg_tokens=2)
    if tuner:
        tuners.apply(vit, tuner, **options)
    vit.eval()
    assert unsplittable(vit) is None
    with torch.no_grad():
        whole = vit.forward_features(images)
        for k in range(len(vit.blocks) + 1):
            assert torch.equal(tokens_after(vit, tokens_before(vit, images, k), k), whole), k


def test_the_split_forward_honours_gradient_checkpointing(images):
    vit = tiny_vit(dynamic_img_size=True)
    tuners.apply(vit, "apla", blocks=[2, 3])
    out = vit.forward_features(images)
    grads = torch.autograd.grad(out.square().sum(), [p for p in vit.parameters() if p.requires_grad])
    vit.set_grad_checkpointing(True)
    split = tokens_after(vit, tokens_before(vit, images, 2), 2)
    assert torch.equal(split, out)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(
        split.square().sum(), [p for p in vit.parameters() if p.requires_grad])))


def test_kept_patches_keep_their_position_embeddings(images):
    # attention does not see token order, so keeping every patch in another order permutes the patch outputs and
    # leaves the class token's: position embeddings travel with their patches
    vit = tiny_vit(dynamic_img_size=True).eval()
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0)).expand(2, -1)
    with torch.no_grad():
        whole = vit.forward_features(images)
        shuffled = tokens_after(vit, tokens_before(vit, images, 1, order), 1)
        half = tokens_after(vit, tokens_before(vit, images, 0, order[:, :8]), 0)
    assert torch.allclose(shuffled[:, 0], whole[:, 0], atol=1e-5)
    assert torch.allclose(shuffled[:, 1:], whole[:, 1:][:, order[0]], atol=1e-5)
    assert half.shape == (2, 1 + 8, vit.embed_dim) and not torch.allclose(half[:, 0], whole[:, 0], atol=1e-3)


def test_a_model_whose_forward_the_split_would_not_reproduce_is_named():
    vit = tiny_vit()
    vit.blocks.register_forward_hook(lambda module, args, out: out)
    assert "forward hooks" in unsplittable(vit)
    assert "not a timm VisionTransformer" in unsplittable(torch.nn.Linear(2, 2))
