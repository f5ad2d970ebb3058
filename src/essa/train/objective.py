"""The interface between the SSA stage (:mod:`essa.adaptation`) and the objective it runs (``objective:`` in the
config; the implementations are :mod:`essa.objectives`).

An objective has two sides:

- :class:`Objective`, the data side and the factory: the loader's per-image ``transform`` and its batch
  ``collate`` (whose masks are drawn from a generator the stage seeds per batch, so a resumed run draws the same
  masks), what the config's data-dependent sizes become (``sized``: the DINO head from the number of images),
  whether some steps leave trainable parameters without a gradient (DDP must look for them), a deterministic
  ``preview_transform`` for the per-epoch picture (None: no picture), and the ``module`` that trains.
- :class:`ObjectiveModule`, the module side: a :class:`essa.train.stage.StageModule` (the training step's skeleton,
  checkpoints, timing) that also says which backbone the kNN monitor reads (``monitored_backbone``), which backbone
  is exported (``exported_backbone``: the EMA teacher's for DINOv2, the student's otherwise; its ``requires_grad``
  flags mark the tuner state), which backbones ``trainer`` options (gradient checkpointing, compile) apply to, the
  warnings of its schedules, its own ``resources.json`` entries, and what it writes at each epoch end
  (reconstruction pictures).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from essa.train.optim import decay_groups
from essa.train.stage import StageModule
from essa.train.trainer import attached_trainer


class ObjectiveModule(StageModule):
    """A StageModule the SSA stage can run whatever its objective (see the module docstring).

    What the objectives' modules share: an optimizer of two parts with their own lr schedules (``backbone``: what
    acts inside the backbone; ``head``: the objective's new parts, the DINO head or a decoder), whose per-step values
    ``self.schedules`` holds (``lr``, ``head_lr``, ``weight_decay``), and the whole batch of a distributed run."""

    #: The batch (the objective's collate output) whose reconstructions each epoch end draws; None: no picture.
    preview: dict[str, torch.Tensor] | None = None
    #: The preprocessing the stage normalises images with (essa.data.normalize.Preprocessing; the picture
    #: un-normalises with it); None: ImageNet's.
    preprocessing = None

    def two_part_optimizer(self, backbone: list, head: list) -> torch.optim.AdamW:
        """AdamW over (name, parameter) pairs of the two parts, weight decay groups of each
        (:func:`essa.train.optim.decay_groups`) marked with their ``part``."""
        groups = []
        for part, params in (("backbone", backbone), ("head", head)):
            groups += [{**g, "part": part} for g in decay_groups(params) if g["params"]]
        return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))

    def _step_index(self) -> int:
        return min(self.global_step, len(self.schedules) - 1)

    def schedule_step(self, optimizer):
        """This step's index into the schedules (``_it``), and its learning rates and weight decay in ``optimizer``."""
        self._it = it = self._step_index()
        for group in optimizer.param_groups:
            group["lr"] = float((self.schedules.head_lr if group["part"] == "head" else self.schedules.lr)[it])
            if group["apply_decay"]:
                group["weight_decay"] = float(self.schedules.weight_decay[it])

    def _whole_batch(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, ...) of this process, or in a distributed run the rows of every process (world * B, ...)."""
        trainer = attached_trainer(self)
        if trainer is None or trainer.world_size == 1:
            return x
        return self.all_gather(x).flatten(0, 1)

    @property
    def monitored_backbone(self) -> nn.Module:
        """The backbone whose CLS features the kNN monitor reads each epoch."""
        return self.tuned

    @property
    def prepared_backbones(self) -> tuple[nn.Module, ...]:
        """The backbones that ``trainer.grad_checkpointing`` and ``trainer.compile`` apply to."""
        return (self.tuned,)

    @property
    def schedule_warnings(self) -> tuple[str, ...]:
        return ()

    @property
    def phase_starts(self) -> tuple[int, ...]:
        """The optimisation steps at which the objective's views move to their next phase (the loader's samples are
        keyed by phase: :meth:`essa.train.loader.EpochSampler.key_phases`); () when they have one phase."""
        return ()

    def exported_backbone(self) -> nn.Module:
        """A copy of the backbone to export, whose trainable parameters (``requires_grad``) are the tuner state."""
        return copy.deepcopy(self.tuned)

    def stage_resources(self) -> dict[str, Any]:
        """The objective's own ``resources.json`` entries."""
        return {}

    def exported_extras(self, run_dir: Path) -> dict[str, Path]:
        """Files besides the backbone and the tuner state that the export writes (e.g. a decoder); process 0."""
        return {}

    def epoch_outputs(self, run_dir: Path, epoch: int, write: bool) -> None:
        """At each epoch end, with the whole weights, in every process (``write``: this process writes files)."""


class Objective:
    """The data side and the factory of an SSA objective (see the module docstring)."""

    name: str = ""
    #: Whether the objective keeps an EMA teacher (what it exports and monitors then).
    has_teacher: bool = False

    def sized(self, cfg, n_images: int):
        """``cfg`` with the sizes that depend on the number of SSA images filled in."""
        return cfg

    def check(self, cfg, patch_size: int) -> None:
        """Config checks that need the backbone's patch size (raise ConfigError)."""

    def unused_parameters(self, cfg) -> bool:
        return False

    def transform(self, cfg, patch_size: int, preprocessing) -> Callable:
        """PIL image -> what ``collate`` batches, normalised with ``preprocessing``
        (:class:`essa.data.normalize.Preprocessing`)."""
        raise NotImplementedError

    def collate(self, cfg, patch_size: int) -> Callable:
        """``collate(samples, generator=...)`` -> a batch (a picklable callable: loader workers get a copy)."""
        raise NotImplementedError

    def preview_transform(self, cfg, preprocessing) -> Callable | None:
        """A deterministic PIL image -> tensor view for the per-epoch picture (normalised with ``preprocessing``);
        None: no picture."""
        return None

    def module(self, cfg, backbone: nn.Module, iters_per_epoch: int) -> ObjectiveModule:
        raise NotImplementedError
