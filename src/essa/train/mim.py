"""Masked-image-modelling SSA (MAE, SimMIM) as a LightningModule: the tuned backbone and the objective's new parts
(a decoder; SimMIM's mask token) train together from the first step; no teacher.

The objective itself is :class:`essa.ssl.mae.MAE` or :class:`essa.ssl.simmim.SimMIM` (``model``); this module gives
the training step's parts (:class:`essa.train.stage.StageModule`) and what the SSA stage reads of it
(:class:`essa.train.objective.ObjectiveModule`): the student's backbone is monitored and exported, the decoder is
written next to it (``decoder.safetensors``), and each epoch end draws the reconstructions of a few fixed images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from essa.config import ConfigError
from essa.ssl.mim import save_reconstructions
from essa.ssl.schedules import tuner_schedules
from essa.train.memory import recompute_frozen
from essa.train.objective import ObjectiveModule
from essa.train.optim import default_lr
from essa.train.resources import release_free_heap
from essa.train.ssa import CollapseError, effective_rank
from essa.train.trainer import attached_trainer

#: The file next to the exported backbone that holds the objective's new parts (``<objective>.decoder_weights``
#: reads it back).
DECODER_FILE = "decoder.safetensors"


def _new_parts(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}


def load_decoder(model: nn.Module, path: str | Path, key: str) -> None:
    """Load ``model``'s new parts (everything but ``model.backbone``) from a ``decoder.safetensors`` that a run of
    the same objective and decoder size wrote; ``key`` names the config key in errors."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ConfigError(f"{key}={str(path)!r} does not exist")
    state, own = load_file(str(path)), _new_parts(model)
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ConfigError(f"{key}={str(path)!r} holds {len(state)} tensors that do not fit this objective's "
                          f"decoder ({len(own)} tensors: its size or objective differs)")
    model.load_state_dict(state, strict=False)


class ReconstructionModule(ObjectiveModule):
    """One MAE or SimMIM run. ``model``: an :class:`essa.ssl.mae.MAE` or :class:`essa.ssl.simmim.SimMIM` around the
    tuned backbone; ``name`` the objective; ``head_lr`` the new parts' lr (None: the tuner's);
    ``decoder_weights`` a ``decoder.safetensors`` to start the new parts from (``decoder_key`` names its config
    key). The network that trains (:attr:`network`) is ``model``; the tuned model (:attr:`tuned`) its backbone."""

    def __init__(self, cfg, model: nn.Module, iters_per_epoch: int, *, name: str, head_lr: float | None = None,
                 decoder_weights: str | None = None, decoder_key: str = "decoder_weights"):
        super().__init__()
        self.cfg, self.objective_name = cfg, name
        if cfg.optim.recompute_frozen:  # auto: every block (its budget planning is DINOv2's)
            recompute_frozen(model.backbone)
        if decoder_weights:
            load_decoder(model, decoder_weights, decoder_key)
        self.model = model
        self.schedules = tuner_schedules(
            cfg.optim.epochs, iters_per_epoch, default_lr(cfg.tuner.name, cfg.optim.lr), head_lr=head_lr,
            min_lr=cfg.optim.min_lr, warmup=cfg.optim.warmup, weight_decay=tuple(cfg.optim.weight_decay),
        )

    @property
    def network(self) -> nn.Module:
        return self.model

    @property
    def tuned(self) -> nn.Module:
        return self.model.backbone

    # ----- what the SSA stage reads ---------------------------------------------------------------------------
    @property
    def schedule_warnings(self) -> tuple[str, ...]:
        return self.schedules.warnings

    def stage_resources(self) -> dict[str, Any]:
        return {"objective": self.objective_name,
                "decoder_params": sum(p.numel() for n, p in self.model.named_parameters()
                                      if not n.startswith("backbone."))}

    def exported_extras(self, run_dir: Path) -> dict[str, Path]:
        from essa.export import save_weights

        path = save_weights(_new_parts(self.model), Path(run_dir) / DECODER_FILE, {"objective": self.objective_name})
        return {"decoder": path}

    def epoch_outputs(self, run_dir: Path, epoch: int, write: bool) -> None:
        """``reconstructions/epoch_NNN.png``: the fixed preview images (:attr:`preview`), their masked input and
        their reconstruction; the global RNG is untouched (the run's numbers do not depend on the picture)."""
        if self.preview is None:
            return
        device = next(self.model.parameters()).device
        images, masks = self.preview["images"].to(device), self.preview["masks"].to(device)
        was_training = self.model.training
        self.model.eval()
        try:
            reconstructions = self.model.reconstruct(images, masks)
        finally:
            self.model.train(was_training)
        if write:
            stats = {} if self.preprocessing is None else {"mean": self.preprocessing.mean,
                                                           "std": self.preprocessing.std}
            save_reconstructions(Path(run_dir) / "reconstructions" / f"epoch_{epoch:03d}.png", images, masks,
                                 reconstructions, self.model.patch_size, title=f"{self.objective_name}, epoch {epoch}",
                                 **stats)

    # ----- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        # Two parts with their own lr schedules: what acts in the encoder (the tuner; SimMIM's mask token) and the
        # decoder.
        named = list(self.model.named_parameters())
        return self.two_part_optimizer([(n, p) for n, p in named if not n.startswith("decoder.")],
                                       [(n, p) for n, p in named if n.startswith("decoder.")])

    def batch_images(self, batch) -> int:
        return len(batch["images"])

    def training_step(self, batch, batch_idx):
        loss, _, tokens = self.model(batch["images"], batch["masks"])
        # every process decides on the whole global batch, so that all stop together
        values = self._whole_batch(loss.detach().float().reshape(1, 1))
        if not torch.isfinite(values).all():
            raise CollapseError(
                f"SSA ({self.objective_name}) diverged at epoch {self.current_epoch}, step {self.global_step}: "
                f"non-finite loss {float(values[~torch.isfinite(values)][0])}. Lower optim.lr (or raise optim.warmup); "
                "the last good checkpoint is kept."
            )
        rank = effective_rank(self._whole_batch(tokens[:, 0].detach().float()))
        self.add_to_epoch({"reconstruction": float(loss.detach()), "total": float(loss.detach()),
                           "feature_rank": rank})
        self.count_step()
        if attached_trainer(self) is not None:  # essa.bench runs the step outside a Trainer
            self.log("loss", loss.detach(), prog_bar=True)
        if loss.device.type == "cpu":
            release_free_heap()
        return loss
