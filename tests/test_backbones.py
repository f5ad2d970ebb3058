import argparse
import time

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from essa import backbones, export
from essa.backbones import BackboneError


def test_random_backbone_records_its_architecture(make_vit, images):
    model = make_vit()
    assert model.essa_arch == {
        "timm_name": "vit_tiny_patch16_224",
        "model_args": {"img_size": 32, "patch_size": 8, "depth": 4},
    }
    assert model.num_classes == 0
    assert model(images).shape == (2, 192)
    assert model.patch_embed.grid_size == (4, 4)


def test_dynamic_img_size_accepts_several_input_sizes(make_vit):
    model = make_vit(dynamic_img_size=True).eval()
    for size in (16, 32, 48):
        tokens = model.forward_features(torch.randn(1, 3, size, size))
        assert tokens.shape == (1, 1 + (size // 8) ** 2, 192)


def test_pretrained_tag_is_stripped_from_the_recorded_name():
    model = backbones.create("vit_small_patch14_dinov2.lvd142m", img_size=28, depth=1)
    assert model.essa_arch["timm_name"] == "vit_small_patch14_dinov2"
    assert model.patch_embed.grid_size == (2, 2)


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("vit_smal", "unknown backbone 'vit_smal'"),
        ("resnet50", "not a timm Vision Transformer"),
        ("vit_small_patch14_dinov2.imagenet", "has no pretrained tag 'imagenet'; valid tags: lvd142m"),
    ],
)
def test_bad_backbone_names_are_explained(name, fragment):
    with pytest.raises(BackboneError, match=fragment) as info:
        backbones.create(name)
    assert "valid" in str(info.value).lower() or "Did you mean" in str(info.value)


def test_pretrained_offline_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(backbones, "_hub_reachable", lambda: False)
    start = time.monotonic()
    with pytest.raises(BackboneError) as info:
        backbones.create("vit_small_patch14_dinov2.lvd142m", pretrained=True)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "unreachable" in message and "weights=" in message and "backbone.weights=" in message


def test_weights_file_round_trip_rebuilds_from_header(make_vit, images, tmp_path):
    model = make_vit().eval()
    path = export.save_weights(model.state_dict(), tmp_path / "w.safetensors", export.arch_metadata(model))
    again = backbones.create(weights=path).eval()
    assert again.essa_arch == model.essa_arch
    assert torch.equal(again(images), model(images))


def test_weights_resampled_to_a_new_img_size(make_vit, tmp_path):
    model = make_vit()
    path = export.save_weights(model.state_dict(), tmp_path / "w.safetensors", export.arch_metadata(model))
    bigger = backbones.create(weights=path, img_size=64)
    assert bigger.pos_embed.shape == (1, 1 + 8 * 8, 192)
    assert bigger(torch.randn(1, 3, 64, 64)).shape == (1, 192)
    # the class token's position embedding is carried over unchanged
    assert torch.equal(bigger.pos_embed[:, 0], model.pos_embed[:, 0])


def test_header_contradictions_show_both_sides(make_vit, tmp_path):
    model = make_vit()
    path = export.save_weights(model.state_dict(), tmp_path / "w.safetensors", export.arch_metadata(model))
    with pytest.raises(BackboneError, match=r"vit_small_patch16_224.*timm_name='vit_tiny_patch16_224'"):
        backbones.create("vit_small_patch16_224", weights=path)
    with pytest.raises(BackboneError, match=r"patch_size=16 contradicts.*patch_size=8"):
        backbones.create(weights=path, patch_size=16)


def test_headerless_files_need_a_name(make_vit, tmp_path, images):
    model = make_vit().eval()
    path = tmp_path / "plain.safetensors"
    save_file(model.state_dict(), str(path))
    with pytest.raises(BackboneError, match="does not say which architecture"):
        backbones.create(weights=path)
    again = backbones.create("vit_tiny_patch16_224", weights=path, img_size=32, patch_size=8, depth=4).eval()
    assert torch.equal(again(images), model(images))


def test_pytorch_files_load_with_weights_only(make_vit, tmp_path, images):
    model = make_vit().eval()
    good = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, good)
    again = backbones.create("vit_tiny_patch16_224", weights=good, img_size=32, patch_size=8, depth=4).eval()
    assert torch.equal(again(images), model(images))

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "obj": argparse.Namespace(a=1)}, evil)
    with pytest.raises(BackboneError, match="weights_only=True"):
        backbones.create("vit_tiny_patch16_224", weights=evil, img_size=32, patch_size=8, depth=4)


def test_weights_that_do_not_fit_are_reported(make_vit, tmp_path):
    model = make_vit()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.3.")}
    path = export.save_weights(state, tmp_path / "w.safetensors", export.arch_metadata(model))
    with pytest.raises(BackboneError, match=r"missing keys 12 \(blocks\.3\.norm1\.weight, .*, \.\.\.\), unexpected keys 0"):
        backbones.create(weights=path)
    with pytest.raises(BackboneError, match="does not exist"):
        backbones.create(weights=tmp_path / "nope.safetensors")


def test_shared_pretrained_model_loads_from_its_header(pretrained_path):
    """The offline foundation model in ../shared/models loads as its README shows, with no name given."""
    meta_model = backbones.create(weights=pretrained_path).eval()
    assert meta_model.essa_arch == {"timm_name": "vit_tiny_patch16_224", "model_args": {"patch_size": 4, "img_size": 32}}
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, patch_size=4, img_size=32)
    reference.load_state_dict(load_file(str(pretrained_path)))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(meta_model(x), reference.eval()(x))


def test_token_avg_head_reads_cls_and_mean_patch_tokens_and_reloads(make_vit, images, tmp_path):
    from essa import tuners

    model = make_vit(num_classes=3, global_pool="token+avg").eval()
    assert isinstance(model, backbones.TokenAvgViT) and model.head.weight.shape == (3, 2 * 192)
    tokens = model.forward_features(images)  # after the final norm
    features = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)
    torch.testing.assert_close(model(images), features @ model.head.weight.T + model.head.bias)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), features)

    tuners.apply(model, "apla", r=16)
    with torch.no_grad():
        model.blocks[0].attn.proj.weight_rows.normal_()  # a trained tuner, merged into the export
    path = tuners.save_merged(model, tmp_path / "classifier.safetensors")
    loaded = backbones.create(weights=path).eval()
    assert isinstance(loaded, backbones.TokenAvgViT) and loaded.global_pool == "token+avg"
    torch.testing.assert_close(loaded(images), model(images))
    with pytest.raises(BackboneError, match="keeps its pooling"):
        loaded.reset_classifier(2, global_pool="avg")


def test_a_header_that_does_not_describe_its_tensors_is_refused_naming_both(make_vit, tmp_path):
    import json

    model = make_vit()  # patch 8, width 192
    meta = export.arch_metadata(model)
    args = json.loads(meta["model_args"])
    lying = export.save_weights(model.state_dict(), tmp_path / "patch.safetensors",
                                {**meta, "model_args": json.dumps({**args, "patch_size": 4})})
    with pytest.raises(BackboneError, match=r"header says patch size 4 .* holds 8 px patches"):
        backbones.create(weights=lying)  # timm would resample the patch embedding without a word
    wide = export.save_weights(model.state_dict(), tmp_path / "width.safetensors",
                               {**meta, "timm_name": "vit_small_patch16_224"})
    with pytest.raises(BackboneError, match=r"header says width \(embed_dim\) 384 .* tensors are 192 wide"):
        backbones.create(weights=wide)  # a size-mismatch traceback before


def test_image_sizes_the_patch_size_does_not_divide_are_refused_naming_ones_that_work(make_vit, tmp_path):
    from essa.config import BackboneConfig

    assert backbones.patch_size("vit_small_patch14_dinov2.lvd142m") == 14
    assert backbones.patch_size("vit_tiny_patch16_224", patch_size=8) == 8
    model = make_vit()
    path = export.save_weights(model.state_dict(), tmp_path / "w.safetensors", export.arch_metadata(model))
    assert backbones.patch_size(weights=path) == 8
    with pytest.raises(BackboneError, match="img_size=40 is not a multiple of the backbone's patch size 16: use 32 or 48"):
        BackboneConfig(name="vit_tiny_patch16_224").check_img_size("img_size", 40)
    with pytest.raises(BackboneError, match="ssl.local_size=10 .* patch size 8: use 8 or 16"):
        BackboneConfig(weights=str(path)).check_img_size("ssl.global_size, ssl.local_size", 32, 10)
    BackboneConfig(weights=str(path)).check_img_size("ssl.global_size, ssl.local_size", 32, None)


# ----- preprocessing: what the backbone's inputs are normalised with -------------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_clip(**kwargs):
    torch.manual_seed(0)
    return backbones.create("vit_base_patch16_clip_224.openai", img_size=32, patch_size=8, depth=1, embed_dim=64,
                            num_heads=2, **kwargs)


def test_a_tagged_timm_name_brings_its_pretrained_configs_statistics():
    pre = tiny_clip().essa_preprocessing
    assert (pre.mean, pre.std, pre.interpolation) == (CLIP_MEAN, CLIP_STD, "bicubic")
    # the tag decides, not the architecture's default tag: MAE's weights were trained with ImageNet's statistics
    assert backbones.create("vit_base_patch16_224.mae", img_size=32, patch_size=8, depth=1).essa_preprocessing.mean \
        == (0.485, 0.456, 0.406)
    assert backbones.create("vit_base_patch16_224", img_size=32, patch_size=8, depth=1).essa_preprocessing.mean \
        == (0.5, 0.5, 0.5)  # its default tag (augreg2_in21k_ft_in1k)


def test_the_export_header_records_the_preprocessing_and_a_reload_by_path_uses_it(tmp_path, images):
    model = tiny_clip().eval()
    path = export.save_weights(model.state_dict(), tmp_path / "clip.safetensors", export.arch_metadata(model))
    reloaded = backbones.create(weights=path).eval()  # the path alone: the header names no tag
    assert reloaded.essa_preprocessing == model.essa_preprocessing
    assert backbones.preprocessing(None, weights=path) == model.essa_preprocessing
    torch.testing.assert_close(reloaded(images), model(images), rtol=0, atol=0)


def test_files_without_recorded_statistics_fall_back_to_imagenet_unless_a_tag_is_named(make_vit, tmp_path):
    model = make_vit()
    path = tmp_path / "old.safetensors"
    old_header = {k: v for k, v in export.arch_metadata(model).items() if k in ("timm_name", "model_args")}
    export.save_weights(model.state_dict(), path, old_header)  # as essa wrote files before it recorded them
    assert model.essa_preprocessing.mean == (0.5, 0.5, 0.5)  # vit_tiny_patch16_224's default tag
    old = backbones.create(weights=path).essa_preprocessing
    assert (old.mean, old.std, old.interpolation) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    pth = tmp_path / "other.pth"
    torch.save(tiny_clip().state_dict(), pth)
    named = backbones.create("vit_base_patch16_clip_224.openai", weights=pth, img_size=32, patch_size=8, depth=1,
                             embed_dim=64, num_heads=2).essa_preprocessing
    assert named.mean == CLIP_MEAN


# ----- other people's checkpoints: key prefixes that are not timm's -------------------------------------------
def _moco_style(model: torch.nn.Module, path):
    """A DDP / MoCo-style checkpoint: {"state_dict": {"module.encoder.<timm key>": ..., "module.predictor...": ...}}."""
    state = {f"module.encoder.{k}": v.clone() for k, v in model.state_dict().items()}
    state["module.predictor.weight"] = torch.zeros(4, 4)
    torch.save({"state_dict": state, "epoch": 3}, path)
    return path


def test_a_prefixed_checkpoint_loads_with_a_key_map_exactly(make_vit, tmp_path):
    model = make_vit()
    path = _moco_style(model, tmp_path / "moco.pth")
    loaded = backbones.create("vit_tiny_patch16_224", weights=path, img_size=32, patch_size=8, depth=4,
                              key_map={"module.encoder.": "", "module.predictor.": None})
    own = model.state_dict()
    assert set(loaded.state_dict()) == set(own)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, own[key]), key


def test_a_prefixed_checkpoint_without_a_fitting_key_map_lists_the_keys_and_the_prefix(make_vit, tmp_path):
    path = _moco_style(make_vit(), tmp_path / "moco.pth")
    args = dict(weights=path, img_size=32, patch_size=8, depth=4)
    with pytest.raises(BackboneError) as err:
        backbones.create("vit_tiny_patch16_224", **args)
    message = str(err.value)
    assert "missing keys 54 (cls_token, pos_embed, patch_embed.proj.weight, patch_embed.proj.bias, blocks.0.norm1.weight" \
        ", ...)" in message
    assert "unexpected keys 55 (module.encoder.cls_token, module.encoder.pos_embed," in message
    assert "54 unexpected keys are model keys behind the prefix 'module.encoder.': try --key-map module.encoder.=" \
        in message
    # a map that strips the prefix but keeps the predictor: only that key is unexpected, and the map is named
    with pytest.raises(BackboneError, match=r'after backbone.key_map \{"module.encoder.": ""\} do not fit .*missing '
                                            r"keys 0, unexpected keys 1 \(module.predictor.weight\)"):
        backbones.create("vit_tiny_patch16_224", key_map={"module.encoder.": ""}, **args)
    with pytest.raises(BackboneError, match="maps both 'module.encoder.cls_token' and 'cls_token' to 'cls_token'"):
        backbones.map_keys({"module.encoder.cls_token": torch.zeros(1), "cls_token": torch.zeros(1)},
                           {"module.encoder.": ""})
    with pytest.raises(BackboneError, match="key_map .* renames the keys of a weights file: give weights=PATH"):
        backbones.create("vit_tiny_patch16_224", key_map={"module.": ""})


def test_the_key_map_is_a_config_key_and_a_flag(make_vit, tmp_path):
    from essa import config as config_mod
    from essa.commands import common
    from essa.config import BackboneConfig, ConfigError
    from essa.finetuning import FinetuneConfig

    path = _moco_style(make_vit(), tmp_path / "moco.pth")
    cfg = BackboneConfig(name="vit_tiny_patch16_224", weights=str(path),
                         model_args={"img_size": 32, "patch_size": 8, "depth": 4},
                         key_map={"module.encoder.": "", "module.predictor.": None})
    assert torch.equal(cfg.build().pos_embed, make_vit().pos_embed)
    assert common.key_map(["module.encoder.=", "module.predictor.=null", "a.=b."]) == {
        "module.encoder.": "", "module.predictor.": None, "a.": "b."}
    args = argparse.Namespace(weights=str(path), backbone=None, key_map=["module.="], set=[])
    overrides = common.overrides(args, {"weights": "backbone.weights"})
    assert 'backbone.key_map={"module.": ""}' in overrides
    loaded = config_mod.load(FinetuneConfig, overrides=overrides + ["data.root=x"])
    assert loaded.backbone.key_map == {"module.": ""}
    with pytest.raises(ConfigError, match="backbone.key_map renames the keys of a weights file: give backbone.weights"):
        config_mod.load(FinetuneConfig, overrides=["backbone.key_map={module.: ''}"])
    with pytest.raises(ConfigError, match="backbone.key_map: 'module.': 3; give key prefixes mapped"):
        config_mod.load(FinetuneConfig, overrides=["backbone.weights=w.pth", "backbone.key_map={module.: 3}"])
    with pytest.raises(ConfigError, match="--key-map 'module.': expected PREFIX=REPLACEMENT"):
        common.key_map(["module."])


def test_an_unset_argument_keeps_the_model_args_value():
    """essa evaluate builds with img_size=None when --img-size is not given: model_args' img_size stays (it used to
    fall back to timm's 224, running a 32 px model at 224 px)."""
    from essa.config import BackboneConfig

    cfg = BackboneConfig(name="vit_tiny_patch16_224", pretrained=False,
                         model_args={"img_size": 32, "patch_size": 8, "depth": 1})
    assert cfg.build(img_size=None, num_classes=0).patch_embed.img_size == (32, 32)
    assert cfg.build(img_size=16, num_classes=0).patch_embed.img_size == (16, 16)
