"""A backbone's preprocessing (essa.data.normalize): timm's pretrained config of the model, ImageNet's statistics,
or a dataset's own, and the config key data.normalize that chooses between them."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from essa import config as config_mod, data
from essa.data import normalize
from tests.data.conftest import write_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_timm_model():
    return timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, img_size=32, patch_size=8, depth=1,
                             embed_dim=64, num_heads=2, num_classes=0)


def test_a_timm_model_gets_the_statistics_of_its_pretrained_config():
    model = clip_timm_model()
    assert model.pretrained_cfg["mean"] == CLIP_MEAN  # timm knows the tag's config offline, weights or not
    pre = normalize.of_model(model)
    assert (pre.mean, pre.std, pre.interpolation) == (CLIP_MEAN, CLIP_STD, "bicubic")
    assert normalize.of_timm_name("vit_base_patch16_siglip_224.webli").mean == (0.5, 0.5, 0.5)
    assert normalize.of_timm_name("vit_small_patch14_dinov2.lvd142m").mean == normalize.IMAGENET_MEAN
    assert normalize.of_model(torch.nn.Linear(2, 2)) == normalize.IMAGENET  # no pretrained config: ImageNet's


def test_the_eval_view_maps_a_grey_image_to_the_models_statistics():
    pre = normalize.of_model(clip_timm_model())
    grey = Image.new("RGB", (40, 36), (128, 128, 128))
    x = data.transforms.eval_transform(32, preprocessing=pre)(grey)
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x, expected[:, None, None].expand(3, 32, 32))


def test_imagenet_mode_keeps_the_models_interpolation_and_uses_imagenets_statistics():
    own = normalize.of_model(clip_timm_model())
    pre = normalize.resolve("imagenet", own)
    assert (pre.mean, pre.std, pre.interpolation) == (normalize.IMAGENET_MEAN, normalize.IMAGENET_STD, "bicubic")
    assert normalize.resolve("model", own) == own


def test_dataset_statistics_equal_numpy_on_the_same_images_and_are_cached(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):  # 12 x 12 RGB noise: at img_size=12 no resizing, so numpy sees the same pixels
        write_image(tmp_path / "imgs" / f"{i}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    source = data.open_source(tmp_path / "imgs", labels=False)
    own = normalize.of_model(clip_timm_model())
    cache = tmp_path / "stats.json"
    pre = normalize.resolve("dataset", own, source, source.records, img_size=12, cache=cache)

    pixels = np.stack([np.asarray(Image.open(tmp_path / "imgs" / f"{i}.png"), dtype=np.float64) / 255
                       for i in range(5)])  # (5, 12, 12, 3)
    np.testing.assert_allclose(pre.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(pre.std, pixels.std(axis=(0, 1, 2)), rtol=1e-6)
    assert pre.interpolation == "bicubic" and pre.source.startswith("dataset (5 images of")

    # at most max_images (a seeded sample): deterministic, and different from all five
    three = normalize.resolve("dataset", own, source, source.records, img_size=12, max_images=3)
    assert three == normalize.resolve("dataset", own, source, source.records, img_size=12, max_images=3)
    assert three.mean != pre.mean and three.source.startswith("dataset (3 images")

    # the cache answers for the same images and size, and is recomputed for others
    saved = json.loads(cache.read_text())
    saved["mean"] = [0.1, 0.2, 0.3]
    cache.write_text(json.dumps(saved))
    assert normalize.resolve("dataset", own, source, source.records, img_size=12, cache=cache).mean == (0.1, 0.2, 0.3)
    assert normalize.resolve("dataset", own, source, source.records, img_size=8, cache=cache).mean != (0.1, 0.2, 0.3)


def test_the_header_fields_round_trip():
    pre = normalize.Preprocessing(CLIP_MEAN, CLIP_STD, "bicubic", "timm pretrained config of x")
    meta = normalize.header(pre)
    assert json.loads(meta["mean"]) == list(CLIP_MEAN) and meta["interpolation"] == "bicubic"
    assert normalize.from_header(meta, "w.safetensors") == pre
    assert normalize.from_header({"timm_name": "vit_tiny_patch16_224"}, "w.safetensors") is None
    with pytest.raises(ValueError, match="do not describe a preprocessing"):
        normalize.from_header({"mean": "[0.5, 0.5]", "std": "[1, 1, 1]"}, "w.safetensors")


@pytest.mark.parametrize("config", ["essa.adaptation.AdaptConfig", "essa.finetuning.FinetuneConfig",
                                    "essa.evaluate.run.EvalConfig"])
def test_data_normalize_is_a_config_key_whose_bad_values_are_refused(config):
    import importlib

    module, _, name = config.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    root = ["data.root=somewhere", "backbone.name=vit_tiny_patch16_224"]
    cfg = config_mod.load(cls, overrides=root)
    assert (cfg.data.normalize, cfg.data.normalize_images) == ("model", 1000)
    assert config_mod.load(cls, overrides=root + ["data.normalize=dataset"]).data.normalize == "dataset"
    with pytest.raises(config_mod.ConfigError, match=r"data.normalize='clip'; valid choices: model, imagenet, "
                                                     r"dataset \(model: the backbone's own statistics"):
        config_mod.load(cls, overrides=root + ["data.normalize=clip"])
    with pytest.raises(config_mod.ConfigError, match="data.normalize_images=0 must be at least 1"):
        config_mod.load(cls, overrides=root + ["data.normalize_images=0"])


def test_the_normalize_flag_sets_the_key_that_print_config_shows(capsys):
    from essa.commands import main
    from essa.commands.common import NORMALIZE_MODES

    assert NORMALIZE_MODES == normalize.MODES  # the parser's copy (it imports no torch) is the implementation's

    assert main(["finetune", "--data", "somewhere", "--normalize", "dataset", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "  normalize: dataset\n  normalize_images: 1000\n" in printed
    with pytest.raises(SystemExit):
        main(["adapt", "--data", "somewhere", "--normalize", "clip", "--print-config"])
    assert "--normalize: invalid choice: 'clip' (choose from 'model', 'imagenet', 'dataset')" in capsys.readouterr().err
