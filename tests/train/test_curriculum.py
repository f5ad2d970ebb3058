"""Low resolution first (``ssl.curriculum``, FastDINOv2): the loader's crops are smaller for exactly the steps before
the switch (decided by the optimisation step, so a resumed run gets the same crops), the masks and kept patches on
each phase's patch grid, the step runs on either size (ViT and Eva), the lengths resolve as the other schedule
lengths do, bad values are refused by name, an empty low phase changes nothing, and a run killed before the switch
resumes to the uninterrupted run's export, bit for bit."""

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from essa import config as config_mod, tuners
from essa.adaptation import adapt, build_loader, resolve_config
from essa.config import ConfigError
from essa.objectives import DINOv2
from essa.ssl import ssa_schedules
from essa.ssl.patch_dropout import kept_count
from essa.train.loader import mix_seed
from essa.train.ssa import SSAModule
from tests.train.test_adapt import TINY, XRAYS, _cfg, folders  # noqa: F401  (folders: the fixture)
from tests.train.test_reliability import _killed, _same_weights, _strip
from tests.train.test_ssa_speed import _step

PATCH = 8


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """12 random 40 px RGB pictures in a folder."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _loader_cfg(root, **ssl):
    return resolve_config(None, sections={
        "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False, "model_args": {"patch_size": PATCH}},
        "data": {"root": str(root), "num_workers": 2}, "optim": {"epochs": 3, "batch_size": 4},
        "ssl": {"n_local": 2, "global_size": 64, "curriculum": 5, **ssl}})


def _batches(loader, epochs):
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        yield from ((epoch, b, batch) for b, batch in enumerate(loader))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_crops_are_low_before_the_switch_and_full_after_with_masks_and_kept_patches_on_each_grid(pictures,
                                                                                                     accumulate):
    # 12 pictures, 4 per batch: 3 batches an epoch; with 2 batches to a step, 2 steps an epoch (the last one short)
    cfg = _loader_cfg(pictures, patch_drop=0.5)
    loader = build_loader(cfg, PATCH)
    loader.sampler.key_phases((5,), accumulate)
    steps_per_epoch = -(-3 // accumulate)
    seen = []
    for epoch, b, batch in _batches(loader, 3 if accumulate == 1 else 4):
        step = epoch * steps_per_epoch + b // accumulate
        size, local = (32, 16) if step < 5 else (64, 32)  # half of 64; local 7/16 of 64 = 28 -> 32, halved: 16
        grid = size // PATCH
        assert batch["global_crops"].shape == (2 * 4, 3, size, size), (step, batch["global_crops"].shape)
        assert batch["local_crops"].shape == (2 * 4, 3, local, local)
        assert batch["masks"].shape == (2 * 4, grid, grid) and batch["masks"].any()
        assert batch["kept_global"].shape == (2 * 4, kept_count(grid * grid, 0.5))
        assert batch["kept_local"].shape == (2 * 4, kept_count((local // PATCH) ** 2, 0.5))
        seen.append(step)
    # Lightning's global_step of each batch: with 2 batches to a step, the last batch of an epoch is a step alone
    assert seen == (list(range(9)) if accumulate == 1 else [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7])


def test_a_loader_resumed_mid_epoch_across_the_switch_gives_the_same_crops(pictures):
    cfg = _loader_cfg(pictures, curriculum=4)  # steps 0-3 low: the switch in the middle of epoch 1
    whole = build_loader(cfg, PATCH)
    whole.sampler.key_phases((4,))
    reference = [batch for epoch, _, batch in _batches(whole, 2) if epoch == 1]
    resumed = build_loader(cfg, PATCH)
    resumed.sampler.key_phases((4,))
    resumed.load_state_dict({"epoch": 1, "batches": 1})  # a checkpoint after step 3, the last low one
    tail = list(resumed)
    assert [b["global_crops"].shape[-1] for b in reference] == [32, 64, 64]
    assert len(tail) == 2
    for a, b in zip(reference[1:], tail):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_a_phase_in_the_keys_a_phased_loader_says_what_is_missing(pictures):
    cfg = _loader_cfg(pictures)
    cfg.data.num_workers = 0
    with pytest.raises(RuntimeError, match="key its samples by phase"):
        next(iter(build_loader(cfg, PATCH)))


# ----- the length and the sizes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, switch", [(0, 0), (0.75, 9), (5, 5), ("2 epochs", 8), ("1.5 ep", 6), ("0 epochs", 0)])
def test_the_length_resolves_as_the_other_schedule_lengths(value, switch):
    s = ssa_schedules(3, 4, lr=1e-3, curriculum=value)  # 12 steps of 4 per epoch
    assert s.switch_step == switch and s.low_res.tolist() == [True] * switch + [False] * (12 - switch)
    assert not s.warnings


@pytest.mark.parametrize("value", [20, "5 epochs"])
def test_a_low_phase_longer_than_the_run_is_clamped_to_leave_the_last_step_at_full_size_and_warned(value):
    s = ssa_schedules(3, 4, lr=1e-3, curriculum=value)
    assert s.switch_step == 11 and not s.low_res[-1]
    assert any(w.startswith(f"ssl.curriculum={value!r} is 20 steps, longer than this run of 12 steps") and
               w.endswith("clamped to 11") for w in s.warnings), s.warnings


BACKBONE = {"name": "vit_tiny_patch16_224", "pretrained": False, "model_args": {"patch_size": PATCH, "depth": 2}}


@pytest.mark.parametrize("ssl, message", [
    ({"curriculum": -1}, "ssl.curriculum=-1.0: give a fraction of the run in [0, 1)"),
    ({"curriculum": 1.5}, "ssl.curriculum=1.5: a fraction of the run is below 1 and a number of steps is whole"),
    ({"curriculum": "3 weeks"}, "ssl.curriculum='3 weeks': give a fraction"),
    ({"curriculum_size": 32}, ("ssl.curriculum_size=32 is the size of the low-resolution phase, which "
                               "ssl.curriculum sets the length of")),
    ({"curriculum": 0.5, "curriculum_size": 64}, "ssl.curriculum_size=64 must be smaller than ssl.global_size=64"),
    ({"curriculum": 0.5, "curriculum_size": 0}, "ssl.curriculum_size=0 must be at least 1"),
])
def test_bad_values_are_refused_by_name(ssl, message):
    with pytest.raises(ConfigError) as err:
        resolve_config(None, sections={"backbone": BACKBONE, "data": {"root": "unused"},
                                       "ssl": {"global_size": 64, **ssl}})
    assert message in str(err.value)


@pytest.mark.parametrize("ssl, message", [
    ({"curriculum_size": 28}, "ssl.curriculum_size=28 is not a multiple of the backbone's patch size 8: use 32"),
    ({"global_size": 8}, ("ssl.curriculum_size=8 is not smaller than ssl.global_size=8 (one patch of 8 px: there "
                          "is no lower size)")),
])
def test_sizes_the_patch_size_does_not_allow_are_refused_before_any_work(ssl, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        adapt(backbone=BACKBONE, data={"root": str(tmp_path)}, out=str(tmp_path / "run"),
              ssl={"global_size": 64, "curriculum": 0.5, **ssl})
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("objective, why", [("mae", "mae's masks are drawn on the patch grid of ssl.global_size"),
                                            ("simmim", "simmim's mask cells and masks are sized to ssl.global_size")])
def test_the_reconstruction_objectives_refuse_it_and_say_why(objective, why):
    with pytest.raises(ConfigError, match="applies to objective=dinov2 only") as err:
        resolve_config(None, sections={"objective": objective, "data": {"root": "unused"}, "ssl": {"curriculum": 0.5}})
    assert why in str(err.value)


# ----- the step on low-resolution crops -----------------------------------------------------------------------------

def _module(backbone, tuner="apla", options=None, **ssl):
    cfg = resolve_config(None, sections={
        "backbone": backbone, "tuner": {"name": tuner, "options": options or {}}, "data": {"root": "unused"},
        "ssl": {"prototypes": 256, "head_hidden": 64, "head_bottleneck": 32, "n_local": 2, "global_size": 32,
                "head_warmup": 0, "freeze_prototypes": 0, "curriculum": 2, **ssl}})
    torch.manual_seed(0)
    vit = cfg.backbone.build(img_size=32, dynamic_img_size=True)
    tuners.apply(vit, tuner, **(options or {}))
    module = SSAModule(cfg, vit, iters_per_epoch=4)
    module._it = 0
    return module


def _batch(module, size, local, n_images=3):
    g = torch.Generator().manual_seed(0)
    samples = [[torch.randn(3, size, size, generator=g) for _ in range(2)] +
               [torch.randn(3, local, local, generator=g) for _ in range(2)] for _ in range(n_images)]
    return DINOv2().collate(module.cfg, PATCH)(samples, generator=torch.Generator().manual_seed(mix_seed(0, 0, 0)))


EVA = {"name": "vit_small_patch16_dinov3", "pretrained": False,
       "model_args": {"patch_size": PATCH, "depth": 2, "embed_dim": 64, "num_heads": 2, "init_values": 0.5}}


@pytest.mark.parametrize("backbone", [BACKBONE, EVA], ids=["vit", "eva-rope"])
def test_a_step_on_low_resolution_crops_trains_like_one_on_full_size_crops(backbone):
    """Position embeddings (a ViT's resampled, an Eva's RoPE of the grid) follow the crops' patch grid, as they
    already do for the local crops: the step runs on 16 px global crops (2 x 2 patches) as on 32 px ones."""
    module = _module(backbone)
    assert module.curriculum == {"switch_step": 2, "low": {"global_size": 16, "local_size": 8},
                                 "full": {"global_size": 32, "local_size": 16}}
    for size, local in ((16, 8), (32, 16)):
        batch = _batch(module, size, local)
        assert batch["masks"].shape[-2:] == (size // PATCH,) * 2
        loss, grads = _step(module, batch)
        assert torch.isfinite(loss)
        assert all(torch.isfinite(g).all() for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("patch_drop", [0.0, 0.5], ids=["shared-prefix", "patch-drop"])
def test_the_truncated_step_on_low_resolution_crops_gives_the_full_autograd_step(patch_drop):
    """``ssl.truncated_backward`` (and with ``ssl.patch_drop``) in the low phase: the same loss and gradients as the
    step without truncation on the same low-resolution batch."""
    options = {"blocks": [1]}  # block 0 frozen: the prefix the truncation runs without autograd
    truncated = _module(BACKBONE, options=options, patch_drop=patch_drop)
    reference = _module(BACKBONE, options=options, patch_drop=patch_drop, truncated_backward="off")
    assert truncated.truncation.frozen_blocks == 1 and truncated.truncation.shared_prefix == (not patch_drop)
    batch = _batch(truncated, 16, 8)
    (loss_ref, grads_ref), (loss, grads) = _step(reference, batch), _step(truncated, batch)
    assert torch.allclose(loss, loss_ref, rtol=1e-6, atol=0)
    assert grads.keys() == grads_ref.keys()
    for key in grads_ref:  # the rows run in other groupings: float rounding apart (test_ssa_speed's tolerance)
        scale = float(grads_ref[key].abs().max())
        assert scale > 0 and torch.allclose(grads[key], grads_ref[key], rtol=1e-5, atol=1e-6 * scale), key


# ----- runs ---------------------------------------------------------------------------------------------------------

#: 24 X-rays, 8 a batch: 3 steps an epoch, 6 in all; steps 0-3 at 24 px (3 x 3 patches; local 16 px), 4-5 at 48 px
#: (local 24 px); block 0 frozen (the truncated backward) and PatchDropout on the CLS-only views
CURRICULUM = {"optim": {"epochs": 2, "batch_size": 8},
              "tuner": {"name": "apla", "options": {"r": 16, "blocks": [1]}},
              "ssl": {**TINY["ssl"], "global_size": 48, "curriculum": 4, "patch_drop": 0.25}}


class _Seen(L.Callback):
    """(global step, global crop size, local crop size, mask grid, loss) of every training batch."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((pl_module.global_step - 1, batch["global_crops"].shape[-1], batch["local_crops"].shape[-1],
                          batch["masks"].shape[-1], float(outputs["loss"])))


needs_xrays = pytest.mark.skipif(not XRAYS.is_dir(), reason=f"shared chest X-rays not found at {XRAYS}")


@pytest.fixture(scope="module")
def reference(folders, tmp_path_factory):  # noqa: F811
    seen = _Seen()
    result = adapt(_cfg(folders, tmp_path_factory.mktemp("ref") / "run", **CURRICULUM),
                   trainer_kwargs={"callbacks": [seen]})
    return result, seen.rows


@needs_xrays
def test_a_run_trains_at_the_low_size_until_the_switch_step_then_at_the_full_size(reference):
    result, rows = reference
    assert [r[:4] for r in rows] == [(s, 24, 16, 3) for s in range(4)] + [(s, 48, 24, 6) for s in range(4, 6)]
    assert all(np.isfinite(r[4]) for r in rows)
    assert [r["low_res"] for r in result["metrics"]] == pytest.approx([1.0, 1 / 3])
    assert all(np.isfinite(r["total"]) for r in result["metrics"])
    resources = result["resources"]
    curriculum = resources["curriculum"]
    assert {k: {kk: vv for kk, vv in v.items() if kk != "images_per_s"} if isinstance(v, dict) else v
            for k, v in curriculum.items()} == {"switch_step": 4, "low": {"global_size": 24, "local_size": 16},
                                                "full": {"global_size": 48, "local_size": 24}}
    assert curriculum["low"]["images_per_s"] > 0 and curriculum["full"]["images_per_s"] > 0
    assert resources["truncated_backward"]["frozen_blocks"] == 1  # the truncation applied in both phases


@pytest.mark.slow
@needs_xrays
def test_a_run_killed_before_the_switch_resumes_to_the_same_export(folders, tmp_path, reference):  # noqa: F811
    out = tmp_path / "killed"
    out.mkdir()
    config_mod.dump(_cfg(folders, out, **CURRICULUM), out / "given.yaml")
    # last.ckpt after step 0, mid-epoch 0: the resumed session runs steps 1-3 at the low size and switches at step 4,
    # in the middle of epoch 1
    _killed("adapt", out / "given.yaml", "step:1")
    with pytest.warns(UserWarning, match="taking over the lock"):
        resumed = adapt(_cfg(folders, out, **CURRICULUM), resume=True)
    result, _ = reference
    assert _strip(resumed["metrics"]) == _strip(result["metrics"])
    _same_weights(result["backbone"], resumed["backbone"])
    _same_weights(result["tuner"], resumed["tuner"])


@needs_xrays
def test_an_empty_low_phase_gives_the_run_without_the_key_bit_for_bit(folders, tmp_path):  # noqa: F811
    """``curriculum: 0 epochs`` runs the phased loader (keys with a phase, the phased views) with no low step: the
    losses and the export equal those of the run without the key, which takes today's path."""
    sections = {"optim": {"epochs": 1, "batch_size": 8},
                "data": {"num_workers": 0, "root": str(folders / "train"), "max_images": 16}}  # 2 steps, no kNN
    plain = adapt(_cfg(folders, tmp_path / "plain", **sections))
    empty = adapt(_cfg(folders, tmp_path / "empty", **sections, ssl={**TINY["ssl"], "curriculum": "0 epochs"}))
    assert "curriculum" not in plain["resources"] and empty["resources"]["curriculum"]["switch_step"] == 0
    assert [{k: v for k, v in r.items() if k != "low_res"} for r in _strip(empty["metrics"])] == \
        _strip(plain["metrics"])
    _same_weights(plain["backbone"], empty["backbone"])
    _same_weights(plain["tuner"], empty["tuner"])
