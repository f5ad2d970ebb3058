"""The training-stage skeleton that ``essa adapt`` (:mod:`essa.adaptation`) and ``essa finetune``
(:mod:`essa.finetuning`) share.

- :class:`StageModule`: the LightningModule both stages' modules subclass (:class:`essa.train.ssa.SSAModule`,
  :class:`essa.train.classify.ClassifierModule`): the history of epoch rows, the sums behind each epoch's means,
  the step timing (:class:`essa.train.resources.StepTiming`), checkpoints that hold only what trains, and one
  training step whose parts the Trainer's hooks call, which :meth:`StageModule.standalone_step` also runs whole
  outside a Trainer (``essa.bench`` times it).
"""

from __future__ import annotations

import contextlib

import lightning as L
import torch
from torch import nn

from essa.train.resources import StepTiming
from essa.train.run_dir import check_trainable_state, drop_frozen
from essa.train.trainer import module_full_weights


class StageModule(StepTiming, L.LightningModule):
    """What the modules of both training stages share.

    Subclasses give :attr:`network`, the network that trains (its frozen weights are left out of checkpoints), and
    the parts of their training step: :meth:`schedule_step` (this step's hyperparameters), :meth:`batch_images`,
    ``training_step``, optionally ``on_after_backward``, :meth:`after_optimizer_step` and :meth:`step_timing`.

    Bookkeeping: ``history`` (one row per epoch, kept in checkpoints), ``_sums`` (what :meth:`add_to_epoch` and
    :meth:`count_step` gather, read and reset by :meth:`pop_epoch_means` at the epoch end), ``timing`` (images and
    seconds of the optimisation steps)."""

    #: The module keeps submodules in eval mode while it trains, on purpose (the SSA teacher): Lightning's warning
    #: about them at the start of training is then silenced.
    keeps_eval_submodules = False

    def __init__(self):
        super().__init__()
        self.strict_loading = False  # checkpoints leave the frozen weights out; they are rebuilt from the foundation model
        self.history: list[dict] = []
        self._sums: dict[str, float] = {}
        self.timing = {"images": 0, "seconds": 0.0}  # the optimisation steps only (no data loading, no validation)

    @property
    def network(self) -> nn.Module:
        """The network that trains: checkpoints hold its trainable tensors and its frozen weights' checksum."""
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

    def step_timing(self) -> dict:
        """The counts this step's images and seconds add to (``timing``; SSA's head warm-up has its own)."""
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
