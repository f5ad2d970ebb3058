"""Combinations of tuners (``apla+lora``): exactness, what trains, merge, save/load, refusals, config forms, CLI."""

import copy
import json
import re
import shutil

import pytest
import torch
import yaml

from essa import backbones, config as config_mod, tuners
from essa.adaptation import AdaptConfig
from essa.commands import build_parser, main
from essa.commands.adapt import ADAPT_FLAGS
from essa.commands.common import overrides
from essa.commands.tuners import parameter_table
from essa.config import ConfigError, TunerConfig
from essa.study.config import StudyConfig, _tuner_spec
from tests.conftest import SHARED, tiny_vit
from tests.tuners.test_tuners import assert_steps_change_only_trainable

MERGEABLE = [
    ("apla+lora", {"apla": {"r": 16}, "lora": {"targets": ["qkv"]}}),
    ("apla+lora", {"lora": {"r": 2, "targets": ["mlp.fc1", "mlp.fc2"]}}),  # APLA on the whole projection
    ("ssf+lora", {"lora": {"r": 4, "targets": ["qkv", "attn.proj"]}}),  # LoRA wraps layers that SSF scales
    ("bitfit+lora", {}),
    ("lora+apla", {"apla": {"r": 8, "blocks": [1, 3]}}),
]
KEEPS_MODULES = [
    ("apla+lora+adaptformer", {"apla": {"r": 16}, "adaptformer": {"bottleneck": 8}}),
    ("bitfit+vpt", {"vpt": {"tokens": 3}}),
]
ALL = MERGEABLE + KEEPS_MODULES


def _ids(configs):
    return [f"{name}-{i}" for i, (name, _) in enumerate(configs)]


def _perturb(model, scale=0.05):
    torch.manual_seed(123)
    with torch.no_grad():
        for p in tuners.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("name, options", MERGEABLE + KEEPS_MODULES[:1], ids=_ids(MERGEABLE + KEEPS_MODULES[:1]))
def test_equal_to_base_model_at_initialisation(images, name, options):
    base = tiny_vit().eval()
    model = tuners.apply(copy.deepcopy(base), name, **options).eval()
    with torch.no_grad():
        assert torch.equal(model(images), base(images))


@pytest.mark.parametrize("name, options", ALL, ids=_ids(ALL))
def test_the_union_of_the_parts_trains(name, options):
    model = tuners.apply(tiny_vit(num_classes=3), name, **options)
    tuner = tuners.tuner_of(model)
    assert isinstance(tuner, tuners.Combination) and tuner.name == name
    assert list(tuner.options()) == name.split("+")
    union, count = set(), 0
    for part in name.split("+"):
        alone = tuners.apply(tiny_vit(num_classes=3), part, train_head=False, **options.get(part, {}))
        assert tuner.options()[part] == tuners.tuner_of(alone).options()
        union |= set(tuners.trainable_parameters(alone))
        count += tuners.count_parameters(alone)[0]
    head = {"head.weight", "head.bias"}
    # LoRA keeps the layer it wraps as its base_layer: SSF's scale on qkv is qkv.base_layer.ssf_scale after LoRA
    trainable = {n.replace(".base_layer", "") for n in tuners.trainable_parameters(model)}
    assert trainable == union | head
    assert tuners.count_parameters(model)[0] == count + sum(
        p.numel() for n, p in model.named_parameters() if n in head and n not in union)


@pytest.mark.parametrize("name, options", ALL, ids=_ids(ALL))
def test_adamw_steps_change_only_the_parts_parameters(images, name, options):
    assert_steps_change_only_trainable(tuners.apply(tiny_vit(num_classes=3), name, **options), images)


@pytest.mark.parametrize("name, options", MERGEABLE, ids=_ids(MERGEABLE))
def test_merge_gives_a_plain_vit_with_identical_outputs(images, name, options):
    base = tiny_vit().eval()
    model = tuners.apply(copy.deepcopy(base), name, **options).eval()
    assert tuners.tuner_of(model).mergeable
    _perturb(model)
    merged = tuners.merge(model).eval()
    with torch.no_grad():
        tuned, plain = model(images), merged(images)
    assert (plain - tuned).abs().max() <= 1e-5
    assert (tuned - base(images)).abs().max() > 1e-3  # the perturbation mattered
    assert set(merged.state_dict()) == set(base.state_dict())
    assert [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in merged.modules())
    assert not hasattr(merged, "peft_config") and tuners.tuner_of(merged) is None


def test_each_part_contributes_to_the_merged_weights(images):
    """Folding every part: with only one part perturbed at a time, the merge still matches (no part is skipped)."""
    for prefix in ("attn.proj.weight_rows", "lora_B"):
        model = tuners.apply(tiny_vit(), "apla+lora", apla={"r": 16}).eval()
        with torch.no_grad():
            for n, p in tuners.trainable_parameters(model).items():
                if prefix in n:
                    p.add_(0.1)
        merged = tuners.merge(model).eval()
        with torch.no_grad():
            assert (merged(images) - model(images)).abs().max() <= 1e-5
            assert (model(images) - tiny_vit().eval()(images)).abs().max() > 1e-3


@pytest.mark.parametrize("name, options", ALL, ids=_ids(ALL))
def test_save_then_load_into_a_fresh_model_gives_identical_outputs(images, tmp_path, name, options):
    model = tuners.apply(tiny_vit(), name, **options).eval()
    _perturb(model)
    path = tuners.save(model, tmp_path / "tuner.safetensors")
    fresh = tuners.load(tiny_vit(), path)
    assert tuners.tuner_of(fresh).name == name
    assert tuners.tuner_of(fresh).options() == tuners.tuner_of(model).options()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images), model(images))
    assert set(tuners.trainable_parameters(fresh)) == set(tuners.trainable_parameters(model))
    with pytest.raises(tuners.TunerError, match=re.escape(f"holds tuner '{name}'")):
        tuners.load(tuners.apply(tiny_vit(), name.split("+")[0]), path)


@pytest.mark.parametrize("name, options", [MERGEABLE[0], KEEPS_MODULES[0]], ids=["mergeable", "keeps-modules"])
def test_merged_export_reloads_from_its_header(images, tmp_path, name, options):
    model = tuners.apply(tiny_vit(), name, **options).eval()
    _perturb(model)
    if tuners.tuner_of(model).mergeable:
        path = tuners.save_merged(model, tmp_path / "merged.safetensors")
    else:
        with pytest.warns(UserWarning, match=re.escape(f"tuner '{name}' cannot be folded")):
            path = tuners.save_merged(model, tmp_path / "merged.safetensors")
    again = backbones.create(weights=path).eval()
    with torch.no_grad():
        assert (again(images) - model(images)).abs().max() <= 1e-5
    assert tuners.tuner_of(again) is None
    # a reloaded export is a base model: a tuner applies on top
    if tuners.tuner_of(model).mergeable:
        tuners.apply(again, "apla+lora", apla={"r": 4})
    else:
        kept = re.escape("target 'qkv' is blocks.0.attn.qkv (peft.tuners.lora.layer.Linear)")
        with pytest.raises(tuners.TunerError, match=kept):  # the kept LoRA layer
            tuners.apply(again, "lora")
        tuners.apply(again, "apla", r=4)


def test_mergeable_only_when_every_part_is():
    assert tuners.base.build("apla+lora", {}).mergeable
    assert not tuners.base.build("apla+vpt", {}).mergeable
    assert not tuners.base.build("adaptformer+lora", {}).mergeable


def _state(model):
    return ({n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            [type(m) for m in model.modules()])


@pytest.mark.parametrize(
    "name, options, fragment",
    [
        ("apla+bitfit", {}, "bitfit and apla both train blocks.0.attn.proj.bias"),
        ("apla+full", {}, "full and apla both train blocks.0.attn.proj.weight"),
        ("full+lora", {}, "full trains every parameter of the model, so nothing is left for the other parts of "
                          "full+lora"),
        ("adaptformer+bitfit", {}, "bitfit and adaptformer both train blocks.0.mlp.adaptformer.down.bias"),
        ("apla+bitfit", {"apla": {"r": 16}},
         "bitfit would train blocks.0.attn.proj.bias inside blocks.0.attn.proj, the APLAProjection that apla put"),
        ("bitfit+apla", {"apla": {"r": 16}},
         "apla replaces blocks.0.attn.proj, dropping blocks.0.attn.proj.bias, which bitfit trains"),
        ("lora+apla", {"lora": {"targets": ["attn.proj"]}, "apla": {"r": 16}},
         "apla replaces blocks.0.attn.proj, dropping blocks.0.attn.proj.lora_A.default.weight, which lora trains"),
        ("apla+lora", {"apla": {"r": 16}, "lora": {"targets": ["qkv", "attn.proj"]}},
         "lora: target 'attn.proj' is blocks.0.attn.proj (APLAProjection), not a linear layer: LoRA cannot wrap it"),
        ("apla+lora", {"apla": {"r": 16, "blocks": [2]}, "lora": {"targets": ["proj"]}},
         "target 'proj' is blocks.2.attn.proj (APLAProjection)"),
        ("lora+ssf", {}, "ssf would train blocks.0.attn.qkv.base_layer.ssf_scale inside blocks.0.attn.qkv, the "
                         "peft.tuners.lora.layer.Linear that lora put there"),
        ("apla+lora", {"lora": {"targets": ["attn.proj"]}},
         "lora adapts blocks.0.attn.proj, whose weight apla already trains in full (blocks.0.attn.proj.weight)"),
        ("apla+ssf", {}, "ssf adapts blocks.0.attn.proj, whose weight apla already trains in full"),
        ("apla+ssf", {"apla": {"r": 16}}, "ssf trains blocks.0.attn.proj.ssf_scale when applied alone but not after "
                                          "apla, which replaced that module (8 such parameters)"),
        ("linear+apla", {}, "linear trains nothing in the backbone, so it adds nothing to a combination"),
        ("apla+linear", {}, "linear trains nothing in the backbone"),
    ],
)
def test_overlapping_parts_are_refused_by_name_and_leave_the_model_as_it_was(name, options, fragment):
    model = tiny_vit()
    before = _state(model)
    with pytest.raises(tuners.TunerError) as info:
        tuners.apply(model, name, **options)
    assert fragment in str(info.value)
    params, types = _state(model)
    assert types == before[1] and tuners.tuner_of(model) is None and not hasattr(model, "peft_config")
    assert params.keys() == before[0].keys()
    assert all(torch.equal(params[n][0], before[0][n][0]) and params[n][1] == before[0][n][1] for n in params)


@pytest.mark.parametrize(
    "name, options, fragment",
    [
        ("apla+lorax", {}, "tuner 'apla+lorax': unknown part 'lorax'; valid parts: adaptformer, apla, bitfit, full, "
                           "linear, lora, ssf, vpt"),
        ("apla+lora+apla", {}, "tuner 'apla+lora+apla' names 'apla' twice; a combination has each tuner once"),
        ("apla+", {}, "tuner 'apla+' has an empty part"),
        ("apla+lora", {"r": 64}, "tuner 'apla+lora' takes its options by part (apla, lora), e.g. {'apla': {...}}; "
                                 "'r' is not one of its parts"),
        ("apla+lora", {"lora": {"rank": 4}}, "tuner 'lora' has no option 'rank'; valid options: r, alpha, dropout, "
                                             "targets"),
        ("apla+lora", {"apla": 64}, "tuner 'apla+lora': the options of 'apla' must be a mapping, got 64"),
        ("apla+lora", {"apla": {"r": 0}}, "apla: r=0 must be a positive integer"),
    ],
)
def test_build_refuses_bad_names_and_options(name, options, fragment):
    with pytest.raises(tuners.TunerError) as info:
        tuners.base.build(name, options)
    assert fragment in str(info.value)


def test_build_parses_the_name_and_fills_defaults():
    tuner = tuners.base.build(" apla + lora ", {"apla": {"r": 64}, "lora": None})
    assert tuner.name == "apla+lora"
    assert tuner.options() == {"apla": {"r": 64, "blocks": None, "seed": 0},
                               "lora": {"r": 8, "alpha": 8.0, "dropout": 0.0, "targets": ["qkv"]}}
    assert type(tuners.base.build("apla", {"r": 64})).__name__ == "APLA"


def test_config_list_form_is_normalised_to_the_mapping(tmp_path):
    listed = [{"name": "apla", "options": {"r": 64}}, {"name": "lora", "options": {"targets": ["qkv"]}}]
    mapping = {"name": "apla+lora", "options": {"apla": {"r": 64}, "lora": {"targets": ["qkv"]}}}
    assert config_mod.from_dict(TunerConfig, TunerConfig.coerce(listed)) == TunerConfig(**mapping)
    base = {"data": {"root": "imgs"}}
    for tuner in (listed, mapping):
        cfg = config_mod.resolve(AdaptConfig, None, {**base, "tuner": tuner})
        assert config_mod.to_dict(cfg.tuner) == mapping
    # in a YAML file, with an override addressing a part's option afterwards
    (tmp_path / "adapt.yaml").write_text(yaml.safe_dump({**base, "tuner": listed}))
    cfg = config_mod.load(AdaptConfig, tmp_path / "adapt.yaml", overrides=["tuner.options.apla.r=32"])
    assert cfg.tuner == TunerConfig("apla+lora", {"apla": {"r": 32}, "lora": {"targets": ["qkv"]}})
    saved = yaml.safe_load(config_mod.dump(cfg, tmp_path / "config.yaml").read_text())["tuner"]
    assert saved == {"name": "apla+lora", "options": {"apla": {"r": 32}, "lora": {"targets": ["qkv"]}}}
    assert config_mod.load(AdaptConfig, tmp_path / "config.yaml") == cfg  # what --resume reads
    # one tuner in a list is that tuner; names alone are fine
    assert TunerConfig.coerce([{"name": "apla", "options": {"r": 64}}]) == {"name": "apla", "options": {"r": 64}}
    assert TunerConfig.coerce(["bitfit", "lora"]) == {"name": "bitfit+lora", "options": {"bitfit": {}, "lora": {}}}


@pytest.mark.parametrize(
    "tuner, fragment",
    [
        ([], "tuner: an empty list of tuners"),
        ([{"name": "apla", "opts": {}}], "unknown config key tuner[0].opts; valid keys of tuner[0]: name, options"),
        ([{"name": "apla+lora"}], "tuner[0].name: expected the name of one tuner"),
        ([{"options": {}}], "tuner[0].name: expected the name of one tuner (essa tuners lists them), got None"),
        (["apla", {"name": "lora", "options": [1]}], "tuner[1].options: expected a mapping, got [1]"),
        (["apla", "apla"], "tuner[1].name: 'apla' is already in the list"),
        ([3], "tuner[0]: a tuner of the list is a name or a mapping {name, options}, got 3"),
        ([{"name": "apla"}, {"name": "bitfit"}], "bitfit and apla both train blocks.0.attn.proj.bias"),
    ],
)
def test_bad_list_entries_are_config_errors(tuner, fragment):
    if "both train" in fragment:  # a valid config: the overlap needs a model and is refused when it is applied
        cfg = config_mod.resolve(AdaptConfig, None, {"data": {"root": "imgs"}, "tuner": tuner})
        with pytest.raises(tuners.TunerError, match=fragment):
            tuners.apply(tiny_vit(), cfg.tuner.name, **cfg.tuner.options)
        return
    with pytest.raises(ConfigError) as info:
        config_mod.resolve(AdaptConfig, None, {"data": {"root": "imgs"}, "tuner": tuner})
    assert fragment in str(info.value)


def test_command_line_sets_a_combination_and_its_part_options():
    args = build_parser().parse_args(["adapt", "--data", "imgs", "--tuner", "apla+lora", "--tuner-opt", "apla.r=64",
                                      "--tuner-opt", "lora.targets=[qkv, mlp.fc1]"])
    cfg = config_mod.load(AdaptConfig, None, overrides=overrides(args, ADAPT_FLAGS))
    assert cfg.tuner == TunerConfig("apla+lora", {"apla": {"r": 64}, "lora": {"targets": ["qkv", "mlp.fc1"]}})
    args = build_parser().parse_args(["adapt", "--data", "imgs", "--tuner", "apla+lora", "--tuner-opt", "r=64"])
    with pytest.raises(tuners.TunerError, match="'r' is not one of its parts"):
        config_mod.load(AdaptConfig, None, overrides=overrides(args, ADAPT_FLAGS))


def test_study_tuners_take_combinations_with_readable_labels():
    spec = _tuner_spec({"name": "apla+lora", "options": {"apla": {"r": 64}, "lora": {"targets": ["qkv"]}}})
    assert spec.label == "apla r=64 + lora targets=['qkv']"
    assert _tuner_spec({"name": "apla+lora"}).label == "apla + lora"
    assert _tuner_spec({"name": "apla+lora", "label": "mine"}).label == "mine"
    listed = _tuner_spec([{"name": "apla", "options": {"r": 64}}, "lora"])
    assert (listed.name, listed.options, listed.label) == ("apla+lora", {"apla": {"r": 64}, "lora": {}},
                                                           "apla r=64 + lora")
    cfg = config_mod.resolve(StudyConfig, None, {
        "datasets": [{"name": "x", "data": {"root": "x"}}],
        "ssa": {"epochs": 1, "tuners": ["none", {"name": "apla+lora", "options": {"apla": {"r": 64}}}]},
        "finetune": {"epochs": 1, "tuners": ["apla", [{"name": "bitfit"}, {"name": "lora"}]]},
    })
    assert [s.label for s in cfg.finetune.specs()] == ["apla", "bitfit + lora"]
    with pytest.raises(tuners.TunerError, match="unknown part 'lorra'"):
        config_mod.resolve(StudyConfig, None, {"datasets": [{"name": "x"}],
                                               "finetune": {"epochs": 1, "tuners": ["apla+lorra"]}})


def test_tuners_command_prints_a_combination_row(capsys):
    assert main(["tuners", "--backbone", "vit_tiny_patch16_224", "--img-size", "32", "--options",
                 '{"apla": {"r": 64}}', "--combine", "apla+lora", "--json"]) == 0
    rows = {row["tuner"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["apla+lora"]["trainable"] == rows["apla"]["trainable"] + rows["lora"]["trainable"] == \
        12 * (64 * 192 + 64) + 12 * 8 * (192 + 3 * 192)
    assert rows["apla+lora"]["options"] == {"apla": rows["apla"]["options"], "lora": rows["lora"]["options"]}
    assert main(["tuners", "--backbone", "vit_tiny_patch16_224", "--img-size", "32", "--combine", "ssf+lora"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ssf+lora "))
    assert line.split()[1] == f"{rows['ssf']['trainable'] + rows['lora']['trainable']:,}"
    assert line.endswith("lora.r=8, lora.alpha=8.0, lora.dropout=0.0, lora.targets=['qkv']")
    with pytest.raises(tuners.TunerError, match="bitfit and apla both train"):
        parameter_table("vit_tiny_patch16_224", 32, combine=["apla+bitfit"])
    with pytest.raises(tuners.TunerError, match=re.escape("unknown tuner 'apla+lora' in --options (a combination's "
                                                          'parts take their own entries, e.g. {"apla": {"r": 64}})')):
        parameter_table("vit_tiny_patch16_224", 32, options={"apla+lora": {}}, combine=["apla+lora"])


XRAYS = SHARED / "data" / "chest_xray_pneumonia"


@pytest.mark.skipif(not XRAYS.is_dir(), reason=f"shared chest X-rays not found at {XRAYS}")
def test_one_ssa_epoch_with_apla_plus_lora_in_list_form(tmp_path):
    from essa.adaptation import adapt

    root = tmp_path / "train"
    root.mkdir()
    for cls in ("NORMAL", "PNEUMONIA"):
        for i, path in enumerate(sorted((XRAYS / "train" / cls).iterdir())[:4]):
            shutil.copy(path, root / f"{cls[0]}{i}.jpg")
    result = adapt(None, **{
        "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False, "model_args": {"patch_size": 8, "depth": 2}},
        "tuner": [{"name": "apla", "options": {"r": 16}}, {"name": "lora", "options": {"r": 2}}],
        "ssl": {"prototypes": 64, "head_hidden": 64, "head_bottleneck": 32, "n_local": 2, "global_size": 32},
        "optim": {"epochs": 1, "batch_size": 4}, "data": {"num_workers": 0, "root": str(root)},
        "out": str(tmp_path / "run"),
    })
    saved = yaml.safe_load((result["run_dir"] / "config.yaml").read_text())["tuner"]
    assert saved == {"name": "apla+lora", "options": {"apla": {"r": 16}, "lora": {"r": 2}}}
    assert result["resources"]["trainable_params"] == 2 * (16 * 192 + 16) + 2 * 2 * (192 + 3 * 192)
    assert torch.isfinite(torch.tensor(result["metrics"][-1]["total"]))
    fresh = tuners.load(tiny_vit(patch_size=8, depth=2), result["tuner"])
    assert tuners.tuner_of(fresh).name == "apla+lora"
    assert tuners.tuner_of(fresh).options()["apla"]["r"] == 16
