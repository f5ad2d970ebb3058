"""A labelled task: its images, classes, task type, primary metric and train/val/test splits.

``essa finetune`` and ``essa evaluate`` read their data through it, so that both see the same splits::

    task = load_task(TaskDataConfig(root="../shared/data/medmnist/breastmnist.npz"))
    task.task, task.classes, task.primary        # "binary", ["malignant", "normal, benign"], "auc"
    task.splits["train"]                         # list[Record]; official splits kept, missing ones carved

The split seed (``data.split_seed``) is independent of the training seeds: every seed of a study trains and tests
on the same images.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from essa import data
from essa.config import ConfigError
from essa.data import DataError, DuplicateReport, Record, Source
from essa.data.duplicates import POLICIES, SCOPES
from essa.evaluate import metrics

#: ``skip`` skips the duplicate scan (it decodes every image); the others are ``essa.data.find_duplicates`` policies.
DUPLICATE_POLICIES = ("skip", *POLICIES)


@dataclass
class TaskDataConfig:
    root: str | None = None  # what essa.data.open_source reads: a folder, a .csv manifest, a MedMNIST .npz or name
    options: dict[str, Any] = field(default_factory=dict)  # open_source options (CSV columns, DICOM window...)
    val: float = 0.1  # fractions carved from the training pool for splits the source does not have
    test: float = 0.1
    split_seed: int = 0
    official: bool = True  # keep the source's own splits
    max_train: int | None = None  # a seeded, stratified subsample of the train split (val and test stay whole)
    duplicates: str = "report"  # skip | report | drop | error (exact duplicates, essa.data.find_duplicates)
    duplicate_scope: str = "across"  # the policy acts on groups across splits, or on all groups
    num_workers: int = 2
    # the mean / std images are normalised with (essa.data.normalize): model: the backbone's own (an essa weights
    # file's header, else timm's pretrained config of its name, e.g. CLIP's); imagenet; dataset: per channel over at
    # most normalize_images images of the train split (a seeded sample), resized to the model's size
    normalize: str = "model"
    normalize_images: int = 1000

    def validate(self) -> None:
        check_normalize(self.normalize, self.normalize_images)
        if self.duplicates not in DUPLICATE_POLICIES:
            raise ConfigError(f"data.duplicates={self.duplicates!r}; valid choices: {', '.join(DUPLICATE_POLICIES)}")
        if self.max_train is not None and self.max_train < 1:
            raise ConfigError(f"data.max_train={self.max_train} must be at least 1 (or null: the whole train split)")
        if self.duplicate_scope not in SCOPES:
            raise ConfigError(f"data.duplicate_scope={self.duplicate_scope!r}; valid choices: {', '.join(SCOPES)}")


def check_normalize(mode: str, images: int, where: str = "data") -> None:
    """``data.normalize`` is one of essa.data.normalize.MODES and ``data.normalize_images`` at least 1."""
    try:
        data.normalize.check_mode(mode, f"{where}.normalize")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if images < 1:
        raise ConfigError(f"{where}.normalize_images={images} must be at least 1 (the images data.normalize=dataset "
                          "computes the statistics on)")


def check_task_key(task: str | None) -> None:
    """A config's ``task`` key is None (the source decides) or one of ``essa.evaluate.metrics.TASKS``."""
    if task is not None and task not in metrics.TASKS:
        raise ConfigError(f"task={task!r}; valid choices: {', '.join(metrics.TASKS)} (or leave it out)")


@dataclass
class Task:
    """A labelled dataset ready to train and test on.

    ``task``: one of ``essa.evaluate.metrics.TASKS``; ``primary``: the metric that picks checkpoints and ranks
    models; ``splits``: ``{"train", "val", "test"}`` -> records; ``duplicates``: the scan's report (None if skipped).
    """

    source: Source
    task: str
    classes: list[str]
    primary: str
    splits: dict[str, list[Record]]
    duplicates: DuplicateReport | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        sizes = " / ".join(f"{name} {len(records)}" for name, records in self.splits.items())
        text = f"{self.source.path}: {self.task}, {self.num_classes} classes, {sizes} images"
        if self.duplicates is not None:
            exact = self.duplicates.summary()["exact"]
            text += (f"; {exact['groups']} exact duplicate groups ({exact['groups_across_splits']} across splits), "
                     f"{len(self.duplicates.dropped)} images dropped")
        return text


def _resolve_task(source: Source, task: str | None) -> str:
    """The config's task, else the source's hint; a task that contradicts the labels is an error."""
    check_task_key(task)
    chosen = task or source.task
    multilabel_labels = source.task == "multilabel"
    if (chosen == "multilabel") != multilabel_labels:
        raise DataError(
            f"task={chosen!r} does not fit {source.path}, whose labels are "
            f"{'several classes per image (task multilabel)' if multilabel_labels else 'one class per image'}"
        )
    if chosen == "binary" and len(source.classes) != 2:
        raise DataError(f"task='binary' needs 2 classes, but {source.path} has {len(source.classes)}: "
                        f"{', '.join(source.classes)}; use multiclass or ordinal")
    return chosen


def _check_classes(task: str, classes: list[str], splits: dict[str, list[Record]], cfg: TaskDataConfig) -> None:
    """Every split holds images, and (single-label tasks) every class: a class missing from train cannot be
    learnt, and one missing from val or test leaves balanced accuracy and AUC undefined or biased."""
    for name, records in splits.items():
        if not records:
            raise DataError(f"the {name} split of {cfg.root} is empty; set data.{name} > 0 (a fraction of train)"
                            if name != "train" else f"{cfg.root} has no training images left after the split")
        if task == "multilabel":
            continue
        counts = Counter(r.label for r in records)
        missing = [f"{classes[c]!r} ({c})" for c in range(len(classes)) if not counts[c]]
        if missing:
            raise DataError(
                f"the {name} split of {cfg.root} has no images of class {', '.join(missing)} "
                f"({len(records)} images, classes found: {', '.join(classes[c] for c in sorted(counts))}); "
                f"every class needs images in train, val and test: use another data.split_seed or larger "
                f"data.val / data.test fractions, or fix the official split"
            )


def load_task(cfg: TaskDataConfig, task: str | None = None, metric: str | None = None) -> Task:
    """Open ``cfg.root``, decide the task type (``task``, else the source's hint) and the primary metric (``metric``,
    else the task's), split it with ``cfg.split_seed``, apply the duplicate policy, subsample the train split to
    ``cfg.max_train`` images (seeded by ``cfg.split_seed``) and check every split."""
    if cfg.root is None:
        raise ConfigError("data.root is required: a labelled dataset (--data), e.g. a folder with one subfolder per "
                          "class, a .csv manifest or a MedMNIST .npz")
    source = data.open_source(cfg.root, **cfg.options)
    if not source.classes:
        raise DataError(f"{cfg.root} has no labels; supervised fine-tuning and evaluation need labelled images "
                        "(one folder per class, a label column, or a MedMNIST file)"
                        + "".join(f"; {note}" for note in source.notes if "label" in note))
    chosen = _resolve_task(source, task)
    primary = metrics.primary_metric(chosen, metric)
    splits = data.split(source.records, val=cfg.val, test=cfg.test, seed=cfg.split_seed, official=cfg.official)
    report = None
    if cfg.duplicates != "skip":
        report = data.find_duplicates(source, splits, policy=cfg.duplicates, scope=cfg.duplicate_scope,
                                      workers=cfg.num_workers)
        kept = {r.path for r in report.records}  # paths are unique within a source
        splits = {name: [r for r in records if r.path in kept] for name, records in splits.items()}
    if cfg.max_train is not None:
        splits["train"] = data.subsample(splits["train"], cfg.max_train, cfg.split_seed,
                                         stratify=chosen != "multilabel")
    _check_classes(chosen, source.classes, splits, cfg)
    return Task(source, chosen, list(source.classes), primary, splits, report)
