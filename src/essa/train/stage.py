"""The training-stage skeleton that ``essa adapt`` (:mod:`essa.adaptation`) and ``essa finetune``
(:mod:`essa.finetuning`, once per seed) share.

- :func:`fit_stage`: the sequence of a training run: prepare the run directory, seed, checkpointing and the
  epoch-end callback, the Trainer, the memory meter, the tuned model, its loader (sharded over the processes),
  the module, ``Trainer.fit`` (resumed from ``checkpoints/last.ckpt`` with ``resume``), the peak memory and the
  throughput, the reload of the checkpoint to export, ``resources.json``, the stage's export on process 0, and
  the broadcast of what it returned. What differs between the stages is a :class:`Stage`'s methods.
- :class:`StageModule`: the LightningModule both stages' modules subclass (:class:`essa.train.ssa.SSAModule`,
  :class:`essa.train.classify.ClassifierModule`): the history of epoch rows, the sums behind each epoch's means,
  the step timing (:class:`essa.train.resources.StepTiming`), checkpoints that hold only what trains, and one
  training step whose parts the Trainer's hooks call, which :meth:`StageModule.standalone_step` also runs whole
  outside a Trainer (``essa.bench`` times it).
- :data:`RESOURCES_FILE` and :func:`export_merged`, which both stages write their results with.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from essa import config as config_mod, io, tuners
from essa.train.interrupt import StopRequest
from essa.train.loader import ResumableLoader
from essa.train.resources import MemoryMeter, StepTiming
from essa.train.run_dir import (RESOURCES_FILE, Checkpointing, EpochEnd, RunDir, check_trainable_state, drop_frozen,
                                writing)
from essa.train.trainer import build_trainer, full_weights, module_full_weights, over_processes, shard

#: What a finished run measured, in its run directory (``essa finetune``: each seed's): ``trainable_params`` (of
#: :attr:`StageModule.tuned`), the stage's own entries, ``peak_memory_mib`` (peak training memory from before the
#: model was built: of the last session when resumed; of process 0 in a distributed run), ``images_per_s``
#: (training images per second of optimisation steps, of all processes together) and ``train_seconds`` (summed
#: over sessions). ``RESOURCES_FILE`` (imported above) names it: essa.train.run_dir reads it to tell a finished run.


class StageModule(StepTiming, L.LightningModule):
    """What the modules of both training stages share.

    Subclasses give :attr:`network`, the network that trains (its frozen weights are left out of checkpoints),
    :attr:`tuned`, the tuned model (``resources.json`` counts its trainable parameters), and the parts of their
    training step: :meth:`schedule_step` (this step's hyperparameters), :meth:`batch_images`,
    ``training_step``, optionally ``on_after_backward``, :meth:`after_optimizer_step` and :meth:`step_timing`.

    Bookkeeping: ``history`` (one row per epoch, kept in checkpoints), ``_sums`` (what :meth:`add_to_epoch` and
    :meth:`count_step` gather, read and reset by :meth:`pop_epoch_means` at the epoch end), ``timing`` (images and
    seconds of the optimisation steps)."""

    #: The module keeps submodules in eval mode while it trains, on purpose (the SSA teacher): Lightning's warning
    #: about them at the start of training is then silenced.
    keeps_eval_submodules = False

    def __init__(self):
        super().__init__()
        self.strict_loading = False  # checkpoints leave the frozen weights out (rebuilt from the foundation model)
        self.history: list[dict] = []
        self._sums: dict[str, float] = {}
        self.timing = {"images": 0, "seconds": 0.0}  # the optimisation steps only (no data loading, no validation)

    @property
    def network(self) -> nn.Module:
        """The network that trains: checkpoints hold its trainable tensors and its frozen weights' checksum."""
        raise NotImplementedError

    @property
    def tuned(self) -> nn.Module:
        """The tuned model whose trainable parameters ``resources.json`` counts (``trainable_params``)."""
        raise NotImplementedError

    # ----- the epoch's means --------------------------------------------------------------------------------
    def add_to_epoch(self, values: dict[str, float]) -> None:
        """Add ``values`` to the epoch's sums (their means go into the epoch's history row)."""
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count_step(self) -> None:
        """Count a step of the epoch: the sums are divided by the number of steps."""
        self._sums["steps"] = self._sums.get("steps", 0) + 1

    def pop_epoch_means(self) -> dict[str, float]:
        """Means of the epoch's sums over its steps, and reset."""
        steps = self._sums.pop("steps", 0) or 1
        means = {k: v / steps for k, v in self._sums.items()}
        self._sums = {}
        return means

    # ----- what a checkpoint holds: only what trains (frozen weights are rebuilt from the foundation model) ----
    def checkpoint_state(self) -> dict:
        """What a checkpoint keeps of the module besides its tensors (``checkpoint["essa"]``)."""
        return {"history": self.history, "sums": self._sums, "timing": self.timing}

    def load_checkpoint_state(self, state: dict) -> None:
        self.history, self._sums, self.timing = state["history"], state["sums"], state["timing"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        with module_full_weights(self):  # FSDP: the frozen weights' checksum needs them whole
            drop_frozen(checkpoint, self, self.network)
        checkpoint["essa"] = self.checkpoint_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        with module_full_weights(self):
            check_trainable_state(checkpoint, self, self.network, "the checkpoint")
        self.load_checkpoint_state(checkpoint["essa"])

    # ----- the training step ----------------------------------------------------------------------------------
    def schedule_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Set this step's hyperparameters (learning rates...) in ``optimizer``, before its forward pass."""

    def batch_images(self, batch) -> int:
        """The number of images in ``batch`` (what the step timing counts)."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """What the module updates right after the optimizer step (the SSA teacher)."""

    def step_timing(self) -> dict | tuple[dict, ...]:
        """The counts this step's images and seconds add to (``timing``; SSA's head warm-up has its own), or a
        tuple of counts that each get them."""
        return self.timing

    def on_train_batch_start(self, batch, batch_idx):
        self.schedule_step(self.optimizers().optimizer)
        self.start_step(self.batch_images(batch))

    def optimizer_step(self, *args, **kwargs):
        # The module's own update follows the optimizer's before any callback's on_train_batch_end: a checkpoint
        # saved there holds the whole step (a resumed SSA run would otherwise miss one momentum update).
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()
        self.end_step(self.step_timing())

    def standalone_step(self, batch, optimizer: torch.optim.Optimizer, grad_clip: float | None = None,
                        forward_context=None) -> torch.Tensor:
        """One training step outside a Trainer, made of the parts the Trainer's hooks call, in the Trainer's
        order: :meth:`schedule_step`, ``training_step``, ``zero_grad`` (the last step's gradients live through the
        forward pass, as in a Trainer), the backward pass, ``on_after_backward``,
        gradient clipping by the norm (``grad_clip``; None: none), the optimizer step, :meth:`after_optimizer_step`.
        ``forward_context``: a context manager around the forward pass (autocast, saved-tensor hooks). Returns the
        loss. Its step index is the module's ``global_step``, 0 outside a Trainer."""
        self.schedule_step(optimizer)
        with torch.enable_grad():
            with forward_context if forward_context is not None else contextlib.nullcontext():
                loss = self.training_step(batch, 0)
            optimizer.zero_grad(set_to_none=True)  # after the forward pass, as Lightning's closure does
            loss.backward()
            self.on_after_backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        optimizer.step()
        self.after_optimizer_step()
        return loss.detach()


def export_merged(model: nn.Module, path: str | Path) -> Path:
    """:func:`essa.tuners.save_merged` with its UserWarnings silenced: the export's header records the tuners that
    cannot be folded into plain weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tuners.save_merged(model, path)


@dataclass
class Fitted:
    """A stage after ``Trainer.fit``: what :meth:`Stage.reload` and :meth:`Stage.export` get, and what
    :func:`fit_stage` returns with ``resources`` and ``exported`` filled in."""

    run: RunDir
    trainer: L.Trainer
    module: StageModule
    loader: ResumableLoader
    peak_memory_mib: float  # of this process, from before the model was built to the end of training
    throughput: dict[str, float]  # images_per_s of all processes together
    resources: dict[str, Any] | None = None  # what resources.json holds (each process computes its own)
    exported: Any = None  # what Stage.export returned on process 0, in every process


class Stage:
    """A training stage's own parts, which :func:`fit_stage` calls in this order; every process calls each but
    :meth:`export`."""

    #: ``checkpoints/last.ckpt`` every this many optimisation steps (and at each epoch end)
    checkpoint_every_n_steps: int = 50
    #: The epoch-row metric whose best value keeps ``checkpoints/best.ckpt`` (None: no best.ckpt), and which epoch
    #: a tie keeps ("earlier" or "later").
    monitor: str | None = None
    ties: str = "earlier"
    #: Some steps leave trainable parameters without a gradient (the SSA head warm-up), which DDP must look for.
    unused_parameters: bool = False
    #: What heads its progress lines (essa.train.progress.ProgressLines).
    name: str = "train"

    def start(self) -> None:
        """Once the run directory is prepared and the seed set, before the Trainer exists (e.g. load the data whose
        presence decides :attr:`monitor`)."""

    def epoch_metrics(self, module: StageModule) -> dict[str, Any]:
        """The epoch row's metrics besides the module's means (validation, kNN); called with the whole weights."""
        return {}

    def tuned_model(self) -> nn.Module:
        """The tuned model (the backbone or classifier with its tuner applied) the module will train, and
        :attr:`StageModule.tuned`; built after the memory meter, so its weights count as training memory."""
        raise NotImplementedError

    def loader(self, tuned: nn.Module) -> ResumableLoader:
        """The training loader (:func:`essa.train.loader.training_loader`); :func:`fit_stage` shards it."""
        raise NotImplementedError

    def module(self, tuned: nn.Module, loader: ResumableLoader, trainer: L.Trainer,
               checkpointing: Checkpointing) -> StageModule:
        """The module that trains ``tuned``; may start its history and ``checkpointing``'s best value."""
        raise NotImplementedError

    def reload(self, fitted: Fitted) -> dict[str, Any]:
        """After training, with the whole weights: load the checkpoint to export into ``fitted.module`` (and
        evaluate it). Returns the stage's own ``resources.json`` entries."""
        return {}

    def export(self, fitted: Fitted) -> Any:
        """Process 0, after ``resources.json`` is written (``fitted.resources``): write the stage's files. Every
        process gets what it returns."""
        return None


def fit_stage(stage: Stage, cfg, run: RunDir, *, seed: int, resume: bool, trainer_kwargs: dict | None = None) -> Fitted:
    """Train a stage in ``run``: ``cfg`` is its config (``trainer`` and ``optim.epochs`` / ``optim.grad_clip``
    sections; ``config.yaml``), ``seed`` seeds everything, ``resume`` continues ``checkpoints/last.ckpt`` if there
    is one, ``trainer_kwargs`` override the Trainer's arguments (tests, benchmarks). Every process calls it and
    gets the same ``exported``. Process 0 holds the run directory's lock (:meth:`RunDir.locked`) throughout. A Ctrl-C
    stops the run after the step it fell in, with a checkpoint there (:mod:`essa.train.interrupt`)."""
    with run.locked(), StopRequest() as stop:
        return _fit_stage(stage, cfg, run, seed=seed, resume=resume, trainer_kwargs=trainer_kwargs, stop=stop)


def _fit_stage(stage: Stage, cfg, run: RunDir, *, seed: int, resume: bool, trainer_kwargs: dict | None,
               stop: StopRequest) -> Fitted:
    run.prepare(cfg, resume)
    if resume and run.last.exists():
        run.check_last()
    L.seed_everything(seed, workers=True, verbose=False)
    stage.start()
    checkpointing = Checkpointing(run, stage.checkpoint_every_n_steps, monitor=stage.monitor, ties=stage.ties,
                                  stop=stop, every_epoch=cfg.trainer.keep_checkpoints == "all")
    trainer = build_trainer(cfg.trainer, max_epochs=cfg.optim.epochs, grad_clip=cfg.optim.grad_clip,
                            callbacks=[checkpointing, EpochEnd(run, checkpointing, stage.epoch_metrics)],
                            trainer_kwargs=trainer_kwargs, unused_parameters=stage.unused_parameters,
                            name=stage.name, run_dir=run.path, config=config_mod.to_dict(cfg))
    # before the model exists: its weights count as training memory; each run (seed) measures its own peak
    meter = MemoryMeter(trainer.strategy.root_device, restart=True)
    tuned = stage.tuned_model()
    loader = stage.loader(tuned)
    shard(loader, trainer)
    module = stage.module(tuned, loader, trainer, checkpointing)
    with warnings.catch_warnings() if module.keeps_eval_submodules else contextlib.nullcontext():
        if module.keeps_eval_submodules:  # on purpose
            warnings.filterwarnings("ignore", message=r"Found .* module\(s\) in eval mode")
        trainer.fit(module, train_dataloaders=loader,
                    ckpt_path=str(run.last) if resume and run.last.exists() else None, weights_only=True)
    fitted = Fitted(run, trainer, module, loader, peak_memory_mib=meter.peak_mib(),
                    throughput=over_processes(trainer, {"images_per_s": module.images_per_s}, op="sum"))

    exported = None
    with full_weights(trainer, writeback=True):
        own = stage.reload(fitted)
        fitted.resources = {
            "trainable_params": tuners.count_parameters(module.tuned)[0], **own,
            "peak_memory_mib": fitted.peak_memory_mib, **fitted.throughput, "train_seconds": module.timing["seconds"],
        }
        if trainer.is_global_zero:
            with writing(f"write {run.path / RESOURCES_FILE}"):
                io.write_json(run.path / RESOURCES_FILE, fitted.resources)
            exported = stage.export(fitted)
            run.prune(cfg.trainer.keep_checkpoints)
    fitted.exported = trainer.strategy.broadcast(exported)  # the other processes return once the files exist
    return fitted
