"""The run directory every command writes: resolved config, metrics (CSV and JSON), checkpoints, exports.

Checkpoints are written atomically (temporary file, then rename), so a run killed while saving keeps the
previous checkpoint whole. Checkpoints of a tuned model leave its frozen weights out (:func:`drop_frozen`): a
resumed run rebuilds them from the foundation model, and a checksum refuses a resume onto other weights. A run
directory is continued (or read back) only with the config it was made with (:meth:`RunDir.refuse_other_config`).

In a distributed run every process keeps the same history, and only global rank 0 writes files.

What a run guarantees (README, "What a run guarantees"; tests/train/test_reliability.py):

- Exact resume after a kill at any moment: the best value of the monitored metric, with its epoch and step, is
  updated before any checkpoint of the epoch's end is written, so every ``last.ckpt`` holds the best so far; and
  ``best.ckpt`` is written before the epoch end's ``last.ckpt``, so a kill between the two resumes from the
  previous ``last.ckpt``, redoes the steps and the epoch end, and writes the same ``best.ckpt`` again.
- One run at a time in a directory: :meth:`RunDir.locked` holds ``.lock`` (JSON pid, host, start), created with
  ``os.link`` of a complete file (atomic, fails if it exists); a lock whose process is gone on this host is taken
  over with a warning. Only global rank 0 takes it.
- Operational problems with the directory (no permission, a full disk, an existing run without ``--resume``, a
  corrupt ``last.ckpt``) are :class:`RunDirError`: one line, exit code 2.

Test hook: ``ESSA_KILL_AFTER=<kind>:<n>`` SIGKILLs the process right after one checkpoint write (``step:<n>``:
``last.ckpt`` after optimisation step n; ``epoch:<n>``: ``last.ckpt`` at the end of epoch n; ``best:<n>``:
``best.ckpt`` at the end of epoch n). Unset, it costs one dictionary look-up per write.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import os
import pickle
import shutil
import signal
import socket
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from essa import config as config_mod, io
from essa.errors import EssaError, Interrupted
from essa.train.interrupt import StopRequest, signal_hook
from essa.train.loggers import log_epoch
from essa.train.trainer import full_weights, is_global_zero, over_processes


class RunDirError(EssaError, OSError):
    """An operational problem with a run directory (permission, full disk, busy, existing run, corrupt checkpoint):
    one line, exit code 2. Also an OSError, as what it replaces was."""


class RunExistsError(RunDirError, FileExistsError):
    """The directory holds a run and ``--resume`` was not given."""


class CheckpointMismatchError(EssaError, ValueError):
    """A checkpoint that is not one of the model built now (other frozen weights, tensors or shapes)."""


class RunBusyError(RunDirError):
    """Another live process holds the directory's lock."""


def _os_error(err: OSError, what: str) -> RunDirError:
    """``err`` (raised while doing ``what``, e.g. "write checkpoints/last.ckpt") as one line."""
    if err.errno == errno.ENOSPC:
        why = "no space left on the device: free some space and rerun with --resume"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied (read-only?): choose another --out"
    else:
        why = err.strerror or str(err)
    return RunDirError(f"cannot {what}: {why}")


@contextlib.contextmanager
def writing(what: str):
    """Convert an OSError raised in the block into a :class:`RunDirError` saying ``what`` failed."""
    try:
        yield
    except RunDirError:
        raise
    except OSError as err:
        raise _os_error(err, what) from None


def _kill_hook(kind: str, n: int) -> None:
    """The test hook (module docstring): SIGKILL this process if ``ESSA_KILL_AFTER`` is ``kind:n``."""
    if os.environ.get("ESSA_KILL_AFTER") == f"{kind}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @contextlib.contextmanager
    def locked(self):
        """Hold the directory's lock (``.lock``) for the block, on global rank 0 (the other processes of a
        distributed run start with it and write nothing). Raises :class:`RunBusyError` naming the holder when a live
        process holds it; a lock left by a process that is gone (on this host) is taken over, with a warning."""
        if not is_global_zero():
            yield
            return
        with writing(f"create the run directory {self.path}"):
            self.path.mkdir(parents=True, exist_ok=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname(),
                "start": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
        tmp = self.path / f".lock.{os.getpid()}.tmp"
        try:
            with writing(f"write into the run directory {self.path}"):
                tmp.write_text(json.dumps(mine))
                for _ in range(3):
                    try:
                        os.link(tmp, self.lock_file)  # atomic: fails if the lock exists; the file is whole
                        break
                    except FileExistsError:
                        pass
                    holder = self._holder()
                    if holder is not None and (holder.get("host") != mine["host"] or _alive(int(holder.get("pid", -1)))):
                        raise RunBusyError(
                            f"{self.path} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                            f"started {holder.get('start')}); wait for it, or choose another --out")
                    warnings.warn(f"{self.path}: taking over the lock left by a process that is gone "
                                  f"({json.dumps(holder) if holder else 'an unreadable .lock'})", stacklevel=3)
                    self.lock_file.unlink(missing_ok=True)
                else:
                    raise RunBusyError(f"{self.path}: could not take the lock {self.lock_file}")
        finally:
            tmp.unlink(missing_ok=True)
        try:
            yield
        finally:
            if self._holder() == mine:
                self.lock_file.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.lock_file.read_text())
        except (OSError, ValueError):
            return None

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.ckpt"

    def epoch(self, epoch: int) -> Path:
        """The checkpoint of epoch ``epoch``'s end, kept with ``trainer.keep_checkpoints=all``."""
        return self.checkpoints / f"epoch_{epoch:03d}.ckpt"

    @property
    def finished(self) -> bool:
        """Whether a run finished here: its resources.json is written once training is done, before the exports."""
        return (self.path / RESOURCES_FILE).is_file()

    def prune(self, keep: str) -> None:
        """Once the run is finished and exported, delete the checkpoints that ``keep`` (``trainer.keep_checkpoints``)
        does not name; rank 0 only."""
        if not is_global_zero():
            return
        kept = {"last,best": ("last.ckpt", "best.ckpt"), "last": ("last.ckpt",), "best": ("best.ckpt",),
                "none": ()}.get(keep)
        if kept is None:  # all
            return
        with writing(f"delete checkpoints in {self.checkpoints}"):
            for path in self.checkpoints.glob("*.ckpt"):
                if path.name not in kept:
                    path.unlink()

    def refuse_other_config(self, cfg, message: str) -> None:
        """Raise ConfigError(``message``) when the directory's ``config.yaml`` holds another config than ``cfg`` (a
        config of the same class): a run continues, or is read back, only with the config it was made with."""
        saved = self.path / "config.yaml"
        if saved.exists() and config_mod.load(type(cfg), saved) != cfg:
            raise config_mod.ConfigError(message)

    def prepare(self, cfg, resume: bool) -> None:
        """Create the directory; refuse to silently overwrite a run that has checkpoints or finished, and to resume
        a finished run whose ``last.ckpt`` was not kept (``trainer.keep_checkpoints``)."""
        if self.last.exists() and not resume:
            raise RunExistsError(
                f"{self.path} already holds a run (checkpoints/last.ckpt); pass --resume to continue it "
                "or choose another --out"
            )
        keep = getattr(getattr(cfg, "trainer", None), "keep_checkpoints", "last,best")
        if self.finished and keep not in ("last,best", "all"):  # pruned (prune): the export cannot be redone
            if not self.last.exists() and not resume:
                raise RunExistsError(f"{self.path} already holds a finished run; choose another --out")
            if resume:
                raise RunDirError(f"{self.path} holds a finished run whose checkpoints were pruned "
                                  f"(trainer.keep_checkpoints={keep}): there is nothing to resume; its results and "
                                  "exports are in that directory")
        if is_global_zero():
            with writing(f"write into the run directory {self.path}"):
                self.checkpoints.mkdir(parents=True, exist_ok=True)
                config_mod.dump(cfg, self.path / "config.yaml")

    def check_last(self) -> None:
        """Refuse a ``last.ckpt`` that cannot be read (truncated, overwritten) with one line: delete it to restart.
        Memory-mapped, so the tensors are not read."""
        try:
            torch.load(self.last, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RunDirError(f"{self.last} is corrupt and cannot be resumed ({first[:120]}); delete it to restart "
                              "the run from scratch") from None

    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.csv and metrics.json from the full history (idempotent across resumes); rank 0 only."""
        if not is_global_zero():
            return
        keys = list(dict.fromkeys(k for row in rows for k in row))
        with writing(f"write the metrics into {self.path}"):
            io.write_json(self.path / "metrics.json", rows)
            with io.replacing(self.path / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)


def save_checkpoint(trainer: L.Trainer, path: Path, also: Path | None = None) -> None:
    """Every process calls it (a sharded model's state is gathered); rank 0 writes, and the others wait until the
    file is in place. ``also``: a second name for the same file (a hard link, else a copy), in place before
    ``path`` is."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        trainer.save_checkpoint(tmp, weights_only=False)  # full state: optimizer, loops, loader position
        if trainer.is_global_zero:
            if also is not None:
                _second_name(tmp, also)
            os.replace(tmp, path)
    except OSError as err:  # e.g. a full disk: no partial file stays behind, the previous checkpoint stays whole
        if trainer.is_global_zero:
            tmp.unlink(missing_ok=True)
        raise _os_error(err, f"write {path}") from None
    trainer.strategy.barrier("essa.save_checkpoint")


def _second_name(path: Path, name: Path) -> None:
    """``name`` for the complete file ``path``: a hard link where the file system has them, else a copy; replaced
    whole if it exists (a resumed run that redoes an epoch end)."""
    tmp = name.with_name(name.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, name)


#: What a finished run records of its training (essa.train.stage.fit_stage writes it, before the exports).
RESOURCES_FILE = "resources.json"


class Checkpointing(Callback):
    """``last.ckpt`` every ``every_n_steps`` optimisation steps (not after the epoch's last batch) and at each epoch
    end; ``best.ckpt`` when the monitored value (if any) improves. Also tells the loader how many batches of the
    epoch are done, which is what a resumed run skips (Lightning's fetcher reads one batch ahead, so the loader
    cannot count this itself). With gradient accumulation a checkpoint is only taken right after an optimisation
    step, never with gradients of some batches accumulated but not applied (a resumed run would skip those batches).

    With ``stop`` (a :class:`essa.train.interrupt.StopRequest`), a Ctrl-C ends the run after the optimisation step
    it fell in: ``last.ckpt`` is written there (after the epoch's last batch: at the epoch end, which runs first)
    and :class:`essa.errors.Interrupted` raised. In a distributed run the processes stop together, at the first
    step after any of them was asked.
    """

    def __init__(self, run: RunDir, every_n_steps: int, monitor: str | None = None, mode: str = "max",
                 ties: str = "earlier", stop: StopRequest | None = None, every_epoch: bool = False):
        """``ties``: which epoch ``best.ckpt`` keeps when the monitored value equals the best so far;
        ``every_epoch``: each epoch end's ``last.ckpt`` also as ``epoch_NNN.ckpt``."""
        self.run, self.every_n_steps, self.monitor, self.mode = run, every_n_steps, monitor, mode
        self.ties, self.stop, self.every_epoch = ties, stop, every_epoch
        self.best_value: float | None = None
        self.best_epoch: int | None = None  # of best.ckpt, with its step: kept in every last.ckpt
        self.best_step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        signal_hook(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.train_dataloader.position = batch_idx + 1
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        # not after the epoch's last batch: the epoch end writes last.ckpt, and Lightning resumed from a checkpoint
        # taken after the last batch goes on to the next epoch without the epoch end (its row, its best.ckpt)
        epoch_done = batch_idx + 1 >= trainer.num_training_batches
        if not stepped or epoch_done:
            return
        stopping = self._stop_requested(trainer)
        if stopping or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            save_checkpoint(trainer, self.run.last)
            _kill_hook("step", trainer.global_step)
        if stopping:
            self._interrupted(trainer)

    def _stop_requested(self, trainer) -> bool:
        """Whether a Ctrl-C asks the run to stop now: in a distributed run, whether any process was asked."""
        asked = self.stop is not None and self.stop.requested
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(asked, all=False))
        return asked

    def _interrupted(self, trainer):
        where = (f"stopped after optimisation step {trainer.global_step} (epoch {trainer.current_epoch}), saved in "
                 f"{self.run.last}")
        raise Interrupted(f"interrupted: {where}; continue with --resume", where)

    def epoch_end(self, trainer, metrics: dict) -> None:
        """Called by the module once the epoch's metrics (e.g. kNN) are known. The best value is updated first and
        ``best.ckpt`` written before ``last.ckpt`` (module docstring: exact resume after a kill at any moment)."""
        value = metrics.get(self.monitor) if self.monitor else None
        if value is not None:
            later = self.ties == "later" and value == self.best_value
            better = self.best_value is None or later or (
                value > self.best_value if self.mode == "max" else value < self.best_value)
            if better:
                self.best_value, self.best_epoch, self.best_step = value, trainer.current_epoch, trainer.global_step
                save_checkpoint(trainer, self.run.best)
                _kill_hook("best", trainer.current_epoch)
        save_checkpoint(trainer, self.run.last, self.run.epoch(trainer.current_epoch) if self.every_epoch else None)
        _kill_hook("epoch", trainer.current_epoch)
        # after the last epoch, only the export is left: the run finishes
        if trainer.current_epoch + 1 < trainer.max_epochs and self._stop_requested(trainer):
            self._interrupted(trainer)

    def state_dict(self):
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "best_step": self.best_step}

    def load_state_dict(self, state):
        self.best_value = state["best_value"]
        self.best_epoch, self.best_step = state.get("best_epoch"), state.get("best_step")


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
        log_epoch(trainer, row)
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
        raise CheckpointMismatchError(
            f"{what} was trained from other frozen backbone weights than the ones built now (checksum "
            f"{theirs:.6g} vs {mine:.6g}): resume with the run's own config"
        )
    own, state = owner.state_dict(), checkpoint["state_dict"]
    missing = sorted(set(own) - set(state) - frozen_keys(owner, trained))
    if missing:
        raise CheckpointMismatchError(f"{what} lacks trainable tensors {missing[:5]}: it is not a checkpoint of this model")
    wrong = [f"{k} is {tuple(state[k].shape)} there but {tuple(own[k].shape)} here"
             for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if wrong:
        raise CheckpointMismatchError(f"{what} does not fit the model: {'; '.join(wrong[:3])}; the checkpoint belongs to another "
                         "architecture or number of classes (resume with the run's own config and data)")
