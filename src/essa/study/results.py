"""The results of a study: what every cell wrote, gathered into one JSON-able dict (``results.json``), which
:func:`essa.report.write_report` renders. The TypedDicts below are its schema."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, NotRequired, TypedDict

from essa.config import BackboneConfig
from essa.io import read_json, write_json
from essa.names import NO_SSA
from essa.study.config import DatasetSpec, SSASpec, TunerSpec, budget_label, budget_suffix
from essa.study.grid import WEIGHT_CHANGE_FILE, Grid, probe_backbone


class TunerResult(TypedDict):
    """A tuner of a cell as the study ran it: ``{"name": "apla", "options": {"r": 64}}``."""

    name: str
    options: dict[str, Any]


class ProbeResult(TypedDict):
    backbone: str  # "pretrained" (the foundation model) or "ssa <SSA label>" (an SSA export)
    ssa: str  # the SSA label of that backbone ("none": the foundation model)
    objective: str | None  # the SSA objective of that backbone (None: the foundation model)
    method: str  # the protocol (knn, linear), and the label budget on that axis: "linear, 300 labels"
    metrics: dict[str, Any]  # test metrics, 95 % interval bounds, protocol settings (k, C)


class CellResult(TypedDict):
    """One fine-tuning cell (an SSA tuner, a fine-tuning tuner and a label budget) over its seeds."""

    ssa: str  # the SSA tuner's label ("none": no SSA), naming its objective when the study names objectives
    ssa_tuner: TunerResult
    objective: str | None  # the SSA objective (dinov2, mae, simmim); None without SSA
    finetune: str  # the fine-tuning tuner's label, and the label budget on that axis: "apla, 300 labels"
    finetune_tuner: TunerResult
    status: str  # done | partial | pending | failed
    error: str | None  # "seed 0: ValueError: ..." of every failed seed
    seeds: dict[str, dict[str, float]]  # seed -> test metrics, predicted_share, label_share, the tested epoch
    ssa_resources: dict[str, Any] | None  # resources.json of the SSA run, and its weight_change; None without SSA
    finetune_resources: dict[str, float] | None  # trainable_params, peak_memory_mib, ... (mean over seeds)


class DatasetResult(TypedDict):
    name: str
    task: str
    primary_metric: str
    description: str
    cells: list[CellResult]
    probes: list[ProbeResult]
    ssa_curves: dict[str, list[dict[str, Any]]]  # SSA label -> the SSA run's metrics rows, one per epoch


class Budget(TypedDict):
    img_size: int
    batch_size: int
    ssa_epochs: int
    finetune_epochs: int
    seeds: list[int]
    ssa_seed: int
    label_budgets: NotRequired[list[str]]  # with the label-budget axis only: "300 labels", "all labels"
    ssa_objectives: NotRequired[list[str]]  # only when the study runs any objective but dinov2: "dinov2", "mae"


class Environment(TypedDict):
    """Where and when the results were measured: versions, machine, and the machine's load, which moves every
    throughput and time in the report (two runs with equal metrics differed by x1.25 vs x1.08 in throughput)."""

    essa: str
    torch: str
    timm: str
    lightning: str
    python: str
    platform: str
    cpu_cores: int | None
    gpus: list[str]
    written: str  # UTC, when these results were written
    session_started: str | None  # UTC, when the study session that wrote them started
    load_average_at_start: list[float] | None  # 1, 5, 15 min load averages when the session started
    load_average_now: list[float] | None  # ... when these results were written


class CellCount(TypedDict):
    done: int
    failed: int
    total: int


class Runs(TypedDict):
    """The study's cells as ``essa run`` counts them (each SSA run, probe and fine-tuning seed is one): the count
    its progress lines give, by kind."""

    done: int
    failed: int
    total: int
    by_kind: dict[str, CellCount]  # ssa, probe, finetune


class Results(TypedDict):
    name: str
    backbone: str | None
    wall_seconds: float
    budget: Budget
    notes: list[str]
    datasets: list[DatasetResult]
    runs: NotRequired[Runs]
    environment: NotRequired[Environment]


def runs(grid: Grid, state: dict) -> Runs:
    """How many of ``grid``'s cells are done and failed (``state``: ``cells.json``), in all and by kind."""
    out: Runs = {"done": 0, "failed": 0, "total": 0, "by_kind": {}}
    kinds = ("ssa", "probe", "finetune")  # in this order, whichever runs first
    for cell in sorted(grid.cells, key=lambda c: kinds.index(c.kind)):
        status = state.get(cell.id, {}).get("status")
        kind = out["by_kind"].setdefault(cell.kind, {"done": 0, "failed": 0, "total": 0})
        for count in (out, kind):
            count["total"] += 1
            if status in ("done", "failed"):
                count[status] += 1
    return out


def load_average() -> list[float] | None:
    """The 1, 5 and 15 min load averages (None where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment(session_started: str | None = None, load_at_start: list[float] | None = None) -> Environment:
    """The :class:`Environment` now, for a session that started at ``session_started`` with ``load_at_start``."""
    import platform

    import lightning
    import timm
    import torch

    import essa

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"essa": essa.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "lightning": lightning.__version__, "python": platform.python_version(),
            "platform": platform.platform(terse=True), "cpu_cores": os.cpu_count(), "gpus": gpus,
            "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "session_started": session_started,
            "load_average_at_start": load_at_start, "load_average_now": load_average()}


def tuner_result(spec: TunerSpec) -> TunerResult:
    return {"name": spec.name, "options": dict(spec.options)}


def study_results(grid: Grid, state: dict, weight_change: Callable[[Path], float | None]) -> Results:
    """The results of ``grid``'s cells as they are on disk now; ``state``: the cells' status records
    (``cells.json``); ``weight_change``: export -> how far SSA moved the backbone (:class:`WeightChanges`)."""
    cfg = grid.cfg
    budget: Budget = {"img_size": cfg.img_size, "batch_size": cfg.batch_size, "ssa_epochs": cfg.ssa.epochs,
                      "finetune_epochs": cfg.finetune.epochs, "seeds": list(cfg.seeds), "ssa_seed": cfg.ssa_seed}
    if cfg.finetune.label_budgets:
        budget["label_budgets"] = [budget_label(b) for b in cfg.finetune.budgets()]
    if cfg.ssa.names_objectives():
        budget["ssa_objectives"] = cfg.ssa.objective_names()
    return {
        "name": cfg.name, "backbone": cfg.backbone.weights or cfg.backbone.name,
        "wall_seconds": sum(s.get("seconds") or 0.0 for s in state.values()),
        "budget": budget,
        "notes": _notes(grid),
        "datasets": [_dataset_results(grid, d, state, weight_change) for d in grid.datasets],
        "runs": runs(grid, state),
    }


def _notes(grid: Grid) -> list[str]:
    cfg = grid.cfg
    lrs = {stage: getattr(cfg, stage).config.get("optim", {}).get("lr") for stage in ("ssa", "finetune")}
    lr_note = ", ".join(f"{stage} lr {lr}" for stage, lr in lrs.items() if lr is not None)
    notes = [
        "SSA sees only the train split of each task (labels unused; never the val or test images); its kNN "
        "monitor uses the val split. Every cell of a task uses the same splits, image size, epochs and seeds; "
        "checkpoints are chosen on the val split and tested once on the test split.",
        "Learning rates: " + (f"set in the study config ({lr_note}); others " if lr_note else "")
        + "the reference defaults of method.md (1e-4 for full, 1e-3 for parameter-efficient tuners).",
        "Trainable parameters are the backbone's (plus, in fine-tuning, the head); every SSA tuner also trains "
        "the same DINO head (see ssa/*/resources.json)." if not cfg.ssa.names_objectives() else
        "Trainable parameters are the backbone's (plus, in fine-tuning, the head); with the dinov2 objective every "
        "SSA tuner also trains the same DINO head, with mae or simmim the same decoder (see ssa/*/resources.json).",
    ]
    for d in grid.datasets:
        if d.data.get("max_train") and not cfg.finetune.label_budgets:
            notes.append(f"{d.name}: train split subsampled to {d.data['max_train']} images (seeded, "
                         "stratified); val and test whole.")
        if d.ssa_epochs is not None:
            notes.append(f"{d.name}: SSA for {d.ssa_epochs} epochs (ssa.epochs: {cfg.ssa.epochs}).")
    if cfg.finetune.label_budgets:
        notes.append("Label budgets: fine-tuning and probes use a seeded, stratified subsample of that many "
                     "labelled train images (all labels: every one); SSA always sees every train image; val "
                     "and test whole.")
    return notes + list(cfg.notes)


def _dataset_results(grid: Grid, dataset: DatasetSpec, state: dict,
                     weight_change: Callable[[Path], float | None]) -> DatasetResult:
    task = grid.task_of(dataset)
    cells, curves, probes = [], {}, []
    for ssa in grid.cfg.ssa.ssa_specs():
        ssa_resources = None
        if ssa.name != NO_SSA:
            from essa.adaptation import RESOURCES_FILE

            ssa_dir = grid.ssa_dir(dataset, ssa)
            ssa_resources = read_json(ssa_dir / RESOURCES_FILE)
            if ssa_resources is not None:
                ssa_resources["weight_change"] = weight_change(ssa_dir / "backbone.safetensors")
            rows = read_json(ssa_dir / "metrics.json")
            if rows:
                curves[ssa.label] = rows
        for budget in grid.cfg.finetune.budgets():
            for row in read_json(grid.probe_dir(dataset, ssa, budget) / "metrics.json") or []:
                probes.append({"backbone": probe_backbone(ssa), "ssa": ssa.label, "objective": ssa.objective,
                               "method": row["name"] + budget_suffix(budget),
                               "metrics": {k: v for k, v in row.items() if k != "name"}})
            for spec in grid.cfg.finetune.specs():
                cells.append(_cell_results(grid, dataset, ssa, spec, budget, state, ssa_resources))
    return {"name": dataset.name, "task": task.task, "primary_metric": task.primary,
            "description": task.describe(), "cells": cells, "probes": probes, "ssa_curves": curves}


def _cell_results(grid: Grid, dataset: DatasetSpec, ssa: SSASpec, spec: TunerSpec, budget, state: dict,
                  ssa_resources: dict | None) -> CellResult:
    from essa.evaluate.metrics import metric_names

    out = grid.finetune_dir(dataset, ssa, spec, budget)
    seeds, tests, errors = {}, [], []
    for seed in grid.cfg.seeds:
        rows = read_json(out / f"seed_{seed}" / "metrics.json")
        if rows and rows[-1].get("split") == "test":
            tests.append(rows[-1])
            # the test metrics, and the shares the report's one-class flag reads
            # and the tested checkpoint's epoch (-1: the linear-probe head before fine-tuning's first step)
            keep = (*metric_names(grid.task_of(dataset).task), "predicted_share", "label_share", "epoch")
            seeds[str(seed)] = {k: rows[-1][k] for k in keep if k in rows[-1]}
        error = state.get((out / f"seed_{seed}").as_posix(), {}).get("error")
        if error:
            errors.append(f"seed {seed}: {error}")
    status = ("done" if len(seeds) == len(grid.cfg.seeds) else "failed" if errors
              else "partial" if seeds else "pending")
    keys = ("trainable_params", "peak_memory_mib", "images_per_s", "train_seconds")
    resources = None
    if tests:
        resources = {k: sum(r.get(k, float("nan")) for r in tests) / len(tests) for k in keys}
    return {"ssa": ssa.label, "ssa_tuner": tuner_result(ssa), "objective": ssa.objective,
            "finetune": spec.label + budget_suffix(budget), "finetune_tuner": tuner_result(spec),
            "status": status, "error": "; ".join(errors) or None,
            "seeds": seeds, "ssa_resources": ssa_resources, "finetune_resources": resources}


class WeightChanges:
    """How far SSA moved the backbone: ||W_ssa - W_0|| / ||W_0|| over the foundation model's weights (the
    classifier head aside) that an export holds with the same shape; computed once per version of an export (its
    path and modification time)."""

    def __init__(self, foundation: BackboneConfig, img_size: int):
        self.foundation = foundation
        self.img_size = img_size
        self._known: dict[tuple[str, int], float | None] = {}

    def __call__(self, export: Path) -> float | None:
        """The relative change of ``export``; None without an export, or when the foundation model has random
        weights (there is no fixed starting point to compare with). Recorded beside the export
        (``weight_change.json``) and read from there once the export is gone (a study's record keeps no exports)."""
        record = export.with_name(WEIGHT_CHANGE_FILE)
        if not export.exists():  # what was recorded of this export, if anything
            recorded = read_json(record) or {}
            return recorded.get("weight_change") if recorded.get("export") == export.name else None
        key = (export.as_posix(), export.stat().st_mtime_ns)
        if key not in self._known:
            self._known[key] = self._change(export) if self.foundation.weights or self.foundation.pretrained else None
            write_json(record, {"weight_change": self._known[key], "export": export.name})
        return self._known[key]

    def _change(self, export: Path) -> float | None:
        from safetensors.torch import load_file

        # built per export, not kept: the study process would otherwise hold a copy of the weights throughout
        foundation = self.foundation.build(img_size=self.img_size).state_dict()
        adapted = load_file(export)
        names = [k for k, v in foundation.items()
                 if not k.startswith("head") and k in adapted and adapted[k].shape == v.shape]
        change = sum(float((adapted[k].float() - foundation[k].float()).square().sum()) for k in names)
        norm = sum(float(foundation[k].float().square().sum()) for k in names)
        return (change / norm) ** 0.5 if norm else None
