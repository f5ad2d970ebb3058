"""``essa export``: a finished run's model as a Hub folder that plain timm loads (the same outputs, the run's
preprocessing in its config), with a model card; clear errors for what cannot be exported or pushed."""

from __future__ import annotations

import json
import stat

import pytest
import timm
import torch
import yaml

from essa import backbones, hub, tuners
from essa.commands import main
from essa.finetuning import CLASSIFIER_FILE
from essa.train.stage import export_merged

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_CLIP = dict(pretrained=False, img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2)


def _adapt_run(tmp_path):
    """What a finished essa adapt run leaves: an APLA-tuned CLIP-configured ViT's merged export and its records."""
    run = tmp_path / "ssa"
    run.mkdir()
    torch.manual_seed(0)
    model = backbones.create("vit_base_patch16_clip_224.openai", **TINY_CLIP)
    tuners.apply(model, "apla", r=8)
    with torch.no_grad():
        for p in tuners.trainable_parameters(model).values():
            p.add_(0.1 * torch.randn_like(p))  # as if SSA had moved it
    export_merged(model, run / "backbone.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "backbone": {"name": "vit_base_patch16_clip_224.openai", "pretrained": False},
        "tuner": {"name": "apla", "options": {"r": 8}}, "objective": "dinov2",
        "data": {"root": "/data/xrays", "split": "train"}, "ssl": {"global_size": 32},
        "optim": {"epochs": 2, "batch_size": 8}}))
    (run / "resources.json").write_text(json.dumps({
        "trainable_params": 1040, "images": 24, "peak_memory_mib": 512.5, "images_per_s": 3.25,
        "train_seconds": 40.0, "exported": {"epoch": 1, "step": 6, "checkpoint": "best",
                                            "reason": "the best kNN balanced accuracy"}}))
    (run / "metrics.json").write_text(json.dumps([{"epoch": 0, "step": 3, "knn_bal_acc": 0.61},
                                                   {"epoch": 1, "step": 6, "knn_bal_acc": 0.66}]))
    return run, backbones.create(weights=run / "backbone.safetensors").eval()


def test_an_adapt_run_exports_a_folder_plain_timm_loads_with_its_preprocessing(tmp_path):
    run, essa_model = _adapt_run(tmp_path)
    out = hub.export(run, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in out.iterdir())  # group and others read
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), essa_model.forward_features(x))
    data = timm.data.resolve_data_config({}, model=loaded)
    assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == 1.0
    assert data["mean"] == pytest.approx(CLIP_MEAN) and data["std"] == pytest.approx(CLIP_STD)
    # the other way timm takes a file: the architecture by name, the weights from the folder
    config = json.loads((out / "config.json").read_text())
    overlaid = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                                 pretrained_cfg_overlay={"file": str(out / "model.safetensors")}).eval()
    with torch.no_grad():
        assert torch.equal(overlaid.forward_features(x), essa_model.forward_features(x))

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    from timm.models import get_pretrained_cfg

    licence = get_pretrained_cfg("vit_base_patch16_clip_224.openai").license  # the base weights' own
    assert front["library_name"] == "timm" and "essa" in front["tags"] and front["license"] == licence
    assert "- **Base model:** vit_base_patch16_clip_224.openai" in card
    assert config["pretrained_cfg"]["tag"] == "openai"  # the base weights', not the architecture's default tag
    assert '  - tuner: apla {"r": 8}' in card and "  - objective: dinov2" in card
    assert "  - exported: epoch 1 (step 6): the best kNN balanced accuracy" in card
    assert "24 unlabelled images of /data/xrays (the train split; labels unused)" in card
    assert "- epoch 1: kNN balanced accuracy on the val images 0.6600 (exported)" in card
    assert "- peak memory (MiB): 512" in card and "- images/s: 3.25" in card
    assert 'timm.create_model("hf-hub:export", pretrained=True)' in card


def test_a_finetune_seed_exports_its_classifier_and_test_metrics_with_intervals(tmp_path, make_vit):
    run = tmp_path / "sa" / "seed_0"
    run.mkdir(parents=True)
    model = make_vit(num_classes=2)
    export_merged(model, run / CLASSIFIER_FILE)
    (run / "config.yaml").write_text(yaml.safe_dump({"tuner": {"name": "full"}, "task": "binary", "img_size": 32,
                                                     "seeds": [0], "data": {"root": "breast.npz"}}))
    (run / "metrics.json").write_text(json.dumps([
        {"epoch": 0, "split": "val", "auc": 0.7},
        {"epoch": 0, "step": 5, "split": "test", "auc": 0.8, "auc_ci_low": 0.7, "auc_ci_high": 0.9}]))
    with pytest.raises(hub.ExportError, match=r"is an essa finetune run of 1 seeds: export one of them, e.g. .*seed_0"):
        hub.export(tmp_path / "sa", tmp_path / "out")
    out = hub.export(run, tmp_path / "out")
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert loaded(x).shape == (2, 2) and torch.equal(loaded(x), model.eval()(x))
    card = (out / "README.md").read_text()
    assert "- test auc: 0.8000 (95 % bootstrap interval 0.7000-0.9000)" in card
    assert "pipeline_tag: image-classification" in card


def test_what_cannot_be_exported_is_one_line(tmp_path, make_vit, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no run directory at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "holds no exported model" in capsys.readouterr().err
    run, _ = _adapt_run(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert main(["export", str(run), "--out", str(tmp_path / "taken")]) == 2
    assert "taken already exists; choose another --out or delete it" in capsys.readouterr().err
    both = tmp_path / "both"
    both.mkdir()
    export_merged(backbones.create("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                                   num_classes=2, global_pool="token+avg"), both / CLASSIFIER_FILE)
    assert main(["export", str(both), "--out", str(tmp_path / "o")]) == 2
    assert "head.pool=token+avg" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()


def test_pushing_offline_is_one_clear_error_and_the_folder_stays(tmp_path, monkeypatch, capsys):
    run, _ = _adapt_run(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export", str(run), "--out", str(tmp_path / "out"), "--push-to-hub", "me/ssa-apla"]) == 2
    captured = capsys.readouterr()
    assert f"exported: {tmp_path / 'out'} (README.md, config.json, model.safetensors)" in captured.out
    assert ("cannot push to the Hugging Face Hub: HF_HUB_OFFLINE is set; the folder " in captured.err
            and "push it later with `huggingface-cli upload me/ssa-apla" in captured.err)
    assert 'timm.create_model("hf-hub:me/ssa-apla", pretrained=True)' in (tmp_path / "out" / "README.md").read_text()
