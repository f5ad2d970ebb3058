"""Less work per SSA step: PatchDropout on the student's CLS-only views (``ssl.patch_drop``) and the truncated
backward over a frozen prefix of blocks shared with the teacher (``ssl.truncated_backward``,
essa.train.truncation)."""

import warnings

import pytest
import torch

from essa import config as config_mod, tuners
from essa.adaptation import adapt, resolve_config
from essa.bench import SavedActivations, live_peak_mib, step_flops
from essa.config import ConfigError
from essa.objectives import DINOv2
from essa.ssl import forward_masked
from essa.train.loader import mix_seed
from essa.train.ssa import SSAModule
from essa.train.truncation import frozen_prefix_blocks, plan
from tests.train.test_adapt import TINY, XRAYS, _cfg, folders  # noqa: F401  (folders: the fixture)
from tests.train.test_reliability import ADAPT, _killed, _same_weights, _strip

BASE = {
    "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False, "model_args": {"patch_size": 8, "depth": 4}},
    "ssl": {"prototypes": 256, "head_hidden": 64, "head_bottleneck": 32, "n_local": 2, "global_size": 32,
            "local_size": 16, "head_warmup": 0, "freeze_prototypes": 0},
    "data": {"root": "unused"},
}
LAST_TWO = {"blocks": [2, 3]}


def _module(tuner="apla", options=None, recompute=True, model_args=None, freeze=(), **ssl):
    cfg = resolve_config(None, sections={
        **BASE, "tuner": {"name": tuner, "options": options or {}}, "optim": {"recompute_frozen": recompute},
        "backbone": {**BASE["backbone"], "model_args": {**BASE["backbone"]["model_args"], **(model_args or {})}},
        "ssl": {**BASE["ssl"], **ssl}})
    torch.manual_seed(0)
    backbone = cfg.backbone.build(img_size=32, dynamic_img_size=True)
    tuners.apply(backbone, tuner, **(options or {}))
    for name, p in backbone.named_parameters():
        if name.startswith(tuple(freeze)):
            p.requires_grad_(False)
    module = SSAModule(cfg, backbone, iters_per_epoch=4)
    module._it = 0
    return module


def _batch(module, n_images=3, seed=0):
    """A batch as the dinov2 objective's collate makes it (masks on half the global crops; kept patches with
    ``ssl.patch_drop``), from a generator seeded as essa.adaptation._seeded_collate seeds it."""
    g = torch.Generator().manual_seed(0)
    samples = [[torch.randn(3, 32, 32, generator=g), torch.randn(3, 32, 32, generator=g),
                torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 16, generator=g)] for _ in range(n_images)]
    return DINOv2().collate(module.cfg, 8)(samples, generator=torch.Generator().manual_seed(mix_seed(seed, 0, 0)))


def _step(module, batch):
    """Loss and the gradient of every trainable parameter of the student (the optimizer does not step)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = module.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.requires_grad}
    module.student.zero_grad(set_to_none=True)  # a second step of the same module starts from no gradients
    return loss.detach(), grads


def _tokens_seen(vit):
    """(rows, tokens) of every call of ``vit``'s first block, in call order."""
    seen = []
    vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[:2])))
    return seen


def _outputs(module):
    """The student's and the teacher's backbone outputs, per call, in call order (their final norms' outputs)."""
    out = {"student": [], "teacher": []}
    for who in out:
        getattr(module, who).backbone.norm.register_forward_hook(lambda m, a, y, who=who: out[who].append(y.detach()))
    return out


# ----- the default path: today's step, bit for bit ---------------------------------------------------------------

def test_without_either_key_the_step_runs_the_whole_backbone_on_every_view_as_before():
    batch = _batch(_module())
    plain = _module()  # the config without patch_drop / truncated_backward set: APLA on every block
    explicit = _module(patch_drop=0.0, truncated_backward="auto")
    assert plain.truncation.frozen_blocks == 0 and "block 0" in plain.truncation.reason
    outputs = _outputs(plain)
    loss, grads = _step(plain, batch)
    assert len(outputs["student"]) == 2 and len(outputs["teacher"]) == 1
    # the backbone ran as before these keys: the teacher on the global crops, the student on all global crops
    # (forward_masked) and on all local crops, each in one call
    with torch.no_grad():
        s = plain.student.backbone
        assert torch.equal(outputs["teacher"][0], plain.teacher.backbone.forward_features(batch["global_crops"]))
        assert torch.equal(outputs["student"][0],
                           forward_masked(s, batch["global_crops"], batch["masks"], plain.student.mask_token))
        assert torch.equal(outputs["student"][1], s.forward_features(batch["local_crops"]))
    loss2, grads2 = _step(explicit, batch)
    assert torch.equal(loss, loss2) and grads.keys() == grads2.keys()
    assert all(torch.equal(grads[k], grads2[k]) for k in grads)


# ----- PatchDropout ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("drop,kept_global,kept_local", [(0.5, 8, 2), (0.3, 11, 2), (0.8, 3, 1)])
def test_patch_drop_thins_the_students_cls_only_views_and_nothing_else(drop, kept_global, kept_local):
    module = _module(patch_drop=drop)
    batch = _batch(module)
    masked = int(batch["masks"].flatten(1).any(1).sum())
    student, teacher = _tokens_seen(module.student.backbone), _tokens_seen(module.teacher.backbone)
    _step(module, batch)
    assert teacher == [(6, 1 + 16)]  # the teacher: every token of every global crop
    # the student: the iBOT-masked global crops whole, the others and the local crops with the kept patches
    assert student == [(masked, 1 + 16), (6 - masked, 1 + kept_global), (6, 1 + kept_local)]
    assert 0 < masked < 6


def test_patch_drop_draws_from_the_seed_the_same_every_time():
    losses, kept = {}, {}
    for run, seed in (("a", 0), ("b", 0), ("other seed", 1)):
        module = _module(patch_drop=0.5)
        batch = _batch(module, seed=seed)
        losses[run], kept[run] = _step(module, batch)[0], batch["kept_global"]
    assert torch.equal(losses["a"], losses["b"]) and torch.equal(kept["a"], kept["b"])
    assert not torch.equal(kept["a"], kept["other seed"]) and not torch.equal(losses["a"], losses["other seed"])


def test_patch_drop_without_kept_patches_in_the_batch_is_explained():
    module = _module(patch_drop=0.5)
    batch = {k: v for k, v in _batch(module).items() if not k.startswith("kept")}
    with pytest.raises(ValueError, match="needs the batch's kept patches"):
        _step(module, batch)


def _flops(module, batch):
    opt = module.configure_optimizers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return step_flops(lambda: module.standalone_step(batch, opt, 1.0))


def test_patch_drop_cuts_the_counted_flops_of_a_step():
    plain = _module()
    flops = {drop: _flops(_module(patch_drop=drop), _batch(_module(patch_drop=drop))) for drop in (0.0, 0.5)}
    assert flops[0.0] == _flops(plain, _batch(plain))
    assert flops[0.5] < 0.9 * flops[0.0]


def test_patch_drop_on_a_backbone_whose_forward_cannot_be_followed_is_refused():
    cfg = _module(patch_drop=0.5).cfg
    backbone = cfg.backbone.build(img_size=32, dynamic_img_size=True)
    tuners.apply(backbone, "apla")
    backbone.blocks.register_forward_hook(lambda module, args, out: out)
    with pytest.raises(ConfigError, match="ssl.patch_drop=0.5 needs .* forward hooks"):
        SSAModule(cfg, backbone, iters_per_epoch=4)


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_patch_drop_is_refused_for_the_reconstruction_objectives(objective):
    with pytest.raises(ConfigError, match=f"applies to objective=dinov2 only, not {objective}"):
        resolve_config(None, sections={"data": {"root": "x"}, "objective": objective, "ssl": {"patch_drop": 0.5}})
    resolve_config(None, sections={"data": {"root": "x"}, "objective": objective, "ssl": {"patch_drop": 0}})


@pytest.mark.parametrize("key,value,message", [("patch_drop", 1.0, r"must be a fraction in \[0, 1\)"),
                                               ("patch_drop", -0.2, r"must be a fraction in \[0, 1\)"),
                                               ("truncated_backward", "on", "valid choices: auto, off")])
def test_bad_values_are_refused_by_name(key, value, message):
    with pytest.raises(ConfigError, match=f"ssl.{key}=.*{message}"):
        resolve_config(None, sections={"data": {"root": "x"}, "ssl": {key: value}})


# ----- the truncated backward --------------------------------------------------------------------------------------

TRUNCATED = [("apla", LAST_TWO, ()), ("apla", {**LAST_TWO, "r": 16}, ()),
             # any tuner: what counts is which parameters require a gradient (here BitFit with the biases of the
             # patch embedding and of blocks 0 and 1 frozen)
             ("bitfit", {}, ("patch_embed.", "blocks.0.", "blocks.1."))]


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute_frozen", "kept"])
@pytest.mark.parametrize("tuner,options,freeze", TRUNCATED, ids=["apla", "apla r=16", "bitfit frozen 0-1"])
def test_the_truncated_step_gives_the_full_autograd_losses_and_gradients(tuner, options, freeze, recompute):
    reference = _module(tuner, options, recompute, freeze=freeze, truncated_backward="off")
    module = _module(tuner, options, recompute, freeze=freeze)
    assert module.truncation.frozen_blocks == 2 and module.truncation.shared_prefix
    batch = _batch(module)
    loss_ref, grads_ref = _step(reference, batch)
    loss, grads = _step(module, batch)
    assert torch.allclose(loss, loss_ref, rtol=1e-6, atol=0), (loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and "mask_token" in grads  # the mask token trains through the prefix
    for key in grads_ref:
        scale = grads_ref[key].abs().max()
        assert scale > 0, key
        assert torch.allclose(grads[key], grads_ref[key], rtol=1e-5, atol=1e-6 * float(scale)), key
    for center, ref in ((module.loss.dino.center, reference.loss.dino.center),
                        (module.loss.ibot.center.value, reference.loss.ibot.center.value)):
        assert torch.allclose(center, ref, atol=1e-7)


@pytest.mark.parametrize("probability", [0.0, 1.0], ids=["no crop masked", "every crop masked"])
def test_the_truncated_step_with_no_or_only_masked_global_crops_gives_the_same_step(probability):
    reference = _module(options=LAST_TWO, truncated_backward="off", mask_probability=probability)
    module = _module(options=LAST_TWO, mask_probability=probability)
    batch = _batch(module)
    assert batch["masks"].flatten(1).any(1).float().mean() == probability
    (loss_ref, grads_ref), (loss, grads) = _step(reference, batch), _step(module, batch)
    assert torch.allclose(loss, loss_ref, rtol=1e-6, atol=0)
    assert all(torch.allclose(grads[k], grads_ref[k], rtol=1e-5, atol=1e-7) for k in grads_ref)
    if not probability:  # no mask anywhere: the mask token's gradient is zero, as the whole-batch forward gives it
        assert torch.equal(grads["mask_token"], torch.zeros_like(grads["mask_token"]))


def test_the_shared_prefix_gives_the_teacher_its_own_outputs_and_the_student_the_rest():
    module = _module(options=LAST_TWO)
    batch = _batch(module)
    outputs = _outputs(module)
    student = _tokens_seen(module.student.backbone)
    _step(module, batch)
    masked = int(batch["masks"].flatten(1).any(1).sum())
    # the student's block 0 ran on the masked global crops and the local crops only: the unmasked global crops
    # continued from the teacher's prefix
    assert student == [(masked, 17), (6, 5)]
    with torch.no_grad():
        assert torch.equal(outputs["teacher"][0], module.teacher.backbone.forward_features(batch["global_crops"]))


def _memory(module, batch):
    opt = module.configure_optimizers()
    saved = SavedActivations(module.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.standalone_step(batch, opt, 1.0, forward_context=saved)
        return saved.mib, live_peak_mib(lambda: module.standalone_step(batch, opt, 1.0))


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute_frozen", "kept"])
def test_the_truncated_step_counts_fewer_flops_and_keeps_less(recompute):
    off, auto = (_module(options=LAST_TWO, recompute=recompute, truncated_backward=mode) for mode in ("off", "auto"))
    batch = _batch(off)
    assert _flops(auto, batch) < 0.95 * _flops(off, batch)
    (saved_off, peak_off), (saved_auto, peak_auto) = _memory(off, batch), _memory(auto, batch)
    assert saved_auto < saved_off and peak_auto < peak_off


def test_the_plan_says_where_the_prefix_ends_and_why_it_is_not_shared():
    assert plan("off", *_pair(_module(options=LAST_TWO))).reason == "ssl.truncated_backward=off"
    dropped = _module(options=LAST_TWO, patch_drop=0.5).truncation
    assert dropped.frozen_blocks == 2 and not dropped.shared_prefix and "patch_drop" in dropped.reason
    drop_path = _module(options=LAST_TWO, model_args={"drop_path_rate": 0.1}).truncation
    assert drop_path.frozen_blocks == 2 and not drop_path.shared_prefix and "drop-path" in drop_path.reason
    for tuner, options in (("vpt", {"tokens": 2}), ("ssf", {}), ("lora", {"r": 2})):
        assert _module(tuner, options).truncation.frozen_blocks == 0, tuner
    backbone = _module(options=LAST_TWO).student.backbone
    backbone.requires_grad_(False)
    assert frozen_prefix_blocks(backbone) == 4  # nothing trains: every block is prefix
    assert _module(options={"blocks": [3]}).stage_resources()["truncated_backward"] == {
        "mode": "auto", "frozen_blocks": 3, "shared_prefix": True, "reason": None}


def _pair(module):
    return module.student.backbone, module.teacher.backbone, 0.0


def test_patch_drop_and_truncation_together_match_patch_drop_alone():
    reference = _module(options=LAST_TWO, patch_drop=0.5, truncated_backward="off")
    module = _module(options=LAST_TWO, patch_drop=0.5)
    batch = _batch(module)
    (loss_ref, grads_ref), (loss, grads) = _step(reference, batch), _step(module, batch)
    assert torch.allclose(loss, loss_ref, rtol=1e-6, atol=0)
    assert all(torch.allclose(grads[k], grads_ref[k], rtol=1e-5, atol=1e-7) for k in grads_ref)


# ----- a run with PatchDropout killed mid-epoch resumes to the uninterrupted run's export, bit for bit ------------

@pytest.mark.slow
@pytest.mark.skipif(not XRAYS.is_dir(), reason=f"shared chest X-rays not found at {XRAYS}")
def test_a_patch_drop_run_killed_after_a_checkpoint_resumes_to_the_same_export(folders, tmp_path):  # noqa: F811
    sections = {**ADAPT, "ssl": {**TINY["ssl"], "patch_drop": 0.5}}
    reference = adapt(_cfg(folders, tmp_path / "ref", **sections))
    out = tmp_path / "killed"
    out.mkdir()
    config_mod.dump(_cfg(folders, out, **sections), out / "given.yaml")
    _killed("adapt", out / "given.yaml", "step:4")  # last.ckpt mid-epoch 1
    with pytest.warns(UserWarning, match="taking over the lock"):
        resumed = adapt(_cfg(folders, out, **sections), resume=True)
    assert _strip(resumed["metrics"]) == _strip(reference["metrics"])
    _same_weights(reference["backbone"], resumed["backbone"])
    _same_weights(reference["tuner"], resumed["tuner"])


# ----- the fast preset: APLA on the last 4 blocks, the truncated backward and PatchDropout together --------------

def test_the_fast_preset_trains_the_last_four_projections_over_a_frozen_prefix_at_fewer_flops():
    deep = {**BASE, "backbone": {**BASE["backbone"], "model_args": {"patch_size": 8, "depth": 6}}}
    standard, fast = (resolve_config(None, sections={**deep, **extra}) for extra in ({}, {"preset": "fast"}))
    assert (fast.tuner.name, fast.tuner.options, fast.ssl.patch_drop) == ("apla", {"blocks": "last:4"}, 0.5)
    assert fast.ssl.prototypes == 256 and fast.optim == standard.optim  # the run's own keys are kept
    modules = []
    for cfg in (standard, fast):
        torch.manual_seed(0)
        backbone = tuners.apply(cfg.backbone.build(img_size=32, dynamic_img_size=True), cfg.tuner.name,
                                **cfg.tuner.options)
        modules.append(SSAModule(cfg, backbone, iters_per_epoch=4))
        modules[-1]._it = 0
    plain, quick = modules
    assert set(tuners.trainable_parameters(quick.student.backbone)) == {
        f"blocks.{i}.attn.proj.{p}" for i in range(2, 6) for p in ("weight", "bias")}
    assert quick.truncation.frozen_blocks == 2 and not quick.truncation.shared_prefix  # patch_drop: not shared
    assert _flops(quick, _batch(quick)) < 0.8 * _flops(plain, _batch(plain))


def test_a_preset_fills_only_what_the_run_leaves_out():
    fast = resolve_config(None, sections={**BASE, "preset": "fast", "tuner": {"options": {"r": 8}},
                                          "ssl": {**BASE["ssl"], "patch_drop": 0.25}})
    assert fast.tuner.options == {"blocks": "last:4", "r": 8} and fast.ssl.patch_drop == 0.25
    other = resolve_config(None, sections={**BASE, "preset": "fast", "tuner": {"name": "lora"}})
    assert other.tuner.options == {} and other.ssl.patch_drop == 0.5  # another tuner: none of APLA's options
    with pytest.raises(ConfigError, match="preset='slow' is not a preset; valid choices: fast"):
        resolve_config(None, sections={**BASE, "preset": "slow"})


def test_the_fast_preset_under_a_reconstruction_objective_says_which_key_to_turn_off():
    with pytest.raises(ConfigError, match=r"preset fast sets it: give ssl.patch_drop=0 with it"):
        resolve_config(None, sections={**BASE, "preset": "fast", "objective": "mae"})
