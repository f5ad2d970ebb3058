"""``essa run``: a whole ESSA study in one command, with a report.

    essa run --config examples/quickstart.yaml

A study is a grid: datasets x SSA tuner (``none``: the foundation model as it is) x SSA objective (optional:
``ssa.objectives``, e.g. ``[dinov2, mae]``) x label budget (optional: ``finetune.label_budgets``) x fine-tuning
tuner x seeds, under one budget (image size, batch size, epochs per stage). Per dataset it runs these cells,
the foundation model's probes and fine-tuning first, then each SSA run followed by the cells that start from it:

- ``ssa/[<objective>__]<tuner>/``: one ``essa adapt`` per SSA tuner and objective, on the images of the task's
  **train split only** (labels unused; never the val or test images), kNN-monitored on the val split; the
  directory names every objective but dinov2 (``ssa/apla_r64/``, ``ssa/mae__apla_r64/``), the label names the
  objective whenever the study runs one other than dinov2 (``apla r=64 (mae)``, ``apla r=64 (dinov2)``);
- ``probe/<backbone>[__<budget>]/``: ``essa evaluate`` of the frozen features (kNN, linear probe) of the
  foundation model and of each SSA export;
- ``finetune/<ssa>__<tuner>[__<budget>]/seed_N/``: one ``essa finetune`` seed per cell, from the foundation model
  or the SSA export; every cell of a dataset uses the same splits, image size, epochs and seeds.

Each SSA run is shared by every fine-tuning cell that starts from it. A cell whose outputs are complete is skipped,
so a re-run of an interrupted study resumes it (an unfinished SSA or fine-tuning run continues from its last
checkpoint). A failed cell (e.g. SSA diverged) is recorded with its error, the cells that need it are skipped,
and the others go on. After every cell the study writes ``results.json``, ``report.md`` and ``report.html``
(:mod:`essa.report`), so the report is current whenever the study stops.

Modules: :mod:`~essa.study.config` (the study's YAML: tuners, stages, datasets, budget), :mod:`~essa.study.grid`
(the cells, their directories and the config of each cell's command), :mod:`~essa.study.runner` (running the
cells, each SSA and fine-tuning cell in a fresh process, progress and time left) and :mod:`~essa.study.results`
(``results.json`` and its schema).
"""

from essa.names import NO_SSA, slug
from essa.study.config import (
    ALL_LABELS,
    PROBES,
    DatasetSpec,
    FinetuneStageConfig,
    SSASpec,
    SSAStageConfig,
    StageConfig,
    StudyConfig,
    TunerSpec,
    budget_label,
    budget_dir_suffix,
    budget_suffix,
    deep_merge,
)
from essa.study.grid import Cell, Grid, probe_backbone
from essa.study.results import CellResult, DatasetResult, ProbeResult, Results, TunerResult, WeightChanges
from essa.study.runner import CELLS_FILE, CellError, Study, run

__all__ = [
    "ALL_LABELS", "CELLS_FILE", "NO_SSA", "PROBES", "Cell", "CellError", "CellResult", "DatasetResult", "DatasetSpec",
    "FinetuneStageConfig", "Grid", "ProbeResult", "Results", "SSASpec", "SSAStageConfig", "StageConfig", "Study",
    "StudyConfig", "TunerResult", "TunerSpec", "WeightChanges", "budget_dir_suffix", "budget_label", "budget_suffix",
    "deep_merge", "probe_backbone", "run", "slug",
]
