"""Every stage normalises a CLIP-configured ViT with CLIP's statistics (timm's pretrained config of
``vit_base_patch16_clip_224.openai``), not ImageNet's: the SSA views (DINOv2 multi-crop, MAE / SimMIM crop and
picture), the kNN monitor, fine-tuning's train and eval views, the linear-probe head, ``essa evaluate``; the
exports record the statistics and a stage that loads them by path alone uses them. The images are constant (black
and mid-grey), so that every normalised pixel has one expected value per channel."""

import json

import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from essa import adaptation, backbones, finetuning
from essa.data import normalize
from essa.evaluate.run import evaluate
from essa.task import load_task
from essa.train.run_dir import RunDir
from tests.data.conftest import write_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = normalize.IMAGENET_MEAN, normalize.IMAGENET_STD
GREY = 128
CLIP = {"name": "vit_base_patch16_clip_224.openai", "pretrained": False,
        "model_args": {"patch_size": 8, "depth": 1, "embed_dim": 64, "num_heads": 2}}
QUIET = {"enable_progress_bar": False}


def expected(value: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(3,) the normalised value of a constant image of grey level ``value``."""
    return (value / 255 - torch.tensor(mean)) / torch.tensor(std)


def assert_constant(x: torch.Tensor, value: int, mean=CLIP_MEAN, std=CLIP_STD) -> None:
    """``x`` (3, H, W): every pixel of channel c is (value / 255 - mean[c]) / std[c]."""
    want = expected(value, mean, std)[:, None, None].expand_as(x)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)


@pytest.fixture
def task_root(tmp_path):
    """A labelled task: train/{black,grey} 6 images each, test/{black,grey} 2 each, constant 40 x 36 px RGB."""
    root = tmp_path / "task"
    for split, n in (("train", 6), ("test", 2)):
        for name, value in (("black", 0), ("grey", GREY)):
            for i in range(n):
                write_image(root / split / name / f"{i}.png", (value,) * 3, size=(40, 36), mode="RGB")
    return root


def _value_of(x: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> int:
    """The grey level (0 or GREY) whose normalised value ``x`` (3, H, W) holds, checked exactly."""
    value = 0 if torch.allclose(x[:, 0, 0], expected(0, mean, std), atol=1e-6) else GREY
    assert_constant(x, value, mean, std)
    return value


class Recorder:
    """Replaces ``VisionTransformer.forward_features`` and records each input batch."""

    def __init__(self, monkeypatch):
        self.batches: list[torch.Tensor] = []
        original = VisionTransformer.forward_features

        def forward_features(model, x, *args, **kwargs):
            self.batches.append(x.detach().clone())
            return original(model, x, *args, **kwargs)

        monkeypatch.setattr(VisionTransformer, "forward_features", forward_features)

    def values(self, mean=CLIP_MEAN, std=CLIP_STD) -> set[int]:
        images = torch.cat(self.batches)
        self.batches.clear()
        return {_value_of(x, mean, std) for x in images}


def test_the_dinov2_views_and_the_knn_monitor_use_clips_statistics(task_root, tmp_path, monkeypatch):
    cfg = adaptation.resolve_config(sections=dict(
        backbone=CLIP, data={"root": str(task_root / "train"), "val": str(task_root / "test"), "num_workers": 0},
        ssl={"global_size": 32, "n_local": 2}, tuner={"name": "full"}, optim={"batch_size": 4},
        out=str(tmp_path / "run")))
    stage = adaptation._SSAStage(cfg, RunDir(cfg.out))
    stage.start()
    backbone = stage.tuned_model()
    loader = stage.loader(backbone)
    assert (stage.preprocessing.mean, stage.preprocessing.std) == (CLIP_MEAN, CLIP_STD)
    # the transform the loader applies (black: colour jitter, blur and solarisation leave it black)
    crops = loader.dataset.base.transform(Image.new("RGB", (40, 36)))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    for crop in crops:
        assert_constant(crop, 0)
    # the loader built without a stage resolves the same
    standalone = adaptation.build_loader(cfg, 8)
    for crop in standalone.dataset.base.transform(Image.new("RGB", (40, 36))):
        assert_constant(crop, 0)
    assert json.loads((tmp_path / "run" / adaptation.PREPROCESSING_FILE).read_text())["mean"] == list(CLIP_MEAN)

    recorder = Recorder(monkeypatch)
    metrics = adaptation.knn_metrics(backbone, stage.knn_data, cfg, stage.preprocessing)
    assert recorder.values() == {0, GREY} and metrics["knn_bal_acc"] == 1.0  # constant classes: trivially apart

    # data.normalize=dataset: the SSA images' statistics (6 black, 6 grey), recorded with their images' key
    cfg = adaptation.resolve_config(cfg, overrides=["data.normalize=dataset", f"out={tmp_path / 'run2'}"])
    stage = adaptation._SSAStage(cfg, RunDir(cfg.out))
    stage.start()
    crops = stage.loader(stage.tuned_model()).dataset.base.transform(Image.new("RGB", (40, 36)))
    mean, std = GREY / 255 / 2, GREY / 255 / 2  # half 0, half GREY / 255: std = mean
    assert stage.preprocessing.mean == pytest.approx((mean,) * 3, rel=1e-6)
    assert stage.preprocessing.std == pytest.approx((std,) * 3, rel=1e-6)
    assert_constant(crops[0], 0, stage.preprocessing.mean, stage.preprocessing.std)
    saved = json.loads((tmp_path / "run2" / adaptation.PREPROCESSING_FILE).read_text())
    assert saved["mean"] == list(stage.preprocessing.mean) and "key" in saved


def test_finetuning_views_and_the_probe_head_use_clips_statistics(task_root, tmp_path, monkeypatch):
    cfg = finetuning.resolve_config(sections=dict(
        backbone=CLIP, data={"root": str(task_root), "num_workers": 0, "duplicates": "skip", "val": 0.25},
        img_size=32, optim={"batch_size": 4}, out=str(tmp_path / "ft")))
    task = load_task(cfg.data)
    pre = finetuning.resolve_preprocessing(cfg, task)
    stage = finetuning._SeedStage(cfg, 0, task, RunDir(tmp_path / "ft" / "seed_0"), False, pre)
    model = stage.tuned_model()
    assert model.essa_preprocessing == pre and (pre.mean, pre.std) == (CLIP_MEAN, CLIP_STD)
    train_view = stage.loader(model).dataset.base.transform
    assert_constant(train_view(Image.new("RGB", (40, 36), (GREY,) * 3)), GREY)

    recorder = Recorder(monkeypatch)
    finetuning.fit_probe_head(model, cfg, task, 0, preprocessing=pre)  # the eval view of train and val
    assert recorder.values() == {0, GREY}
    finetuning._val_metrics(type("M", (), {"model": model})(), cfg, task, pre)
    assert recorder.values() == {0, GREY}

    # data.normalize=imagenet: ImageNet's statistics, the model's interpolation
    imagenet = finetuning.resolve_preprocessing(finetuning.resolve_config(cfg, overrides=["data.normalize=imagenet"]),
                                                task)
    assert (imagenet.mean, imagenet.interpolation) == (normalize.IMAGENET_MEAN, "bicubic")
    # data.normalize=dataset: the train split's own statistics (6 black and 4 grey images after the val split)
    own = finetuning.resolve_preprocessing(finetuning.resolve_config(cfg, overrides=["data.normalize=dataset"]), task)
    grey_share = sum(r.label == task.classes.index("grey") for r in task.splits["train"]) / len(task.splits["train"])
    mean = grey_share * GREY / 255
    std = (grey_share * (GREY / 255) ** 2 - mean**2) ** 0.5
    torch.testing.assert_close(torch.tensor(own.mean), torch.full((3,), mean), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(own.std), torch.full((3,), std), rtol=1e-6, atol=1e-7)
    view = finetuning.build_loader(finetuning.resolve_config(cfg, overrides=["data.normalize=dataset"]), task,
                                   0).dataset.base.transform
    assert_constant(view(Image.new("RGB", (40, 36), (GREY,) * 3)), GREY, own.mean, own.std)


def test_mae_then_finetune_then_evaluate_by_path_keep_clips_statistics(task_root, tmp_path, monkeypatch):
    import essa.train.mim

    pictures = []
    original = essa.train.mim.save_reconstructions
    monkeypatch.setattr(essa.train.mim, "save_reconstructions",
                        lambda *args, **kwargs: pictures.append(kwargs) or original(*args, **kwargs))
    ssa = adaptation.adapt(backbone=CLIP, objective="mae", tuner={"name": "lora", "options": {"r": 2}},
                           data={"root": str(task_root / "train"), "val": str(task_root / "test"), "num_workers": 0},
                           mae={"decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2},
                           ssl={"global_size": 32}, optim={"epochs": 1, "batch_size": 6},
                           out=str(tmp_path / "ssa"), trainer_kwargs=QUIET)
    clip = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic"}
    assert [(p["mean"], p["std"]) for p in pictures] == [(tuple(clip["mean"]), tuple(clip["std"]))]
    _, meta = backbones.read_state_dict(ssa["backbone"])
    assert {k: json.loads(meta[k]) if k != "interpolation" else meta[k] for k in clip} == clip
    assert meta["normalize"] == "timm pretrained config of vit_base_patch16_clip_224.openai"
    assert json.loads((ssa["run_dir"] / adaptation.PREPROCESSING_FILE).read_text())["std"] == clip["std"]

    # the export by path alone: its header names no tag, so the statistics can only come from the header
    recorder = Recorder(monkeypatch)
    ft = finetuning.finetune(backbone={"name": None, "pretrained": False, "weights": str(ssa["backbone"])},
                             tuner={"name": "linear"}, data={"root": str(task_root), "num_workers": 0, "val": 0.25,
                                                             "duplicates": "skip"},
                             img_size=32, optim={"epochs": 1, "batch_size": 4}, bootstrap=10,
                             out=str(tmp_path / "ft"), trainer_kwargs=QUIET)
    assert recorder.values() == {0, GREY}  # the probe head, validation and test views
    classifier = ft["seeds"][0]["classifier"]
    assert backbones.create(weights=classifier).essa_preprocessing.mean == tuple(clip["mean"])
    assert json.loads((tmp_path / "ft" / finetuning.PREPROCESSING_FILE).read_text())["mean"] == clip["mean"]

    out = evaluate(checkpoint=str(classifier), data={"root": str(task_root), "num_workers": 0, "val": 0.25,
                                                     "duplicates": "skip"}, bootstrap=10, out=str(tmp_path / "ev"))
    assert recorder.values() == {0, GREY}
    assert json.loads((out["out"] / "preprocessing.json").read_text())["classifier"]["mean"] == clip["mean"]

    # evaluate's knn / linear of the SSA export, with data.normalize=imagenet: ImageNet's statistics
    out = evaluate(backbone={"name": None, "pretrained": False, "weights": str(ssa["backbone"])},
                   data={"root": str(task_root), "num_workers": 0, "val": 0.25, "duplicates": "skip",
                         "normalize": "imagenet"}, bootstrap=10, out=str(tmp_path / "ev2"))
    assert recorder.values(IMAGENET_MEAN, IMAGENET_STD) == {0, GREY}
    used = json.loads((out["out"] / "preprocessing.json").read_text())
    assert used["knn"]["mean"] == used["linear"]["mean"] == list(normalize.IMAGENET_MEAN)
