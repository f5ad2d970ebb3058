"""End-to-end SSA on real chest X-rays with a tiny ViT: runs, logs kNN, resumes after a kill, exports."""

import copy
import json
import shutil
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
import yaml

from essa import backbones, tuners
from essa.adaptation import adapt, build_loader, resolve_config
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
    cfg = _cfg(folders, tmp_path / "run", optim={"epochs": 2, "batch_size": 8, "warmup": 0},
               ssl={**TINY["ssl"], "head_warmup": 0, "freeze_prototypes": "1 epoch"})
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


def _grads_after_one_step(module, loader):
    """Names of the student's trainable parameters that got a gradient in the first training step (the optimizer
    step is skipped, so the gradients stay to be read)."""
    seen = {}

    class Seen(Exception):
        pass

    class Grab(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.update({n: p.grad is not None for n, p in pl_module.student.named_parameters() if p.requires_grad})
            raise Seen

    with pytest.raises(Seen):
        L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[Grab()]).fit(module, loader)
    return seen


def test_the_head_warmup_trains_the_head_alone_then_the_tuner(folders, tmp_path):
    ssl = {**TINY["ssl"], "head_warmup": 3, "freeze_prototypes": 0}
    module, loader = _module(_cfg(folders, tmp_path / "run", ssl=ssl, optim={"epochs": 2, "batch_size": 8,
                                                                             "warmup": 2}))
    s = module.schedules
    assert s.head_warmup.tolist() == [True] * 3 + [False] * 3 and s.head_warmup_steps == 3
    assert (s.lr[:3] == 0).all() and s.lr[3] == 0 and s.lr[4] > 0  # the tuner's ramp starts after the warm-up
    assert s.head_lr[1] > 0
    grads = _grads_after_one_step(module, loader)
    head = {n for n in grads if n.startswith("head.")}
    assert head and all(grads[n] for n in head)  # every head parameter, prototypes included
    assert not any(grads[n] for n in set(grads) - head), "the backbone's tuner or the mask token got a gradient"

    # after the warm-up: the tuner and the mask token train too
    module, loader = _module(_cfg(folders, tmp_path / "run2", ssl={**ssl, "head_warmup": 0}))
    assert all(_grads_after_one_step(module, loader).values())


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
    choice = resources["exported"]
    assert choice["checkpoint"] in ("best", "last") and choice["reason"]
    state = torch.load(run / "checkpoints" / f"{choice['checkpoint']}.ckpt", weights_only=True)
    assert state["epoch"] == choice["epoch"]
    state = state["state_dict"]
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


@pytest.mark.parametrize("head_warmup", [0.1, 10], ids=["warmup-before-kill", "kill-inside-warmup"])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(folders, tmp_path, head_warmup):
    # 6 steps per epoch, killed at step 8 or later: after a 2-step head warm-up, or inside a 10-step one
    sections = {"optim": {"epochs": 3, "batch_size": 4}, "ssl": {**TINY["ssl"], "head_warmup": head_warmup}}
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


def test_a_head_whose_prototypes_are_all_equal_stops_the_run(folders, tmp_path):
    """A constructed collapse: every prototype the same vector, so teacher and student are uniform whatever the
    image; the watch stops the run after collapse_patience steps once the warm-ups are over."""
    cfg = _cfg(folders, tmp_path / "run", ssl={**TINY["ssl"], "head_warmup": 2, "freeze_prototypes": 2},
               monitor={"knn_k": 5, "checkpoint_every_n_steps": 1, "collapse_patience": 2})
    module, loader = _module(cfg)
    with torch.no_grad():
        module.student.head.prototypes.weight[:] = module.student.head.prototypes.weight[0]
        module.teacher.head.prototypes.weight[:] = module.student.head.prototypes.weight[0]
    with pytest.raises(CollapseError, match=r"collapsed at epoch 1, step 3: the teacher's distribution over the 256 "
                                            r"prototypes is uniform .* for 2 steps"):
        L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(module, loader)


def test_the_collapse_watch_stays_quiet_on_a_healthy_run(folders, tmp_path):
    result = adapt(_cfg(folders, tmp_path / "run", monitor={"knn_k": 5, "checkpoint_every_n_steps": 1,
                                                            "collapse_patience": 1}))
    for row in result["metrics"]:
        assert 0 < row["teacher_entropy"] < row["dino"] + 1e-6 and row["prototypes_used"] >= 1
        assert 0 <= row["student_kl_uniform"] and 0 < row["teacher_batch_entropy"]
    head = result["resources"]["head"]
    assert head == {"prototypes": 256, "hidden": 128, "bottleneck": 64, "warmup_steps": 1}  # 0.1 of 6 steps


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


def test_extra_unlabelled_folders_add_their_images(folders, tmp_path):
    cfg = _cfg(folders, tmp_path / "run", data={**TINY["data"], "root": str(folders / "train"),
                                                "extra": [str(folders / "val"), str(folders / "train")]})
    loader = build_loader(cfg, 8)
    source = loader.dataset.base.source
    records = loader.dataset.base.records
    assert len(records) == 24 + 20  # the train folder named twice counts once
    assert all(r.label is None for r in records) and source.classes == []
    val_image = next(r for r in records if "NORMAL" in r.path)
    assert source.load(val_image).size == _image_size(val_image.path)
    cfg = _cfg(folders, tmp_path / "run2", data={**TINY["data"], "root": str(folders / "train"),
                                                 "extra": [str(folders / "val")], "max_images": 30})
    assert len(build_loader(cfg, 8).dataset.base.records) == 30  # max_images subsamples all of them


def _image_size(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_the_export_choice_says_which_epoch_and_why():
    from essa.adaptation import export_choice, knn_k, knn_noise

    rows = [{"epoch": e, "step": 10 * (e + 1), "knn_bal_acc": v, "knn_noise": 0.01}
            for e, v in enumerate([0.60, 0.70, 0.70, 0.65])]
    best = export_choice(rows, monitored=True)
    assert (best["epoch"], best["step"], best["checkpoint"]) == (2, 30, "best")  # the tie goes to the later epoch
    assert best["reason"].startswith("the best kNN balanced accuracy, 0.700")
    flat = export_choice([{**r, "knn_noise": 0.06} for r in rows], monitored=True)  # 0.10 <= 2 x 0.06
    assert (flat["epoch"], flat["checkpoint"]) == (3, "last") and "stayed flat" in flat["reason"]
    assert export_choice(rows, monitored=False)["reason"].startswith("no kNN monitor")
    # BreastMNIST's val split: 21 malignant, 57 benign; k=200 would let all 77 others vote on each image
    labels = [0] * 21 + [1] * 57
    assert knn_k(labels, 200) == 20 and knn_k(labels, 5) == 5 and knn_k([0, 1, 1], 200) == 1
    assert knn_noise(labels, 0.5) == pytest.approx((0.25 / 21 + 0.25 / 57) ** 0.5 / 2)
