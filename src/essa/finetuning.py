"""``essa finetune``: supervised adaptation (SA) of a ViT to a labelled task with any tuner, over one or more seeds.

    from essa.finetuning import finetune
    finetune(backbone={"weights": "runs/ssa-apla/backbone.safetensors"}, tuner={"name": "apla", "options": {"r": 64}},
             data={"root": "../shared/data/medmnist/breastmnist.npz"}, seeds=[0, 1, 2], out="runs/sa-apla")

The recipe (method.md, "Supervised stage"): a new linear head on the CLS token (``head.pool: avg``: on the mean of
the patch tokens instead; ``token+avg``: on both, concatenated); AdamW with weight decay 1e-5 (none on biases, norms
and tokens); a linear warm-up over
``optim.warmup_steps`` (500 in the reference, at most a fifth of the run) then a cosine to ``optim.min_lr``;
gradient clipping 1.0; resize, random-resized crop and horizontal flip; the checkpoint with the best primary metric
on the val split is tested on the test split. Default lr: 1e-4 for the ``full`` tuner, 1e-3 for every other
(``linear``, ``apla``, ``lora``...), as in SSA.

Two departures from the reference recipe, both defaults because they measured better with short budgets (README):

- ``head.init: lp`` (LP-FT, Kumar et al., ICLR 2022): before step 0 the head is fitted as essa's linear probe
  (:func:`essa.evaluate.linear_probe.fit_linear_probe`: logistic regression on the standardised head inputs of the
  train split, its C chosen on the val split by the primary metric) and then trained with everything the tuner
  trains. The probe is recorded in ``seed_N/head_init.json`` and validated before step 0 (a history row with
  ``epoch: -1, step: 0``): it is the first candidate for the best checkpoint, so fine-tuning that never beats its
  own linear probe on the val split is tested as that probe (the test row then says ``epoch: -1``). A resumed run
  takes its head from the checkpoint and does not fit it again. ``head.calibrate`` (default on): the probe's logits
  are then scaled to the fine-tuning loss on augmented train views (:func:`fit_logit_scale`), which changes none of
  its predictions. ``head.init: random``: timm's fresh head, as in the reference.
- ``head.class_weights: auto``: the loss is weighted by inverse class frequency (multilabel: BCE ``pos_weight``,
  negatives / positives) when the train split's largest class count exceeds :data:`AUTO_CLASS_RATIO` (1.5) times
  its smallest (multilabel: a label's positives against its negatives); ``true`` / ``false`` force it.

Every seed sees the same splits (``data.split_seed``) and the same preprocessing (``data.normalize``: the
backbone's own mean and std, e.g. an SSA export's header, ImageNet's, or the train split's), and trains in its own
run directory. Output in ``OUT``: ``config.yaml``; ``preprocessing.json`` (the mean, std and interpolation used,
which ``classifier.safetensors`` records too); ``summary.json`` / ``summary.csv`` (mean ± std over seeds of each test metric, the peak training
memory and the training images/s); ``duplicates.json`` (when the scan ran); and per seed ``seed_N/``:
``config.yaml`` (``seeds: [N]``), ``metrics.json`` / ``metrics.csv`` (with ``head.init: lp`` a first row, epoch -1,
with the validation metrics of the probe head; a row per epoch with the mean training loss, lr and validation
metrics; a last row with ``split: test``: the epoch and step of the best checkpoint, its test
metrics with their 95 % bootstrap intervals, ``peak_memory_mib``, ``images_per_s``, ``train_seconds``,
``trainable_params``, ``class_weights`` (whether the loss was weighted) and, for single-label tasks,
``predicted_share`` / ``label_share``: the fraction of the test images in the most-predicted class and in the most
frequent true class, by which ``essa.report`` flags a classifier that predicts (almost) one class),
``resources.json`` (as ``essa adapt`` writes it: ``trainable_params``, ``images``, ``peak_memory_mib``,
``images_per_s``, ``train_seconds``), ``head_init.json`` (``head.init: lp``), ``test_predictions.csv``,
``test_confusion_matrix.png``,
``checkpoints/{last,best}.ckpt``, and ``classifier.safetensors``: the merged plain timm classifier, which
``essa.backbones.create(weights=...)`` rebuilds with its head. A re-run skips finished seeds.

Peak memory: on CUDA the allocator's peak; on CPU the peak resident memory minus the resident memory at the seed's
start (the first seed of a process also counts one-off library allocations; ``essa.bench`` measures each
configuration in a fresh process for comparisons).

Each seed follows :func:`essa.train.stage.fit_stage`, the sequence ``essa adapt`` follows too; this module holds the
fine-tuning config, the recipe's pieces (classifier, loader, lr schedule, class weights, the linear-probe head) and
the seed stage's parts (``_SeedStage``: the head init before step 0, testing the best checkpoint, the export and the
test row); the module that trains is :class:`essa.train.classify.ClassifierModule`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from essa import backbones, config as config_mod, data, io, tuners
from essa.train.optim import default_lr
from essa.config import BackboneConfig, ConfigError, StageOptimConfig, TrainerConfig, TunerConfig
from essa.evaluate import metrics
from essa.evaluate.features import classifier_scores, forward_images
from essa.evaluate.linear_probe import fit_linear_probe
from essa.evaluate.run import (
    CLASSIFIER_FILE, RESOURCES, format_table, mean_std_column, report_predictions, summarise, write_summary,
)
from essa.ssl.schedules import cosine
from essa.task import Task, TaskDataConfig, check_task_key, load_task
from essa.train.classify import ClassifierModule, class_weights
from essa.train.loader import ResumableLoader, training_loader
from essa.train.run_dir import RunDir, check_trainable_state, writing
from essa.train.stage import Fitted, Stage, export_merged, fit_stage
from essa.train.trainer import is_global_zero, prepare_backbones, steps_per_epoch

#: Pooling of the tokens the head reads: timm's ``global_pool`` values, and essa's CLS + mean of the patch tokens.
POOLS = ("token", "avg", backbones.TOKEN_AVG_POOL)
#: The warm-up never takes more than this fraction of the run, so that a short run still trains at its peak lr.
MAX_WARMUP_FRACTION = 0.2
#: What the linear-probe head of ``head.init: lp`` was (C, its val metric), in each seed's run directory.
HEAD_INIT_FILE = "head_init.json"
#: The entries of a seed's ``resources.json`` (essa.train.stage.RESOURCES_FILE) that its test row repeats.
RESOURCE_KEYS = ("peak_memory_mib", "images_per_s", "train_seconds", "trainable_params")


#: ``head.init`` values: ``lp`` fits essa's linear probe on the frozen head inputs first (LP-FT); ``random``: timm's
#: initialisation (truncated normal, std 0.02; bias 0).
HEAD_INITS = ("lp", "random")
#: ``head.class_weights: auto`` weights the loss when the train split's largest class count exceeds this many times
#: its smallest (multilabel: a label's positives against its negatives, either way round).
AUTO_CLASS_RATIO = 1.5


@dataclass
class HeadConfig:
    pool: str = "token"  # token: the CLS token (reference); avg: the mean of the patch tokens; token+avg: both
    init: str = "lp"  # lp: the linear probe of the frozen features before step 0 (LP-FT); random: a fresh head
    class_weights: bool | str = "auto"  # true: weight the loss by inverse class frequency in the train split;
    #                                     auto: true when the largest / smallest class count exceeds 1.5
    calibrate: bool = True  # init lp: rescale the probe head's logits to the training loss on augmented train views


@dataclass
class AugmentConfig:
    scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # area range of the random-resized crop (the
    #                                                                  reference's 0.08-1 measured worse: README)
    hflip: float = 0.5


@dataclass
class OptimConfig(StageOptimConfig):
    # epochs (100), batch_size, lr (None: 1e-4 for the full tuner, 1e-3 for the others), min_lr
    warmup_steps: int = 500
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    layer_decay: float = 1.0  # layer-wise lr decay: block i of D trains at layer_decay^(D - i) of the lr; 1: off


@dataclass
class FinetuneConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    task: str | None = None  # None: the data source's hint (binary, multiclass, multilabel, ordinal)
    metric: str | None = None  # the primary metric (None: kappa for ordinal, auc for binary and multilabel,
    #                            balanced_accuracy for multiclass)
    seeds: list[int] = field(default_factory=lambda: [0])  # training seeds (head init, batch order, augmentation)
    img_size: int = 224
    bootstrap: int = 1000  # resamples of the test metrics' 95 % intervals
    checkpoint_every_n_steps: int = 50
    out: str = "runs/finetune"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # devices, nodes, strategy, precision, memory

    def validate(self) -> None:
        check_task_key(self.task)
        if self.optim.epochs < 1 or self.optim.batch_size < 1:
            raise ConfigError("optim.epochs and optim.batch_size must be at least 1")
        peak = peak_lr(self)
        if peak < self.optim.min_lr:
            raise ConfigError(f"optim.lr={peak:g} is below optim.min_lr={self.optim.min_lr:g}: the cosine would "
                              "rise from the one to the other; lower optim.min_lr too")
        scale = self.augment.scale
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"augment.scale={scale} must be two area fractions 0 < low <= high <= 1")
        if not 0 < self.optim.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay={self.optim.layer_decay} must be in (0, 1] (1: no decay)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds} must be a non-empty list of distinct integers")
        if self.head.pool not in POOLS:
            raise ConfigError(f"head.pool={self.head.pool!r}; valid choices: {', '.join(POOLS)}")
        if self.head.init not in HEAD_INITS:
            raise ConfigError(f"head.init={self.head.init!r}; valid choices: {', '.join(HEAD_INITS)}")
        if self.head.class_weights not in (True, False, "auto"):
            raise ConfigError(f"head.class_weights={self.head.class_weights!r}; valid choices: true, false, auto")
        tuners.base.build(self.tuner.name, self.tuner.options)  # a bad tuner fails before any work


def resolve_config(config=None, sections=None, overrides=None) -> FinetuneConfig:
    """A FinetuneConfig from an instance, a YAML path or the defaults, then sections, then ``key=value`` overrides
    (:func:`essa.config.resolve`'s order)."""
    return config_mod.resolve(FinetuneConfig, config, sections, overrides)


def build_classifier(cfg: FinetuneConfig, num_classes: int):
    """The backbone with a new head of ``num_classes`` outputs and the tuner applied (head trainable)."""
    pool = {"global_pool": cfg.head.pool}
    if cfg.head.pool == "avg":
        pool["fc_norm"] = False  # keep the final norm before pooling, where the pretrained weights have it
    model = cfg.backbone.build(img_size=cfg.img_size, num_classes=num_classes, **pool)
    return tuners.apply(model, cfg.tuner.name, **cfg.tuner.options)


#: The preprocessing the run normalised with (as essa adapt's: essa.adaptation.PREPROCESSING_FILE), in ``OUT``.
PREPROCESSING_FILE = "preprocessing.json"


def resolve_preprocessing(cfg: FinetuneConfig, task: Task, cache: Path | None = None) -> data.normalize.Preprocessing:
    """What every seed normalises with (``data.normalize``, :func:`essa.data.normalize.resolve`): the backbone's own
    preprocessing (:func:`essa.backbones.preprocessing`: an essa file's header, else timm's pretrained config of the
    name), ImageNet's statistics, or the train split's at ``img_size`` (read from ``cache`` when it holds them)."""
    own = backbones.preprocessing(cfg.backbone.name, weights=cfg.backbone.weights)
    return data.normalize.resolve(cfg.data.normalize, own, task.source, task.splits["train"], img_size=cfg.img_size,
                                  max_images=cfg.data.normalize_images, cache=cache)


def build_loader(cfg: FinetuneConfig, task: Task, seed: int, preprocessing=None) -> ResumableLoader:
    """The train split with the training augmentation, in a seeded order that a resumed run continues exactly,
    normalised with ``preprocessing`` (default: :func:`resolve_preprocessing`)."""
    preprocessing = preprocessing or resolve_preprocessing(cfg, task)
    transform = data.transforms.train_transform(cfg.img_size, scale=tuple(cfg.augment.scale), hflip=cfg.augment.hflip,
                                                preprocessing=preprocessing)
    return training_loader(task.source, task.splits["train"], transform, seed=seed, batch_size=cfg.optim.batch_size,
                           num_workers=cfg.data.num_workers, what=f"the train split of {cfg.data.root}")


#: The peak lr of fine-tuning from the linear-probe head (``head.init: lp``) with every tuner: the probe's head is
#: already fitted, and at the reference's 1e-3 the first epochs pull the features (and the val metric) away from it.
LP_FT_LR = 1e-4


def peak_lr(cfg: FinetuneConfig) -> float:
    """``optim.lr`` if given; else :data:`LP_FT_LR` with ``head.init: lp``, and with ``head.init: random`` the
    reference's (:func:`essa.train.optim.default_lr`: 1e-4 for the full tuner, 1e-3 for the others)."""
    if cfg.optim.lr is None and cfg.head.init == "lp":
        return LP_FT_LR
    return default_lr(cfg.tuner.name, cfg.optim.lr)


def lr_schedule(cfg: FinetuneConfig, total_steps: int) -> np.ndarray:
    """(total_steps,) lr: linear warm-up from 0 over ``optim.warmup_steps`` (at most MAX_WARMUP_FRACTION of the run),
    then a cosine from :func:`peak_lr` to ``optim.min_lr``."""
    warmup = min(cfg.optim.warmup_steps, math.floor(MAX_WARMUP_FRACTION * total_steps))
    return cosine(peak_lr(cfg), cfg.optim.min_lr, total_steps, warmup_iters=warmup)


def class_ratio(labels: list, num_classes: int, multilabel: bool) -> float:
    """How imbalanced the training labels are: the largest class count over the smallest (inf when a class has no
    image); multilabel: the largest, over labels, of positives / negatives or negatives / positives."""
    if multilabel:
        positives = np.zeros(num_classes)
        for label in labels:
            positives[list(label)] += 1
        pairs = np.stack([positives, len(labels) - positives], axis=1)  # (L, 2): each label against the rest
    else:
        pairs = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[None]  # (1, C)
    smallest, largest = pairs.min(axis=1), pairs.max(axis=1)
    if np.any(smallest == 0):
        return math.inf
    return float(np.max(largest / smallest))


def uses_class_weights(setting: bool | str, labels: list, num_classes: int, multilabel: bool) -> bool:
    """``head.class_weights``: true or false as given; ``auto``: whether :func:`class_ratio` of the training labels
    exceeds :data:`AUTO_CLASS_RATIO`."""
    if setting == "auto":
        return class_ratio(labels, num_classes, multilabel) > AUTO_CLASS_RATIO
    return bool(setting)


def _head_inputs(model, x: torch.Tensor) -> torch.Tensor:
    """What the head reads: the pooled (and normed) tokens of ``head.pool``."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def fit_probe_head(model, cfg: FinetuneConfig, task: Task, seed: int, device: torch.device | str = "cpu",
                   preprocessing=None, loss_weights: torch.Tensor | None = None) -> dict:
    """LP-FT's first stage (``head.init: lp``): essa's linear probe (:func:`essa.evaluate.linear_probe.
    fit_linear_probe`: standardised features, C chosen on the val split by the primary metric) fitted on what the
    head reads from the model as it starts training (eval view of the train and val images), folded into the head
    (:meth:`~essa.evaluate.linear_probe.LinearProbe.as_linear`).

    ``head.calibrate``: then the head's weight and bias are multiplied by the one scale that minimises the
    fine-tuning loss (``loss_weights`` as in training) on one view of each train image under the training
    augmentation (:func:`fit_logit_scale`). The probe was fitted on the eval view: on random crops it can be far more
    confident than it is right (a loss above that of predicting the class shares), and its first gradients then
    pull the features apart. A common scale of the logits changes no prediction: the probe's val metrics
    (``epoch: -1``) stay as they are.

    Draws nothing from torch's random generator, so that training starts from the same random state as with
    ``head.init: random`` (the calibration's views are seeded with ``seed`` inside a forked generator).
    ``preprocessing``: the eval view's (default: the model's own).
    Returns {"init", "C", "selected_on", "val_<metric>"} and with ``head.calibrate`` {"logit_scale",
    "train_view_loss", "train_view_loss_calibrated"}: what ``seed_N/head_init.json`` records."""
    kwargs = dict(img_size=cfg.img_size, batch_size=cfg.optim.batch_size, num_workers=cfg.data.num_workers,
                  preprocessing=preprocessing)
    home = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):  # the DataLoaders draw their base seeds from the global generator
        model.to(device)
        try:
            train = forward_images(model, _head_inputs, task.source, task.splits["train"], **kwargs)
            val = (forward_images(model, _head_inputs, task.source, task.splits["val"], **kwargs)
                   if task.splits.get("val") else None)
            views = None
            if cfg.head.calibrate:
                torch.manual_seed(seed)
                augment = data.transforms.train_transform(cfg.img_size, scale=tuple(cfg.augment.scale),
                                                          hflip=cfg.augment.hflip,
                                                          preprocessing=preprocessing or data.normalize.of_model(model))
                views = forward_images(model, _head_inputs, task.source, task.splits["train"], transform=augment,
                                       **kwargs)
        finally:
            model.to(home)
    probe = fit_linear_probe(train.values, train.labels, None if val is None else val.values,
                             None if val is None else val.labels, task=task.task, seed=seed, metric=task.primary,
                             num_classes=None if task.task == "multilabel" else task.num_classes)
    weight, bias = (torch.as_tensor(a, dtype=torch.float64) for a in probe.as_linear())
    record = {"init": "lp", "C": probe.C, "selected_on": probe.selected_on,
              f"val_{probe.metric}": probe.selection.get(probe.C)}
    if views is not None:
        logits = views.values.double() @ weight.T + bias
        scale, before, after = fit_logit_scale(task.task, logits, views.labels, loss_weights)
        weight, bias = weight * scale, bias * scale
        record.update(logit_scale=scale, train_view_loss=before, train_view_loss_calibrated=after)
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
        head.bias.copy_(bias.to(head.bias.dtype))
    return record


#: The range :func:`fit_logit_scale` searches: from nearly uniform predictions to 10 times sharper ones.
LOGIT_SCALES = (1e-3, 10.0)


def fit_logit_scale(task: str, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                    iterations: int = 60) -> tuple[float, float, float]:
    """The scale s in :data:`LOGIT_SCALES` minimising the fine-tuning loss
    (:func:`essa.train.classify.classification_loss`) of ``s * logits`` (temperature scaling, Guo et al., ICML
    2017; the loss is convex in s, so a golden-section search finds it); returns (s, loss at s = 1, loss at s)."""
    from essa.train.classify import classification_loss

    logits = logits.float()
    targets = labels.float() if task == "multilabel" else labels.long()
    weights = None if weights is None else weights.float()

    def loss(s: float) -> float:
        return float(classification_loss(task, s * logits, targets, weights))

    low, high = (math.log(v) for v in LOGIT_SCALES)  # searched in log s: the loss is unimodal there too
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(math.exp(a)), loss(math.exp(b))
    for _ in range(iterations):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(math.exp(b))
    scale = math.exp((low + high) / 2)
    return scale, loss(1.0), loss(scale)


def prediction_shares(task: Task, outputs) -> dict[str, float]:
    """Single-label tasks: ``predicted_share``, the fraction of the images predicted as the most-predicted class,
    and ``label_share``, the fraction of the most frequent true class; a classifier that predicts (almost) one
    class has predicted_share near 1 above label_share (``essa.report`` flags it). Multilabel: {}."""
    if task.task == "multilabel" or len(outputs.labels) == 0:
        return {}
    predicted = np.bincount(outputs.values.argmax(1).numpy(), minlength=task.num_classes)
    truth = np.bincount(outputs.labels.numpy(), minlength=task.num_classes)
    return {"predicted_share": float(predicted.max() / predicted.sum()),
            "label_share": float(truth.max() / truth.sum())}


def test_row(run: RunDir) -> dict | None:
    """The final test row of a finished seed run, else None."""
    return recorded_test_row(run.path) if (run.path / CLASSIFIER_FILE).is_file() else None


def recorded_test_row(path: Path) -> dict | None:
    """The final test row in the ``metrics.json`` of the seed run in ``path``, whether or not its classifier is
    still there (a study's record keeps no exports), else None."""
    rows = io.read_json(path / "metrics.json")
    return rows[-1] if rows and rows[-1].get("split") == "test" else None


def _val_metrics(module, cfg: FinetuneConfig, task: Task, preprocessing=None) -> dict[str, Any]:
    out = classifier_scores(module.model, task.source, task.splits["val"], task=task.task, img_size=cfg.img_size,
                            batch_size=cfg.optim.batch_size, num_workers=cfg.data.num_workers, distributed=True,
                            preprocessing=preprocessing)
    return {"split": "val", **metrics.compute(task.task, out.labels, out.values, task.num_classes)}


def _save_start(module: ClassifierModule, path: Path) -> None:
    """A checkpoint of the module before step 0 (epoch -1, step 0) that testing loads as it loads ``best.ckpt``:
    the trainable tensors and the frozen weights' checksum."""
    checkpoint = {"state_dict": module.state_dict(), "epoch": -1, "global_step": 0}
    module.on_save_checkpoint(checkpoint)
    checkpoint.pop("essa")
    with writing(f"write {path}"), io.replacing(path) as tmp:
        torch.save(checkpoint, tmp)


class _SeedStage(Stage):
    """One seed of ``essa finetune`` as :func:`essa.train.stage.fit_stage` runs it: trains, tests the best
    checkpoint, exports it and writes the test row."""

    def __init__(self, cfg: FinetuneConfig, seed: int, task: Task, run: RunDir, resume: bool, preprocessing):
        self.cfg, self.seed, self.task, self.run, self.resume = cfg, seed, task, run, resume
        self.preprocessing = preprocessing
        self.checkpoint_every_n_steps = cfg.checkpoint_every_n_steps
        self.monitor = task.primary
        self.name = f"finetune seed {seed}"

    def epoch_metrics(self, module) -> dict[str, Any]:
        return _val_metrics(module, self.cfg, self.task, self.preprocessing)

    def tuned_model(self):
        model = build_classifier(self.cfg, self.task.num_classes)
        model.essa_preprocessing = self.preprocessing  # what it is trained with, which its export records
        prepare_backbones(self.cfg.trainer, model)
        return model

    def loader(self, model) -> ResumableLoader:
        return build_loader(self.cfg, self.task, self.seed, self.preprocessing)

    def module(self, model, loader, trainer, checkpointing) -> ClassifierModule:
        cfg, seed, task, run = self.cfg, self.seed, self.task, self.run
        self.loss_weights = None
        train_labels = [r.label for r in task.splits["train"]]
        if uses_class_weights(cfg.head.class_weights, train_labels, task.num_classes, task.task == "multilabel"):
            self.loss_weights = class_weights(train_labels, task.num_classes, multilabel=task.task == "multilabel")
        head_init = None
        # a resumed run's head is in its checkpoint
        if cfg.head.init == "lp" and not (self.resume and run.last.exists()):
            head_init = fit_probe_head(model, cfg, task, seed, device=trainer.strategy.root_device,
                                       preprocessing=self.preprocessing, loss_weights=self.loss_weights)
            if trainer.is_global_zero:
                (run.path / HEAD_INIT_FILE).write_text(json.dumps(head_init, indent=2))
                calibrated = (f", logits x{head_init['logit_scale']:.3g}: loss on augmented train views "
                              f"{head_init['train_view_loss']:.3f} -> {head_init['train_view_loss_calibrated']:.3f}"
                              if "logit_scale" in head_init else "")
                print(f"seed {seed}: head initialised by the linear probe (C={head_init['C']:.3g}, "
                      f"val {task.primary} {head_init[f'val_{task.primary}']}{calibrated})")
        total_steps = cfg.optim.epochs * steps_per_epoch(loader, trainer)
        module = ClassifierModule(model, task.task, lr_schedule(cfg, total_steps),
                                  cfg.optim.weight_decay, self.loss_weights, cfg.optim.layer_decay)
        if head_init is not None:  # the linear-probe head before step 0 is the first candidate for the best checkpoint
            start = {"epoch": -1, "step": 0, **_val_metrics(module, cfg, task, self.preprocessing)}
            module.history = [start]
            if math.isfinite(start.get(task.primary, math.nan)):
                checkpointing.best_value = start[task.primary]
            if trainer.is_global_zero:
                _save_start(module, run.best)
        return module

    def reload(self, fitted: Fitted) -> dict[str, Any]:
        cfg, task, module = self.cfg, self.task, fitted.module
        self.best = torch.load(self.run.best, map_location="cpu", weights_only=True)
        check_trainable_state(self.best, module, module.model, str(self.run.best))
        module.load_state_dict(self.best["state_dict"], strict=False)
        # every process tests its share of the test split; process 0 writes the files
        self.test = classifier_scores(module.model, task.source, task.splits["test"], task=task.task,
                                      img_size=cfg.img_size, batch_size=cfg.optim.batch_size,
                                      num_workers=cfg.data.num_workers, distributed=True,
                                      preprocessing=self.preprocessing)
        return {"images": fitted.loader.sampler.size}

    def export(self, fitted: Fitted) -> dict:
        """The merged classifier and the test row, written last into the metrics: it marks the seed as finished."""
        task, run, module, best = self.task, self.run, fitted.module, self.best
        module.model.essa_preprocessing = self.preprocessing
        export_merged(module.model, run.path / CLASSIFIER_FILE)
        row = {
            "epoch": best["epoch"], "step": best["global_step"], "split": "test",  # the tested (best) checkpoint's
            **report_predictions(task, self.test, run.path, "test", bootstrap=self.cfg.bootstrap),
            **prediction_shares(task, self.test), "class_weights": self.loss_weights is not None,
            **{key: fitted.resources[key] for key in RESOURCE_KEYS},
        }
        run.write_metrics(module.history + [row])
        return row


def _train_seed(cfg: FinetuneConfig, seed: int, task: Task, run: RunDir, resume: bool,
                trainer_kwargs: dict | None, preprocessing) -> dict:
    """Train one seed in ``run``, test its best checkpoint and export it; returns the test row."""
    stage = _SeedStage(cfg, seed, task, run, resume, preprocessing)
    return fit_stage(stage, cfg, run, seed=seed, resume=resume, trainer_kwargs=trainer_kwargs).exported


def finetune(config: FinetuneConfig | str | Path | None = None, *, resume: bool = False,
             overrides: list[str] | None = None, trainer_kwargs: dict | None = None, only: list[int] | None = None,
             **sections) -> dict[str, Any]:
    """Fine-tune and test one classifier per seed. ``config``: a FinetuneConfig, a YAML path, or None; ``sections``
    override it by section (``optim={"epochs": 3}``) or top-level key (``seeds=[0, 1]``, ``out=...``).

    Finished seeds (a test row in ``seed_N/metrics.json``) are read back, not trained again; ``resume`` continues
    unfinished ones from their last checkpoint. A seed directory made with another config is an error. ``only``:
    train only these of the config's seeds now (``essa run`` trains one seed per cell); the summary covers the
    finished seeds.
    Returns {"run_dir", "task", "seeds" (seed -> {"run_dir", "classifier", "test"}), "summary", "table"}.
    """
    cfg = resolve_config(config, sections, overrides)
    cfg.backbone.check_img_size("img_size (--img-size)", cfg.img_size)
    out = Path(cfg.out)
    runs = {seed: (dataclasses.replace(cfg, seeds=[seed]), RunDir(out / f"seed_{seed}")) for seed in cfg.seeds}
    for seed_cfg, run in runs.values():
        run.refuse_other_config(seed_cfg, f"{run.path} was run with another config ({run.path / 'config.yaml'}); "
                                          "give the same options, or another --out")
    task = load_task(cfg.data, cfg.task, cfg.metric)
    preprocessing = resolve_preprocessing(cfg, task, cache=out / PREPROCESSING_FILE)
    if is_global_zero():  # in a distributed run, process 0 writes and prints
        out.mkdir(parents=True, exist_ok=True)
        config_mod.dump(cfg, out / "config.yaml")
        if cfg.data.normalize != "dataset":  # dataset: resolve wrote the statistics with their images' key
            io.write_json(out / PREPROCESSING_FILE, preprocessing.to_dict())
        if task.duplicates is not None:
            (out / "duplicates.json").write_text(json.dumps(task.duplicates.to_dict(), indent=2))
        print(task.describe())
        print(f"normalised with {preprocessing.describe()}")

    if only is not None and not set(only) <= set(cfg.seeds):
        raise ValueError(f"only={only} names seeds that are not in seeds={cfg.seeds}")
    seeds = {}
    for seed, (seed_cfg, run) in runs.items():
        row = test_row(run)
        if row is None and only is not None and seed not in only:
            continue
        if row is None:
            row = _train_seed(seed_cfg, seed, task, run, resume, trainer_kwargs, preprocessing)
        else:
            print(f"seed {seed}: finished before, read from {run.path / 'metrics.json'}")
        seeds[seed] = {"run_dir": run.path, "classifier": run.path / CLASSIFIER_FILE, "test": row}

    names = [*metrics.metric_names(task.task), *RESOURCES]
    summary = {"task": task.task, "primary_metric": task.primary, "seeds": list(seeds),
               **summarise({f"seed_{s}": r["test"] for s, r in seeds.items()}, names)}
    if is_global_zero():
        write_summary(out, summary)
    table = format_table({f"{cfg.tuner.name} (mean ± std)": mean_std_column(summary)}, task.primary)
    return {"run_dir": out, "task": task, "seeds": seeds, "summary": summary, "table": table}
