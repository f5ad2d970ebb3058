"""recompute_frozen: the same outputs and gradients for every tuner, fewer activations kept, state untouched;
and one SSA training step (recompute + chunked loss) against the reference implementation written out here."""

import copy
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss

from essa import tuners
from essa.adaptation import resolve_config
from essa.bench import SavedActivations
from essa.ssl import block_masks, forward_masked
from essa.ssl.teacher import make_teacher
from essa.config import ConfigError, memory_mib
from essa.train.memory import block_costs, plan_recompute, recompute_frozen
from essa.train.resources import malloc_trim
from essa.train.ssa import SSAModule
from tests.conftest import tiny_vit

# Float32 on CPU: recomputation repeats the same kernels, so outputs match exactly; gradients differ only by the
# order in which autograd and the chunked loss sum them. Each gradient must lie within 1e-4 of its own largest
# entry, plus 1e-8: sums that nearly cancel (cls_token, LayerScale gammas; ~4e-5 seen) and the gradients behind
# LayerScale 1e-5 (entries ~1e-5, round-off ~1e-9) are the worst cases; a wrong term would be off by O(1).
REL, ABS = 1e-4, 1e-8


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= REL * b.abs().max() + ABS)
TUNERS = [("apla", {}), ("apla", {"r": 16}), ("lora", {"r": 4}), ("bitfit", {}), ("vpt", {"tokens": 3}),
          ("adaptformer", {}), ("ssf", {}), ("full", {})]


def _tuned(name, options):
    model = tiny_vit(init_values=1e-5, dynamic_img_size=True)  # LayerScale, as the DINOv2 ViTs
    tuners.apply(model, name, **options)
    # Tuner parameters start at values (zero LoRA B, unit SSF scales) whose gradients could hide a wrong path.
    with torch.no_grad():
        for p in tuners.trainable_parameters(model).values():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def _step(model, images):
    with SavedActivations(model.parameters()) as saved:
        out = model(images)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads, saved.mib


@pytest.mark.parametrize("name,options", TUNERS, ids=[f"{n}{o}" for n, o in TUNERS])
def test_same_outputs_and_gradients_for_every_tuner(name, options, images):
    plain = _tuned(name, options)
    wrapped = copy.deepcopy(plain)
    keys = list(wrapped.state_dict())
    # AdaptFormer's adapter hooks the MLP, which must then run whole: its blocks are left as they are.
    expected = [] if name == "adaptformer" else [f"blocks.{i}" for i in range(len(wrapped.blocks))]
    assert recompute_frozen(wrapped) == expected
    assert list(wrapped.state_dict()) == keys  # checkpoints and tuner state see the same names

    out, grads, saved = _step(plain, images)
    out_r, grads_r, saved_r = _step(wrapped, images)
    assert torch.equal(out_r, out)
    assert grads_r.keys() == grads.keys() and grads
    for key in grads:
        assert _close(grads_r[key], grads[key]), key
    # Something frozen on a gradient's way recomputes (fewer bytes kept); when every stretch trains, nothing does.
    if name in ("apla", "lora", "vpt"):
        assert saved_r < 0.8 * saved
    if name in ("full", "bitfit", "ssf", "adaptformer"):
        assert saved_r == pytest.approx(saved)


def test_apla_keeps_neither_mlp_hidden_activations_nor_queries_keys_values(images):
    model = _tuned("apla", {})
    batch = torch.randn(4, 3, 32, 32)
    _, _, before = _step(model, batch)
    recompute_frozen(model)
    _, _, after = _step(model, batch)
    tokens, width, depth = 4 * 17, model.embed_dim, len(model.blocks)
    # Per token and block, in units of the width: the MLP hidden layer (4) and queries, keys, values (3) go, less
    # the stretch input now kept for the recomputation: 6 measured (4 with the MLP stretch alone).
    assert before - after >= tokens * 5.5 * width * depth * 4 / 2**20


def test_calling_twice_changes_nothing_and_no_grad_is_plain(images):
    model = _tuned("apla", {})
    recompute_frozen(model)
    forward = model.blocks[0].forward
    recompute_frozen(model)
    assert model.blocks[0].forward is forward
    with torch.no_grad(), SavedActivations(model.parameters()) as saved:
        model.forward_features(images)
    assert saved.mib == 0


def test_unfrozen_later_recomputes_nothing_and_merge_export_work(images, tmp_path):
    model = _tuned("apla", {"r": 16})
    recompute_frozen(model)
    with torch.no_grad():
        expected = model(images)
    merged = tuners.merge(model)  # every parameter trains again: no stretch is frozen any more
    with torch.no_grad():
        assert torch.allclose(merged(images), expected, atol=1e-5)
    plain = tiny_vit(init_values=1e-5, dynamic_img_size=True)
    plain.load_state_dict(merged.state_dict())
    _, grads, saved = _step(plain, images)
    _, grads_m, saved_m = _step(merged, images)
    assert saved_m == pytest.approx(saved) and grads_m.keys() == grads.keys()
    tuners.save(model, tmp_path / "apla.safetensors")
    fresh = _tuned("apla", {"r": 16})
    tuners.load(fresh, tmp_path / "apla.safetensors")
    with torch.no_grad():
        assert torch.allclose(fresh(images), expected, atol=1e-6)
        # the replaced forward pickles with the module (in memory: no pickle file is ever loaded)
        assert torch.allclose(pickle.loads(pickle.dumps(model))(images), expected, atol=1e-6)


def test_teacher_copy_runs_the_same_blocks(images):
    model = _tuned("apla", {})
    recompute_frozen(model)
    teacher = make_teacher(model)
    assert teacher.blocks[0].forward.args[0] is teacher.blocks[0]  # bound to the copy, not to the student
    with torch.no_grad():
        assert torch.equal(teacher.forward_features(images), model.forward_features(images))


# ----- one SSA training step, against the objective written out with lightly's losses on whole logits ---------

SSA = {
    "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False,
                 "model_args": {"patch_size": 8, "depth": 2, "init_values": 1e-5}},
    # raw head inputs and no head warm-up: the reference objective below is the one of method.md
    "ssl": {"prototypes": 512, "head_hidden": 64, "head_bottleneck": 32, "n_local": 2, "global_size": 32,
            "local_size": 16, "head_input": "raw", "head_warmup": 0},
    "data": {"root": "unused"},
}


def _ssa_module(tuner, options, recompute, chunk):
    cfg = resolve_config(None, sections={**SSA, "tuner": {"name": tuner, "options": options},
                                         "optim": {"recompute_frozen": recompute}})
    torch.manual_seed(0)
    backbone = cfg.backbone.build(img_size=32, dynamic_img_size=True)
    tuners.apply(backbone, tuner, **options)
    module = SSAModule(cfg, backbone, iters_per_epoch=4)
    module.loss.chunk_size = chunk
    module._it = 0
    return module


def _batch(n_images=3):
    g = torch.Generator().manual_seed(0)
    masks = block_masks(2 * n_images, (4, 4), generator=g)  # half the crops masked, the others not
    return {"global_crops": torch.randn(2 * n_images, 3, 32, 32, generator=g),
            "local_crops": torch.randn(2 * n_images, 3, 16, 16, generator=g), "masks": masks}


def _reference_loss(module, batch):
    """The objective as it was computed before chunking: whole logits through the head with F.normalize'd
    prototypes, lightly's DINOLoss and IBOTPatchLoss, KoLeo per global crop."""
    def head(h, x):
        return F.linear(h.bottleneck(x), F.normalize(h.prototypes.weight, dim=1))

    masks, prefix, K = batch["masks"], module.student.backbone.num_prefix_tokens, module.cfg.ssl.prototypes
    flat = masks.flatten(1)
    with torch.no_grad():
        t = module.teacher.backbone.forward_features(batch["global_crops"])
        t_cls, t_patch = head(module.teacher.head, t[:, 0]), head(module.teacher.head, t[:, prefix:][flat])
    s = forward_masked(module.student.backbone, batch["global_crops"], masks, module.student.mask_token)
    s_local = module.student.backbone.forward_features(batch["local_crops"])[:, 0]
    s_cls, s_patch = head(module.student.head, torch.cat([s[:, 0], s_local])), head(module.student.head,
                                                                                    s[:, prefix:][flat])
    temp = float(module.schedules.teacher_temp[0])
    B = len(masks) // 2
    dino_loss, ibot_loss = DINOLoss(K), IBOTPatchLoss(K)
    dino = dino_loss(list(t_cls.split(B)), list(s_cls.split(B)), teacher_temp=temp)
    ibot = ibot_loss(t_patch, s_patch, masks, teacher_temp=temp)
    koleo = sum(KoLeoLoss()(x) for x in s[:, 0].split(B))
    return dino + ibot + 0.1 * koleo, dino_loss.center, ibot_loss.center.value


def _grads(module, loss):
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.requires_grad}
    module.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("tuner,options", [("apla", {}), ("full", {})])
def test_ssa_step_equals_the_reference_objective(tuner, options):
    batch = _batch()
    reference = _ssa_module(tuner, options, recompute=False, chunk=None)
    loss, dino_center, ibot_center = _reference_loss(reference, batch)
    loss_ref, grads_ref = _grads(reference, loss)
    for recompute, chunk in [(False, None), (True, 5), (True, 64)]:
        module = _ssa_module(tuner, options, recompute, chunk)
        loss, grads = _grads(module, module.training_step(batch, 0))
        assert torch.allclose(loss, loss_ref, atol=1e-6, rtol=1e-6), (recompute, chunk)
        assert grads.keys() == grads_ref.keys()
        for key in grads_ref:
            assert _close(grads[key], grads_ref[key]), (recompute, chunk, key)
        # Both centers moved as lightly moves them from the whole teacher logits.
        assert torch.allclose(module.loss.dino.center, dino_center, atol=1e-6)
        assert torch.allclose(module.loss.ibot.center.value, ibot_center, atol=1e-6)


# ----- a memory budget: which blocks recompute (optim.recompute_frozen: auto, trainer.memory_budget) -----------

def test_block_costs_are_what_the_blocks_keep_in_a_forward_of_the_batch():
    """Measured on one image per kind of view and scaled by the images, per block, with and without the
    recomputation: within 2 % of what the blocks keep on the whole batch (the block inputs that neighbouring blocks
    share are counted once per block)."""
    model = _tuned("apla", {})
    costs = block_costs(model, [(3, 17), (4, 5)])
    assert sorted(costs) == [0, 1, 2, 3]
    x_global = torch.randn(3, 17, 192, requires_grad=True)
    x_local = torch.randn(4, 5, 192, requires_grad=True)

    def kept(recompute):
        with SavedActivations(model.parameters()) as saved:
            for x in (x_global, x_local):
                for block in model.blocks:
                    x = block(x)
        return saved.mib

    plain = kept(False)
    recompute_frozen(model)
    wrapped = kept(True)
    assert wrapped < 0.6 * plain  # APLA: the MLP's hidden and the queries, keys and values are not kept
    assert sum(k for k, _ in costs.values()) == pytest.approx(plain, rel=0.02)
    assert sum(r for _, r in costs.values()) == pytest.approx(wrapped, rel=0.02)
    frozen = _tuned("apla", {"blocks": "last:1"})  # three frozen blocks: other stretches, another kind of block
    other = block_costs(frozen, [(3, 17)])
    assert other[0] == other[1] == other[2] != other[3]


def test_plan_recompute_takes_the_fewest_blocks_that_fit_the_budget():
    costs = {0: (10.0, 2.0), 1: (10.0, 2.0), 2: (10.0, 2.0)}
    assert plan_recompute(costs, 5.0, 35.0).blocks == []  # everything kept: 5 + 30 fits
    plan = plan_recompute(costs, 5.0, 34.0)
    assert (plan.blocks, plan.kept_mib, plan.all_kept_mib, plan.fits) == ([0], 22.0, 30.0, True)
    assert plan_recompute(costs, 5.0, 20.0).blocks == [0, 1]  # 5 + 14
    plan = plan_recompute(costs, 5.0, 10.0)
    assert (plan.blocks, plan.kept_mib, plan.fits) == ([0, 1, 2], 6.0, False)  # 5 + 6 > 10: all, and it says so
    # the blocks that save the most go first; one that saves nothing never recomputes
    assert plan_recompute({0: (10.0, 2.0), 1: (20.0, 2.0), 2: (3.0, 3.0)}, 0.0, 20.0).blocks == [1]
    assert plan_recompute({0: (3.0, 3.0)}, 10.0, 1.0).blocks == []
    assert plan.record() == {"blocks": [0, 1, 2], "budget_mib": 10.0, "base_mib": 5.0, "kept_mib": 6.0,
                             "all_kept_mib": 30.0, "fits": False}


def test_memory_budget_values():
    assert [memory_mib(v) for v in ("auto", "6GiB", "6G", "2 gb", "800MiB", "512k", 300, 1.5)] == [
        None, 6144.0, 6144.0, 2048.0, 800.0, 0.5, 300.0, 1.5]
    for bad in ("lots", "0GiB", -5, 0, True, "6 GiBs"):
        with pytest.raises(ConfigError, match="trainer.memory_budget="):
            memory_mib(bad)
    with pytest.raises(ConfigError, match="optim.recompute_frozen='sometimes'; valid: auto, true, false"):
        resolve_config(None, sections={**SSA, "optim": {"recompute_frozen": "sometimes"}})


def _auto_module(budget, tuner="apla", options=None):
    cfg = resolve_config(None, sections={**SSA, "tuner": {"name": tuner, "options": options or {}},
                                         "trainer": {"memory_budget": budget}})
    torch.manual_seed(0)
    backbone = cfg.backbone.build(img_size=32, dynamic_img_size=True)
    tuners.apply(backbone, tuner, **(options or {}))
    return SSAModule(cfg, backbone, iters_per_epoch=4)


def _recomputing(module):
    return [i for i, b in enumerate(module.student.backbone.blocks) if "forward" in vars(b)]


def test_auto_recomputes_nothing_when_the_budget_is_plentiful_and_every_block_when_it_is_tight():
    roomy = _auto_module("64GiB")
    plan = roomy.recompute
    assert plan.blocks == [] and _recomputing(roomy) == [] and plan.fits
    assert roomy.stage_resources()["recompute_frozen"] == plan.record()
    # the student's views of a batch (64 images: 2 x 17 + 2 x 5 tokens each) through the 2 blocks, kept
    assert plan.all_kept_mib == pytest.approx(
        sum(k for k, _ in block_costs(roomy.student.backbone, [(128, 17), (128, 5)]).values()))
    with pytest.warns(UserWarning, match="over the budget of 1 MiB; lower optim.batch_size"):
        tight = _auto_module("1MiB")
    assert tight.recompute.blocks == [0, 1] == _recomputing(tight) and not tight.recompute.fits
    assert _recomputing(_auto_module(plan.base_mib + plan.all_kept_mib - 1)) == [0]  # one block is enough
    assert all("forward" not in vars(b) for b in tight.teacher.backbone.blocks)  # no autograd: nothing to keep


def test_auto_plans_the_same_step_as_recomputing_every_block():
    batch = _batch()
    base = _auto_module("64GiB")
    budget = base.recompute.base_mib + base.recompute.all_kept_mib - 1
    module = _auto_module(budget)
    module.loss.chunk_size, module._it = 5, 0
    assert _recomputing(module) == [0]
    reference = _ssa_module("apla", {}, recompute=True, chunk=5)
    loss, grads = _grads(module, module.training_step(batch, 0))
    loss_ref, grads_ref = _grads(reference, reference.training_step(batch, 0))
    assert torch.allclose(loss, loss_ref, atol=1e-6, rtol=1e-6)
    for key in grads_ref:
        assert _close(grads[key], grads_ref[key]), key


def test_release_free_heap_returns_freed_pages():
    """In a fresh interpreter (the allocator's state is then known): 64 freed 4 MiB blocks below a live one stay
    resident until release_free_heap hands them back."""
    pytest.importorskip("psutil")
    if malloc_trim() is None:
        pytest.skip("not glibc: nothing to trim")
    script = """
import psutil, torch
from essa.train.resources import release_free_heap
big = torch.ones(16 * 2**20 // 4)  # 16 MiB: under glibc's 32 MiB ceiling of the dynamic threshold
del big  # a freed mmapped block raises glibc's mmap threshold: the blocks below go to the heap
blocks = [torch.ones(2**20) for _ in range(64)]
keep = blocks[-1]  # holds the top of the heap, so freeing the others trims nothing by itself
del blocks
before = psutil.Process().memory_info().rss
release_free_heap()
print((before - psutil.Process().memory_info().rss) / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert float(out) > 200  # of the 252 MiB freed
