"""End-to-end supervised adaptation on real breast ultrasound images (BreastMNIST, 546 / 78 / 156 images, 28 px):
a pretrained ViT learns the task, a killed run resumes to the uninterrupted result, seeds are summarised, the
exported classifier reloads with its head, and a multilabel task (a CSV manifest of the same images) trains."""

import copy
import csv
import json
import math
import signal
import subprocess
import sys
import time

import lightning as L
import numpy as np
import pytest
import torch

from essa import backbones, config as config_mod, data
from essa.commands import main
from essa.evaluate.run import evaluate
from essa.finetuning import finetune, resolve_config
from tests.conftest import SHARED

BREAST = SHARED / "data" / "medmnist" / "breastmnist.npz"
pytestmark = pytest.mark.skipif(not BREAST.is_file(), reason=f"shared BreastMNIST not found at {BREAST}")

# A 2-block ViT-Ti with random weights on 28 px images (7 x 7 patches): fast enough to train in a test.
TINY = {
    "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False, "model_args": {"patch_size": 4, "depth": 2}},
    "tuner": {"name": "full"},
    "data": {"root": str(BREAST), "num_workers": 0, "duplicates": "skip"},
    "optim": {"epochs": 2, "batch_size": 32, "lr": 1e-3},
    "img_size": 28,
    "bootstrap": 100,
    "checkpoint_every_n_steps": 1,
}
QUIET = {"enable_progress_bar": False}


def _sections(out, **changes):
    sections = {**copy.deepcopy(TINY), "out": str(out)}
    for key, value in changes.items():
        sections[key] = {**sections[key], **value} if isinstance(value, dict) and key in sections else value
    return sections


@pytest.mark.slow
def test_a_pretrained_vit_beats_the_majority_baseline_and_exports_a_classifier(tmp_path, pretrained_path):
    result = finetune(
        backbone={"name": None, "pretrained": False, "weights": str(pretrained_path)},
        tuner={"name": "apla", "options": {"r": 16}}, head={"class_weights": True},
        data={"root": str(BREAST), "num_workers": 0}, optim={"epochs": 3, "batch_size": 16},
        img_size=32, bootstrap=200, out=str(tmp_path), trainer_kwargs=QUIET,
    )
    run = result["seeds"][0]["run_dir"]
    rows = json.loads((run / "metrics.json").read_text())
    epochs, test = rows[:-1], rows[-1]
    # epoch -1: the linear-probe head before step 0 (head.init=lp), the first candidate for the best checkpoint
    assert [r["epoch"] for r in epochs] == [-1, 0, 1, 2] and all(r["split"] == "val" for r in epochs)
    assert test["split"] == "test" and test == result["seeds"][0]["test"]
    # The majority-class baseline (always "normal, benign") has balanced accuracy 0.5; seeds 0-2 of this recipe
    # reach 0.635-0.662 (AUC 0.74), so 0.6 leaves a margin of 0.1 over the baseline and 0.035 under the runs.
    assert test["balanced_accuracy"] > 0.6 and test["auc"] > 0.65
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "auc", "kappa"):
        assert test[f"{name}_ci_low"] <= test[name] <= test[f"{name}_ci_high"], name
    # the tested checkpoint is the epoch with the best validation AUC (the primary metric of a binary task)
    assert test["epoch"] == max(epochs, key=lambda r: r["auc"])["epoch"]
    assert test["peak_memory_mib"] > 0 and test["images_per_s"] > 0

    # The merged classifier rebuilds from its header alone, head included, and reproduces the test predictions.
    classifier = backbones.create(weights=run / "classifier.safetensors").eval()
    assert classifier.num_classes == 2 and classifier.patch_embed.img_size == (32, 32)
    with open(run / "test_predictions.csv") as f:
        predictions = list(csv.DictReader(f))
    assert len(predictions) == 156 and list(predictions[0]) == [
        "path", "label", "predicted", "score:malignant", "score:normal, benign"]
    task = result["task"]
    images = data.ImageDataset(task.source, task.splits["test"][:4], data.transforms.eval_transform(32))
    with torch.no_grad():
        scores = classifier(torch.stack([images[i][0] for i in range(4)])).softmax(1)
    saved = torch.tensor([[float(p["score:malignant"]), float(p["score:normal, benign"])] for p in predictions[:4]])
    assert torch.allclose(scores, saved, atol=1e-5)
    assert (run / "test_confusion_matrix.png").stat().st_size > 0
    assert result["summary"]["metrics"]["auc"] == pytest.approx({"mean": test["auc"], "std": math.nan, "n": 1},
                                                                nan_ok=True)  # one seed: no std


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    sections = {"optim": {"epochs": 3, "batch_size": 32}}  # 17 steps per epoch
    reference = finetune(resolve_config(sections=_sections(tmp_path / "ref", **sections)), trainer_kwargs=QUIET)

    out = tmp_path / "killed"
    out.mkdir()
    config_mod.dump(resolve_config(sections=_sections(out, **sections)), out / "given.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "essa", "finetune", "--config", str(out / "given.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "seed_0" / "checkpoints" / "last.ckpt"
    deadline, step = time.monotonic() + 180, 0
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists():
            try:
                step = torch.load(last, weights_only=True)["global_step"]
            except Exception:  # being replaced right now
                step = 0
            if step >= 20:  # epoch 1, step 3 of 17: mid-epoch
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 20 <= step < 34, f"the run was not caught mid-epoch (step {step})"
    assert not (out / "seed_0" / "classifier.safetensors").exists()

    with pytest.raises(FileExistsError, match="pass --resume"):
        finetune(out / "given.yaml", trainer_kwargs=QUIET)
    resumed = finetune(out / "given.yaml", resume=True, trainer_kwargs=QUIET)
    ref_rows = json.loads((reference["seeds"][0]["run_dir"] / "metrics.json").read_text())
    res_rows = json.loads((resumed["seeds"][0]["run_dir"] / "metrics.json").read_text())
    assert [r["epoch"] for r in res_rows] == [-1, 0, 1, 2, ref_rows[-1]["epoch"]]
    # Tolerance: float32 reductions may differ in the last bits between processes; 1e-5 on weights, 1e-4 on
    # losses and metrics (a single flipped prediction of 78 validation images would change accuracy by 0.013).
    a = backbones.create(weights=reference["seeds"][0]["classifier"]).state_dict()
    b = backbones.create(weights=resumed["seeds"][0]["classifier"]).state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"the resumed run's weights differ from the uninterrupted one's by {worst}"
    for r_ref, r_res in zip(ref_rows, res_rows):
        for key in ("train_loss", "lr", "accuracy", "auc", "kappa"):
            if key in r_ref:
                assert abs(r_ref[key] - r_res[key]) <= 1e-4, (key, r_ref, r_res)


@pytest.mark.slow
def test_seeds_are_summarised_by_the_cli_and_a_rerun_skips_finished_seeds(tmp_path, capsys):
    given = tmp_path / "given.yaml"
    config_mod.dump(resolve_config(sections=_sections(tmp_path / "unused", optim={"epochs": 1})), given)
    out = tmp_path / "run"
    argv = ["finetune", "--config", str(given), "--seeds", "0,1", "--out", str(out), "--set", "head.pool=token+avg"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    tests = [json.loads((out / f"seed_{s}" / "metrics.json").read_text())[-1] for s in (0, 1)]
    assert tests[0]["auc"] != tests[1]["auc"]  # the seeds trained differently
    # Each seed's peak memory is its own: without freeing the first seed's heap and restarting the high-water mark,
    # the second one measured about a quarter of the first (the first also counts one-off library allocations).
    assert tests[1]["peak_memory_mib"] > 0.5 * tests[0]["peak_memory_mib"] > 0
    for name in ("balanced_accuracy", "auc", "kappa", "peak_memory_mib", "images_per_s"):
        values = [t[name] for t in tests]
        stats = summary["metrics"][name]
        assert stats["n"] == 2 and stats["mean"] == pytest.approx(np.mean(values))
        assert stats["std"] == pytest.approx(np.std(values, ddof=1))
    auc = summary["metrics"]["auc"]
    assert f"auc *              {auc['mean']:.3f} ± {auc['std']:.3f} (n=2)" in printed
    with open(out / "summary.csv") as f:
        assert next(csv.DictReader(f)) == {"metric": "accuracy", **{
            k: str(v) for k, v in summary["metrics"]["accuracy"].items()}}
    assert config_mod.read_yaml(out / "seed_1" / "config.yaml")["seeds"] == [1]
    assert backbones.create(weights=out / "seed_0" / "classifier.safetensors").global_pool == "token+avg"

    stamp = (out / "seed_0" / "classifier.safetensors").stat().st_mtime_ns
    assert main(argv) == 0
    assert "seed 0: finished before" in capsys.readouterr().out
    assert (out / "seed_0" / "classifier.safetensors").stat().st_mtime_ns == stamp
    # a seed directory made with other options is not mixed into the summary
    assert main([*argv[:-1], "head.pool=token"]) == 2
    assert "was run with another config" in capsys.readouterr().err


def test_bad_configs_are_explained(tmp_path):
    with pytest.raises(ValueError, match="head.pool='cls'; valid choices: token, avg"):
        resolve_config(sections=_sections(tmp_path, head={"pool": "cls"}))
    with pytest.raises(ValueError, match=r"seeds=\[0, 0\] must be a non-empty list of distinct integers"):
        resolve_config(sections=_sections(tmp_path, seeds=[0, 0]))
    with pytest.raises(ValueError, match="unknown tuner 'aplaa'"):
        resolve_config(sections=_sections(tmp_path, tuner={"name": "aplaa"}))
    with pytest.raises(ValueError, match="fewer than one batch"):
        finetune(resolve_config(sections=_sections(tmp_path, optim={"batch_size": 1024})))
    with pytest.raises(ValueError, match=r"optim.lr=1e-09 is below optim.min_lr=1e-06: the cosine would rise"):
        resolve_config(sections=_sections(tmp_path, optim={"lr": 1e-9}))
    for scale in ([0.0, 1.0], [0.8, 0.5], [0.5], [0.5, 1.2]):
        with pytest.raises(ValueError, match=r"augment.scale=.* must be two area fractions 0 < low <= high <= 1"):
            resolve_config(sections=_sections(tmp_path, augment={"scale": scale}))


@pytest.mark.slow
def test_a_multilabel_task_trains_and_its_classifier_and_features_are_evaluated(tmp_path):
    # 120 real BreastMNIST images with two labels each at most: their class, and "bright" when their mean
    # intensity is above the median, in a CSV manifest ("a|b" is a multilabel row).
    source = data.open_source(BREAST)
    records = [r for r in source.records if r.split == "train"][:120]
    pixels = [np.asarray(source.read(r)) for r in records]
    median = np.median([p.mean() for p in pixels])
    lines = ["path,labels"]
    for i, (record, image) in enumerate(zip(records, pixels)):
        source.read(record).save(tmp_path / f"{i}.png")
        names = [["malignant", "benign"][record.label]] + (["bright"] if image.mean() > median else [])
        lines.append(f"{i}.png,{'|'.join(names)}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")

    sections = _sections(tmp_path / "run", data={"root": str(tmp_path / "labels.csv"), "val": 0.2, "test": 0.2},
                         optim={"epochs": 1, "batch_size": 16}, head={"class_weights": True})
    result = finetune(resolve_config(sections=sections), trainer_kwargs=QUIET)
    assert result["task"].task == "multilabel" and result["task"].classes == ["benign", "bright", "malignant"]
    test = result["seeds"][0]["test"]
    assert 0 <= test["subset_accuracy"] <= test["accuracy"] <= 1 and 0 <= test["auc"] <= 1
    run = result["seeds"][0]["run_dir"]
    with open(run / "test_predictions.csv") as f:
        labels = [row["label"] for row in csv.DictReader(f)]
    assert len(labels) == 24 and {"0", "0;1", "1;2", "2"} >= set(labels)
    assert not (run / "test_confusion_matrix.png").exists()  # no confusion matrix for multilabel tasks

    evaluated = evaluate(backbone={"name": None, "weights": str(run / "classifier.safetensors")},
                         checkpoint=str(run), bootstrap=50, out=str(tmp_path / "eval"))
    assert set(evaluated["rows"]) == {"linear", "classifier"}  # no kNN for multilabel tasks
    assert evaluated["rows"]["classifier"]["auc"] == pytest.approx(test["auc"])


# ----- LP-FT, class weights --------------------------------------------------------------------------------------
SMALL = {"data": {"root": str(BREAST), "num_workers": 0, "duplicates": "skip", "max_train": 96},  # 3 steps/epoch
         "optim": {"epochs": 2, "batch_size": 32, "lr": 1e-3, "warmup_steps": 1}}


def test_the_lp_head_is_the_linear_probe_of_the_frozen_features_fitted_before_step_0(tmp_path):
    from essa.evaluate.features import cls_features
    from essa.evaluate.linear_probe import fit_linear_probe
    from essa.finetuning import HEAD_INIT_FILE

    # lr 0 throughout: the trained head stays the one fitted before step 0, so the exported classifier is the probe
    sections = _sections(tmp_path / "run", data=SMALL["data"],
                         optim={**SMALL["optim"], "lr": 0.0, "min_lr": 0.0, "epochs": 1})
    result = finetune(resolve_config(sections=sections), trainer_kwargs=QUIET)
    task, run = result["task"], result["seeds"][0]["run_dir"]
    assert resolve_config(sections=sections).head.init == "lp"  # the default

    # essa's linear probe, fitted here independently on the CLS features of the model as it started (lr 0: the
    # exported classifier's backbone is the initial one; head.pool=token: the head reads the CLS token)
    classifier = backbones.create(weights=run / "classifier.safetensors").eval()
    train = cls_features(classifier, task.source, task.splits["train"], img_size=28)
    val = cls_features(classifier, task.source, task.splits["val"], img_size=28)
    probe = fit_linear_probe(train.values, train.labels, val.values, val.labels, task="binary", num_classes=2)
    recorded = json.loads((run / HEAD_INIT_FILE).read_text())
    assert recorded["C"] == probe.C and recorded["val_auc"] == pytest.approx(probe.selection[probe.C])
    # validated before step 0 (epoch -1), it is the tested checkpoint: no epoch of lr 0 improves on it
    rows = json.loads((run / "metrics.json").read_text())
    # within one pair of the AUC: two val images score within 1e-11 under the probe (a tie there), which the head's
    # float32 scores (within 2e-5 of the probe's) may break
    counts = np.bincount(val.labels.numpy())
    one_pair = 1 / (counts[0] * counts[1])
    assert rows[0]["epoch"] == -1 and rows[0]["step"] == 0
    assert rows[0]["auc"] == pytest.approx(recorded["val_auc"], abs=one_pair * 1.001)
    assert rows[-1]["split"] == "test" and (rows[-1]["epoch"], rows[-1]["step"]) == (-1, 0)

    # head.calibrate (default): the probe's logits times one scale, fitted to the training loss on augmented views
    scale = recorded["logit_scale"]
    assert resolve_config(sections=sections).head.calibrate is True
    assert 1e-3 <= scale <= 10 and recorded["train_view_loss_calibrated"] <= recorded["train_view_loss"]
    weight, bias = probe.as_linear()
    assert np.allclose(classifier.head.weight.detach().numpy(), scale * weight, atol=1e-5)
    assert np.allclose(classifier.head.bias.detach().numpy(), scale * bias, atol=1e-5)
    with torch.no_grad():  # the probe's own probabilities on the val images, sharpened or softened by the scale
        scores = torch.softmax(classifier.head(val.values) / scale, 1)
    assert np.allclose(scores.numpy(), probe.predict_scores(val.values), atol=5e-5)
    # breast ultrasound's train split is imbalanced (about 2.7 benign per malignant): auto weights the loss
    assert result["seeds"][0]["test"]["class_weights"] is True


def test_the_calibrated_head_is_the_probe_times_its_scale_and_leaves_the_random_state_alone(tmp_path):
    from essa.finetuning import build_classifier, fit_probe_head
    from essa.task import load_task

    heads, states = {}, {}
    for calibrate in (False, True):
        cfg = resolve_config(sections=_sections(tmp_path, data=SMALL["data"], head={"calibrate": calibrate}))
        task = load_task(cfg.data)
        torch.manual_seed(0)
        model = build_classifier(cfg, task.num_classes)
        before = torch.get_rng_state()
        record = fit_probe_head(model, cfg, task, seed=0, loss_weights=torch.tensor([0.7, 1.8]))
        states[calibrate] = torch.equal(before, torch.get_rng_state())
        heads[calibrate] = (model.head.weight.detach().clone(), model.head.bias.detach().clone(), record)
    assert states == {False: True, True: True}  # training starts from the same random state either way
    assert "logit_scale" not in heads[False][2]
    scale = heads[True][2]["logit_scale"]
    assert scale != pytest.approx(1.0)
    assert torch.allclose(heads[True][0], scale * heads[False][0], atol=1e-6)
    assert torch.allclose(heads[True][1], scale * heads[False][1], atol=1e-6)
    assert heads[True][2]["C"] == heads[False][2]["C"]


class _Crash(Exception):
    pass


class _CrashAtStep(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise _Crash(f"crashed at step {self.step}")


def test_a_run_resumed_after_the_lp_stage_is_bit_identical_and_keeps_the_checkpoints_head(tmp_path, monkeypatch):
    from essa import finetuning

    reference = finetune(resolve_config(sections=_sections(tmp_path / "ref", **SMALL)), trainer_kwargs=QUIET)
    out = tmp_path / "crashed"
    with pytest.raises(_Crash):  # epoch 1, step 1 of 3; last.ckpt holds step 4
        finetune(resolve_config(sections=_sections(out, **SMALL)),
                 trainer_kwargs={**QUIET, "callbacks": [_CrashAtStep(4)]})
    assert torch.load(out / "seed_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    def no_refit(*args, **kwargs):
        raise AssertionError("a resumed run refitted the linear-probe head over its checkpoint's head")

    monkeypatch.setattr(finetuning, "fit_probe_head", no_refit)
    resumed = finetune(resolve_config(sections=_sections(out, **SMALL)), resume=True, trainer_kwargs=QUIET)
    a = backbones.create(weights=reference["seeds"][0]["classifier"]).state_dict()
    b = backbones.create(weights=resumed["seeds"][0]["classifier"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref_rows = json.loads((reference["seeds"][0]["run_dir"] / "metrics.json").read_text())
    res_rows = json.loads((resumed["seeds"][0]["run_dir"] / "metrics.json").read_text())
    strip = {"train_seconds", "images_per_s", "peak_memory_mib"}
    assert [{k: v for k, v in r.items() if k not in strip} for r in ref_rows] == [
        {k: v for k, v in r.items() if k not in strip} for r in res_rows]


def test_class_weights_auto_follows_the_class_ratio_and_true_false_are_kept(tmp_path):
    from essa.finetuning import AUTO_CLASS_RATIO, class_ratio, uses_class_weights

    assert AUTO_CLASS_RATIO == 1.5 and resolve_config().head.class_weights == "auto"
    assert class_ratio([0, 0, 0, 1, 1], 2, multilabel=False) == 1.5
    assert not uses_class_weights("auto", [0, 0, 0, 1, 1], 2, multilabel=False)  # 1.5: not above the ratio
    assert uses_class_weights("auto", [0, 0, 0, 0, 1, 1], 2, multilabel=False)  # 2.0
    assert uses_class_weights("auto", [0, 0, 1, 1], 3, multilabel=False)  # a class without images: inf
    assert not uses_class_weights("auto", [0, 1, 2, 0, 1, 2], 3, multilabel=False)
    # multilabel: each label's positives against its negatives
    assert class_ratio([(0,), (1,), (0, 1), ()], 2, multilabel=True) == 1.0
    assert uses_class_weights("auto", [(0,), (0,), (0, 1), ()], 2, multilabel=True)  # label 0: 3 vs 1
    assert uses_class_weights(True, [0, 1], 2, multilabel=False)
    assert not uses_class_weights(False, [0, 0, 0, 0, 1], 2, multilabel=False)
    for value in (True, False, "auto"):
        assert resolve_config(sections=_sections(tmp_path, head={"class_weights": value})).head.class_weights == value
    with pytest.raises(ValueError, match="head.class_weights='yes'; valid choices: true, false, auto"):
        resolve_config(sections=_sections(tmp_path, head={"class_weights": "yes"}))
    with pytest.raises(ValueError, match="head.init='probe'; valid choices: lp, random"):
        resolve_config(sections=_sections(tmp_path, head={"init": "probe"}))
