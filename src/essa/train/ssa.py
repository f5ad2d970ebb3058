"""Self-supervised adaptation as a LightningModule: student and EMA teacher, DINO + iBOT + KoLeo.

The tuner is applied to the backbone before this module sees it, so the student's frozen backbone weights are
frozen for the whole run and the teacher shares them (:func:`essa.ssl.teacher.make_teacher`); the momentum
update moves only the teacher's copies of what trains (tuner parameters, the head, the mask token).

The bookkeeping (epoch sums, history, step timing), the checkpoint hooks and the skeleton of the training step are
:class:`essa.train.stage.StageModule`'s; this module gives the step's parts: the schedules' hyperparameters, the
objective, the prototype freeze after the backward pass and the teacher's momentum update after the optimizer step.

Less work per step: PatchDropout thins the student's views that only their CLS token is scored on (``ssl.patch_drop``,
:mod:`essa.ssl.patch_dropout`; what the student sees changes), and a frozen prefix of blocks runs without autograd
and, on the unmasked global crops, once for teacher and student (``ssl.truncated_backward``,
:mod:`essa.train.truncation`; the same losses and gradients). Low resolution first (``ssl.curriculum``, FastDINOv2):
the loader's crops are smaller before the switch step (``schedules.low_res``); the step runs on whatever size its
batch has (position embeddings resampled to the patch grid, as for the local crops; the iBOT masks and kept
patches are drawn on it), and the module records the phases' sizes and throughput.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from essa.config import ConfigError, memory_mib
from essa.ssl import DINOHead, DINOv2Loss, forward_masked, ssa_schedules
from essa.ssl.heads import HeadInputNorm
from essa.ssl.collapse import CollapseWatch, head_stats
from essa.ssl.prefix import tokens_after, tokens_before, unsplittable
from essa.ssl.teacher import ema_pairs, ema_update, make_teacher
from essa.ssl.views import local_crop_size, low_resolution_sizes
from essa.train.memory import (AUTO_SHARE, RecomputePlan, available_mib, block_costs, plan_recompute,
                               recompute_frozen)
from essa.train.resources import release_free_heap
from essa.train.optim import default_lr
from essa.train.objective import ObjectiveModule
from essa.train.trainer import attached_trainer, module_full_weights, over_processes
from essa.train import truncation


class CollapseError(RuntimeError):
    """SSA diverged (non-finite loss) or collapsed (teacher features lost their rank, or the head's outputs went
    uniform or one-hot: :mod:`essa.ssl.collapse`)."""


class Student(nn.Module):
    """Backbone + DINO head + the iBOT mask token (timm ViTs have none)."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))


def effective_rank(features: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of centred, L2-normalised features (B, D): 1 when all
    rows point one way around their mean, up to min(B, D) when spread evenly; 0 when all rows are equal."""
    x = nn.functional.normalize(features.float(), dim=1)
    x = x - x.mean(0, keepdim=True)
    if x.norm() < 1e-6:
        return 0.0
    s = torch.linalg.svdvals(x)
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


def memory_plan(cfg, student: nn.Module, frozen_prefix: int) -> RecomputePlan:
    """Which of the student's blocks recompute their frozen stretches so that a step fits
    ``trainer.memory_budget`` (:func:`essa.train.memory.plan_recompute`). The step's activations: per block, one
    image's at the run's full crop sizes (the low-resolution phase of a curriculum needs less) times the views of a
    batch (``n_global`` global and ``n_local`` local crops per image, PatchDropout not counted); blocks of a frozen
    prefix (the truncated backward) keep activations only for the masked global crops. Besides them: the student
    and teacher weights and buffers, gradients and AdamW's two states of what trains, and the student's and
    teacher's prototype scores of the crops (the iBOT patch scores are scored in chunks and not counted)."""
    ssl, batch = cfg.ssl, cfg.optim.batch_size
    backbone, patch = student.backbone, student.backbone.patch_embed.patch_size[0]
    (global_size, local_size), _ = crop_sizes(cfg, patch)
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    global_view = (ssl.n_global * batch, (global_size // patch) ** 2 + prefix)
    views = [global_view] + ([(ssl.n_local * batch, (local_size // patch) ** 2 + prefix)] if ssl.n_local else [])
    costs = block_costs(backbone, views)
    if frozen_prefix:
        costs.update({i: c for i, c in block_costs(backbone, [global_view]).items() if i < frozen_prefix})
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    weights = sum(t.numel() for t in [*student.parameters(), *student.buffers()]) + trainable  # the teacher's copies
    scores = (ssl.n_global + ssl.n_local) * batch + ssl.n_global * batch  # student's views, teacher's globals
    base = (weights + 3 * trainable + 2 * scores * ssl.prototypes) * 4 / 2**20
    budget = memory_mib(cfg.trainer.memory_budget)
    if budget is None:
        device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
        budget = AUTO_SHARE[device] * available_mib(device)
    plan = plan_recompute(costs, base, budget)
    if not plan.fits:
        warnings.warn(f"trainer.memory_budget: a step is estimated at {plan.base_mib + plan.kept_mib:.0f} MiB with "
                      f"every block recomputing, over the budget of {budget:.0f} MiB; lower optim.batch_size or the "
                      "crop sizes, or raise trainer.memory_budget", stacklevel=2)
    return plan


def crop_sizes(cfg, patch: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(global, local) crop sizes of the run (``ssl.local_size``, or 7/16 of ``ssl.global_size`` rounded to the
    patch size), and those of the low-resolution phase of ``ssl.curriculum`` (None without one); ConfigError for an
    ``ssl.curriculum_size`` the patch size does not divide or that is not smaller than ``ssl.global_size``."""
    ssl = cfg.ssl
    full = (ssl.global_size, local_crop_size(ssl.global_size, patch, ssl.local_size))
    if not ssl.curriculum:
        return full, None
    try:
        return full, low_resolution_sizes(*full, patch, ssl.curriculum_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None


class SSAModule(ObjectiveModule):
    """One SSA run. ``cfg`` is an :class:`essa.adaptation.AdaptConfig` whose head size is resolved
    (:func:`essa.adaptation.head_size`); ``iters_per_epoch`` sizes the schedules.

    Two phases: during the head warm-up (``schedules.head_warmup``) the student's backbone runs without autograd
    and only the DINO head trains (the mask token, used inside the backbone, waits too); then the tuner trains
    with its own lr ramp. The teacher follows both by EMA.

    The network that trains (:attr:`network`, whose frozen weights checkpoints leave out) is the student; the
    tuned model (:attr:`tuned`, whose trainable parameters ``resources.json`` counts) is its backbone."""

    keeps_eval_submodules = True  # the teacher

    def __init__(self, cfg, backbone: VisionTransformer, iters_per_epoch: int):
        super().__init__()
        self.cfg = cfg
        ssl = cfg.ssl
        if cfg.optim.recompute_frozen is True:  # before the teacher is copied from the student: the same blocks
            recompute_frozen(backbone)
        head = DINOHead(backbone.embed_dim, ssl.prototypes, ssl.head_hidden, ssl.head_bottleneck)
        self.student = Student(backbone, head)
        self.teacher = make_teacher(self.student)
        why = unsplittable(backbone) if ssl.patch_drop else None
        if why:
            raise ConfigError(f"ssl.patch_drop={ssl.patch_drop} needs a backbone whose forward the student's dropped "
                              f"views can follow step by step, and {why}; leave ssl.patch_drop at 0")
        self.truncation = truncation.plan(ssl.truncated_backward, backbone, self.teacher.backbone, ssl.patch_drop)
        # optim.recompute_frozen: auto: the student's blocks that recompute, for trainer.memory_budget (the
        # teacher runs without autograd: its blocks keep nothing either way)
        self.recompute = None
        if cfg.optim.recompute_frozen == "auto":
            self.recompute = memory_plan(cfg, self.student, self.truncation.frozen_blocks)
            recompute_frozen(backbone, self.recompute.blocks)
        # standardised head inputs (ssl.head_input: standardize), shared by student and teacher
        self.head_norm = HeadInputNorm(backbone.embed_dim) if ssl.head_input == "standardize" else None
        self.loss = DINOv2Loss(ssl.prototypes, ssl.n_global, ssl.student_temp, ssl.center_momentum,
                               ssl.dino_weight, ssl.ibot_weight, ssl.koleo_weight)
        self.schedules = ssa_schedules(
            cfg.optim.epochs, iters_per_epoch, default_lr(cfg.tuner.name, cfg.optim.lr), head_lr=ssl.head_lr,
            min_lr=cfg.optim.min_lr, warmup=cfg.optim.warmup, head_warmup=ssl.head_warmup,
            weight_decay=tuple(cfg.optim.weight_decay), teacher_temp=tuple(ssl.teacher_temp),
            teacher_temp_warmup=ssl.teacher_temp_warmup, teacher_momentum=tuple(ssl.momentum),
            freeze_prototypes=ssl.freeze_prototypes, curriculum=ssl.curriculum,
        )
        self.curriculum = self._curriculum(backbone.patch_embed.patch_size[0])
        # the collapse watch starts once the head has had its warm-up and its prototypes are free
        self._watch_from = max(self.schedules.head_warmup_steps, int(self.schedules.freeze_prototypes.sum()))
        self._ema = ema_pairs(self.student, self.teacher)
        self._low_rank_steps = 0
        self._collapse = CollapseWatch(ssl.prototypes, cfg.monitor.collapse_patience, cfg.monitor.collapse_tolerance)
        # timing: the tuner's optimisation steps (no data loading, no kNN)
        self.warmup_timing = {"images": 0, "seconds": 0.0}  # the head warm-up's steps
        self.low_res_timing = {"images": 0, "seconds": 0.0}  # the tuner's steps at the low resolution (also in timing)

    def _curriculum(self, patch: int) -> dict | None:
        """What ``ssl.curriculum`` does (resources.json): the switch step and each phase's crop sizes; None: off."""
        full, low = crop_sizes(self.cfg, patch)
        if low is None:
            return None
        return {"switch_step": self.schedules.switch_step,
                "low": {"global_size": low[0], "local_size": low[1]},
                "full": {"global_size": full[0], "local_size": full[1]}}

    @property
    def network(self) -> nn.Module:
        return self.student

    @property
    def tuned(self) -> nn.Module:
        return self.student.backbone  # the DINO head and the mask token are not part of the export

    # ----- what the SSA stage reads (essa.train.objective.ObjectiveModule) ------------------------------------
    @property
    def monitored_backbone(self) -> nn.Module:
        return self.teacher.backbone  # the kNN monitor reads the teacher's CLS features

    @property
    def prepared_backbones(self) -> tuple[nn.Module, ...]:
        return self.student.backbone, self.teacher.backbone

    @property
    def schedule_warnings(self) -> tuple[str, ...]:
        return self.schedules.warnings

    @property
    def phase_starts(self) -> tuple[int, ...]:
        return (self.schedules.switch_step,) if self.curriculum else ()

    def exported_backbone(self) -> nn.Module:
        """The teacher's backbone, whose tuner state is what trains in the student."""
        teacher = copy.deepcopy(self.teacher.backbone)
        for s, t in zip(self.student.backbone.parameters(), teacher.parameters(), strict=True):
            t.requires_grad_(s.requires_grad)
        return teacher

    def stage_resources(self) -> dict:
        ssl = self.cfg.ssl
        return {"head_params": sum(p.numel() for p in self.student.head.parameters()),
                "head": {"prototypes": ssl.prototypes, "hidden": ssl.head_hidden, "bottleneck": ssl.head_bottleneck,
                         "warmup_steps": self.schedules.head_warmup_steps},
                "truncated_backward": self.truncation.record(),
                "recompute_frozen": (self.recompute.record() if self.recompute is not None
                                     else {"blocks": "all" if self.cfg.optim.recompute_frozen else []}),
                **({"curriculum": self._curriculum_record()} if self.curriculum else {})}

    def _curriculum_record(self) -> dict:
        """:attr:`curriculum` with each phase's tuner steps' images/s (of all processes, as ``images_per_s``)."""
        low, whole = self.low_res_timing, self.timing
        full = {k: whole[k] - low[k] for k in whole}

        def rate(t):
            return t["images"] / t["seconds"] if t["seconds"] else float("nan")

        trainer = attached_trainer(self)
        rates = {"low": rate(low), "full": rate(full)}
        if trainer is not None:
            rates = over_processes(trainer, rates, op="sum")
        return {"switch_step": self.curriculum["switch_step"],
                **{phase: {**self.curriculum[phase], "images_per_s": rates[phase]} for phase in ("low", "full")}}

    # ----- what a checkpoint holds besides the student's trainable tensors and the teacher's copies ------------
    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "low_rank_steps": self._low_rank_steps,
                "collapsed_steps": self._collapse.steps, "warmup_timing": self.warmup_timing,
                **({"low_res_timing": self.low_res_timing} if self.curriculum else {})}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self._low_rank_steps, self._collapse.steps = state["low_rank_steps"], state["collapsed_steps"]
        self.warmup_timing = state["warmup_timing"]
        if self.curriculum:
            self.low_res_timing = state["low_res_timing"]

    # ----- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        # Two parts with their own lr schedules: the backbone's tuner (and the mask token, which acts inside the
        # backbone) and the DINO head.
        return self.two_part_optimizer([*self.student.backbone.named_parameters(),
                                        ("mask_token", self.student.mask_token)],
                                       list(self.student.head.named_parameters()))

    def on_train_epoch_start(self):
        self.teacher.eval()  # Lightning puts every submodule in train mode; the teacher never drops paths

    def batch_images(self, batch) -> int:
        return len(batch["global_crops"]) // self.cfg.ssl.n_global  # images, each with all its crops

    def on_after_backward(self):
        if self.schedules.freeze_prototypes[self._it]:
            self.student.head.cancel_last_layer_gradients()

    def after_optimizer_step(self) -> None:
        # The teacher moves right after the student, before any callback's on_train_batch_end (StageModule).
        # FSDP: a student tensor and its teacher copy may lie in different shards; the update needs them whole
        with module_full_weights(self, writeback=True):
            ema_update(*self._ema, float(self.schedules.teacher_momentum[self._it]))

    def step_timing(self) -> dict | tuple[dict, ...]:
        if self.schedules.head_warmup[self._it]:
            return self.warmup_timing
        return (self.timing, self.low_res_timing) if self.schedules.low_res[self._it] else self.timing

    # ----- the objective ------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        global_crops, local_crops, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
        it = self._step_index()
        prefix = self.student.backbone.num_prefix_tokens
        flat_masks = masks.flatten(1)

        k = self.truncation.frozen_blocks
        with torch.no_grad():
            if self.truncation.shared_prefix:  # the tokens entering block k, reused by the student (_student_views)
                t_prefix = tokens_before(self.teacher.backbone, global_crops, k)
                t_tokens = tokens_after(self.teacher.backbone, t_prefix, k)
            else:
                t_prefix, t_tokens = None, self.teacher.backbone.forward_features(global_crops)
            t_cls, t_patches = t_tokens[:, 0], t_tokens[:, prefix:][flat_masks]
            if self.head_norm is not None:  # statistics of this batch first (the first batch starts them)
                self.head_norm.update(t_cls, HeadInputNorm.CLS)
                self.head_norm.update(t_tokens[:, prefix:].flatten(0, 1), HeadInputNorm.PATCH)
            head_cls, head_patches = self._norm(t_cls, t_patches)
            # Head features before the prototype layer: the loss scores them against the 65,536 prototypes a few
            # rows at a time, so no (rows x prototypes) logits exist whole (DINOv2Loss, chunk_size).
            t_out = self.teacher.head.bottleneck(torch.cat([head_cls, head_patches]))
            t_prototypes = self.teacher.head.prototypes.scorer()
        # head warm-up: the backbone (tuner and mask token included) is frozen, so it runs without autograd
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.schedules.head_warmup[it]):
            if k or self.cfg.ssl.patch_drop:
                s_cls, s_patches, s_local = self._student_views(batch, flat_masks, t_prefix)
            else:
                s_tokens = forward_masked(self.student.backbone, global_crops, masks, self.student.mask_token)
                s_cls, s_patches = s_tokens[:, 0], s_tokens[:, prefix:][flat_masks]
                s_local = (self.student.backbone.forward_features(local_crops)[:, 0] if local_crops is not None
                           else None)
        pieces = list(self._norm(s_cls, s_patches))
        if s_local is not None:
            pieces.append(self._norm(s_local, None)[0])
        s_out = self.student.head.bottleneck(torch.cat(pieces))
        n_g, n_m = s_cls.shape[0], s_patches.shape[0]
        # before the loss moves its center: the distributions this step's DINO term compares
        with torch.no_grad():
            s_logits = self.student.head.prototypes(s_out[:n_g].detach())
            stats = head_stats(t_prototypes(t_out[:n_g]), self.loss.dino.center,
                               float(self.schedules.teacher_temp[it]), s_logits, self.loss.dino.student_temp)

        terms = self.loss(
            teacher_temp=float(self.schedules.teacher_temp[it]),
            student_global=s_out[:n_g], teacher_global=t_out[:n_g],
            student_local=s_out[n_g + n_m :] if local_crops is not None else None,
            student_patches=s_out[n_g : n_g + n_m], teacher_patches=t_out[n_g:],
            masks=masks, student_features=s_cls,
            student_prototypes=self.student.head.prototypes.scorer(), teacher_prototypes=t_prototypes,
        )
        self._check_health(terms, t_cls, stats)
        self.add_to_epoch(stats)
        if self.curriculum:  # the share of the epoch's steps at the low resolution (metrics: low_res)
            self.add_to_epoch({"low_res": float(self.schedules.low_res[it])})
        self.add_to_epoch({key: float(value.detach()) for key, value in terms.items()})
        self.count_step()
        self.log("loss", terms["total"].detach(), prog_bar=True)
        if terms["total"].device.type == "cpu":
            release_free_heap()  # the forward's freed transients would stay resident through the backward pass
        return terms["total"]

    def _student_views(self, batch, flat_masks: torch.Tensor, t_prefix: torch.Tensor | None):
        """The student's CLS tokens of the global crops (n_global * B, D, in the batch's order), its masked patch
        tokens (masked patches, D) and the local crops' CLS tokens (n_local * B, D, or None), the views run apart:

        - global crops with an iBOT mask: every patch, the mask token at the input (:func:`forward_masked`);
        - global crops without one: the teacher's prefix continued from block k (``t_prefix``: the tokens entering
          block k, shared: :mod:`essa.train.truncation`), or their own forward, of the patches ``kept_global``
          keeps under ``ssl.patch_drop``;
        - local crops: their own forward, of the patches ``kept_local`` keeps under ``ssl.patch_drop``.

        A view's own forward runs its first k blocks without autograd (nothing there trains)."""
        vit, k, prefix = self.student.backbone, self.truncation.frozen_blocks, self.student.backbone.num_prefix_tokens
        dropped = bool(self.cfg.ssl.patch_drop)
        if dropped and "kept_global" not in batch:
            raise ValueError("ssl.patch_drop > 0 needs the batch's kept patches (kept_global, kept_local): batch "
                             "with the dinov2 objective's collate (essa.objectives), which draws them")

        def own(images, kept):
            with torch.no_grad() if k else contextlib.nullcontext():
                tokens = tokens_before(vit, images, k, kept)
            return tokens_after(vit, tokens, k)

        global_crops, masks = batch["global_crops"], batch["masks"]
        masked = flat_masks.any(1)
        rows, cls, s_patches = [], [], None
        m_rows, u_rows = masked.nonzero()[:, 0], (~masked).nonzero()[:, 0]
        if len(m_rows):
            tokens = forward_masked(vit, global_crops[m_rows], masks[m_rows], self.student.mask_token)
            rows.append(m_rows)
            cls.append(tokens[:, 0])
            s_patches = tokens[:, prefix:][flat_masks[m_rows]]
        if len(u_rows):
            if t_prefix is not None:
                tokens = tokens_after(vit, t_prefix[u_rows], k)
            else:
                tokens = own(global_crops[u_rows], batch["kept_global"][u_rows] if dropped else None)
            rows.append(u_rows)
            cls.append(tokens[:, 0])
        s_cls = torch.cat(cls)[torch.cat(rows).argsort()]  # back in the batch's order
        if s_patches is None:
            # No crop has a mask. The mask token still gets the zero gradient the whole-batch forward gives it: AdamW
            # steps a parameter with a zero gradient (moments, weight decay) but skips one without, and DDP waits
            # for it.
            s_patches = s_cls.new_zeros(0, s_cls.shape[-1]) + 0 * self.student.mask_token.sum()
        local_crops = batch["local_crops"]
        s_local = None
        if local_crops is not None:
            s_local = own(local_crops, batch["kept_local"] if dropped else None)[:, 0]
        return s_cls, s_patches, s_local

    def _norm(self, cls: torch.Tensor, patches: torch.Tensor | None):
        """CLS and patch tokens as the head reads them (standardised with ``head_norm``, if any)."""
        if self.head_norm is None:
            return cls, patches
        return (self.head_norm(cls, HeadInputNorm.CLS),
                None if patches is None else self.head_norm(patches, HeadInputNorm.PATCH))

    def _check_health(self, terms: dict, teacher_cls: torch.Tensor, stats: dict[str, float]) -> None:
        # Every process decides on the whole global batch, so that all stop together: a process stopping alone
        # would leave the others waiting in their next collective operation.
        monitor = self.cfg.monitor
        values = self._whole_batch(torch.stack([v.detach().float() for v in terms.values()])[None])  # (W, terms)
        bad = {k: float(v[~torch.isfinite(v)][0]) for k, v in zip(terms, values.T) if not torch.isfinite(v).all()}
        if bad:
            raise CollapseError(
                f"SSA diverged at epoch {self.current_epoch}, step {self.global_step}: non-finite loss {bad}. "
                "Lower optim.lr (or raise optim.warmup); the last good checkpoint is kept."
            )
        rank = effective_rank(self._whole_batch(teacher_cls.detach().float()))
        self.add_to_epoch({"feature_rank": rank})
        self._low_rank_steps = self._low_rank_steps + 1 if rank < monitor.min_feature_rank else 0
        if self._low_rank_steps >= monitor.collapse_patience:
            raise CollapseError(
                f"SSA collapsed at epoch {self.current_epoch}, step {self.global_step}: the effective rank of the "
                f"teacher's CLS features stayed below monitor.min_feature_rank={monitor.min_feature_rank} for "
                f"{self._low_rank_steps} steps (now {rank:.3f}). Lower optim.lr or raise ssl.teacher_temp warm-up; "
                "the last good checkpoint is kept."
            )
        if self.global_step < self._watch_from:
            return
        # every process sees its own batch's statistics: decide on their mean, so that all stop together
        names = list(stats)
        mean = self._whole_batch(torch.tensor([[stats[k] for k in names] + [float(terms["dino"].detach())]],
                                              device=teacher_cls.device)).mean(0).tolist()
        reason = self._collapse.update(dict(zip(names, mean[:-1])), mean[-1])
        if reason:
            raise CollapseError(
                f"SSA collapsed at epoch {self.current_epoch}, step {self.global_step}: {reason} for "
                f"{self._collapse.steps} steps (monitor.collapse_patience={self.cfg.monitor.collapse_patience}). "
                "Try fewer ssl.prototypes, a longer ssl.head_warmup or a lower optim.lr; the last good checkpoint "
                "is kept."
            )
