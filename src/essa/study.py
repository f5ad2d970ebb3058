"""``essa run``: a whole ESSA study in one command, with a report.

    essa run --config examples/quickstart.yaml

A study is a grid: datasets x SSA tuner (``none``: the foundation model as it is) x fine-tuning tuner x seeds, under
one budget (image size, batch size, epochs per stage). Per dataset it runs, in this order:

- ``ssa/<tuner>/``: one ``essa adapt`` per SSA tuner, on the images of the task's **train split only** (labels
  unused; never the val or test images), kNN-monitored on the val split;
- ``probe/<backbone>/``: ``essa evaluate`` of the frozen features (kNN, linear probe) of the foundation model and of
  each SSA export;
- ``finetune/<ssa>__<tuner>/seed_N/``: one ``essa finetune`` seed per cell, from the foundation model or the SSA
  export; every cell of a dataset uses the same splits, image size, epochs and seeds.

Each SSA run is shared by every fine-tuning cell that starts from it. A cell whose outputs are complete is skipped,
so a re-run of an interrupted study resumes it (an unfinished SSA or fine-tuning run continues from its last
checkpoint). A failed cell (e.g. SSA diverged) is recorded with its error, the cells that need it are skipped,
and the others go on. After every cell the study writes ``results.json``, ``report.md`` and ``report.html``
(:mod:`essa.report`), so the report is current whenever the study stops.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from essa import config as config_mod, tuners
from essa.config import BackboneConfig, ConfigError, TrainerConfig

#: The SSA "tuner" that skips SSA: fine-tuning starts from the foundation model.
NO_SSA = "none"
#: Frozen-feature protocols of ``essa evaluate`` that a study can run on each backbone.
PROBES = ("knn", "linear")
#: The file that records every cell's status and duration.
CELLS_FILE = "cells.json"


@dataclass
class TunerSpec:
    """A tuner in a study: ``"apla"`` or ``{name: apla, options: {r: 64}, label: "apla r=64"}`` in YAML."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # None: the name and options, e.g. "apla r=64"

    def __post_init__(self):
        if self.label is None:
            self.label = " ".join([self.name, *(f"{k}={v}" for k, v in self.options.items())])


@dataclass
class StageConfig:
    """One stage of the study: its epochs, its tuners, and any further config of that stage's command."""

    epochs: int
    tuners: list[Any]  # names or {name, options, label} mappings
    config: dict[str, Any] = field(default_factory=dict)  # AdaptConfig / FinetuneConfig keys, nested

    def specs(self) -> list[TunerSpec]:
        return [_tuner_spec(t) for t in self.tuners]


@dataclass
class SSAStageConfig(StageConfig):
    """The SSA stage: SSA sees every image of the task's train split (labels unused; never val or test), also when
    fine-tuning uses fewer (``data.max_train``): unlabelled images are the cheap ones."""

    max_images: int | None = None  # a seeded subsample of those images (None: all)
    extra_data: list[str] = field(default_factory=list)  # more unlabelled image folders, added to every dataset's


#: A label budget that keeps every labelled train image (``finetune.label_budgets: [300, all]``).
ALL_LABELS = "all"


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
    raise ConfigError(f"a tuner is a name or a mapping {{name, options, label}}, got {entry!r}")


def _probe_backbone(ssa: TunerSpec) -> str:
    """The backbone a probe reads: the foundation model ("pretrained") or an SSA export ("ssa apla r=64")."""
    return "pretrained" if ssa.name == NO_SSA else f"ssa {ssa.label}"


def slug(label: str) -> str:
    """A directory name for a label: ``"apla r=64"`` -> ``"apla_r64"``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", label.replace("=", "")).strip("_") or "_"


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, section by section (nested mappings merge, other values replace)."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ----- cells ----------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One unit of work: an SSA run, a frozen-feature probe of one backbone, or one fine-tuning seed."""

    kind: str  # ssa | probe | finetune
    dataset: DatasetSpec
    path: Path
    run: Callable[[], None]
    done: Callable[[], bool]
    needs: Cell | None = None  # the SSA cell whose export this cell starts from

    @property
    def id(self) -> str:
        return self.path.as_posix()


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


class Study:
    """The cells of a study and their results. ``config``: a StudyConfig, a YAML path or None, then ``sections``
    and ``key=value`` overrides (as every essa command)."""

    def __init__(self, config: StudyConfig | str | Path | None = None, *, overrides: list[str] | None = None,
                 trainer_kwargs: dict | None = None, **sections):
        self.cfg = config_mod.resolve(StudyConfig, config, sections, overrides)
        self.out = Path(self.cfg.out)
        self.trainer_kwargs = trainer_kwargs
        self.datasets = self.cfg.dataset_specs()
        self._tasks: dict[str, Any] = {}
        self._weight_changes: dict[tuple[str, int], float | None] = {}
        self.cells: list[Cell] = []
        for dataset in self.datasets:
            self._add_cells(dataset)

    # ----- paths and configs of the cells -------------------------------------------------------------------
    def _dir(self, dataset: DatasetSpec, *parts: str) -> Path:
        return self.out / slug(dataset.name) / Path(*parts)

    def _ssa_dir(self, dataset, spec: TunerSpec) -> Path:
        return self._dir(dataset, "ssa", slug(spec.label))

    def _backbone(self, dataset, ssa: TunerSpec) -> dict:
        """The backbone a cell starts from: the foundation model, or the export of its SSA run."""
        if ssa.name == NO_SSA:
            return dataclasses.asdict(self.cfg.backbone)
        return {"name": None, "pretrained": False, "model_args": {},
                "weights": str(self._ssa_dir(dataset, ssa) / "backbone.safetensors")}

    def adapt_sections(self, dataset: DatasetSpec, spec: TunerSpec) -> dict:
        from essa.task import TaskDataConfig

        # the whole train split: data.max_train limits the labelled images of fine-tuning only
        splits = {k: v for k, v in dataset.data.items() if k not in ("root", "num_workers", "max_train")}
        single_label = dataset.task != "multilabel" and self._task(dataset).task != "multilabel"
        own = {
            "backbone": dataclasses.asdict(self.cfg.backbone), "tuner": {"name": spec.name, "options": spec.options},
            "data": {"root": dataset.data.get("root"), "split": "train", "val_split": "val" if single_label else None,
                     "splits": splits, "max_images": self.cfg.ssa.max_images, "extra": list(self.cfg.ssa.extra_data),
                     "num_workers": dataset.data.get("num_workers", TaskDataConfig.num_workers)},
            "ssl": {"global_size": self.cfg.img_size},
            "optim": {"epochs": self.ssa_epochs(dataset), "batch_size": self.cfg.batch_size},
            "seed": self.cfg.ssa_seed, "out": str(self._ssa_dir(dataset, spec)),
        }
        return deep_merge(self._stage_config(self.cfg.ssa), own)

    def ssa_epochs(self, dataset: DatasetSpec) -> int:
        return dataset.ssa_epochs or self.cfg.ssa.epochs

    def _finetune_dir(self, dataset, ssa: TunerSpec, spec: TunerSpec, budget=None) -> Path:
        return self._dir(dataset, "finetune", f"{slug(ssa.label)}__{slug(spec.label)}" + _budget_suffix(budget))

    @staticmethod
    def _labelled(dataset: DatasetSpec, budget) -> dict:
        """The dataset's data keys for fine-tuning and probes under a label budget (None: as the dataset says)."""
        if budget is None:
            return dataset.data
        return {**dataset.data, "max_train": None if budget == ALL_LABELS else budget}

    def finetune_sections(self, dataset: DatasetSpec, ssa: TunerSpec, spec: TunerSpec, budget=None) -> dict:
        own = {
            "backbone": self._backbone(dataset, ssa), "tuner": {"name": spec.name, "options": spec.options},
            "data": self._labelled(dataset, budget), "task": dataset.task, "metric": dataset.metric, "img_size": self.cfg.img_size,
            "optim": {"epochs": self.cfg.finetune.epochs, "batch_size": self.cfg.batch_size},
            "seeds": list(self.cfg.seeds),
            "out": str(self._finetune_dir(dataset, ssa, spec, budget)),
        }
        return deep_merge(self._stage_config(self.cfg.finetune), own)

    def _stage_config(self, stage: StageConfig) -> dict:
        return deep_merge({"trainer": dataclasses.asdict(self.cfg.trainer)}, stage.config)

    @property
    def distributed(self) -> bool:
        """Whether the cells train over several processes (then they all run in this one, as Lightning needs)."""
        import os

        trainer = self.cfg.trainer
        return (trainer.devices not in (1, [0]) or trainer.num_nodes != 1
                or int(os.environ.get("WORLD_SIZE", "1")) > 1)

    def probe_sections(self, dataset: DatasetSpec, ssa: TunerSpec, budget=None) -> dict:
        protocols = [p for p in self.cfg.probes if p != "knn" or self._task(dataset).task != "multilabel"]
        return {"backbone": self._backbone(dataset, ssa), "data": self._labelled(dataset, budget),
                "task": dataset.task, "metric": dataset.metric, "protocols": protocols, "img_size": self.cfg.img_size,
                "batch_size": self.cfg.batch_size, "out": str(self._probe_dir(dataset, ssa, budget))}

    def _task(self, dataset: DatasetSpec):
        """The dataset's task (splits and all), loaded once."""
        if dataset.name not in self._tasks:
            from essa.task import TaskDataConfig, load_task

            data = config_mod.from_dict(TaskDataConfig, dataset.data, where=f"{dataset.name}.data")
            self._tasks[dataset.name] = load_task(data, dataset.task, dataset.metric)
        return self._tasks[dataset.name]

    # ----- the grid -----------------------------------------------------------------------------------------
    def _add_cells(self, dataset: DatasetSpec) -> None:
        ssa_cells = {}
        for ssa in self.cfg.ssa.specs():
            if ssa.name != NO_SSA:
                ssa_cells[ssa.label] = self._ssa_cell(dataset, ssa)
        budgets = self.cfg.finetune.budgets()
        if self.cfg.probes:
            for budget in budgets:
                for ssa in self.cfg.ssa.specs():
                    self.cells.append(self._probe_cell(dataset, ssa, budget, ssa_cells.get(ssa.label)))
        for budget in budgets:
            for ssa in self.cfg.ssa.specs():
                for spec in self.cfg.finetune.specs():
                    for seed in self.cfg.seeds:
                        self.cells.append(self._finetune_cell(dataset, ssa, spec, budget, seed,
                                                              ssa_cells.get(ssa.label)))

    def _ssa_cell(self, dataset, ssa: TunerSpec) -> Cell:
        path = self._ssa_dir(dataset, ssa)

        def run():
            from essa.adaptation import adapt

            adapt(resume=(path / "config.yaml").exists(), trainer_kwargs=self.trainer_kwargs,
                  **self.adapt_sections(dataset, ssa))

        def done():
            from essa.adaptation import RESOURCES_FILE

            return (path / RESOURCES_FILE).is_file() and (path / "backbone.safetensors").is_file()

        cell = Cell("ssa", dataset, path, run, done)
        self.cells.append(cell)
        return cell

    def _probe_dir(self, dataset, ssa: TunerSpec, budget=None) -> Path:
        return self._dir(dataset, "probe", slug(_probe_backbone(ssa)) + _budget_suffix(budget))

    def _probe_cell(self, dataset, ssa: TunerSpec, budget, needs: Cell | None) -> Cell:
        path = self._probe_dir(dataset, ssa, budget)

        def run():
            from essa.evaluate.run import evaluate

            evaluate(**self.probe_sections(dataset, ssa, budget))

        return Cell("probe", dataset, path, run, lambda: (path / "metrics.json").is_file(), needs)

    def _finetune_cell(self, dataset, ssa: TunerSpec, spec: TunerSpec, budget, seed: int,
                       needs: Cell | None) -> Cell:
        sections = self.finetune_sections(dataset, ssa, spec, budget)
        out = Path(sections["out"])

        def run():
            from essa.finetuning import finetune

            finetune(resume=True, only=[seed], trainer_kwargs=self.trainer_kwargs, **sections)

        def done():
            from essa.finetuning import test_row
            from essa.train.run_dir import RunDir

            return test_row(RunDir(out / f"seed_{seed}")) is not None

        return Cell("finetune", dataset, out / f"seed_{seed}", run, done, needs)

    # ----- running ------------------------------------------------------------------------------------------
    def check_inputs(self) -> None:
        """Fail before any work when a dataset cannot be read or split, or the backbone cannot be built."""
        for dataset in self.datasets:
            self._task(dataset)
        self.cfg.backbone.build(img_size=self.cfg.img_size)

    def run(self, log: Callable[[str], None] = print) -> dict[str, Any]:
        """Run every unfinished cell; returns the results (also in ``results.json``) and the report paths."""
        self.check_inputs()
        self.out.mkdir(parents=True, exist_ok=True)
        config_mod.dump(self.cfg, self.out / "config.yaml")
        state = _read_json(self.out / CELLS_FILE) or {}
        failed: set[str] = set()
        for cell in self.cells:
            if cell.done():
                if state.get(cell.id, {}).get("status") != "done":
                    state[cell.id] = {"status": "done", "seconds": None}  # finished outside this record
                continue
            if cell.needs is not None and cell.needs.id in failed:
                failed.add(cell.id)
                state[cell.id] = {"status": "failed", "seconds": None, "error": f"{cell.needs.id} failed"}
                continue
            log(self.progress(state, cell))
            start = time.perf_counter()
            try:
                if self.cfg.fresh_process and cell.kind != "probe" and not self.distributed:
                    _run_in_fresh_process(self.out / "config.yaml", cell.id)
                else:
                    cell.run()
                state[cell.id] = {"status": "done", "seconds": time.perf_counter() - start}
            except (ValueError, RuntimeError, OSError) as err:  # a broken cell must not stop the others
                failed.add(cell.id)
                state[cell.id] = {"status": "failed", "seconds": time.perf_counter() - start,
                                  "error": f"{type(err).__name__}: {err}"}
                log(f"[study] {cell.id} failed: {err}\n{traceback.format_exc(limit=3)}")
            _write_json(self.out / CELLS_FILE, state)
            self.report(state)
        _write_json(self.out / CELLS_FILE, state)
        results, paths = self.report(state)
        log(self.progress(state, None))
        return {"results": results, **paths}

    def progress(self, state: dict, running: Cell | None) -> str:
        """``[study] 3/14 done, running: ..., 10 left, about 12 min left``; the estimate is the mean duration of
        the finished cells of each kind times the cells of that kind still to run."""
        done = [c for c in self.cells if state.get(c.id, {}).get("status") == "done"]
        failed = [c for c in self.cells if state.get(c.id, {}).get("status") == "failed"]
        left = [c for c in self.cells if c not in done and c not in failed]
        seconds: dict[str, list[float]] = {}
        for c in done:
            if state[c.id].get("seconds") is not None:
                seconds.setdefault(c.kind, []).append(state[c.id]["seconds"])
        known = [c for c in left if c.kind in seconds]
        estimate = sum(sum(seconds[c.kind]) / len(seconds[c.kind]) for c in known)
        eta = f"about {_duration(estimate)} left" if known else "no estimate yet"
        if len(known) < len(left) and known:
            eta += f" for {len(known)} of them"
        parts = [f"[study] {len(done)}/{len(self.cells)} done"]
        if failed:
            parts.append(f"{len(failed)} failed")
        if running is not None:
            parts.append(f"running: {running.kind} {running.id}")
        parts.append(f"{len(left) - (running is not None)} left after it" if running else f"{len(left)} left")
        return ", ".join(parts) + f" ({eta})"

    # ----- results and report -------------------------------------------------------------------------------
    def results(self, state: dict) -> dict[str, Any]:
        """What :func:`essa.report.write_report` reads (the schema is in its module docstring)."""
        return {
            "name": self.cfg.name, "backbone": self.cfg.backbone.weights or self.cfg.backbone.name,
            "wall_seconds": sum(s.get("seconds") or 0.0 for s in state.values()),
            "budget": {"img_size": self.cfg.img_size, "batch_size": self.cfg.batch_size,
                       "ssa_epochs": self.cfg.ssa.epochs, "finetune_epochs": self.cfg.finetune.epochs,
                       "seeds": list(self.cfg.seeds), "ssa_seed": self.cfg.ssa_seed,
                       **({"label_budgets": [budget_label(b) for b in self.cfg.finetune.budgets()]}
                          if self.cfg.finetune.label_budgets else {})},
            "notes": self._notes(),
            "datasets": [self._dataset_results(d, state) for d in self.datasets],
        }

    def _notes(self) -> list[str]:
        lrs = {stage: getattr(self.cfg, stage).config.get("optim", {}).get("lr") for stage in ("ssa", "finetune")}
        lr_note = ", ".join(f"{stage} lr {lr}" for stage, lr in lrs.items() if lr is not None)
        notes = [
            "SSA sees only the train split of each task (labels unused; never the val or test images); its kNN "
            "monitor uses the val split. Every cell of a task uses the same splits, image size, epochs and seeds; "
            "checkpoints are chosen on the val split and tested once on the test split.",
            "Learning rates: " + (f"set in the study config ({lr_note}); others " if lr_note else "")
            + "the reference defaults of method.md (1e-4 for full, 1e-3 for parameter-efficient tuners).",
            "Trainable parameters are the backbone's (plus, in fine-tuning, the head); every SSA tuner also trains "
            "the same DINO head (see ssa/*/resources.json).",
        ]
        for d in self.datasets:
            if d.data.get("max_train") and not self.cfg.finetune.label_budgets:
                notes.append(f"{d.name}: train split subsampled to {d.data['max_train']} images (seeded, "
                             "stratified); val and test whole.")
            if d.ssa_epochs is not None:
                notes.append(f"{d.name}: SSA for {d.ssa_epochs} epochs (ssa.epochs: {self.cfg.ssa.epochs}).")
        if self.cfg.finetune.label_budgets:
            notes.append("Label budgets: fine-tuning and probes use a seeded, stratified subsample of that many "
                         "labelled train images (all labels: every one); SSA always sees every train image; val "
                         "and test whole.")
        return notes + list(self.cfg.notes)

    def _dataset_results(self, dataset: DatasetSpec, state: dict) -> dict[str, Any]:
        task = self._task(dataset)
        cells, curves, probes = [], {}, []
        ssa_specs = self.cfg.ssa.specs()
        for ssa in ssa_specs:
            ssa_resources = None
            if ssa.name != NO_SSA:
                from essa.adaptation import RESOURCES_FILE

                ssa_dir = self._ssa_dir(dataset, ssa)
                ssa_resources = _read_json(ssa_dir / RESOURCES_FILE)
                if ssa_resources is not None:
                    ssa_resources["weight_change"] = self._weight_change(ssa_dir / "backbone.safetensors")
                rows = _read_json(ssa_dir / "metrics.json")
                if rows:
                    curves[ssa.label] = rows
            for budget in self.cfg.finetune.budgets():
                for row in _read_json(self._probe_dir(dataset, ssa, budget) / "metrics.json") or []:
                    probes.append({"backbone": _probe_backbone(ssa), "ssa": ssa.label,
                                   "method": row["name"] + _budget_suffix(budget, ", "),
                                   "metrics": {k: v for k, v in row.items() if k != "name"}})
                for spec in self.cfg.finetune.specs():
                    cells.append(self._cell_results(dataset, ssa, spec, budget, state, ssa_resources))
        return {"name": dataset.name, "task": task.task, "primary_metric": task.primary,
                "description": task.describe(), "cells": cells, "probes": probes, "ssa_curves": curves}

    def _weight_change(self, export: Path) -> float | None:
        """How far SSA moved the backbone: ||W_ssa - W_0|| / ||W_0|| over the foundation model's weights (the
        classifier head aside) that the export holds with the same shape; None without an export, or when the
        foundation model has random weights (there is no fixed starting point to compare with)."""
        if not export.exists() or not (self.cfg.backbone.weights or self.cfg.backbone.pretrained):
            return None
        key = (export.as_posix(), export.stat().st_mtime_ns)
        if key not in self._weight_changes:
            from safetensors.torch import load_file

            # built per export, not kept: the study process would otherwise hold a copy of the weights throughout
            foundation = self.cfg.backbone.build(img_size=self.cfg.img_size).state_dict()
            adapted = load_file(export)
            names = [k for k, v in foundation.items()
                     if not k.startswith("head") and k in adapted and adapted[k].shape == v.shape]
            change = sum(float((adapted[k].float() - foundation[k].float()).square().sum()) for k in names)
            norm = sum(float(foundation[k].float().square().sum()) for k in names)
            self._weight_changes[key] = (change / norm) ** 0.5 if norm else None
        return self._weight_changes[key]

    def _cell_results(self, dataset, ssa, spec, budget, state, ssa_resources) -> dict[str, Any]:
        from essa.evaluate.metrics import metric_names

        out = self._finetune_dir(dataset, ssa, spec, budget)
        seeds, tests, errors = {}, [], []
        for seed in self.cfg.seeds:
            rows = _read_json(out / f"seed_{seed}" / "metrics.json")
            if rows and rows[-1].get("split") == "test":
                tests.append(rows[-1])
                # the test metrics, and the shares the report's one-class flag reads
                keep = (*metric_names(self._task(dataset).task), "predicted_share", "label_share")
                seeds[str(seed)] = {k: rows[-1][k] for k in keep if k in rows[-1]}
            error = state.get((out / f"seed_{seed}").as_posix(), {}).get("error")
            if error:
                errors.append(f"seed {seed}: {error}")
        status = ("done" if len(seeds) == len(self.cfg.seeds) else "failed" if errors
                  else "partial" if seeds else "pending")
        keys = ("trainable_params", "peak_memory_mib", "images_per_s", "train_seconds")
        resources = None
        if tests:
            resources = {k: sum(r.get(k, float("nan")) for r in tests) / len(tests) for k in keys}
        return {"ssa": ssa.label, "finetune": spec.label + _budget_suffix(budget, ", "), "status": status, "error": "; ".join(errors) or None,
                "seeds": seeds, "ssa_resources": ssa_resources, "finetune_resources": resources}

    def report(self, state: dict) -> tuple[dict, dict]:
        from essa.report import write_report

        results = self.results(state)
        _write_json(self.out / "results.json", results)
        return results, write_report(results, self.out)


class CellError(RuntimeError):
    """A cell run in a fresh process failed; the message is the child's error."""


def _cell_main(config: str, cell_id: str, errors) -> None:
    """The body of a fresh cell process: rebuild the study from its saved config and run one cell."""
    import multiprocessing

    from essa._die_with_parent import die_with_parent

    die_with_parent()  # the fork server, which dies with the study
    multiprocessing.set_start_method("fork", force=True)  # data-loader workers as in a plain process
    study = Study(config)
    cell = next(c for c in study.cells if c.id == cell_id)
    try:
        cell.run()
    except Exception as err:
        errors.put(f"{type(err).__name__}: {err}")
        raise


def _run_in_fresh_process(config: Path, cell_id: str) -> None:
    """Run one cell in a child of a fork server that imported the training stack once (a child starts in well
    under a second, and never inherits this process's threads or heap)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["essa._die_with_parent", "essa.adaptation", "essa.finetuning", "essa.train.ssa",
                                "essa.train.classify", "lightning", "timm"])
    errors = ctx.Queue()
    process = ctx.Process(target=_cell_main, args=(str(config), cell_id, errors))
    process.start()
    process.join()
    if process.exitcode != 0:
        message = errors.get(timeout=1) if not errors.empty() else f"exit code {process.exitcode}"
        raise CellError(message)


def _budget_suffix(budget, separator: str = "__") -> str:
    """What a label budget adds to a directory name (``__300_labels``) or a label (``, 300 labels``); nothing
    without the axis (None)."""
    if budget is None:
        return ""
    return separator + (slug(budget_label(budget)) if separator == "__" else budget_label(budget))


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    tmp.replace(path)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run(config: StudyConfig | str | Path | None = None, *, overrides: list[str] | None = None,
        trainer_kwargs: dict | None = None, log: Callable[[str], None] = print, **sections) -> dict[str, Any]:
    """Run a study (see the module docstring). Returns {"results", "markdown", "html", "figures"}."""
    return Study(config, overrides=overrides, trainer_kwargs=trainer_kwargs, **sections).run(log)
