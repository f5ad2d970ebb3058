"""Behaviour every tuner shares: exactness at init and after merge, what trains, save/load, bad input."""

import copy

import pytest
import torch
from torch import nn

from essa import backbones, tuners

# (name, options) of every configuration exercised; the mergeable ones fold back into a plain ViT.
MERGEABLE = [
    ("full", {}),
    ("linear", {}),
    ("bitfit", {}),
    ("apla", {}),
    ("apla", {"r": 16}),
    ("lora", {"r": 4}),
    ("lora", {"r": 2, "alpha": 4.0, "targets": ["qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]}),
    ("ssf", {}),
]
KEEPS_MODULES = [("vpt", {"tokens": 3}), ("vpt", {"tokens": 2, "deep": False}), ("adaptformer", {"bottleneck": 8})]
ALL = MERGEABLE + KEEPS_MODULES


def _ids(configs):
    return [f"{n}-{'-'.join(f'{k}{v}' for k, v in o.items())}" if o else n for n, o in configs]


def _perturb(model, scale=0.05):
    """Stand-in for training: move every trainable parameter away from its initial value."""
    torch.manual_seed(123)
    with torch.no_grad():
        for p in tuners.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("name, options", MERGEABLE + [KEEPS_MODULES[2]], ids=_ids(MERGEABLE + [KEEPS_MODULES[2]]))
def test_equal_to_base_model_at_initialisation(make_vit, images, name, options):
    base = make_vit().eval()
    model = tuners.apply(copy.deepcopy(base), name, **options).eval()
    with torch.no_grad():
        assert (model(images) - base(images)).abs().max() <= 1e-5


@pytest.mark.parametrize("name, options", MERGEABLE, ids=_ids(MERGEABLE))
def test_merge_gives_a_plain_vit_with_identical_outputs(make_vit, images, name, options):
    base = make_vit().eval()
    model = tuners.apply(copy.deepcopy(base), name, **options).eval()
    _perturb(model)
    merged = tuners.merge(model).eval()
    with torch.no_grad():
        tuned, plain = model(images), merged(images)
    assert (plain - tuned).abs().max() <= 1e-5
    if name not in ("linear",):
        assert (tuned - base(images)).abs().max() > 1e-3  # the perturbation mattered
    assert set(merged.state_dict()) == set(base.state_dict())
    assert [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in merged.modules())
    assert tuners.tuner_of(merged) is None and tuners.tuner_of(model) is not None  # merge copies


@pytest.mark.parametrize("name, options", ALL, ids=_ids(ALL))
def test_adamw_steps_change_only_tuner_parameters(make_vit, images, name, options):
    assert_steps_change_only_trainable(tuners.apply(make_vit(num_classes=3), name, **options), images)


def assert_steps_change_only_trainable(model, images) -> None:
    """Two AdamW steps on ``model`` change every parameter that trains and no other."""
    trainable = tuners.trainable_parameters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(images).pow(2).mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} should have trained"
        else:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"


EXPECTED_TRAINABLE = {
    "full": lambda n: True,
    "linear": lambda n: False,
    "bitfit": lambda n: n.endswith("bias"),
    "lora": lambda n: ".lora_" in n and ".attn.qkv." in n,
    "ssf": lambda n: n.endswith(("ssf_scale", "ssf_shift")),
    "vpt": lambda n: n.endswith("vpt_prompts"),
    "adaptformer": lambda n: ".mlp.adaptformer." in n,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TRAINABLE))
def test_each_tuner_trains_what_its_method_says(make_vit, name):
    model = tuners.apply(make_vit(), name)
    expected = {n for n, _ in model.named_parameters() if EXPECTED_TRAINABLE[name](n)}
    assert set(tuners.trainable_parameters(model)) == expected
    assert (len(expected) > 0) == (name != "linear")


def test_classification_head_trains_with_every_tuner(make_vit):
    for name in tuners.names():
        model = tuners.apply(make_vit(num_classes=3), name)
        trainable = tuners.trainable_parameters(model)
        assert {"head.weight", "head.bias"} <= set(trainable), name
    linear = tuners.apply(make_vit(num_classes=3), "linear")
    assert set(tuners.trainable_parameters(linear)) == {"head.weight", "head.bias"}
    frozen_head = tuners.apply(make_vit(num_classes=3), "apla", train_head=False)
    assert not any(n.startswith("head.") for n in tuners.trainable_parameters(frozen_head))


def test_vpt_prompts_change_features_but_not_the_token_layout(make_vit, images):
    base = make_vit().eval()
    for deep in (True, False):
        model = tuners.apply(copy.deepcopy(base), "vpt", tokens=5, deep=deep).eval()
        tokens = model.forward_features(images)
        assert tokens.shape == base.forward_features(images).shape == (2, 17, 192)
        assert (model(images) - base(images)).abs().max() > 1e-4
    deep_model = tuners.apply(copy.deepcopy(base), "vpt", tokens=5)
    assert sum(n.endswith("vpt_prompts") for n in tuners.trainable_parameters(deep_model)) == 4
    shallow = tuners.apply(copy.deepcopy(base), "vpt", tokens=5, deep=False)
    assert list(tuners.trainable_parameters(shallow)) == ["blocks.0.vpt_prompts"]


@pytest.mark.parametrize("name, options", ALL, ids=_ids(ALL))
def test_save_then_load_into_a_fresh_model_gives_identical_outputs(make_vit, images, tmp_path, name, options):
    model = tuners.apply(make_vit(), name, **options).eval()
    _perturb(model)
    path = tuners.save(model, tmp_path / "tuner.safetensors")
    fresh = make_vit()  # same seed: the same frozen base weights
    tuners.load(fresh, path)
    assert tuners.tuner_of(fresh).options() == tuners.tuner_of(model).options()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images), model(images))
    assert set(tuners.trainable_parameters(fresh)) == set(tuners.trainable_parameters(model))


def test_tuner_state_file_is_small(make_vit, tmp_path):
    full = tuners.save(tuners.apply(make_vit(), "full"), tmp_path / "full.safetensors").stat().st_size
    apla = tuners.save(tuners.apply(make_vit(), "apla", r=8), tmp_path / "apla.safetensors").stat().st_size
    assert apla < full / 50


@pytest.mark.parametrize("name, options", ALL, ids=_ids(ALL))
def test_merged_export_reloads_from_its_header(make_vit, images, tmp_path, name, options):
    model = tuners.apply(make_vit(), name, **options).eval()
    _perturb(model)
    if tuners.REGISTRY[name].mergeable:
        path = tuners.save_merged(model, tmp_path / "merged.safetensors")
    else:
        with pytest.warns(UserWarning, match="cannot be folded"):
            path = tuners.save_merged(model, tmp_path / "merged.safetensors")
    again = backbones.create(weights=path).eval()
    with torch.no_grad():
        assert (again(images) - model(images)).abs().max() <= 1e-5
    assert tuners.tuner_of(again) is None
    # a reloaded export is a base model: another tuner applies on top of it
    tuners.apply(again, "apla", r=4)


def test_load_refuses_a_different_tuner_or_a_model_that_does_not_fit(make_vit, tmp_path):
    path = tuners.save(tuners.apply(make_vit(), "apla", r=8), tmp_path / "t.safetensors")
    with pytest.raises(tuners.TunerError, match="holds tuner 'apla'"):
        tuners.load(tuners.apply(make_vit(), "lora"), path)
    with pytest.raises(tuners.TunerError, match="does not fit this model"):
        tuners.load(make_vit(embed_dim=96, num_heads=3), path)


@pytest.mark.parametrize(
    "name, options, fragment",
    [
        ("aplaa", {}, "unknown tuner 'aplaa'; valid choices: adaptformer, apla, bitfit, full, linear, lora, ssf, vpt"),
        ("lora", {"targets": ["proj_out"]}, "target 'proj_out' matches no linear layer in the blocks; valid targets: "
                                            "attn.proj, attn.qkv, mlp.fc1, mlp.fc2"),
        ("lora", {"r": 0}, "r=0 must be a positive integer"),
        ("lora", {"rank": 4}, "has no option 'rank'; valid options: r, alpha, dropout, targets"),
        ("vpt", {"tokens": 0}, "tokens=0 must be a positive integer"),
        ("adaptformer", {"bottleneck": -1}, "bottleneck=-1 must be a positive integer"),
    ],
)
def test_bad_tuner_input_names_the_value_and_the_choices(make_vit, name, options, fragment):
    with pytest.raises(tuners.TunerError) as info:
        tuners.apply(make_vit(), name, **options)
    assert fragment in str(info.value)


def test_lora_proj_target_stays_inside_the_blocks(make_vit):
    model = tuners.apply(make_vit(), "lora", targets=["proj"])
    assert all(".attn.proj." in n for n in tuners.trainable_parameters(model))
    assert isinstance(model.patch_embed.proj, nn.Conv2d)


def test_a_second_tuner_needs_a_merge_first(make_vit):
    model = tuners.apply(make_vit(), "bitfit")
    with pytest.raises(tuners.TunerError, match="already has tuner 'bitfit'; merge it first"):
        tuners.apply(model, "apla")
    tuners.apply(tuners.merge(model), "apla")
