"""``essa adapt``: self-supervised adaptation (SSA) of a foundation ViT to unlabelled domain images.

    essa.adapt(backbone={"name": "vit_small_patch14_dinov2.lvd142m"}, data={"root": "xrays/train"},
               tuner={"name": "apla", "options": {"r": 64}}, out="runs/ssa-apla")

The objective is ``objective`` (:mod:`essa.objectives`): ``dinov2`` (default; student and EMA teacher, DINO + iBOT
+ KoLeo), ``mae`` or ``simmim`` (masked image modelling: the student and a decoder, no teacher).

The run directory gets ``config.yaml`` (resolved), ``preprocessing.json`` (:data:`PREPROCESSING_FILE`: the mean, std
and interpolation of ``data.normalize``, which the exports' headers record too), ``metrics.csv``/``metrics.json``
(one row per epoch: loss terms, feature rank, kNN; with ``ssl.curriculum``, ``low_res``: the share of the epoch's
steps at the low resolution), ``checkpoints/{last,best}.ckpt``, ``resources.json`` (:data:`RESOURCES_FILE`:
trainable parameters, the DINO head or the decoder, the number of images, the exported epoch, peak training memory,
training images/s and seconds), and the adapted backbone: ``backbone.safetensors`` (merged plain timm weights of the
teacher (DINOv2) or the student (MAE, SimMIM), architecture in the header) and ``tuner.safetensors`` (the tuner state);
MAE and SimMIM also write ``decoder.safetensors`` and ``reconstructions/epoch_NNN.png`` (a few fixed images:
original, masked input, reconstruction) at each epoch end.

The run follows :func:`essa.train.stage.fit_stage`, the sequence ``essa finetune`` follows too; this module holds the
SSA config, the SSA loader (the objective's views and masks), the kNN monitor and the export choice, and the SSA
stage's parts (``_SSAStage``), which reach the objective through :mod:`essa.train.objective`'s interface; the
modules that train are :class:`essa.train.ssa.SSAModule` and :class:`essa.train.mim.ReconstructionModule`."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from essa import config as config_mod, io, objectives, tuners
from essa.config import BackboneConfig, StageOptimConfig, TrainerConfig, TunerConfig
from essa.objectives import head_size  # noqa: F401  (essa.adaptation.head_size, as documented)
from essa.ssl.patch_dropout import check_drop
from essa.train import stage
from essa.train.loader import ResumableLoader, mix_seed, training_loader
from essa.train.run_dir import RunDir
from essa.train.stage import Fitted, Stage, export_merged, fit_stage
from essa.train.trainer import is_global_zero, prepare_backbones, steps_per_epoch
from essa.train.truncation import MODES as TRUNCATION_MODES


#: What a finished run measured (essa.train.stage.RESOURCES_FILE): the backbone's trainable parameters, the DINO
#: head's parameters and size, what the truncated backward did (dinov2: ``truncated_backward``), with
#: ``ssl.curriculum`` its switch step and each phase's crop sizes and images/s (``curriculum``), the number of SSA
#: images, which epoch was exported and why, peak training memory (MiB), training images/s and seconds (both phases).
RESOURCES_FILE = stage.RESOURCES_FILE
#: Splits of a labelled task (``essa.task``) that ``data.split`` and ``data.val_split`` can name.
SPLITS = ("train", "val", "test")
#: ``ssl.head_input`` values.
HEAD_INPUTS = ("standardize", "raw")
#: The preprocessing a run normalised with (essa.data.normalize: mean, std, interpolation, source, and with
#: ``data.normalize: dataset`` what identifies the images the statistics were computed on).
PREPROCESSING_FILE = "preprocessing.json"


@dataclass
class SSADataConfig:
    root: str | None = None  # unlabelled images: a folder of any nesting (labels ignored); with split: a task
    val: str | None = None  # labelled images (one folder per class) for the kNN monitor
    # With ``split``, root is read as a labelled task (what ``essa finetune --data`` reads), split as
    # ``essa finetune`` splits it with the same ``splits`` options (essa.task.TaskDataConfig keys: val, test,
    # split_seed, max_train, duplicates...), and SSA sees only that split's images (labels ignored), e.g. train:
    # never the test images. ``val_split`` names the split whose labelled images feed the kNN monitor.
    split: str | None = None
    val_split: str | None = None
    splits: dict[str, Any] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)  # more unlabelled images (folders, any nesting), added to root's
    max_images: int | None = None  # a seeded subsample of all the images, for quick runs
    num_workers: int = 2
    # the mean / std of every view and of the kNN monitor (essa.data.normalize): model: the backbone's own (an essa
    # weights file's header, else timm's pretrained config of its name, e.g. CLIP's); imagenet; dataset: per channel
    # over at most normalize_images of the SSA images (a seeded sample) at ssl.global_size. The export records it.
    normalize: str = "model"
    normalize_images: int = 1000

    def validate(self) -> None:
        from essa.task import check_normalize

        check_normalize(self.normalize, self.normalize_images)
        for key in ("split", "val_split"):
            if getattr(self, key) not in (None, *SPLITS):
                raise config_mod.ConfigError(f"data.{key}={getattr(self, key)!r}; valid choices: {', '.join(SPLITS)}")
        if self.split is None and (self.val_split is not None or self.splits):
            raise config_mod.ConfigError("data.val_split and data.splits need data.split (e.g. data.split=train): "
                                         "they describe how the labelled task in data.root is split")
        if self.val is not None and self.val_split is not None:
            raise config_mod.ConfigError("give data.val (a labelled folder) or data.val_split (a split of data.root) "
                                         "for the kNN monitor, not both")
        self.task_data()  # bad split options fail before any work

    def task_data(self):
        """The TaskDataConfig that splits ``root`` (with ``split``)."""
        from essa.task import TaskDataConfig

        return config_mod.from_dict(TaskDataConfig, {**self.splits, "root": self.root,
                                                     "num_workers": self.num_workers})


@dataclass
class SSLConfig:
    # The DINO head; None: sized to the number of SSA images (head_size)
    prototypes: int | None = None
    head_hidden: int | None = None
    head_bottleneck: int | None = None
    head_lr: float | None = None  # None: optim.lr's value (the tuner's default lr)
    # standardize: the head reads backbone tokens standardised per feature with running statistics
    # (essa.ssl.heads.HeadInputNorm); raw: as they are (the reference)
    head_input: str = "standardize"
    # Schedule lengths: a fraction of the run in [0, 1), a whole number of steps, or epochs ("10 epochs").
    # Head warm-up: the first steps train the DINO head alone, the backbone frozen and run without autograd.
    head_warmup: float | str = 0.1
    n_global: int = 2
    n_local: int = 8
    global_size: int = 224
    local_size: int | None = None  # None: 7/16 of global_size (98 for 224), rounded to the patch size
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])
    mask_probability: float = 0.5
    student_temp: float = 0.1
    # [start, end] over teacher_temp_warmup. Held at 0.04: the reference warms 0.04 -> 0.07 over 30 epochs, which a
    # run of a few epochs never leaves, and from a pretrained backbone the teacher starts nearly uniform (README:
    # on 4,694 X-rays the DINO loss 0.89 ln K vs 0.98 with 0.04 -> 0.07, kNN rising); paper.yaml: the reference
    teacher_temp: list[float] = field(default_factory=lambda: [0.04, 0.04])
    teacher_temp_warmup: float | str = 0.1  # reference: 30 of 300 epochs
    center_momentum: float = 0.9
    momentum: list[float] = field(default_factory=lambda: [0.994, 1.0])
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    freeze_prototypes: float | str = 1 / 300  # reference: the first of 300 epochs
    # PatchDropout (essa.ssl.patch_dropout): the share of patch tokens the student drops from the views only its CLS
    # token is scored on (local crops, global crops without an iBOT mask), in [0, 1); the class and register tokens,
    # the iBOT-masked global crops and the teacher keep every token. 0: off (the step as without the key).
    # dinov2 only: mae already runs its encoder on the visible patches alone, simmim needs every patch position.
    patch_drop: float = 0.0
    # auto: when the tuner trains nothing in blocks 0..k-1 (e.g. apla with blocks [k..]), the student runs them
    # without autograd on the views without a mask token, and the teacher's prefix of the unmasked global crops is
    # reused for the student's (same gradients; essa.train.truncation; resources.json says what applied). off: never.
    # dinov2 only (mae and simmim have no teacher to share a prefix with).
    truncated_backward: str = "auto"
    # Low resolution first (FastDINOv2, arXiv 2507.03779): a length, as head_warmup (a fraction of the run in [0, 1),
    # steps or "N epochs"), during which the global crops are curriculum_size px and the local crops smaller by the
    # same ratio (rounded to the patch size, at least one patch), the iBOT masks on their patch grid; then the full
    # sizes. Decided by the optimisation step, so a resumed run gets the same crops; resources.json records the
    # switch step and the sizes. 0: off (the run as without the key). dinov2 only.
    curriculum: float | str = 0
    # the low phase's global crop size (px), a multiple of the patch size below global_size; None: half of
    # global_size, rounded to the patch size (112 for 224)
    curriculum_size: int | None = None

    def validate(self) -> None:
        for key in ("prototypes", "head_hidden", "head_bottleneck"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise config_mod.ConfigError(f"ssl.{key}={value} must be at least 1 (or left out: sized to the data)")
        if self.head_input not in HEAD_INPUTS:
            raise config_mod.ConfigError(f"ssl.head_input={self.head_input!r}; valid choices: {', '.join(HEAD_INPUTS)}")
        if self.head_lr is not None and self.head_lr <= 0:
            raise config_mod.ConfigError(f"ssl.head_lr={self.head_lr} must be positive")
        for key in ("head_warmup", "teacher_temp_warmup", "freeze_prototypes", "curriculum"):
            _check_length(f"ssl.{key}", getattr(self, key))
        if self.n_global < 1 or self.n_local < 0 or self.n_global + self.n_local < 2:
            raise config_mod.ConfigError(f"ssl.n_global={self.n_global} and ssl.n_local={self.n_local}: give at least "
                                         "one global crop, no negative count, and two crops in all (the DINO term "
                                         "compares crops of one image)")
        low, high = (list(self.mask_ratio) + [None, None])[:2]
        if len(self.mask_ratio) != 2 or not 0 <= low <= high <= 1:
            raise config_mod.ConfigError(f"ssl.mask_ratio={self.mask_ratio}: give [min, max] with "
                                         "0 <= min <= max <= 1")
        if not 0 <= self.mask_probability <= 1:
            raise config_mod.ConfigError(f"ssl.mask_probability={self.mask_probability} must be in [0, 1]")
        for key in ("global_size", "local_size", "curriculum_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise config_mod.ConfigError(f"ssl.{key}={getattr(self, key)} must be at least 1")
        if self.curriculum_size is not None:
            if not self.curriculum:
                raise config_mod.ConfigError(f"ssl.curriculum_size={self.curriculum_size} is the size of the "
                                             "low-resolution phase, which ssl.curriculum sets the length of: give "
                                             "ssl.curriculum too (e.g. 0.75) or leave ssl.curriculum_size out")
            if self.curriculum_size >= self.global_size:
                raise config_mod.ConfigError(f"ssl.curriculum_size={self.curriculum_size} must be smaller than "
                                             f"ssl.global_size={self.global_size} (the low-resolution phase's "
                                             "global crops come before the full-size ones)")
        try:
            check_drop(self.patch_drop, "ssl.patch_drop")
        except ValueError as err:
            raise config_mod.ConfigError(str(err)) from None
        if self.truncated_backward not in TRUNCATION_MODES:
            raise config_mod.ConfigError(f"ssl.truncated_backward={self.truncated_backward!r}; valid choices: "
                                         f"{', '.join(TRUNCATION_MODES)}")


@dataclass
class OptimConfig(StageOptimConfig):
    # epochs, batch_size, lr (None: 1e-4 for full SSA, 1e-3 for parameter-efficient tuners, as the reference), min_lr
    epochs: int = 300
    warmup: float | str = 1 / 30  # the tuner's lr ramp (after the head warm-up); reference: 10 of 300 epochs
    weight_decay: list[float] = field(default_factory=lambda: [1e-5, 1e-4])
    grad_clip: float = 1.0
    # Recompute the student's frozen block stretches in the backward pass instead of keeping their activations
    # (essa.train.memory.recompute_frozen): same numbers, less memory; costs one extra fc1 per block (and qkv and
    # attention where only attn.proj trains, as APLA), about 10 % of an APLA step. auto: in as few blocks as make
    # the step fit trainer.memory_budget (none when memory is plentiful: the fastest step; MAE and SimMIM: every
    # block); true: every block (the least memory); false: none
    recompute_frozen: bool | str = "auto"

    def validate(self) -> None:
        _check_length("optim.warmup", self.warmup)
        if self.recompute_frozen not in (True, False, "auto"):
            raise config_mod.ConfigError(f"optim.recompute_frozen={self.recompute_frozen!r}; valid: auto, true, false")


def _check_scale(key: str, scale) -> None:
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise config_mod.ConfigError(f"{key}={list(scale)}: give [min, max] with 0 < min <= max <= 1 (the share of "
                                     "the image a random resized crop covers)")


@dataclass
class MAEConfig:
    """``objective: mae`` (essa.ssl.mae): the encoder sees the visible patches only; a light decoder (timm Blocks,
    a learned mask token, a fixed 2-D sine-cosine position embedding) predicts the masked ones' pixels."""

    mask_ratio: float = 0.75  # share of each image's patches hidden (the paper's 0.75)
    decoder_depth: int = 2  # the paper's 8 blocks x 512 wide suit long runs; 2 x 256 trains in a short one
    decoder_width: int = 256
    decoder_heads: int = 8
    decoder_weights: str | None = None  # a decoder.safetensors of an earlier MAE run (same sizes); None: fresh
    decoder_lr: float | None = None  # None: optim.lr's value (the tuner's default lr)
    norm_pix_loss: bool = True  # target: each patch's pixels normalised by their own mean and std (the paper's)
    scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # random resized crop's area (the paper's)

    def validate(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise config_mod.ConfigError(f"mae.mask_ratio={self.mask_ratio} must be in (0, 1)")
        for key in ("decoder_depth", "decoder_width", "decoder_heads"):
            if getattr(self, key) < 1:
                raise config_mod.ConfigError(f"mae.{key}={getattr(self, key)} must be at least 1")
        if self.decoder_width % 4 or self.decoder_width % self.decoder_heads:
            raise config_mod.ConfigError(f"mae.decoder_width={self.decoder_width} must be a multiple of 4 (its "
                                         f"sine-cosine position embedding) and of mae.decoder_heads="
                                         f"{self.decoder_heads}")
        if self.decoder_lr is not None and self.decoder_lr <= 0:
            raise config_mod.ConfigError(f"mae.decoder_lr={self.decoder_lr} must be positive")
        _check_scale("mae.scale", self.scale)


@dataclass
class SimMIMConfig:
    """``objective: simmim`` (essa.ssl.simmim): square cells of patches replaced by a learned mask token in the
    encoder; a linear decoder predicts each patch's pixels; L1 on the masked pixels."""

    mask_ratio: float = 0.6  # share of the mask cells hidden (the paper's 0.6)
    # the side of a mask cell in px, a multiple of the patch size; None: the largest multiple of the patch size up to
    # 32 px (the paper's) that leaves at least 4 cells across the image (28 px at 224 px with patch 14; 8 at 32 px
    # with patch 4)
    mask_patch_size: int | None = None
    decoder_weights: str | None = None  # a decoder.safetensors of an earlier SimMIM run; None: fresh
    decoder_lr: float | None = None  # None: optim.lr's value (the tuner's default lr)
    scale: list[float] = field(default_factory=lambda: [0.67, 1.0])  # random resized crop's area (the paper's)

    def validate(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise config_mod.ConfigError(f"simmim.mask_ratio={self.mask_ratio} must be in (0, 1)")
        if self.mask_patch_size is not None and self.mask_patch_size < 1:
            raise config_mod.ConfigError(f"simmim.mask_patch_size={self.mask_patch_size} must be at least 1 (px)")
        if self.decoder_lr is not None and self.decoder_lr <= 0:
            raise config_mod.ConfigError(f"simmim.decoder_lr={self.decoder_lr} must be positive")
        _check_scale("simmim.scale", self.scale)


@dataclass
class MonitorConfig:
    knn_k: int = 200
    knn_temperature: float = 0.1
    # each class's votes divided by its share of the val images (essa.evaluate.knn): the monitor's metric is balanced
    # accuracy, which an imbalanced val set's majority otherwise wins on nearly parallel features
    knn_balanced: bool = True
    min_feature_rank: float = 1.01
    collapse_patience: int = 50
    collapse_tolerance: float = 0.01  # the head is uniform (or one-hot) within this fraction of ln(prototypes)
    checkpoint_every_n_steps: int = 50


#: Named presets (``preset: fast``, ``essa adapt --preset fast``): config keys that a run's own keys override
#: (:func:`essa.config.with_preset`). fast: APLA on the last 4 blocks, the frozen blocks before them run without
#: autograd (``ssl.truncated_backward: auto``; under PatchDropout the prefix is not shared with the teacher),
#: PatchDropout of half the patch tokens of the views only the CLS token is scored on. README: "The fast preset"
#: (essa adapt), and under Performance and Results what it measured, in speed and in quality.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"tuner": {"name": "apla", "options": {"blocks": "last:4"}},
             "ssl": {"patch_drop": 0.5, "truncated_backward": "auto"}},
}


@dataclass
class AdaptConfig:
    PRESETS = PRESETS  # not a field: the presets the ``preset`` key names
    # a named preset (PRESETS: fast) under this config: every key given here wins, the preset fills the others
    preset: str | None = None
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    # the SSA objective (essa.objectives): dinov2 (the ssl section), mae (the mae section) or simmim (simmim)
    objective: str = "dinov2"
    data: SSADataConfig = field(default_factory=SSADataConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)  # dinov2's; global_size is every objective's image size
    mae: MAEConfig = field(default_factory=MAEConfig)
    simmim: SimMIMConfig = field(default_factory=SimMIMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    seed: int = 0
    out: str = "runs/adapt"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # devices, nodes, strategy, precision, memory

    def validate(self) -> None:
        if self.data.root is None:
            raise config_mod.ConfigError("data.root is required: a folder of unlabelled images (--data)")
        if self.optim.epochs < 1 or self.optim.batch_size < 1:
            raise config_mod.ConfigError("optim.epochs and optim.batch_size must be at least 1")
        objectives.get(self.objective)  # names the valid choices
        if self.ssl.patch_drop and self.objective != "dinov2":
            raise config_mod.ConfigError(
                f"ssl.patch_drop={self.ssl.patch_drop} applies to objective=dinov2 only, not {self.objective}: "
                + ("mae already runs its encoder on the visible patches alone (mae.mask_ratio sets how many)"
                   if self.objective == "mae" else "simmim predicts every masked patch, so its encoder needs them all")
                + (f"; preset {self.preset} sets it: give ssl.patch_drop=0 with it (--set ssl.patch_drop=0)"
                   if self.preset else "; leave ssl.patch_drop at 0"))
        if self.ssl.curriculum and self.objective != "dinov2":
            raise config_mod.ConfigError(
                f"ssl.curriculum={self.ssl.curriculum!r} applies to objective=dinov2 only, not {self.objective}: "
                "the low-resolution phase switches the multi-crop views, and "
                + ("mae's masks are drawn on the patch grid of ssl.global_size"
                   if self.objective == "mae" else "simmim's mask cells and masks are sized to ssl.global_size")
                + "; leave ssl.curriculum at 0")
        tuners.base.build(self.tuner.name, self.tuner.options)  # a bad tuner fails before any work


def _check_length(key: str, value) -> None:
    from essa.ssl.schedules import length_steps

    try:
        length_steps(value, 100, 10, key)
    except ValueError as err:
        raise config_mod.ConfigError(str(err)) from None


def _seeded_collate(samples, *, seed: int, collate):
    """Batch ``(sample, key)`` pairs with the objective's ``collate``; its masks are drawn from a generator seeded by
    the batch's first key, so a resumed run draws the same masks."""
    # (epoch, index) of the key: the same masks whether the key also carries a phase (ssl.curriculum) or not
    generator = torch.Generator().manual_seed(mix_seed(seed, *samples[0][1][:2]))
    return collate([sample for (sample, _label), _key in samples], generator=generator)


def _task(cfg: AdaptConfig):
    """The labelled task that ``data.split`` and ``data.val_split`` name splits of, or None."""
    from essa.task import load_task

    return load_task(cfg.data.task_data()) if cfg.data.split else None


def _records(cfg: AdaptConfig, task=None):
    """(source, records) of the SSA images: ``data.root``'s, or with ``data.split`` that split of ``task``, with
    ``data.extra``'s added and ``data.max_images`` drawn."""
    from essa import data

    if cfg.data.split:
        task = task or _task(cfg)
        source, records = task.source, list(task.splits[cfg.data.split])
    else:
        source = data.open_source(cfg.data.root, labels=False)
        records = list(source.records)
    if cfg.data.extra:
        parts = [(source, records)] + [(s, list(s.records)) for s in
                                       (data.open_source(root, labels=False) for root in cfg.data.extra)]
        source = data.CombinedSource(parts)
        records = list(source.records)
    if cfg.data.max_images and len(records) > cfg.data.max_images:
        g = torch.Generator().manual_seed(cfg.seed)
        keep = sorted(torch.randperm(len(records), generator=g)[: cfg.data.max_images].tolist())
        records = [records[i] for i in keep]
    return source, records


def resolve_preprocessing(cfg: AdaptConfig, source, records, own=None, cache: Path | None = None):
    """What the run normalises with (``data.normalize``, :func:`essa.data.normalize.resolve`): ``own`` is the
    backbone's preprocessing (default: what ``essa.backbones.preprocessing`` says of ``backbone``); ``dataset``
    computes the statistics on ``records`` at ``ssl.global_size`` (read from ``cache`` when it holds them)."""
    from essa import backbones
    from essa.data import normalize

    if own is None:
        own = backbones.preprocessing(cfg.backbone.name, weights=cfg.backbone.weights)
    return normalize.resolve(cfg.data.normalize, own, source, records, img_size=cfg.ssl.global_size,
                             max_images=cfg.data.normalize_images, cache=cache)


def build_loader(cfg: AdaptConfig, patch_size: int, task=None, preprocessing=None, images=None) -> ResumableLoader:
    """The objective's views (DINOv2: multi-crop and block masks; MAE / SimMIM: one crop and its masks) of
    ``data.root``'s images, or with ``data.split`` of that split of ``task`` (default: the task ``data``
    describes); ``images``: their (source, records) when already listed. The views are normalised with
    ``preprocessing`` (an :class:`essa.data.normalize.Preprocessing`; default: :func:`resolve_preprocessing`)."""
    objective = objectives.get(cfg.objective)
    objective.check(cfg, patch_size)
    source, records = images if images is not None else _records(cfg, task)
    if preprocessing is None:
        preprocessing = resolve_preprocessing(cfg, source, records)
    collate = functools.partial(_seeded_collate, seed=cfg.seed, collate=objective.collate(cfg, patch_size))
    return training_loader(source, records, objective.transform(cfg, patch_size, preprocessing), seed=cfg.seed,
                           batch_size=cfg.optim.batch_size, num_workers=cfg.data.num_workers, collate_fn=collate,
                           what=str(cfg.data.root))


#: Images in the per-epoch picture of a reconstruction objective (reconstructions/epoch_NNN.png).
PREVIEW_IMAGES = 4


def preview_batch(cfg: AdaptConfig, patch_size: int, preprocessing, labelled=None,
                  loader: ResumableLoader | None = None):
    """The fixed images of the per-epoch picture, through the objective's deterministic view (normalised with
    ``preprocessing``, the run's), with masks drawn from a generator seeded by ``seed``: the first
    :data:`PREVIEW_IMAGES` of the kNN monitor's (``labelled``), else of the training images (``loader``'s). None
    when the objective draws no picture."""
    objective = objectives.get(cfg.objective)
    view = objective.preview_transform(cfg, preprocessing)
    if view is None:
        return None
    source, records = labelled if labelled is not None else (loader.dataset.base.source,
                                                             loader.dataset.base.records)
    images = [view(source.load(record)) for record in records[:PREVIEW_IMAGES]]
    return objective.collate(cfg, patch_size)(images, generator=torch.Generator().manual_seed(cfg.seed))


def _labelled_images(cfg: AdaptConfig, task=None):
    """(source, records) of the kNN monitor: ``data.val``, or the ``data.val_split`` split of ``task``; or None."""
    from essa import data

    if cfg.data.val_split:
        if task.task == "multilabel":
            raise config_mod.ConfigError(f"{cfg.data.root} is multilabel: the kNN monitor needs one class per image")
        return task.source, task.splits[cfg.data.val_split]
    if not cfg.data.val:
        return None
    source = data.open_source(cfg.data.val)
    if not source.classes or source.task == "multilabel":
        raise config_mod.ConfigError(f"data.val {cfg.data.val!r} has no class folders: the kNN monitor needs labels")
    return source, list(source.records)


def knn_k(labels, k: int) -> int:
    """The k of the kNN monitor on ``labels``: ``monitor.knn_k`` at most, and fewer than the smallest class has
    images, so that a leave-one-out vote is not every other image (which predicts the majority class for all)."""
    counts = torch.bincount(torch.as_tensor(labels).long())
    smallest = int(counts[counts > 0].min())
    return max(1, min(k, smallest - 1))


def knn_noise(labels, balanced_accuracy: float) -> float:
    """The binomial standard error of a balanced accuracy ``b`` measured on ``labels``:
    sqrt(sum_c b (1 - b) / n_c) / C, the per-class accuracies taken as b."""
    counts = torch.bincount(torch.as_tensor(labels).long())
    counts = counts[counts > 0].double()
    b = min(max(balanced_accuracy, 0.0), 1.0)
    return float(torch.sqrt((b * (1 - b) / counts).sum()) / len(counts))


def knn_metrics(backbone: nn.Module, labelled, cfg: AdaptConfig, preprocessing=None) -> dict[str, float]:
    """Leave-one-out weighted kNN (class-balanced votes with ``monitor.knn_balanced``) accuracy and balanced accuracy
    of the backbone's CLS features on ``labelled`` (source, records), the k used (:func:`knn_k`) and the balanced
    accuracy's standard error (:func:`knn_noise`). Images normalised with ``preprocessing`` (default: the
    backbone's own, :func:`essa.data.normalize.of_model`)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    from essa.evaluate.features import cls_features
    from essa.evaluate.knn import knn_scores

    source, records = labelled
    # every process extracts its share and gets all features: each computes the same kNN over the whole set
    feats, labels, _ = cls_features(backbone, source, records, img_size=cfg.ssl.global_size, distributed=True,
                                    preprocessing=preprocessing)
    k = knn_k(labels, cfg.monitor.knn_k)
    pred = knn_scores(feats, labels, k=k, temperature=cfg.monitor.knn_temperature, num_classes=len(source.classes),
                      balanced=cfg.monitor.knn_balanced).argmax(1)
    balanced = float(balanced_accuracy_score(labels, pred))
    return {"knn_acc": float(accuracy_score(labels, pred)), "knn_bal_acc": balanced, "knn_k": k,
            "knn_noise": knn_noise(labels, balanced)}


def export_choice(history: list[dict], monitored: bool) -> dict[str, Any]:
    """Which epoch's checkpoint the run exports, and why: the best kNN balanced accuracy (ties: the later epoch),
    unless there is no monitor or its curve stayed flat within twice its standard error, when the last epoch is
    exported (the monitor cannot tell the epochs apart, and the run trained for the last). Returns {"epoch",
    "step", "checkpoint" ("best" or "last"), "reason"}."""
    last = history[-1]
    if not monitored:
        return {"epoch": last["epoch"], "step": last["step"], "checkpoint": "last",
                "reason": "no kNN monitor (no labelled val images): the last epoch"}
    values = [row["knn_bal_acc"] for row in history]
    spread, noise = max(values) - min(values), 2 * max(row["knn_noise"] for row in history)
    if spread <= noise:
        return {"epoch": last["epoch"], "step": last["step"], "checkpoint": "last",
                "reason": f"the kNN monitor stayed flat (balanced accuracy {min(values):.3f}-{max(values):.3f}, within "
                          f"twice its standard error {noise:.3f}): the last epoch"}
    best = max(range(len(history)), key=lambda i: (values[i], i))
    return {"epoch": history[best]["epoch"], "step": history[best]["step"], "checkpoint": "best",
            "reason": f"the best kNN balanced accuracy, {values[best]:.3f} (range {min(values):.3f}-"
                      f"{max(values):.3f}, standard error {noise / 2:.3f})"}


def _export(module, run: RunDir, preprocessing) -> dict[str, Path]:
    """The objective's backbone (DINOv2: the teacher's; MAE, SimMIM: the student's) merged into plain timm weights,
    its tuner state, and the objective's own files (a decoder); the headers record ``preprocessing``."""
    backbone = module.exported_backbone()
    backbone.essa_preprocessing = preprocessing
    backbone_path = export_merged(backbone, run.path / "backbone.safetensors")
    return {"backbone": backbone_path, "tuner": tuners.save(backbone, run.path / "tuner.safetensors"),
            **module.exported_extras(run.path)}


class _SSAStage(Stage):
    """``essa adapt`` as :func:`essa.train.stage.fit_stage` runs it, with the objective that ``objective`` names
    (:mod:`essa.objectives`), through its interface (:mod:`essa.train.objective`)."""

    ties = "later"
    name = "adapt"

    def __init__(self, cfg: AdaptConfig, run: RunDir):
        self.cfg, self.run = cfg, run
        self.objective = objectives.get(cfg.objective)
        self.checkpoint_every_n_steps = cfg.monitor.checkpoint_every_n_steps
        self.unused_parameters = self.objective.unused_parameters(cfg)

    def start(self) -> None:
        self.task = _task(self.cfg)
        self.knn_data = _labelled_images(self.cfg, self.task)
        self.monitor = "knn_bal_acc" if self.knn_data is not None else None

    def epoch_metrics(self, module) -> dict[str, float]:
        # after each epoch: kNN on the monitored backbone's CLS features (best checkpoint by its balanced accuracy)
        trainer = module.trainer
        module.epoch_outputs(self.run.path, trainer.current_epoch, write=trainer.is_global_zero)
        if self.knn_data is None:
            return {}
        return knn_metrics(module.monitored_backbone, self.knn_data, self.cfg, self.preprocessing)

    def tuned_model(self) -> nn.Module:
        backbone = self.cfg.backbone.build(img_size=self.cfg.ssl.global_size, dynamic_img_size=True)
        tuners.apply(backbone, self.cfg.tuner.name, **self.cfg.tuner.options)
        return backbone

    def loader(self, backbone) -> ResumableLoader:
        from essa.data import normalize

        images = _records(self.cfg, self.task)
        self.preprocessing = resolve_preprocessing(self.cfg, *images, own=normalize.of_model(backbone),
                                                   cache=self.run.path / PREPROCESSING_FILE)
        backbone.essa_preprocessing = self.preprocessing  # what the model is trained with (a teacher copies it)
        if is_global_zero():
            if self.cfg.data.normalize != "dataset":  # dataset: resolve wrote the statistics with their images' key
                io.write_json(self.run.path / PREPROCESSING_FILE, self.preprocessing.to_dict())
            print(f"normalised with {self.preprocessing.describe()}")
        return build_loader(self.cfg, backbone.patch_embed.patch_size[0], self.task, self.preprocessing, images)

    def module(self, backbone, loader, trainer, checkpointing):
        self.cfg = cfg = self.objective.sized(self.cfg, loader.sampler.size)
        module = self.objective.module(cfg, backbone, steps_per_epoch(loader, trainer))
        if module.phase_starts:  # ssl.curriculum: each sample's views follow the step its batch trains
            loader.sampler.key_phases(module.phase_starts, trainer.accumulate_grad_batches)
        for note in module.schedule_warnings:
            warnings.warn(note, stacklevel=4)  # the caller of adapt (adapt -> fit_stage -> here)
        prepare_backbones(cfg.trainer, *module.prepared_backbones)
        module.preview = preview_batch(cfg, backbone.patch_embed.patch_size[0], self.preprocessing, self.knn_data,
                                       loader)
        module.preprocessing = self.preprocessing
        return module

    def reload(self, fitted: Fitted) -> dict[str, Any]:
        module = fitted.module
        exported = export_choice(module.history, self.knn_data is not None)
        if exported["checkpoint"] == "best":  # else the module holds the last epoch's weights
            state = torch.load(self.run.best, map_location="cpu", weights_only=True)
            module.load_state_dict(state["state_dict"], strict=False)
        if fitted.trainer.is_global_zero:
            print(f"exported epoch {exported['epoch']} (step {exported['step']}): {exported['reason']}")
        return {**module.stage_resources(), "images": fitted.loader.sampler.size, "exported": exported}

    def export(self, fitted: Fitted) -> dict[str, Path]:
        return _export(fitted.module, self.run, self.preprocessing)


def adapt(config: AdaptConfig | str | Path | None = None, *, resume: bool = False, overrides: list[str] | None = None,
          trainer_kwargs: dict | None = None, **sections) -> dict[str, Any]:
    """Run SSA. ``config``: an AdaptConfig, a YAML path, or None; ``sections`` override it by section
    (``backbone={...}, tuner={...}, optim={"epochs": 2}``, or top-level keys such as ``out=...``).

    Returns {"run_dir", "backbone", "tuner", "metrics", "resources"}, and the objective's own exports (MAE and
    SimMIM: "decoder").
    """
    cfg = resolve_config(config, sections, overrides)
    cfg.backbone.check_img_size("ssl.global_size (--img-size), ssl.local_size", cfg.ssl.global_size,
                                cfg.ssl.local_size)
    # the objective's checks that need the patch size (SimMIM's mask cells), before the run directory
    from essa import backbones

    patch = backbones.patch_size(cfg.backbone.name, weights=cfg.backbone.weights, **cfg.backbone.model_args)
    objectives.get(cfg.objective).check(cfg, patch)
    run = RunDir(cfg.out)
    if resume:
        run.refuse_other_config(cfg, f"--resume continues {run.path} with its own config.yaml; the given config "
                                     "differs: leave the other options out or use another --out")
    fitted = fit_stage(_SSAStage(cfg, run), cfg, run, seed=cfg.seed, resume=resume, trainer_kwargs=trainer_kwargs)
    return {"run_dir": run.path, **fitted.exported, "metrics": fitted.module.history, "resources": fitted.resources}


def resolve_config(config=None, sections=None, overrides=None) -> AdaptConfig:
    """An AdaptConfig from an instance, a YAML path or the defaults, then sections, then ``key=value`` overrides
    (:func:`essa.config.resolve`'s order)."""
    return config_mod.resolve(AdaptConfig, config, sections, overrides)
