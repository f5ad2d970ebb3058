"""Scale-out: 2 processes (torchrun, gloo on CPU) train as 1 process with the same global batch, agree with each other
on everything they hold (APLA rows, student, EMA teacher, DINO and iBOT centers), and evaluate sharded; the sampler
shards epochs without duplicates or drops and resumes per process; memory options and bad settings.

The SSA comparison with 1 process leaves out the two parts of DINOv2's objective that are per process by design
(as in the reference): iBOT masks are drawn per process batch, and KoLeo's nearest neighbours are searched within a
process's batch. So it runs with ``ssl.mask_probability=0`` and ``ssl.koleo_weight=0``; a second SSA run with the
whole objective checks that the processes still agree with each other exactly.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from safetensors.torch import load_file

from essa import config as config_mod
from essa.commands import main
from essa.config import ConfigError, TrainerConfig
from essa.train import run_dir
from essa.train.loader import EpochSampler, ResumableLoader
from essa.train.trainer import prepare_backbones
from tests.conftest import SHARED, tiny_vit
from tests.train.distributed_worker import run_stages

XRAYS = SHARED / "data" / "chest_xray_pneumonia"
needs_xrays = pytest.mark.skipif(not XRAYS.is_dir(), reason=f"shared chest X-rays not found at {XRAYS}")
WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD = 2
# Tolerances of 2 processes against 1: the same images and global batches, so the same maths; only the order of
# float32 sums differs (gradients averaged over processes instead of summed in one batch, centers as the mean of
# per-process means). Measured: weights 4e-6 apart after 4 SSA steps (AdamW divides small gradient differences by
# small second moments), 5e-8 after 4 fine-tuning steps; losses 5e-7. Training on any other batches moves weights
# about 1e-3 apart (AdamW steps each weight by about lr = 1e-3).
WEIGHT_ATOL, LOSS_ATOL = 5e-5, 1e-5

TINY = {"name": "vit_tiny_patch16_224", "pretrained": False, "model_args": {"patch_size": 8, "depth": 2}}
ADAPT = {
    "backbone": TINY, "tuner": {"name": "apla", "options": {"r": 16}},
    "ssl": {"prototypes": 256, "head_hidden": 128, "head_bottleneck": 64, "n_local": 2, "global_size": 32,
            "mask_probability": 0.0, "koleo_weight": 0.0},
    "optim": {"epochs": 2, "warmup": 0},
    "data": {"num_workers": 0},
    "monitor": {"knn_k": 5, "checkpoint_every_n_steps": 1},
}
FINETUNE = {
    "backbone": TINY, "tuner": {"name": "apla", "options": {"r": 16}},
    "data": {"val": 0.25, "num_workers": 0, "duplicates": "skip"},
    "optim": {"epochs": 2, "lr": 1e-3, "warmup_steps": 0},
    "img_size": 32, "bootstrap": 20, "checkpoint_every_n_steps": 1,
}
GLOBAL_BATCH = 8
DISTRIBUTED = {"devices": WORLD, "strategy": "ddp", "accelerator": "cpu"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """16 unlabelled X-rays (SSA), 11 labelled ones for the kNN monitor (an odd count: the last process's share
    is padded), and a labelled task of 2 x 12 train and 5 + 6 test X-rays."""
    root = tmp_path_factory.mktemp("xrays")
    for c, cls in enumerate(("NORMAL", "PNEUMONIA")):
        train = sorted((XRAYS / "train" / cls).iterdir())
        test = sorted((XRAYS / "test" / cls).iterdir())
        for folder, files in ((root / "ssa", train[:8]), (root / "knn" / cls, test[: 5 + c]),
                              (root / "task" / "train" / cls, train[8:20]), (root / "task" / "test" / cls,
                                                                            test[5 + c : 10 + 2 * c])):
            folder.mkdir(parents=True, exist_ok=True)
            for path in files:
                shutil.copy(path, folder / f"{cls}_{path.name}")
    return root


def _stages(images, out: Path, batch_size: int, trainer: dict) -> list[dict]:
    def sections(base, **changes):
        s = copy.deepcopy(base)
        s["optim"]["batch_size"] = batch_size
        s["trainer"] = trainer
        s.update(changes)
        return s

    adapt = sections(ADAPT, out=str(out / "adapt"))
    adapt["data"].update(root=str(images / "ssa"), val=str(images / "knn"))
    whole = copy.deepcopy(adapt)  # DINOv2's whole objective: per-process masks and KoLeo
    whole["ssl"].update(mask_probability=0.5, koleo_weight=0.1)
    whole["out"] = str(out / "adapt_whole")
    finetune = sections(FINETUNE, out=str(out / "finetune"))
    finetune["data"]["root"] = str(images / "task")
    return [{"kind": "adapt", "name": "adapt", "sections": adapt},
            {"kind": "adapt", "name": "adapt_whole", "sections": whole},
            {"kind": "finetune", "name": "finetune", "sections": finetune}]


@pytest.fixture(scope="module")
def runs(images, tmp_path_factory):
    """The stages run by 1 process (batch 8) and by 2 processes under torchrun (batch 4 each)."""
    single, double = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("double")
    run_stages(_stages(images, single, GLOBAL_BATCH, {}), single)

    spec = double / "stages.json"
    spec.write_text(json.dumps({"stages": _stages(images, double, GLOBAL_BATCH // WORLD, DISTRIBUTED),
                                "probe_dir": str(double)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={WORLD}", str(WORKER), str(spec)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return single, double


def _probe(out: Path, stage: str, rank: int = 0) -> dict:
    return torch.load(out / f"{stage}_rank{rank}.pt", weights_only=True)


def _metrics(out: Path, stage: str) -> list[dict]:
    path = out / stage / ("seed_0" if stage == "finetune" else "") / "metrics.json"
    return json.loads(path.read_text())


@needs_xrays
@pytest.mark.parametrize("stage", ["adapt", "adapt_whole", "finetune"])
def test_processes_draw_the_same_apla_rows_and_end_with_identical_state(runs, stage):
    _, double = runs
    ranks = [_probe(double, stage, r) for r in range(WORLD)]
    assert all(p["world_size"] == WORLD for p in ranks)
    rows = ranks[0]["rows"]
    assert len(rows) == (4 if stage.startswith("adapt") else 2)  # 2 blocks; SSA: student and teacher
    for name, value in rows.items():
        assert torch.equal(value, ranks[1]["rows"][name]), name  # drawn independently, before any broadcast
    if stage.startswith("adapt"):
        for name, value in rows.items():
            assert torch.equal(value, rows[name.replace("student.", "teacher.")])
    # Student, EMA teacher and both centers are bit-identical: DDP buffers are not re-broadcast (trainer.py), so
    # equal centers mean lightly's center update all-reduces over the processes.
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    assert state0.keys() == state1.keys()
    for name, value in state0.items():
        assert torch.equal(value, state1[name]), name
    if stage.startswith("adapt"):
        assert state0["loss.dino.center"].abs().sum() > 0
        ibot = state0["loss.ibot.center.center"].abs().sum()
        assert ibot > 0 if stage == "adapt_whole" else ibot == 0  # masks in the whole objective only


@needs_xrays
@pytest.mark.parametrize("stage", ["adapt", "finetune"])
def test_two_processes_train_as_one_with_the_same_global_batch(runs, stage):
    single, double = runs
    one, two = _probe(single, stage)["state"], _probe(double, stage)["state"]
    worst = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert worst <= WEIGHT_ATOL, f"{stage}: 2 processes end {worst} away from 1 process"

    rows_one, rows_two = _metrics(single, stage), _metrics(double, stage)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
    if stage == "adapt":
        assert [r["step"] for r in rows_one] == [2, 4]  # 16 images, global batch 8: 2 steps per epoch
        keys = ("dino", "total", "feature_rank", "knn_acc", "knn_bal_acc")
    else:  # the epoch rows (validation metrics); the last row, the test row, is compared below
        rows_one, rows_two = rows_one[:-1], rows_two[:-1]
        # epoch -1: the linear-probe head before step 0 (head.init=lp; no training loss, no lr), then 2 epochs
        assert [(r["epoch"], r["split"]) for r in rows_two] == [(-1, "val"), (0, "val"), (1, "val")]
        keys = ("train_loss", "lr", "accuracy", "auc", "balanced_accuracy")
    for r1, r2 in zip(rows_one, rows_two):
        assert r1.keys() == r2.keys()
        for key in keys:
            if key in r1:
                assert abs(r1[key] - r2[key]) <= LOSS_ATOL, (stage, key, r1, r2)


@needs_xrays
def test_rank_zero_exports_what_one_process_exports(runs):
    single, double = runs
    for path in ("adapt/backbone.safetensors", "finetune/seed_0/classifier.safetensors"):
        a, b = load_file(single / path), load_file(double / path)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHT_ATOL, path
    test_one, test_two = _metrics(single, "finetune")[-1], _metrics(double, "finetune")[-1]
    assert test_two["split"] == "test" and test_two["epoch"] == test_one["epoch"]
    for key in ("accuracy", "auc", "kappa"):
        assert abs(test_one[key] - test_two[key]) <= LOSS_ATOL, key
    # the sharded test split (11 images over 2 processes, padded) comes back whole, once each, in order
    with open(double / "finetune" / "seed_0" / "test_predictions.csv") as f:
        assert f.read().count("\n") == 1 + 11
    assert not list(double.rglob("*.tmp"))  # checkpoints were renamed into place, by process 0 only


@needs_xrays
def test_gradient_accumulation_trains_as_the_larger_batch(images, runs, tmp_path):
    single, _ = runs
    stages = _stages(images, tmp_path, GLOBAL_BATCH // 2, {"accumulate_grad_batches": 2})
    run_stages([stages[2]], tmp_path)
    one, accumulated = _probe(single, "finetune")["state"], _probe(tmp_path, "finetune")["state"]
    worst = max((one[k].float() - accumulated[k].float()).abs().max().item() for k in one)
    assert worst <= WEIGHT_ATOL, f"accumulating 2 x 4 ends {worst} away from batch 8"
    rows = _metrics(tmp_path, "finetune")
    assert [r["step"] for r in rows[:-1]] == [r["step"] for r in _metrics(single, "finetune")[:-1]]
    # checkpoints are taken right after optimisation steps only: the saved loader position is a whole step
    last = torch.load(tmp_path / "finetune" / "seed_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == rows[-2]["step"]


def _keys(sampler: EpochSampler) -> list[int]:
    return [index for _epoch, index in sampler]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_the_global_batches_without_duplicates_or_drops(world):
    size, batch = 29, 2
    shards = []
    for rank in range(world):
        sampler = EpochSampler(size, seed=5, batch_size=batch)
        sampler.shard(world, rank)
        sampler.set_epoch(3)
        shards.append(_keys(sampler))
    whole = EpochSampler(size, seed=5, batch_size=world * batch)
    whole.set_epoch(3)
    reference = _keys(whole)
    assert len(reference) == size // (world * batch) * world * batch  # only the last incomplete step is dropped
    assert all(len(s) == len(shards[0]) for s in shards)
    flat = [i for s in shards for i in s]
    assert sorted(flat) == sorted(reference) and len(set(flat)) == len(flat)
    for b in range(len(reference) // (world * batch)):  # step b of all shards is step b of one process
        step = {i for s in shards for i in s[b * batch : (b + 1) * batch]}
        assert step == set(reference[b * world * batch : (b + 1) * world * batch])


class _Keys(torch.utils.data.Dataset):
    """Item ``(epoch, index)`` is its own key."""

    def __len__(self):
        return 30

    def __getitem__(self, key):
        return key


def test_a_shard_resumes_mid_epoch_with_exactly_its_remaining_batches():
    def loader():
        sampler = EpochSampler(30, seed=1, batch_size=3)
        sampler.shard(2, 1)
        return ResumableLoader(_Keys(), sampler, collate_fn=list)

    reference = loader()
    reference.sampler.set_epoch(4)
    full = list(reference)
    interrupted = loader()
    interrupted.sampler.set_epoch(4)
    it = iter(interrupted)
    next(it), next(it)
    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    resumed.sampler.set_epoch(4)
    assert list(resumed) == full[2:] and len(full) == 5


def test_bad_shards_and_settings_are_explained(capsys):
    with pytest.raises(ValueError, match="rank 2 of 2 processes"):
        EpochSampler(10, seed=0, batch_size=2).shard(2, 2)
    for section, message in [
        ({"strategy": "deepspeed"}, "trainer.strategy='deepspeed'; valid choices: auto, ddp, fsdp"),
        ({"devices": 0}, "trainer.devices=0; valid: a count of at least 1, -1"),
        ({"accumulate_grad_batches": 0}, "trainer.accumulate_grad_batches=0 must be at least 1"),
        ({"num_nodes": 0}, "trainer.num_nodes=0 must be at least 1"),
        ({"precision": "bf16"}, "trainer.precision='bf16'; valid choices: auto, 32-true"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            config_mod.from_dict(TrainerConfig, section)
    for flags, message in [(["--devices", "0"], "expected a count of at least 1"),
                           (["--accumulate-grad-batches", "0"], "expected an integer of at least 1"),
                           (["--strategy", "zero3"], "invalid choice: 'zero3'")]:
        with pytest.raises(SystemExit) as exit_:
            main(["adapt", "--data", "x", *flags])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_flags_set_the_trainer_section():
    from essa.adaptation import AdaptConfig
    from essa.commands import build_parser
    from essa.commands.adapt import ADAPT_FLAGS
    from essa.commands.common import config_path, overrides

    args = build_parser().parse_args(["adapt", "--data", "x", "--devices", "0,1", "--num-nodes", "2", "--strategy",
                                      "fsdp", "--accumulate-grad-batches", "4", "--grad-checkpointing",
                                      "--precision", "bf16-mixed"])
    cfg = config_mod.load(AdaptConfig, config_path(args), overrides=overrides(args, ADAPT_FLAGS))
    assert cfg.trainer == TrainerConfig(devices=[0, 1], num_nodes=2, strategy="fsdp", precision="bf16-mixed",
                                        accumulate_grad_batches=4, grad_checkpointing=True)


def test_only_process_zero_writes_run_files(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # as RANK=1 set by torchrun
    run = run_dir.RunDir(tmp_path / "run")
    run.prepare(TrainerConfig(), resume=False)
    run.write_metrics([{"epoch": 0}])
    assert not (tmp_path / "run").exists()


def test_activation_checkpointing_gives_the_same_gradients_and_compile_keeps_the_names():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = tiny_vit()
        prepare_backbones(TrainerConfig(grad_checkpointing=checkpointing), model)
        assert model.grad_checkpointing is checkpointing
        model.forward_features(images).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])

    model = tiny_vit()
    keys = list(model.state_dict())
    prepare_backbones(TrainerConfig(compile=True), model)
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert list(model.state_dict()) == keys
