"""The run directory every command writes: resolved config, metrics (CSV and JSON), checkpoints, exports.

Checkpoints are written atomically (temporary file, then rename), so a run killed while saving keeps the
previous checkpoint whole.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from essa import config as config_mod


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

    def prepare(self, cfg, resume: bool) -> None:
        """Create the directory; refuse to silently overwrite a run that has checkpoints."""
        if self.last.exists() and not resume:
            raise FileExistsError(
                f"{self.path} already holds a run (checkpoints/last.ckpt); pass --resume to continue it "
                "or choose another --out"
            )
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        config_mod.dump(cfg, self.path / "config.yaml")

    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.csv and metrics.json from the full history (idempotent across resumes)."""
        (self.path / "metrics.json").write_text(json.dumps(rows, indent=2))
        keys = list(dict.fromkeys(k for row in rows for k in row))
        tmp = self.path / "metrics.csv.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path / "metrics.csv")


def save_checkpoint(trainer: L.Trainer, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    trainer.save_checkpoint(tmp, weights_only=False)  # full state: optimizer, loops, loader position
    os.replace(tmp, path)


class Checkpointing(Callback):
    """``last.ckpt`` every ``every_n_steps`` optimisation steps and at each epoch end; ``best.ckpt`` when the
    monitored value (if any) improves. Also tells the loader how many batches of the epoch are done, which is
    what a resumed run skips (Lightning's fetcher reads one batch ahead, so the loader cannot count this itself).
    """

    def __init__(self, run: RunDir, every_n_steps: int, monitor: str | None = None, mode: str = "max"):
        self.run, self.every_n_steps, self.monitor, self.mode = run, every_n_steps, monitor, mode
        self.best_value: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.train_dataloader.position = batch_idx + 1
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            save_checkpoint(trainer, self.run.last)

    def epoch_end(self, trainer, metrics: dict) -> None:
        """Called by the module once the epoch's metrics (e.g. kNN) are known."""
        save_checkpoint(trainer, self.run.last)
        value = metrics.get(self.monitor) if self.monitor else None
        if value is None:
            return
        better = self.best_value is None or (value > self.best_value if self.mode == "max" else value < self.best_value)
        if better:
            self.best_value = value
            save_checkpoint(trainer, self.run.best)

    def state_dict(self):
        return {"best_value": self.best_value}

    def load_state_dict(self, state):
        self.best_value = state["best_value"]
