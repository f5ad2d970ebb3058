"""The trainer factory: the one place where both training stages build their Lightning Trainer, and what a run needs
to know about the processes it runs in.

Scaling out is Lightning's (PyTorch distributed): one process per device, launched by torchrun, by SLURM's srun,
or by Lightning itself (docs/distributed.md). ``optim.batch_size`` is per process; an optimisation step trains on
``batch_size * world_size * accumulate_grad_batches`` images. The training sampler shards each epoch by rank
(:meth:`essa.train.loader.EpochSampler.shard`), so Lightning's own distributed sampler is switched off.

Strategies (``trainer.strategy``):

- ``ddp``: every process holds the whole model; gradients are averaged over processes in the backward pass, so
  every process takes the same optimizer step and holds the same weights (and EMA teacher) after it. Buffers are
  not re-broadcast before each forward: every buffer is constant (APLA rows) or already all-reduced (the DINO and
  iBOT centers, lightly's ``center_mean``), which the distributed tests check rank against rank.
- ``fsdp``: the whole LightningModule is one FSDP unit: parameters, gradients and optimizer state are sharded over
  the processes between steps and gathered for the forward and backward passes. One unit, not one per block, so
  that the EMA teacher can keep sharing the student's frozen weights (FSDP shares parameters within a unit only).
  Work outside the training step (evaluation, exports) runs inside :func:`full_weights`.
- ``auto``: Lightning's choice (a single device, or DDP with its defaults).
"""

from __future__ import annotations

import contextlib
import math

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn

from essa.config import ConfigError, TrainerConfig
from essa.train.loader import ResumableLoader
from essa.train.optim import precision
from essa.train.progress import ProgressLines, progress_mode, quiet_libraries


def build_trainer(cfg: TrainerConfig, *, max_epochs: int, grad_clip: float | None, callbacks: list,
                  trainer_kwargs: dict | None = None, unused_parameters: bool = False,
                  name: str = "train", run_dir=None, config: dict | None = None) -> L.Trainer:
    """The Trainer of a training stage (``name`` heads its progress lines: ``adapt``, ``finetune``).
    ``trainer_kwargs`` (tests, benchmarks) override any argument; their ``callbacks`` are added to the stage's own.
    ``unused_parameters``: some steps leave trainable parameters without a gradient (the SSA head warm-up), which
    DDP must then look for. Progress as ``trainer.progress`` says (:mod:`essa.train.progress`), libraries quiet;
    the ``trainer.logger`` in ``run_dir`` with ``config`` as its hyperparameters (:mod:`essa.train.loggers`)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from essa.train.loggers import build_loggers

    quiet_libraries()
    trainer_kwargs = dict(trainer_kwargs or {})
    mode = progress_mode(cfg.progress)
    loggers = build_loggers(cfg.logger, run_dir, name, config)
    callbacks = [*callbacks, *([ProgressLines(name, cfg.progress_every)] if mode == "lines" else []),
                 *([LearningRateMonitor(logging_interval="step")] if loggers else []),
                 *trainer_kwargs.pop("callbacks", [])]
    kwargs = dict(
        max_epochs=max_epochs, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=_strategy(cfg.strategy, unused_parameters), precision=precision(cfg.precision),
        accumulate_grad_batches=cfg.accumulate_grad_batches, gradient_clip_val=grad_clip, callbacks=callbacks,
        use_distributed_sampler=False,  # EpochSampler shards itself, resumably (see shard)
        logger=loggers or False, log_every_n_steps=cfg.log_every_n_steps, enable_checkpointing=False,
        num_sanity_val_steps=0, deterministic=False,
        enable_model_summary=False, enable_progress_bar=mode == "bar",
    )
    return L.Trainer(**{**kwargs, **trainer_kwargs})


def _strategy(name: str, unused_parameters: bool = False):
    if name == "ddp":
        # Without a head warm-up every trainable parameter gets a gradient each step (the frozen prototypes get
        # theirs cancelled after the all-reduce), so no search for unused parameters.
        return DDPStrategy(find_unused_parameters=unused_parameters, broadcast_buffers=False)
    if name == "fsdp":
        return FSDPStrategy(use_orig_params=True, state_dict_type="full")  # no wrap policy: one unit (docstring)
    return name


def shard(loader: ResumableLoader, trainer: L.Trainer) -> None:
    """Give ``loader``'s EpochSampler this process's share of every epoch; refuse data without one full step."""
    sampler = loader.sampler
    sampler.shard(trainer.world_size, trainer.global_rank)
    if len(sampler) == 0:
        raise ConfigError(
            f"{sampler.size} images are fewer than one global batch (optim.batch_size={sampler.batch_size} x "
            f"{trainer.world_size} processes); lower --batch-size or use fewer devices"
        )


def steps_per_epoch(loader: ResumableLoader, trainer: L.Trainer) -> int:
    """Optimisation steps in an epoch of ``loader`` (Lightning steps on the last batch of an epoch even when it
    closes fewer than ``accumulate_grad_batches`` batches)."""
    return math.ceil(len(loader) / trainer.accumulate_grad_batches)


def prepare_backbones(cfg: TrainerConfig, *backbones: nn.Module) -> None:
    """Memory and speed options on timm ViTs, in place: activation checkpointing (``grad_checkpointing``: each
    block's activations are recomputed in the backward pass instead of stored) and ``torch.compile`` of each block
    (module names and state-dict keys stay as they are). Call after copies are made (the SSA teacher): a compiled
    block's compiled forward belongs to the block it was compiled from."""
    for backbone in backbones:
        backbone.set_grad_checkpointing(cfg.grad_checkpointing)
        if cfg.compile:
            for block in backbone.blocks:
                block.compile()


def is_global_zero() -> bool:
    """Whether this process is the one that writes files: global rank 0 as the launcher set it (``RANK``,
    ``LOCAL_RANK`` or ``SLURM_PROCID``), before a Trainer exists; Lightning keeps it up to date afterwards."""
    return (rank_zero_only.rank or 0) == 0


def full_weights(trainer: L.Trainer, writeback: bool = False):
    """A context in which the LightningModule's parameters are whole on every process: under FSDP the shards are
    gathered (and with ``writeback`` changes are written back to them); otherwise nothing to do. Every process
    must enter it."""
    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=writeback)
    return contextlib.nullcontext()


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer that runs ``module``, or None when it runs outside one (tests, ``essa.bench``): Lightning's
    ``module.trainer`` raises then."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def module_full_weights(module: L.LightningModule, writeback: bool = False):
    """:func:`full_weights` of the trainer that runs ``module`` (nothing to do without one)."""
    trainer = attached_trainer(module)
    return full_weights(trainer, writeback) if trainer is not None else contextlib.nullcontext()


def over_processes(trainer: L.Trainer, values: dict[str, float], op: str = "mean") -> dict[str, float]:
    """``values`` (the same keys in every process) reduced over the processes by ``op`` ("mean" or "sum");
    every process must call it and gets the result."""
    if trainer.world_size == 1 or not values:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=trainer.strategy.root_device)
    return dict(zip(values, trainer.strategy.reduce(tensor, reduce_op=op).tolist()))
