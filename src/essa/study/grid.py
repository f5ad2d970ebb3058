"""The grid of a study: its cells (one SSA run, one frozen-feature probe, one fine-tuning seed each), where each
writes, and the config of the command each runs."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from essa import config as config_mod
from essa.names import DEFAULT_OBJECTIVE, NO_SSA, slug
from essa.study.config import (ALL_LABELS, DatasetSpec, SSASpec, StageConfig, StudyConfig, TunerSpec,
                               budget_dir_suffix, deep_merge)

#: Beside an SSA export: how far SSA moved the backbone (:class:`essa.study.results.WeightChanges` writes it), so
#: that a study's record keeps it without the export.
WEIGHT_CHANGE_FILE = "weight_change.json"


@dataclass
class Cell:
    """One unit of work: an SSA run, a frozen-feature probe of one backbone, or one fine-tuning seed."""

    kind: str  # ssa | probe | finetune
    dataset: DatasetSpec
    path: Path
    run: Callable[[], None]
    done: Callable[[], bool]
    needs: Cell | None = None  # the SSA cell whose export this cell starts from
    args: tuple = ()  # what the Grid's ``*_sections`` method of its kind takes to give the cell's config
    #: whether the files the study's results read are there: ``done`` but for checkpoints and exports, which a
    #: study's record leaves out (:meth:`essa.study.Study.save_record`); None: as ``done``
    recorded: Callable[[], bool] | None = None

    def finished(self) -> bool:
        """Its outputs are complete, or its record is (checkpoints and exports left out)."""
        return self.done() or (self.recorded is not None and self.recorded())

    @property
    def id(self) -> str:
        return self.path.as_posix()


def probe_backbone(ssa: TunerSpec) -> str:
    """The backbone a probe reads: the foundation model ("pretrained") or an SSA export ("ssa apla r=64",
    "ssa apla r=64 (mae)")."""
    return "pretrained" if ssa.name == NO_SSA else f"ssa {ssa.label}"


class Grid:
    """The cells of a study (datasets x SSA tuner x SSA objective x label budget x fine-tuning tuner x seeds), in
    the order they run: per dataset and row of the SSA axis (the foundation model as it is, then each SSA run), the
    SSA run, the probes of its backbone per label budget, then its fine-tuning seeds: the cells that need an SSA
    export follow it, so a study stopped between two SSA runs needs none of the exports before (a record without
    them, :meth:`essa.study.Study.save_record`, continues without redoing them). The SSA arguments of its methods
    are rows of the SSA axis (:class:`SSASpec`); a plain :class:`TunerSpec` is taken under the grid's first
    objective.
    ``config``: a StudyConfig, a YAML path or None, then ``sections`` and ``key=value`` overrides (as every essa
    command)."""

    def __init__(self, config: StudyConfig | str | Path | None = None, *, overrides: list[str] | None = None,
                 trainer_kwargs: dict | None = None, **sections):
        self.cfg = config_mod.resolve(StudyConfig, config, sections, overrides)
        self.out = Path(self.cfg.out)
        self.trainer_kwargs = trainer_kwargs
        self.datasets = self.cfg.dataset_specs()
        self._tasks: dict[str, Any] = {}
        self.cells: list[Cell] = []
        for dataset in self.datasets:
            self._add_cells(dataset)

    # ----- paths ----------------------------------------------------------------------------------------------
    def _dir(self, dataset: DatasetSpec, *parts: str) -> Path:
        return self.out / slug(dataset.name) / Path(*parts)

    def ssa_spec(self, ssa: TunerSpec) -> SSASpec:
        """``ssa`` as a row of the SSA axis (a plain TunerSpec under the grid's first objective)."""
        return ssa if isinstance(ssa, SSASpec) else self.cfg.ssa.ssa_spec(ssa)

    def ssa_dir(self, dataset: DatasetSpec, spec: TunerSpec) -> Path:
        return self._dir(dataset, "ssa", self.ssa_spec(spec).dir_name)

    def probe_dir(self, dataset: DatasetSpec, ssa: TunerSpec, budget=None) -> Path:
        ssa = self.ssa_spec(ssa)
        if ssa.objective in (None, DEFAULT_OBJECTIVE):  # "pretrained", "ssa_apla_r64": as before the axis
            name = slug("pretrained" if ssa.name == NO_SSA else f"ssa {ssa.tuner_label}")
        else:
            name = f"ssa_{ssa.dir_name}"  # ssa_mae__apla_r64
        return self._dir(dataset, "probe", name + budget_dir_suffix(budget))

    def finetune_dir(self, dataset: DatasetSpec, ssa: TunerSpec, spec: TunerSpec, budget=None) -> Path:
        name = f"{self.ssa_spec(ssa).dir_name}__{slug(spec.label)}" + budget_dir_suffix(budget)
        return self._dir(dataset, "finetune", name)

    # ----- configs of the cells -------------------------------------------------------------------------------
    def _backbone(self, dataset: DatasetSpec, ssa: TunerSpec) -> dict:
        """The backbone a cell starts from: the foundation model, or the export of its SSA run."""
        if ssa.name == NO_SSA:
            return dataclasses.asdict(self.cfg.backbone)
        return {"name": None, "pretrained": False, "model_args": {},
                "weights": str(self.ssa_dir(dataset, ssa) / "backbone.safetensors")}

    def adapt_sections(self, dataset: DatasetSpec, spec: TunerSpec) -> dict:
        from essa.task import TaskDataConfig

        # the whole train split: data.max_train limits the labelled images of fine-tuning only; data.normalize and
        # normalize_images are SSA's own data keys (its statistics: of the SSA images)
        own_keys = ("normalize", "normalize_images")
        splits = {k: v for k, v in dataset.data.items() if k not in ("root", "num_workers", "max_train", *own_keys)}
        single_label = dataset.task != "multilabel" and self.task_of(dataset).task != "multilabel"
        own = {
            "backbone": dataclasses.asdict(self.cfg.backbone), "tuner": {"name": spec.name, "options": spec.options},
            "objective": self.ssa_spec(spec).objective,
            "data": {"root": dataset.data.get("root"), "split": "train", "val_split": "val" if single_label else None,
                     "splits": splits, "max_images": self.cfg.ssa.max_images, "extra": list(self.cfg.ssa.extra_data),
                     "num_workers": dataset.data.get("num_workers", TaskDataConfig.num_workers),
                     **{k: dataset.data[k] for k in own_keys if k in dataset.data}},
            "ssl": {"global_size": self.cfg.img_size},
            "optim": {"epochs": self.ssa_epochs(dataset), "batch_size": self.cfg.batch_size},
            "seed": self.cfg.ssa_seed, "out": str(self.ssa_dir(dataset, spec)),
        }
        return deep_merge(self._stage_config(self.cfg.ssa), own)

    def ssa_epochs(self, dataset: DatasetSpec) -> int:
        return dataset.ssa_epochs or self.cfg.ssa.epochs

    @staticmethod
    def _labelled(dataset: DatasetSpec, budget) -> dict:
        """The dataset's data keys for fine-tuning and probes under a label budget (None: as the dataset says)."""
        if budget is None:
            return dataset.data
        return {**dataset.data, "max_train": None if budget == ALL_LABELS else budget}

    def finetune_sections(self, dataset: DatasetSpec, ssa: TunerSpec, spec: TunerSpec, budget=None) -> dict:
        own = {
            "backbone": self._backbone(dataset, ssa), "tuner": {"name": spec.name, "options": spec.options},
            "data": self._labelled(dataset, budget), "task": dataset.task, "metric": dataset.metric,
            "img_size": self.cfg.img_size,
            "optim": {"epochs": self.cfg.finetune.epochs, "batch_size": self.cfg.batch_size},
            "seeds": list(self.cfg.seeds),
            "out": str(self.finetune_dir(dataset, ssa, spec, budget)),
        }
        return deep_merge(self._stage_config(self.cfg.finetune), own)

    def _stage_config(self, stage: StageConfig) -> dict:
        return deep_merge({"trainer": dataclasses.asdict(self.cfg.trainer)}, stage.config)

    def probe_sections(self, dataset: DatasetSpec, ssa: TunerSpec, budget=None) -> dict:
        protocols = [p for p in self.cfg.probes if p != "knn" or self.task_of(dataset).task != "multilabel"]
        return {"backbone": self._backbone(dataset, ssa), "data": self._labelled(dataset, budget),
                "task": dataset.task, "metric": dataset.metric, "protocols": protocols, "img_size": self.cfg.img_size,
                "batch_size": self.cfg.batch_size, "out": str(self.probe_dir(dataset, ssa, budget))}

    @property
    def distributed(self) -> bool:
        """Whether the cells train over several processes (then they all run in this one, as Lightning needs)."""
        trainer = self.cfg.trainer
        return (trainer.devices not in (1, [0]) or trainer.num_nodes != 1
                or int(os.environ.get("WORLD_SIZE", "1")) > 1)

    def task_of(self, dataset: DatasetSpec):
        """The dataset's task (splits and all), loaded once."""
        if dataset.name not in self._tasks:
            from essa.task import TaskDataConfig, load_task

            data = config_mod.from_dict(TaskDataConfig, dataset.data, where=f"{dataset.name}.data")
            self._tasks[dataset.name] = load_task(data, dataset.task, dataset.metric)
        return self._tasks[dataset.name]

    # ----- the cells ------------------------------------------------------------------------------------------
    def _add_cells(self, dataset: DatasetSpec) -> None:
        budgets = self.cfg.finetune.budgets()
        for ssa in self.cfg.ssa.ssa_specs():  # each SSA run, then every cell that starts from its export
            needs = self._ssa_cell(dataset, ssa) if ssa.name != NO_SSA else None
            if self.cfg.probes:
                for budget in budgets:
                    self.cells.append(self._probe_cell(dataset, ssa, budget, needs))
            for budget in budgets:
                for spec in self.cfg.finetune.specs():
                    for seed in self.cfg.seeds:
                        self.cells.append(self._finetune_cell(dataset, ssa, spec, budget, seed, needs))

    def _ssa_cell(self, dataset: DatasetSpec, ssa: TunerSpec) -> Cell:
        path = self.ssa_dir(dataset, ssa)

        def run():
            from essa.adaptation import adapt

            adapt(resume=(path / "config.yaml").exists(), trainer_kwargs=self.trainer_kwargs,
                  **self.adapt_sections(dataset, ssa))

        def done():
            from essa.adaptation import RESOURCES_FILE

            return (path / RESOURCES_FILE).is_file() and (path / "backbone.safetensors").is_file()

        def recorded():  # the weight change is recorded beside the export when the results first read it
            from essa.adaptation import RESOURCES_FILE

            return (path / RESOURCES_FILE).is_file() and (path / WEIGHT_CHANGE_FILE).is_file()

        cell = Cell("ssa", dataset, path, run, done, args=(dataset, ssa), recorded=recorded)
        self.cells.append(cell)
        return cell

    def _probe_cell(self, dataset: DatasetSpec, ssa: TunerSpec, budget, needs: Cell | None) -> Cell:
        path = self.probe_dir(dataset, ssa, budget)

        def run():
            from essa.evaluate.run import evaluate

            evaluate(**self.probe_sections(dataset, ssa, budget))

        return Cell("probe", dataset, path, run, lambda: (path / "metrics.json").is_file(), needs,
                    args=(dataset, ssa, budget))

    def _finetune_cell(self, dataset: DatasetSpec, ssa: TunerSpec, spec: TunerSpec, budget, seed: int,
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

        def recorded():  # its test row, without the classifier it was computed with
            from essa.finetuning import recorded_test_row

            return recorded_test_row(out / f"seed_{seed}") is not None

        return Cell("finetune", dataset, out / f"seed_{seed}", run, done, needs, args=(dataset, ssa, spec, budget),
                    recorded=recorded)
