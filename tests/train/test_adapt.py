"""End-to-end SSA on real chest X-rays with a tiny ViT: runs, logs kNN, resumes after a kill, exports."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from essa import backbones, tuners
from essa.adaptation import AdaptConfig, adapt, build_loader, resolve_config
from essa.train.ssa import CollapseError, SSAModule
from tests.conftest import SHARED

XRAYS = SHARED / "data" / "chest_xray_pneumonia"
pytestmark = pytest.mark.skipif(not XRAYS.is_dir(), reason=f"shared chest X-rays not found at {XRAYS}")

TINY = {
    "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False, "model_args": {"patch_size": 8, "depth": 2}},
    "tuner": {"name": "apla", "options": {"r": 16}},
    "ssl": {"prototypes": 256, "head_hidden": 128, "head_bottleneck": 64, "n_local": 2, "global_size": 32},
    "optim": {"epochs": 2, "batch_size": 8},
    "data": {"num_workers": 0},
    "monitor": {"knn_k": 5, "checkpoint_every_n_steps": 1},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """24 unlabelled training X-rays (12 per class, labels dropped) and a labelled set of 2 x 10 test X-rays."""
    root = tmp_path_factory.mktemp("xrays")
    for cls in ("NORMAL", "PNEUMONIA"):
        for i, path in enumerate(sorted((XRAYS / "train" / cls).iterdir())[:12]):
            shutil.copy(path, root / "train" / f"{cls[0]}{i}.jpg") if (root / "train").is_dir() else (
                (root / "train").mkdir(), shutil.copy(path, root / "train" / f"{cls[0]}{i}.jpg"))
        (root / "val" / cls).mkdir(parents=True)
        for path in sorted((XRAYS / "test" / cls).iterdir())[:10]:
            shutil.copy(path, root / "val" / cls / path.name)
    return root


def _cfg(folders, out, **sections):
    return resolve_config(None, sections={**copy.deepcopy(TINY), "out": str(out),
                                          "data": {**TINY["data"], "root": str(folders / "train"),
                                                   "val": str(folders / "val")}, **sections})


def _module(cfg):
    L.seed_everything(cfg.seed, verbose=False)
    backbone = cfg.backbone.build(img_size=cfg.ssl.global_size, dynamic_img_size=True)
    tuners.apply(backbone, cfg.tuner.name, **cfg.tuner.options)
    loader = build_loader(cfg, backbone.patch_embed.patch_size[0])
    return SSAModule(cfg, backbone, iters_per_epoch=len(loader)), loader


def test_one_step_moves_the_teacher_by_exactly_the_momentum_formula(folders, tmp_path):
    cfg = _cfg(folders, tmp_path / "run", optim={"epochs": 2, "batch_size": 8, "warmup_epochs": 0})
    module, loader = _module(cfg)
    assert module.schedules.lr[0] > 0
    student0 = {n: p.detach().clone() for n, p in module.student.named_parameters()}
    teacher0 = {n: p.detach().clone() for n, p in module.teacher.named_parameters()}
    assert all(torch.equal(teacher0[n], student0[n]) for n in student0)  # teacher == student at the start

    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, loader)
    m = float(module.schedules.teacher_momentum[0])
    for name, p in module.student.named_parameters():
        t = dict(module.teacher.named_parameters())[name]
        if p.requires_grad:
            assert not torch.equal(p, student0[name]) or name.endswith("prototypes.weight"), name
            assert torch.allclose(t, m * teacher0[name] + (1 - m) * p.detach(), atol=1e-7), name
        else:
            assert torch.equal(p, student0[name]), f"frozen {name} changed"
            assert t is p  # shared, not copied
    # the prototypes are frozen in the first epoch
    assert torch.equal(module.student.head.prototypes.weight, student0["head.prototypes.weight"])


def test_two_epochs_log_knn_and_the_export_reproduces_the_teacher(folders, tmp_path):
    result = adapt(_cfg(folders, tmp_path / "run"))
    run = result["run_dir"]
    rows = result["metrics"]
    assert [r["epoch"] for r in rows] == [0, 1]
    for row in rows:
        assert 0.0 <= row["knn_bal_acc"] <= 1.0 and row["feature_rank"] > 1.0
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("dino", "ibot", "koleo", "total"))
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["tuner"] == {"name": "apla", "options": {"r": 16}}
    resources = json.loads((run / "resources.json").read_text())
    assert resources == result["resources"]
    assert resources["trainable_params"] == 2 * (16 * 192 + 16)  # 16 rows of W_O and its bias, in 2 blocks
    assert resources["head_params"] > 0 and resources["peak_memory_mib"] > 0
    assert resources["images_per_s"] > 0 and resources["train_seconds"] > 0

    exported = backbones.create(weights=result["backbone"]).eval()
    x = torch.randn(3, 3, 32, 32)
    module, _ = _module(_cfg(folders, tmp_path / "unused"))
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    module.load_state_dict(state, strict=False)
    teacher = module.teacher.backbone.eval()
    with torch.no_grad():
        assert (exported.forward_features(x) - teacher.forward_features(x)).abs().max() <= 1e-5
    # the tuner state applies to a fresh foundation model (random weights here: seeded as the run) and gives
    # the same features
    L.seed_everything(0, verbose=False)
    base = _cfg(folders, tmp_path / "unused").backbone.build(img_size=32, dynamic_img_size=True)
    tuners.load(base, result["tuner"])
    with torch.no_grad():
        assert (base.eval().forward_features(x) - teacher.forward_features(x)).abs().max() <= 1e-5


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(folders, tmp_path):
    sections = {"optim": {"epochs": 3, "batch_size": 4}}  # 6 steps per epoch
    reference = adapt(_cfg(folders, tmp_path / "ref", **sections))

    out = tmp_path / "killed"
    cfg = _cfg(folders, out, **sections)
    out.mkdir()
    from essa import config as config_mod

    config_mod.dump(cfg, out / "given.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "essa", "adapt", "--config", str(out / "given.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    step = 0
    while time.monotonic() < deadline and proc.poll() is None:
        last = out / "checkpoints" / "last.ckpt"
        if last.exists():
            try:
                step = torch.load(last, weights_only=True)["global_step"]
            except Exception:  # being replaced right now
                step = 0
            if step >= 8:  # epoch 1, step 2 of 6: mid-epoch
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 8 <= step < 18, f"the run was not caught mid-way (step {step})"
    assert not (out / "backbone.safetensors").exists()

    resumed = adapt(_cfg(folders, out, **sections), resume=True)
    assert [r["epoch"] for r in resumed["metrics"]] == [0, 1, 2]
    a = backbones.create(weights=reference["backbone"]).state_dict()
    b = backbones.create(weights=resumed["backbone"]).state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"resumed run differs from the uninterrupted one by {worst}"
    for r_ref, r_res in zip(reference["metrics"], resumed["metrics"]):
        assert abs(r_ref["total"] - r_res["total"]) <= 1e-4, "\n".join(map(str, reference["metrics"] + resumed["metrics"] + [step]))


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(folders, tmp_path):
    cfg = _cfg(folders, tmp_path / "run", monitor={"knn_k": 5, "checkpoint_every_n_steps": 1,
                                                   "min_feature_rank": 1e9, "collapse_patience": 2})
    with pytest.raises(CollapseError, match="collapsed at epoch 0, step 1: the effective rank"):
        adapt(cfg)
    good = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert good["global_step"] == 1


BREAST = SHARED / "data" / "medmnist" / "breastmnist.npz"


@pytest.mark.skipif(not BREAST.is_file(), reason=f"shared BreastMNIST not found at {BREAST}")
def test_ssa_on_the_train_split_of_a_task_monitors_knn_on_its_val_split(tmp_path):
    from essa.task import load_task

    splits = {"max_train": 40, "duplicates": "skip"}
    cfg = resolve_config(None, sections={
        **copy.deepcopy(TINY), "out": str(tmp_path / "run"), "optim": {"epochs": 1, "batch_size": 8},
        "data": {"root": str(BREAST), "split": "train", "val_split": "val", "splits": splits, "num_workers": 0},
    })
    task = load_task(cfg.data.task_data())
    loader = build_loader(cfg, 8)
    assert loader.dataset.base.records == task.splits["train"] and len(task.splits["train"]) == 40
    assert not {r.path for r in task.splits["train"]} & {r.path for r in task.splits["test"]}
    result = adapt(cfg)
    assert 0.0 <= result["metrics"][0]["knn_bal_acc"] <= 1.0  # leave-one-out kNN on the 78 val images
    assert (result["run_dir"] / "checkpoints" / "best.ckpt").exists()
    with pytest.raises(ValueError, match="data.val_split and data.splits need data.split"):
        resolve_config(None, sections={"data": {"root": str(BREAST), "val_split": "val"}})
    with pytest.raises(ValueError, match="data.split='tests'; valid choices: train, val, test"):
        resolve_config(None, sections={"data": {"root": str(BREAST), "split": "tests"}})
    with pytest.raises(ValueError, match="unknown config key max_images"):
        resolve_config(None, sections={"data": {"root": str(BREAST), "split": "train",
                                                "splits": {"max_images": 3}}})


def test_bad_input_is_explained(folders, tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch"):
        adapt(_cfg(folders, tmp_path / "a", optim={"epochs": 1, "batch_size": 64}))
    with pytest.raises(ValueError, match="data.root is required"):
        resolve_config(None, sections={"out": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown tuner 'aplaa'"):
        _cfg(folders, tmp_path / "b", tuner={"name": "aplaa"})
    adapt(_cfg(folders, tmp_path / "c", optim={"epochs": 1, "batch_size": 8}))
    with pytest.raises(FileExistsError, match="pass --resume"):
        adapt(_cfg(folders, tmp_path / "c", optim={"epochs": 1, "batch_size": 8}))
