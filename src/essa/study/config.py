"""The configuration of a study: its tuners, stages, datasets and budget (``essa run --config study.yaml``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from essa import config as config_mod, tuners
from essa.config import BackboneConfig, ConfigError, TrainerConfig, TunerConfig
from essa.names import DEFAULT_OBJECTIVE, NO_SSA, slug

#: Frozen-feature protocols of ``essa evaluate`` that a study can run on each backbone.
PROBES = ("knn", "linear")
#: A label budget that keeps every labelled train image (``finetune.label_budgets: [300, all]``).
ALL_LABELS = "all"


@dataclass
class TunerSpec:
    """A tuner in a study: ``"apla"`` or ``{name: apla, options: {r: 64}, label: "apla r=64"}`` in YAML; a
    combination ``{name: apla+lora, options: {apla: {r: 64}}}`` is labelled ``"apla r=64 + lora"``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # None: the name and options, e.g. "apla r=64"

    def __post_init__(self):
        if self.label is None and tuners.base.COMBINE in self.name:
            self.label = tuners.combined.label(self.name, self.options)  # "apla r=64 + lora targets=['qkv']"
        if self.label is None:
            self.label = " ".join([self.name, *(f"{k}={v}" for k, v in self.options.items())])


@dataclass
class SSASpec(TunerSpec):
    """A row of the study's SSA axis: an SSA tuner under one objective (None: the ``none`` tuner, no SSA).

    ``label`` names both when the study runs any objective but dinov2 (``"apla r=64 (mae)"``, ``"apla r=64
    (dinov2)"``), else it is the tuner's label (``tuner_label``). Directories name every objective but dinov2
    (:attr:`dir_name`: ``mae__apla_r64``; dinov2's ``apla_r64``, as before objectives were an axis, so a study
    that adds an objective keeps its dinov2 runs)."""

    objective: str | None = None
    tuner_label: str = ""

    @property
    def dir_name(self) -> str:
        """The SSA part of a cell's directory names: ``apla_r64`` (dinov2, or no SSA), ``mae__apla_r64``."""
        base = slug(self.tuner_label)
        return base if self.objective in (None, DEFAULT_OBJECTIVE) else f"{slug(self.objective)}__{base}"


@dataclass
class StageConfig:
    """One stage of the study: its epochs, its tuners, and any further config of that stage's command."""

    epochs: int
    tuners: list[Any]  # names, {name, options, label} mappings, or lists of tuners to combine
    config: dict[str, Any] = field(default_factory=dict)  # AdaptConfig / FinetuneConfig keys, nested

    def specs(self) -> list[TunerSpec]:
        return [_tuner_spec(t) for t in self.tuners]


@dataclass
class SSAStageConfig(StageConfig):
    """The SSA stage: SSA sees every image of the task's train split (labels unused; never val or test), also when
    fine-tuning uses fewer (``data.max_train``): unlabelled images are the cheap ones."""

    max_images: int | None = None  # a seeded subsample of those images (None: all)
    extra_data: list[str] = field(default_factory=list)  # more unlabelled image folders, added to every dataset's
    # One more axis of the grid: every SSA tuner (but none) runs once per objective (essa adapt's ``objective``),
    # e.g. [dinov2, mae]. None: no axis, the objective of ssa.config (default dinov2).
    objectives: list[str] | None = None

    def validate(self) -> None:
        if self.objectives is None:
            return
        from essa.objectives import OBJECTIVES

        valid = ", ".join(OBJECTIVES)
        if "objective" in self.config:
            raise ConfigError(f"ssa.objectives={self.objectives} and ssa.config.objective="
                              f"{self.config['objective']!r} both set the SSA objective: give ssa.objectives only "
                              f"(e.g. ssa.objectives: [{self.config['objective']}])")
        if not self.objectives:
            raise ConfigError(f"ssa.objectives is empty: give at least one of {valid} (or leave it out: dinov2)")
        for name in self.objectives:
            if name not in OBJECTIVES:
                raise ConfigError(f"ssa.objectives: unknown objective {name!r}; valid choices: {valid}")
        if len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(f"ssa.objectives must be distinct, got {self.objectives}; valid choices: {valid}")

    def objective_names(self) -> list[str]:
        """The objectives of the grid: ``objectives``, or the one of ``config`` (default dinov2)."""
        if self.objectives is not None:
            return list(self.objectives)
        return [self.config.get("objective", DEFAULT_OBJECTIVE)]

    def names_objectives(self) -> bool:
        """Whether the SSA labels name the objective: the study runs any objective but dinov2."""
        return self.objective_names() != [DEFAULT_OBJECTIVE]

    def ssa_spec(self, tuner: TunerSpec, objective: str | None = None) -> SSASpec:
        """``tuner`` under ``objective`` (None: the first of the grid; always None for the ``none`` tuner)."""
        if tuner.name == NO_SSA:
            objective = None
        elif objective is None:
            objective = self.objective_names()[0]
        label = tuner.label if objective is None or not self.names_objectives() else f"{tuner.label} ({objective})"
        return SSASpec(tuner.name, dict(tuner.options), label, objective=objective, tuner_label=tuner.label)

    def ssa_specs(self) -> list[SSASpec]:
        """The SSA axis of the grid: per SSA tuner, in order, one row per objective (``none``: one, no objective)."""
        return [self.ssa_spec(tuner, objective) for tuner in self.specs()
                for objective in ([None] if tuner.name == NO_SSA else self.objective_names())]


@dataclass
class FinetuneStageConfig(StageConfig):
    """The fine-tuning stage. ``label_budgets``: one more axis of the grid, the number of labelled train images
    that fine-tuning and the probes use (``data.max_train`` per budget; ``all`` or null: every one), e.g.
    ``[300, all]``; every budget starts from the same SSA runs (SSA sees every unlabelled train image anyway).
    Empty: no axis, ``data.max_train`` as the dataset gives it."""

    label_budgets: list[int | str | None] = field(default_factory=list)

    def validate(self) -> None:
        for budget in self.label_budgets:
            if not (budget is None or budget == ALL_LABELS or (isinstance(budget, int) and budget >= 1)):
                raise ConfigError(f"finetune.label_budgets: {budget!r} is neither a number of labelled images "
                                  f"(at least 1) nor {ALL_LABELS!r}")
        names = [budget_label(b) for b in self.label_budgets]
        if len(set(names)) != len(names):
            raise ConfigError(f"finetune.label_budgets must be distinct, got {self.label_budgets}")

    def budgets(self) -> list[int | str | None]:
        """The budgets of the grid; ``[None]`` (the dataset's own ``data.max_train``) without the axis."""
        return [ALL_LABELS if b is None else b for b in self.label_budgets] or [None]


def budget_label(budget: int | str | None) -> str:
    """``300`` -> ``"300 labels"``; ``"all"``/None -> ``"all labels"``."""
    return "all labels" if budget in (None, ALL_LABELS) else f"{budget} labels"


def budget_suffix(budget: int | str | None) -> str:
    """What a label budget adds to a cell's or probe's label (``, 300 labels``); nothing without the axis (None)."""
    return "" if budget is None else f", {budget_label(budget)}"


def budget_dir_suffix(budget: int | str | None) -> str:
    """What a label budget adds to a directory name (``__300_labels``); nothing without the axis (None)."""
    return "" if budget is None else "__" + slug(budget_label(budget))


@dataclass
class DatasetSpec:
    """A labelled task of the study. ``data``: essa.task.TaskDataConfig keys (root, max_train, duplicates...)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    task: str | None = None  # None: what the data says
    metric: str | None = None  # None: the task's primary metric
    ssa_epochs: int | None = None  # None: ssa.epochs (a small train split may need more epochs for its steps)

    def validate(self) -> None:
        if self.ssa_epochs is not None and self.ssa_epochs < 1:
            raise ConfigError(f"datasets: {self.name}: ssa_epochs must be at least 1, got {self.ssa_epochs}")


@dataclass
class StudyConfig:
    name: str = "study"
    out: str = "runs/study"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: dict[str, Any] = field(default_factory=dict)  # defaults for every dataset's data (e.g. root, max_train)
    datasets: list[dict[str, Any]] = field(default_factory=list)  # DatasetSpec mappings
    img_size: int = 112  # SSA global crops, fine-tuning and probes
    batch_size: int = 32
    seeds: list[int] = field(default_factory=lambda: [0])  # fine-tuning seeds
    ssa_seed: int = 0  # SSA runs once per dataset and SSA tuner
    ssa: SSAStageConfig = field(default_factory=lambda: SSAStageConfig(epochs=10, tuners=[NO_SSA, "full", "apla"]))
    finetune: FinetuneStageConfig = field(default_factory=lambda: FinetuneStageConfig(epochs=20,
                                                                                      tuners=["full", "apla"]))
    probes: list[str] = field(default_factory=lambda: list(PROBES))  # frozen features before and after SSA
    # Devices, strategy, precision and memory options of every SSA and fine-tuning cell (a stage's config.trainer
    # overrides them). Several devices or nodes run every cell in this process (Lightning starts the others).
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # Run each SSA and fine-tuning cell in a fresh process: on CPU its peak memory is then its own (in one process,
    # memory freed by earlier cells is reused unseen), and a crash or leak stays in that cell.
    fresh_process: bool = True
    notes: list[str] = field(default_factory=list)  # free text for the report (e.g. how hyperparameters were set)

    def validate(self) -> None:
        if not self.datasets:
            raise ConfigError("datasets is empty: give at least one, e.g. datasets: [{name: xrays, data: {root: "
                              "../shared/data/chest_xray_pneumonia}}]")
        names = [d.name for d in self.dataset_specs()]
        if len(set(names)) != len(names):
            raise ConfigError(f"dataset names must be distinct, got {names}")
        for stage in ("ssa", "finetune"):
            specs = getattr(self, stage).specs()
            labels = [s.label for s in specs]
            if not specs or len(set(labels)) != len(labels):
                raise ConfigError(f"{stage}.tuners must be a non-empty list of distinct tuners, got {labels}")
            for spec in specs:
                if spec.name != NO_SSA or stage != "ssa":
                    tuners.base.build(spec.name, spec.options)  # a bad tuner fails before any work
            if getattr(self, stage).epochs < 1:
                raise ConfigError(f"{stage}.epochs must be at least 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds} must be a non-empty list of distinct integers")
        bad = [p for p in self.probes if p not in PROBES]
        if bad:
            raise ConfigError(f"probes={self.probes}: unknown {bad[0]!r}; valid choices: {', '.join(PROBES)}")
        if self.img_size < 1 or self.batch_size < 1:
            raise ConfigError("img_size and batch_size must be at least 1")

    def dataset_specs(self) -> list[DatasetSpec]:
        specs = []
        for i, entry in enumerate(self.datasets):
            spec = config_mod.from_dict(DatasetSpec, entry, where=f"datasets[{i}]")
            specs.append(dataclasses.replace(spec, data={**self.data, **spec.data}))
        return specs


def _tuner_spec(entry) -> TunerSpec:
    if isinstance(entry, str):
        return TunerSpec(entry)
    if isinstance(entry, dict):
        return config_mod.from_dict(TunerSpec, entry, where="tuner")
    if isinstance(entry, list):  # a combination as a list of tuners, as in an adapt or finetune config
        return config_mod.from_dict(TunerSpec, TunerConfig.coerce(entry, "tuner"), where="tuner")
    raise ConfigError(f"a tuner is a name, a mapping {{name, options, label}} or a list of tuners to combine, "
                      f"got {entry!r}")


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, section by section (nested mappings merge, other values replace)."""
    return config_mod.overlay(base, extra, by_name=False)
