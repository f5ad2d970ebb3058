"""The fine-tuning module's pieces: loss weights, lr schedule, checkpoints that hold only what trains."""

import copy

import numpy as np
import pytest
import torch

from essa import tuners
from essa.config import TunerConfig
from essa.finetuning import (
    LP_FT_LR, MAX_WARMUP_FRACTION, FinetuneConfig, HeadConfig, OptimConfig, lr_schedule, peak_lr,
)
from essa.train.classify import ClassifierModule, class_weights


def test_class_weights_are_inverse_frequencies():
    w = class_weights([0, 0, 0, 1], num_classes=3, multilabel=False)
    # N / (C * n_c): 4 / (3 * 3), 4 / (3 * 1); an absent class counts as one image
    assert torch.allclose(w, torch.tensor([4 / 9, 4 / 3, 4 / 3]))
    pos = class_weights([(0,), (0, 1), (), (0,)], num_classes=2, multilabel=True)
    assert torch.allclose(pos, torch.tensor([1 / 3, 3 / 1]))  # negatives / positives per label


def test_weighted_cross_entropy_equals_the_formula():
    module = ClassifierModule(torch.nn.Identity(), "multiclass", np.ones(1), 0.0, torch.tensor([1.0, 3.0]))
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    nll = -torch.log_softmax(logits, 1)[torch.arange(2), y]
    assert torch.isclose(module.loss(logits, y), (nll * torch.tensor([1.0, 3.0])).sum() / 4.0)


def _cfg(tuner: str = "apla", init: str = "lp", **optim):
    return FinetuneConfig(tuner=TunerConfig(name=tuner), head=HeadConfig(init=init), optim=OptimConfig(**optim))


def test_lr_warms_up_then_follows_a_cosine_and_short_runs_clamp_the_warm_up():
    lr = lr_schedule(_cfg(lr=1e-3, min_lr=0.0, warmup_steps=500), 10_000)
    assert lr[0] == 0 and np.isclose(lr[250], 5e-4) and lr[500] == pytest.approx(1e-3) and lr[-1] == 0
    assert np.all(np.diff(lr[500:]) <= 0)
    short = lr_schedule(_cfg("full", init="random", warmup_steps=500), 50)  # full: the reference's 1e-4
    assert np.argmax(short) == int(MAX_WARMUP_FRACTION * 50) and short.max() == pytest.approx(1e-4)


def test_the_default_lr_is_lp_fts_from_the_probe_head_and_the_references_from_a_random_head():
    assert LP_FT_LR == 1e-4
    assert peak_lr(_cfg("apla")) == peak_lr(_cfg("full")) == peak_lr(_cfg("lora")) == LP_FT_LR
    assert peak_lr(_cfg("apla", init="random")) == 1e-3 and peak_lr(_cfg("full", init="random")) == 1e-4
    assert peak_lr(_cfg("apla", lr=3e-4)) == peak_lr(_cfg("apla", init="random", lr=3e-4)) == 3e-4


def _module(model, num_classes):
    """A module around a copy of ``model`` with a new head of ``num_classes`` (same frozen weights)."""
    model = copy.deepcopy(model)
    model.reset_classifier(num_classes)
    return ClassifierModule(tuners.apply(model, "apla", r=8), "multiclass", np.ones(1), 0.0)


def test_checkpoints_hold_only_what_trains_and_refuse_another_head(make_vit):
    base = make_vit()
    module = _module(base, 3)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    kept = set(checkpoint["state_dict"])
    trainable = {f"model.{n}" for n in tuners.trainable_parameters(module.model)}
    assert trainable <= kept and all(k.endswith(".rows") for k in kept - trainable)  # APLA rows: tuner state
    assert "model.blocks.0.mlp.fc1.weight" not in kept and "model.head.weight" in kept
    _module(base, 3).on_load_checkpoint(checkpoint)  # the same model: fine
    with pytest.raises(ValueError, match=r"model\.head\.weight is \(3, 192\) there but \(2, 192\) here"):
        _module(base, 2).on_load_checkpoint(checkpoint)
    other = _module(base, 3)
    with torch.no_grad():
        other.model.blocks[0].mlp.fc1.weight.add_(1.0)  # other frozen (foundation) weights
    with pytest.raises(ValueError, match="trained from other frozen backbone weights"):
        other.on_load_checkpoint(checkpoint)


def test_layer_decay_scales_the_lr_by_depth_and_one_keeps_the_two_groups(make_vit):
    from essa.train.classify import layer_decay_groups

    model = tuners.apply(make_vit(num_classes=2), "full")  # 4 blocks
    plain = layer_decay_groups(model, 1.0)
    assert [(g["apply_decay"], g["lr_scale"]) for g in plain] == [(True, 1.0), (False, 1.0)]
    groups = layer_decay_groups(model, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["head.weight"])] == scale[id(named["norm.weight"])] == 1.0
    assert scale[id(named["blocks.3.attn.qkv.weight"])] == 0.5 and scale[id(named["blocks.0.mlp.fc1.bias"])] == 0.5 ** 4
    assert scale[id(named["patch_embed.proj.weight"])] == scale[id(named["cls_token"])] == 0.5 ** 5
    assert len(scale) == sum(p.requires_grad for p in model.parameters())  # every trainable parameter, once
    module = ClassifierModule(model, "multiclass", np.full(3, 1e-3), 0.0, layer_decay=0.5)
    optimizer = module.configure_optimizers()
    assert sorted({g["lr_scale"] for g in optimizer.param_groups}) == [0.5 ** k for k in range(5, -1, -1)]
