"""The run directory every command writes: resolved config, metrics (CSV and JSON), checkpoints, exports.

Checkpoints are written atomically (temporary file, then rename), so a run killed while saving keeps the
previous checkpoint whole. Checkpoints of a tuned model leave its frozen weights out (:func:`drop_frozen`): a
resumed run rebuilds them from the foundation model, and a checksum refuses a resume onto other weights. A run
directory is continued (or read back) only with the config it was made with (:meth:`RunDir.refuse_other_config`).

In a distributed run every process keeps the same history, and only global rank 0 writes files.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from essa import config as config_mod
from essa.train.trainer import full_weights, is_global_zero, over_processes


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.ckpt"

    def refuse_other_config(self, cfg, message: str) -> None:
        """Raise ValueError(``message``) when the directory's ``config.yaml`` holds another config than ``cfg`` (a
        config of the same class): a run continues, or is read back, only with the config it was made with."""
        saved = self.path / "config.yaml"
        if saved.exists() and config_mod.load(type(cfg), saved) != cfg:
            raise ValueError(message)

    def prepare(self, cfg, resume: bool) -> None:
        """Create the directory; refuse to silently overwrite a run that has checkpoints."""
        if self.last.exists() and not resume:
            raise FileExistsError(
                f"{self.path} already holds a run (checkpoints/last.ckpt); pass --resume to continue it "
                "or choose another --out"
            )
        if is_global_zero():
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            config_mod.dump(cfg, self.path / "config.yaml")

    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.csv and metrics.json from the full history (idempotent across resumes); rank 0 only."""
        if not is_global_zero():
            return
        (self.path / "metrics.json").write_text(json.dumps(rows, indent=2))
        keys = list(dict.fromkeys(k for row in rows for k in row))
        tmp = self.path / "metrics.csv.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path / "metrics.csv")


def save_checkpoint(trainer: L.Trainer, path: Path) -> None:
    """Every process calls it (a sharded model's state is gathered); rank 0 writes, and the others wait until the
    file is in place."""
    tmp = path.with_name(path.name + ".tmp")
    trainer.save_checkpoint(tmp, weights_only=False)  # full state: optimizer, loops, loader position
    if trainer.is_global_zero:
        os.replace(tmp, path)
    trainer.strategy.barrier("essa.save_checkpoint")


class Checkpointing(Callback):
    """``last.ckpt`` every ``every_n_steps`` optimisation steps and at each epoch end; ``best.ckpt`` when the
    monitored value (if any) improves. Also tells the loader how many batches of the epoch are done, which is
    what a resumed run skips (Lightning's fetcher reads one batch ahead, so the loader cannot count this itself).
    With gradient accumulation a checkpoint is only taken right after an optimisation step, never with gradients
    of some batches accumulated but not applied (a resumed run would skip those batches).
    """

    def __init__(self, run: RunDir, every_n_steps: int, monitor: str | None = None, mode: str = "max",
                 ties: str = "earlier"):
        """``ties``: which epoch ``best.ckpt`` keeps when the monitored value equals the best so far."""
        self.run, self.every_n_steps, self.monitor, self.mode = run, every_n_steps, monitor, mode
        self.ties = ties
        self.best_value: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.train_dataloader.position = batch_idx + 1
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if self.every_n_steps and stepped and trainer.global_step % self.every_n_steps == 0:
            save_checkpoint(trainer, self.run.last)

    def epoch_end(self, trainer, metrics: dict) -> None:
        """Called by the module once the epoch's metrics (e.g. kNN) are known."""
        save_checkpoint(trainer, self.run.last)
        value = metrics.get(self.monitor) if self.monitor else None
        if value is None:
            return
        later = self.ties == "later" and value == self.best_value
        better = self.best_value is None or later or (
            value > self.best_value if self.mode == "max" else value < self.best_value)
        if better:
            self.best_value = value
            save_checkpoint(trainer, self.run.best)

    def state_dict(self):
        return {"best_value": self.best_value}

    def load_state_dict(self, state):
        self.best_value = state["best_value"]


class EpochEnd(Callback):
    """After each training epoch: one history row (epoch, step, ``module.pop_epoch_means()`` and ``metrics_fn(module)``,
    e.g. validation metrics), the metrics files, and the checkpoints (best by the ``Checkpointing`` monitor).

    In a distributed run the epoch means are averaged over the processes (each process averaged its own equal
    share of every step's batch), ``metrics_fn`` runs in every process with the whole weights (it may evaluate
    sharded, :func:`essa.evaluate.features.forward_images`), and every process keeps the same history."""

    def __init__(self, run: RunDir, checkpointing: Checkpointing, metrics_fn):
        self.run, self.checkpointing, self.metrics_fn = run, checkpointing, metrics_fn

    def on_train_epoch_end(self, trainer, module):
        with full_weights(trainer):
            metrics = self.metrics_fn(module)
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step,
               **over_processes(trainer, module.pop_epoch_means()), **metrics}
        # a resumed run may redo the epoch end that a kill interrupted
        module.history = [r for r in module.history if r["epoch"] != row["epoch"]] + [row]
        self.run.write_metrics(module.history)
        self.checkpointing.epoch_end(trainer, row)


def frozen_keys(owner: nn.Module, trained: nn.Module) -> set[str]:
    """Names in ``owner.state_dict()`` of the parameters of ``trained`` (a submodule) that do not train."""
    frozen = {id(p) for p in trained.parameters() if not p.requires_grad}
    return {n for n, p in owner.named_parameters(remove_duplicate=False) if id(p) in frozen}


def frozen_checksum(trained: nn.Module) -> float:
    """A cheap checksum of the frozen weights of ``trained``."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in trained.parameters() if not p.requires_grad))


def drop_frozen(checkpoint: dict, owner: nn.Module, trained: nn.Module) -> None:
    """Leave the frozen weights of ``trained`` out of a Lightning checkpoint of ``owner``; record their checksum."""
    for key in frozen_keys(owner, trained):
        checkpoint["state_dict"].pop(key, None)
    checkpoint["frozen_checksum"] = frozen_checksum(trained)


def check_trainable_state(checkpoint: dict, owner: nn.Module, trained: nn.Module, what: str) -> None:
    """Refuse a checkpoint (``what`` names it) trained from other frozen weights than ``trained`` has, or whose
    trainable tensors are missing or have other shapes (e.g. a head for another number of classes)."""
    mine = frozen_checksum(trained)
    theirs = checkpoint["frozen_checksum"]
    if not math.isclose(theirs, mine, rel_tol=1e-9, abs_tol=1e-6):
        raise ValueError(
            f"{what} was trained from other frozen backbone weights than the ones built now (checksum "
            f"{theirs:.6g} vs {mine:.6g}): resume with the run's own config"
        )
    own, state = owner.state_dict(), checkpoint["state_dict"]
    missing = sorted(set(own) - set(state) - frozen_keys(owner, trained))
    if missing:
        raise ValueError(f"{what} lacks trainable tensors {missing[:5]}: it is not a checkpoint of this model")
    wrong = [f"{k} is {tuple(state[k].shape)} there but {tuple(own[k].shape)} here"
             for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"{what} does not fit the model: {'; '.join(wrong[:3])}; the checkpoint belongs to another "
                         "architecture or number of classes (resume with the run's own config and data)")
