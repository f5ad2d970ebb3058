"""The report of a study (``essa run``): ``report.md`` and a self-contained ``report.html`` in one directory.

    from essa.report import write_report, verdict
    paths = write_report(results, "runs/quickstart")   # {"markdown": Path, "html": Path, "figures": [Path, ...]}
    for line in verdict(results["datasets"][0]):
        print(line)

``results`` is the study's JSON-able summary (the study saves the same dict as ``results.json``). Required keys:
``datasets``, and in each dataset ``name``, ``primary_metric`` and ``cells``, and in each cell ``ssa`` and
``finetune``. Everything else is optional and shown as "–" (or left out) when absent: the study's ``name``,
``backbone``, ``wall_seconds``, ``budget`` (every key printed), ``notes``; a dataset's ``task``, ``description``,
``probes`` (``backbone``, ``method``, ``metrics``, and ``ssa``: the SSA label of its backbone, ``none`` for the
foundation model), ``ssa_curves``; a cell's ``status`` (default ``pending``), ``error``, ``seeds`` (seed -> test
metrics), ``ssa_resources`` and ``finetune_resources`` (``trainable_params``, ``peak_memory_mib``, ``images_per_s``; SSA
also ``weight_change``, the relative L2 change of the backbone weights from the foundation model to the SSA export).

Per dataset the report holds: a test-metric table (one row per cell, every metric as mean ± std over the finished
seeds, the best primary metric in bold), a resource table, the frozen-feature probes, the primary metric against
peak training memory (``figures/<dataset>_metric_vs_memory.png``), the SSA kNN curves
(``figures/<dataset>_ssa_curves.png``) and a verdict computed from the numbers (:func:`verdict`).

Statistics: a NaN seed makes its cell's mean NaN (it is shown, not hidden); the std has ddof=1 and is shown only
with two seeds or more. Every metric is taken as higher-is-better. Seed-dict keys that are not metrics (95 %
interval bounds ``*_ci_low``/``*_ci_high``, resource keys, ``auc_skipped_labels``, ``predicted_share``,
``label_share``, ``class_weights``) get no column, so the study may pass a finetune run's per-seed ``test`` dict as
it is.

A cell with a seed that predicts (almost) one class (:func:`one_class_seeds`: the seed's ``predicted_share``, the
fraction of the test images in its most-predicted class, is at least :data:`ONE_CLASS_SHARE` and above its
``label_share``, that of the most frequent true class) is marked ``⚠ one class (k/n seeds)`` in the tables, never
bold, never the verdict's best cell, and named in the verdict. ``essa finetune`` writes both shares into each seed's
test row; a seed dict without them is not flagged.

Every file is written to a temporary file and renamed, so an interrupted study never leaves half a report; figures
of earlier calls that this call did not redraw are removed, so ``figures/`` matches the report.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from essa.evaluate.plots import accuracy_vs_memory_png

__all__ = ["Summary", "cell_summary", "one_class_seeds", "summary_markdown", "verdict", "write_report"]

MISSING = "–"
NO_SSA = "none"
STATUSES = ("done", "partial", "pending", "failed")
MEMORY_FIGURE = "_metric_vs_memory.png"
CURVES_FIGURE = "_ssa_curves.png"
#: Seed-dict keys that are not test metrics: resources and counts that a finetune run stores beside its metrics.
_NOT_METRICS = frozenset({"peak_memory_mib", "images_per_s", "train_seconds", "trainable_params",
                          "auc_skipped_labels", "predicted_share", "label_share", "class_weights"})
#: A seed whose most-predicted class takes at least this fraction of the test images (and more than the most
#: frequent true class does) predicts (almost) one class: its cell is flagged and never bolded as best.
ONE_CLASS_SHARE = 0.95
ONE_CLASS_MARK = "⚠ one class"
_ONE_CLASS_RULE = (f"seeds whose most-predicted class takes at least {ONE_CLASS_SHARE:.0%} of the test images, more "
                   "than the test split's most frequent class does (the classifier predicts (almost) one class)")
_MAX_ERROR_CHARS = 200


class Summary(NamedTuple):
    """Mean, std (ddof=1; NaN below two seeds) and number of finished seeds of one metric of one cell."""

    mean: float
    std: float
    n: int


# ----- statistics -------------------------------------------------------------------------------------------------
def cell_summary(cell: dict, metric: str) -> Summary:
    """Mean, std and count of ``metric`` over the finished seeds of ``cell`` (seeds lacking the metric are not
    counted). A NaN (or JSON null) value makes the mean NaN: a broken seed should show, not vanish from the mean."""
    values = np.array([_number(seed[metric]) for seed in (cell.get("seeds") or {}).values() if metric in seed],
                      dtype=np.float64)
    if len(values) == 0:
        return Summary(math.nan, math.nan, 0)
    std = float(values.std(ddof=1)) if len(values) >= 2 else math.nan
    return Summary(float(values.mean()), std, len(values))


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _finished(summary: Summary) -> bool:
    return summary.n >= 1 and not math.isnan(summary.mean)


def one_class_seeds(cell: dict) -> int:
    """How many finished seeds of ``cell`` predict (almost) one class: the fraction of the test images in the
    most-predicted class (``predicted_share``, written by ``essa finetune`` for single-label tasks) is at least
    :data:`ONE_CLASS_SHARE` and above the fraction of the most frequent true class (``label_share``), so that a
    test split that is itself that skewed is not flagged. Seeds without ``predicted_share`` are not counted."""
    count = 0
    for seed in (cell.get("seeds") or {}).values():
        share = seed.get("predicted_share")
        if share is not None and share >= ONE_CLASS_SHARE and share > _number(seed.get("label_share", 0.0)):
            count += 1
    return count


def _one_class_note(cell: dict) -> str:
    """``" ⚠ one class (1/3 seeds)"`` for a flagged cell, else ``""``."""
    k = one_class_seeds(cell)
    return f" {ONE_CLASS_MARK} ({k}/{len(cell.get('seeds') or {})} seeds)" if k else ""


def _best(cells: Sequence[dict], metric: str, healthy: bool = False) -> tuple[dict, Summary] | None:
    """The cell with the highest finite mean ``metric`` (the first one on ties), or None if no cell has one;
    ``healthy``: among the cells none of whose seeds predicts one class (:func:`one_class_seeds`)."""
    candidates = [(cell, cell_summary(cell, metric)) for cell in cells if not (healthy and one_class_seeds(cell))]
    candidates = [(cell, s) for cell, s in candidates if _finished(s)]
    return max(candidates, key=lambda pair: pair[1].mean) if candidates else None


def _tuner_family(label: str) -> str:
    """``"apla r=64"`` -> ``"apla"``: the tuner name before its options, to group labels of one method."""
    return label.split()[0].lower() if label.strip() else ""


# ----- verdict ----------------------------------------------------------------------------------------------------
def verdict(dataset: dict) -> list[str]:
    """Conclusions computed from one dataset's cells, one line each (also printed by the study to the terminal):
    the best cell (of those not flagged for predicting one class); the flagged cells; per fine-tuning tuner, the
    best SSA cell against the cell without SSA ("helped", "within noise", "hurt", or "single seed: no noise
    estimate"); and APLA-SSA against full-SSA cells (metric, SSA peak
    memory and throughput ratios) where both exist."""
    metric = dataset["primary_metric"]
    cells = dataset["cells"]
    flagged = [f"{_cell_name(c)} ({one_class_seeds(c)}/{len(c.get('seeds') or {})} seeds)"
               for c in cells if one_class_seeds(c)]
    flag_line = ([f"Predicts (almost) one class, so its {metric} is not a usable result: {'; '.join(flagged)} "
                  f"(at least {ONE_CLASS_SHARE:.0%} of the test images in one class, more than the test split "
                  "holds)."] if flagged else [])
    best = _best(cells, metric, healthy=True)
    if best is None:
        return [f"No cell has a finished seed with a {metric} value yet"
                + (" that does not predict one class." if flagged else "."), *flag_line]
    cell, summary = best
    lines = [f"Best cell: {_cell_name(cell)}, {metric} {_format_summary(summary, with_n=True)}.", *flag_line]
    finetune_tuners = list(dict.fromkeys(str(c["finetune"]) for c in cells))
    lines += [_ssa_effect(cells, tuner, metric) for tuner in finetune_tuners]
    lines += [line for tuner in finetune_tuners for line in _apla_vs_full(cells, tuner, metric)]
    return lines


def _ssa_effect(cells: Sequence[dict], finetune: str, metric: str) -> str:
    """Whether SSA helped fine-tuning with ``finetune``: its best SSA cell against its cell without SSA."""
    same = [c for c in cells if str(c["finetune"]) == finetune]
    baseline = _best([c for c in same if c["ssa"] == NO_SSA], metric)
    adapted = _best([c for c in same if c["ssa"] != NO_SSA], metric)
    if baseline is None or adapted is None:
        return (f"Fine-tuning {finetune}: no SSA comparison yet (needs a finished cell without SSA and one "
                "with SSA).")
    (cell, a), (_, b) = adapted, baseline
    judged = _judge(a, b, better="SSA helped", worse="SSA hurt",
                    neutral="SSA did not help beyond seed-to-seed noise")
    return (f"Fine-tuning {finetune}: best SSA cell ({cell['ssa']}) {a.mean:.4f} (n={a.n}) vs no SSA "
            f"{b.mean:.4f} (n={b.n}): {metric} {a.mean - b.mean:+.4f}; {judged}.")


def _apla_vs_full(cells: Sequence[dict], finetune: str, metric: str) -> list[str]:
    """APLA-SSA cells against the full-SSA cell, both fine-tuned with ``finetune``: metric difference, and the
    ratios of SSA peak memory and SSA throughput (the efficiency claim of the method)."""
    same = [c for c in cells if str(c["finetune"]) == finetune]
    full = _best([c for c in same if _tuner_family(str(c["ssa"])) == "full"], metric)
    if full is None:
        return []
    full_cell, b = full
    lines = []
    for cell in same:
        a = cell_summary(cell, metric)
        if _tuner_family(str(cell["ssa"])) != "apla" or not _finished(a):
            continue
        judged = _judge(a, b, better="APLA-SSA better", worse="APLA-SSA worse",
                        neutral="APLA-SSA and full SSA do not differ beyond seed-to-seed noise")
        ratios = "; ".join(_resource_ratio(cell, full_cell, key, what, unit)
                           for key, what, unit in (("peak_memory_mib", "SSA peak memory", "MiB"),
                                                   ("images_per_s", "SSA throughput", "images/s")))
        lines.append(f"Fine-tuning {finetune}: SSA {cell['ssa']} vs SSA {full_cell['ssa']}: {metric} "
                     f"{a.mean - b.mean:+.4f}; {judged}; {ratios}.")
    return lines


def _judge(a: Summary, b: Summary, better: str, worse: str, neutral: str) -> str:
    """Compare mean ``a`` with mean ``b`` against seed noise: ``better`` if the difference exceeds the larger of
    the two stds, ``worse`` if it is below minus that, else ``within noise``; needs two seeds on each side."""
    if a.n < 2 or b.n < 2:
        return "single seed: no noise estimate"
    noise = max(a.std, b.std)
    difference = a.mean - b.mean
    if difference > noise:
        return f"{better} (the difference exceeds the larger std, {noise:.4f})"
    if difference < -noise:
        return f"{worse} (the difference is below minus the larger std, {noise:.4f})"
    return f"within noise (|difference| ≤ the larger std, {noise:.4f}): {neutral}"


def _resource_ratio(cell: dict, reference: dict, key: str, what: str, unit: str) -> str:
    """``"SSA peak memory ×0.62 of full (1,100 vs 1,765 MiB)"``, or a note when either value was not measured."""
    value = (cell.get("ssa_resources") or {}).get(key)
    base = (reference.get("ssa_resources") or {}).get(key)
    if value is None or base is None or not base:
        return f"{what} not measured for both"
    return (f"{what} ×{value / base:.2f} of SSA {reference['ssa']} "
            f"({_format_resource(key, value)} vs {_format_resource(key, base)} {unit})")


# ----- formatting -------------------------------------------------------------------------------------------------
def _format_summary(summary: Summary, with_n: bool) -> str:
    """``"0.9100 ± 0.0100 (n=3)"``; the std only when defined (two seeds or more); "–" without a finished seed."""
    if summary.n == 0:
        return MISSING
    text = f"{summary.mean:.4f}"
    if summary.n >= 2:
        text += f" ± {summary.std:.4f}"
    return f"{text} (n={summary.n})" if with_n else text


def _format_resource(key: str, value: Any) -> str:
    """Thousands separators for parameter counts and MiB, two decimals for images/s; "–" when missing."""
    if value is None:
        return MISSING
    value = float(value)
    if math.isnan(value):
        return "nan"
    if key == "trainable_params":
        return f"{round(value):,}"
    if key == "peak_memory_mib":
        return f"{value:,.0f}"
    if key == "weight_change":
        return f"{100 * value:.2g} %"
    return f"{value:,.2f}"


def _format_duration(seconds: float | None) -> str:
    """``612.3`` -> ``"10 min 12 s"``; hours from one hour on."""
    if seconds is None or not math.isfinite(float(seconds)):
        return MISSING
    seconds = round(float(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _format_value(value: Any) -> str:
    """A budget value: lists comma-joined, everything else as ``str``."""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return MISSING if value is None else str(value)


def _cell_name(cell: dict) -> str:
    return f"SSA {cell['ssa']} + fine-tuning {cell['finetune']}"


def _status(cell: dict) -> str:
    """The cell's status, with its error (on one line, shortened) when it has one."""
    status = str(cell.get("status") or "pending")
    error = cell.get("error")
    if not error:
        return status
    error = " ".join(str(error).split())
    if len(error) > _MAX_ERROR_CHARS:
        error = error[: _MAX_ERROR_CHARS - 1] + "…"
    return f"{status}: {error}"


def _is_metric(key: str) -> bool:
    return key not in _NOT_METRICS and not key.endswith(("_ci_low", "_ci_high"))


def _metric_names(dataset: dict) -> list[str]:
    """The primary metric, then every other metric found in the seeds of the dataset's cells, in order seen."""
    found = (key for cell in dataset["cells"] for seed in (cell.get("seeds") or {}).values() for key in seed)
    return list(dict.fromkeys([dataset["primary_metric"], *(key for key in found if _is_metric(key))]))


def _file_stem(name: str) -> str:
    """A file-name-safe form of a dataset name: runs of characters other than letters, digits, ``.``, ``-``,
    ``_`` become ``_`` (so spaces, ``=``, ``/`` and ``<script>`` cannot escape the figures folder)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80]
    return stem or "dataset"


# ----- document blocks: built once, rendered to markdown and html --------------------------------------------------
@dataclass(frozen=True)
class Heading:
    text: str
    level: int


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    bold: frozenset[tuple[int, int]] = field(default_factory=frozenset)  # (row, column) cells shown in bold
    note: str = ""


@dataclass(frozen=True)
class FigureBlock:
    path: Path  # the PNG on disk; markdown links it, html embeds it
    caption: str


Block = Heading | Paragraph | Bullets | Table | FigureBlock


def _header_blocks(results: dict) -> list[Block]:
    """Title, backbone, wall time, cell counts, budget and notes of the study."""
    cells = [cell for dataset in results["datasets"] for cell in dataset["cells"]]
    counts = {status: 0 for status in STATUSES}
    for cell in cells:
        status = str(cell.get("status") or "pending")
        counts[status] = counts.get(status, 0) + 1
    count_text = ", ".join(f"{n} {status}" for status, n in counts.items())
    blocks: list[Block] = [
        Heading(f"Study report: {results.get('name', MISSING)}", 1),
        Bullets([f"Backbone: {results.get('backbone', MISSING)}",
                 f"Total wall time: {_format_duration(results.get('wall_seconds'))}",
                 f"Cells: {count_text} (of {len(cells)})"]),
    ]
    budget = results.get("budget") or {}
    if budget:
        blocks += [Heading("Budget", 2), Bullets([f"{key}: {_format_value(value)}" for key, value in budget.items()])]
    notes = results.get("notes") or []
    if notes:
        blocks += [Heading("Notes", 2), Bullets([str(note) for note in notes])]
    return blocks


def _summary_tables(results: dict) -> list[Table]:
    """The study on one screen: per dataset and SSA tuner, the primary metric of each fine-tuning tuner, the
    frozen-feature probes and the SSA resources; then the fine-tuning resources per dataset and tuner."""
    finetunes = list(dict.fromkeys(str(c["finetune"]) for d in results["datasets"] for c in d["cells"]))
    methods = list(dict.fromkeys(str(p.get("method")) for d in results["datasets"] for p in d.get("probes") or []))
    keys = ("trainable_params", "peak_memory_mib", "images_per_s")
    rows, bold, resource_rows = [], set(), []
    for dataset in results["datasets"]:
        metric, cells = dataset["primary_metric"], dataset["cells"]
        best = _best(cells, metric, healthy=True)
        probes = {(str(p.get("ssa")), str(p.get("method"))): (p.get("metrics") or {}).get(metric)
                  for p in dataset.get("probes") or []}
        for ssa in dict.fromkeys(str(c["ssa"]) for c in cells):
            row = [str(dataset["name"]), metric, ssa]
            ssa_resources = {}
            for finetune in finetunes:
                cell = next((c for c in cells if str(c["ssa"]) == ssa and str(c["finetune"]) == finetune), None)
                row.append(MISSING if cell is None else
                           _format_summary(cell_summary(cell, metric), with_n=True) + _one_class_note(cell))
                ssa_resources = ssa_resources or (cell or {}).get("ssa_resources") or {}
                if best is not None and cell is best[0]:
                    bold.add((len(rows), len(row) - 1))
            row += [MISSING if probes.get((ssa, m)) is None else f"{_number(probes[(ssa, m)]):.4f}" for m in methods]
            row += [_format_resource(key, ssa_resources.get(key)) for key in (*keys, "weight_change")]
            rows.append(row)
        for finetune in dict.fromkeys(str(c["finetune"]) for c in cells):
            measured = [c.get("finetune_resources") or {} for c in cells if str(c["finetune"]) == finetune]
            resource_rows.append([str(dataset["name"]), finetune, *(
                _format_resource(key, float(np.mean(values)) if values else None)
                for key in keys for values in [[r[key] for r in measured if r.get(key) is not None]])])
    header = ["task", "metric", "SSA", *(f"FT {f}" for f in finetunes), *(f"{m} probe" for m in methods),
              "SSA params", "SSA peak MiB", "SSA images/s", "SSA weight change"]
    note = ("Test split. FT <tuner>: the primary metric after SSA (row) and fine-tuning with that tuner, mean ± std "
            "over seeds (n); bold: the best cell of the task. Probes: frozen features of the SSA backbone (none: "
            "the foundation model). SSA params: trainable backbone parameters during SSA (the DINO head aside). "
            "SSA weight change: ||W_ssa - W_0|| / ||W_0|| of the backbone weights, the SSA export against the "
            "foundation model (near 0: SSA left the model as it was).")
    if any(one_class_seeds(c) for d in results["datasets"] for c in d["cells"]):
        note += f" {ONE_CLASS_MARK}: {_ONE_CLASS_RULE}; never bold."
    return [Table(header, rows, frozenset(bold), note),
            Table(["task", "fine-tuning", "FT params", "FT peak MiB", "FT images/s"], resource_rows,
                  note="Fine-tuning resources: means over every SSA starting point and seed of the tuner.")]


def summary_markdown(results: dict) -> str:
    """The report's summary tables as markdown (what the README of a study can quote as it is)."""
    _check_results(results)
    return "\n\n".join(_markdown_table(table) for table in _summary_tables(results)) + "\n"


def _metrics_table(dataset: dict) -> Table:
    """One row per cell: tuners, status and every test metric as mean ± std; the best primary mean in bold."""
    primary = dataset["primary_metric"]
    names = _metric_names(dataset)
    rows, primary_means = [], []
    for cell in dataset["cells"]:
        summaries = [cell_summary(cell, name) for name in names]
        n_primary = summaries[0].n
        metric_cells = [_format_summary(s, with_n=(i == 0 or s.n != n_primary)) for i, s in enumerate(summaries)]
        metric_cells[0] += _one_class_note(cell)
        rows.append([str(cell["ssa"]), str(cell["finetune"]), _status(cell), *metric_cells])
        healthy = _finished(summaries[0]) and not one_class_seeds(cell)
        primary_means.append(summaries[0].mean if healthy else -math.inf)
    top = max(primary_means, default=-math.inf)
    bold = frozenset((i, 3) for i, mean in enumerate(primary_means) if mean == top and top > -math.inf)
    note = (f"Test split; mean ± std (ddof=1) over finished seeds, n = seeds; the std only with two seeds or more. "
            f"Bold: best {primary} (primary metric, higher is better).")
    if any(one_class_seeds(c) for c in dataset["cells"]):
        note += f" {ONE_CLASS_MARK}: {_ONE_CLASS_RULE}; never bold."
    return Table(["SSA", "fine-tuning", "status", f"{primary} (primary)", *names[1:]], rows, bold, note)


def _resources_table(dataset: dict) -> Table:
    """One row per cell: trainable parameters, peak memory and throughput of its SSA and fine-tuning runs."""
    keys = ("trainable_params", "peak_memory_mib", "images_per_s")
    rows = []
    for cell in dataset["cells"]:
        ssa = cell.get("ssa_resources") or {}
        finetune = cell.get("finetune_resources") or {}
        rows.append([str(cell["ssa"]), str(cell["finetune"]),
                     *(_format_resource(key, ssa.get(key)) for key in keys),
                     *(_format_resource(key, finetune.get(key)) for key in keys)])
    header = ["SSA", "fine-tuning", "SSA params", "SSA peak MiB", "SSA images/s",
              "FT params", "FT peak MiB", "FT images/s"]
    return Table(header, rows, note="Fine-tuning (FT) resources are means over its finished seeds; "
                                    f"{MISSING} = not measured (no SSA, or no finished seed).")


def _probes_table(dataset: dict) -> Table | None:
    """Frozen-feature probes: backbone x method -> primary metric and balanced accuracy (those present)."""
    probes = dataset.get("probes") or []
    if not probes:
        return None
    candidates = list(dict.fromkeys([dataset["primary_metric"], "balanced_accuracy"]))
    names = [name for name in candidates if any(name in (p.get("metrics") or {}) for p in probes)]
    rows = []
    for probe in probes:
        values = probe.get("metrics") or {}
        rows.append([str(probe.get("backbone", MISSING)), str(probe.get("method", MISSING)),
                     *(f"{_number(values[n]):.4f}" if n in values else MISSING for n in names)])
    return Table(["backbone", "method", *names], rows, note="Frozen features of the backbone before SSA "
                                                            "(pretrained) and after each SSA; test split.")


def _dataset_blocks(dataset: dict, figures_dir: Path, stem: str) -> tuple[list[Block], list[Path]]:
    """The section of one dataset, and the figures it drew into ``figures_dir``."""
    task = dataset.get("task")
    blocks: list[Block] = [Heading(f"Dataset: {dataset['name']}", 2)]
    if dataset.get("description"):
        blocks.append(Paragraph(str(dataset["description"])))
    blocks.append(Paragraph(f"Task: {task or MISSING}; primary metric: {dataset['primary_metric']}."))
    blocks += [Heading("Test metrics", 3), _metrics_table(dataset), Heading("Resources", 3),
               _resources_table(dataset)]
    probes = _probes_table(dataset)
    if probes is not None:
        blocks += [Heading("Frozen-feature probes", 3), probes]
    figures = [figure for figure in (_memory_figure(dataset, figures_dir / f"{stem}{MEMORY_FIGURE}"),
                                     _curves_figure(dataset, figures_dir / f"{stem}{CURVES_FIGURE}"))
               if figure is not None]
    if figures:
        blocks.append(Heading("Figures", 3))
        blocks += figures
    blocks += [Heading("Verdict", 3), Bullets(verdict(dataset))]
    return blocks, [figure.path for figure in figures]


# ----- figures ----------------------------------------------------------------------------------------------------
def _memory_figure(dataset: dict, path: Path) -> FigureBlock | None:
    """Primary metric against peak training memory, one point per cell with a finished seed and a measured
    memory; None when no cell has both."""
    metric = dataset["primary_metric"]
    rows, left_out = [], []
    for cell in dataset["cells"]:
        summary = cell_summary(cell, metric)
        memory = _peak_memory(cell)
        if not _finished(summary) or memory is None:
            left_out.append(f"{cell['ssa']} → {cell['finetune']}")
            continue
        rows.append({"label": _literal(f"{cell['ssa']} → {cell['finetune']}"),
                     "group": _literal(f"fine-tuning {cell['finetune']}"),
                     "memory_mib": memory, "mean": summary.mean,
                     "std": summary.std if summary.n >= 2 else 0.0})
    if not rows:
        return None
    with _replacing(path) as tmp:
        accuracy_vs_memory_png(rows, tmp, metric_name=_literal(metric), title=_literal(str(dataset["name"])))
    caption = (f"{metric} (mean over seeds, error bar ± std; none for a single seed) against peak training memory "
               "of each cell, the larger of its SSA and fine-tuning peaks. Colour and marker: fine-tuning tuner; "
               "label: SSA tuner → fine-tuning tuner.")
    if left_out:
        caption += f" Not shown (no finished seed or no memory measured): {', '.join(left_out)}."
    return FigureBlock(path, caption)


def _peak_memory(cell: dict) -> float | None:
    """The larger of the cell's SSA and fine-tuning peak memory (MiB): what a GPU must hold to run the cell."""
    peaks = [float(resources["peak_memory_mib"])
             for resources in (cell.get("ssa_resources"), cell.get("finetune_resources"))
             if resources and resources.get("peak_memory_mib") is not None]
    return max(peaks) if peaks else None


def _curves_figure(dataset: dict, path: Path) -> FigureBlock | None:
    """kNN balanced accuracy per SSA epoch, one line per SSA tuner; the SSA loss when no curve has kNN values;
    None when there are no curves."""
    curves = {str(label): rows for label, rows in (dataset.get("ssa_curves") or {}).items() if rows}
    key = next((k for k in ("knn_bal_acc", "loss") if any(_has(row, k) for rows in curves.values() for row in rows)),
               None)
    if key is None:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    left_out = []
    for label, rows in curves.items():
        points = [(row.get("epoch", i), _number(row[key])) for i, row in enumerate(rows) if _has(row, key)]
        if not points:
            left_out.append(label)
            continue
        epochs, values = zip(*points)
        ax.plot(epochs, values, marker="o", label=_literal(f"SSA {label}"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("SSA epoch")
    ax.set_ylabel("kNN balanced accuracy (val)" if key == "knn_bal_acc" else "SSA loss")
    ax.set_title(_literal(str(dataset["name"])))
    ax.grid(alpha=0.3)
    ax.legend()
    FigureCanvasAgg(fig)
    with _replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    if key == "knn_bal_acc":
        caption = "Weighted-kNN balanced accuracy of the SSA backbone per epoch, one line per SSA tuner."
    else:
        caption = ("SSA loss per epoch, one line per SSA tuner: no curve has kNN values (no labelled val split was "
                   "used during SSA), so the loss is plotted instead; a lower loss does not imply better features.")
    if left_out:
        caption += f" Not shown (no {key} values): {', '.join(left_out)}."
    return FigureBlock(path, caption)


def _has(row: dict, key: str) -> bool:
    return row.get(key) is not None


def _literal(text: str) -> str:
    """``text`` for a matplotlib label: ``$`` escaped, so a name like ``cost $5 $x`` is not parsed as math."""
    return text.replace("$", r"\$")


# ----- rendering --------------------------------------------------------------------------------------------------
def _markdown(blocks: Sequence[Block], root: Path) -> str:
    """Markdown of the blocks; figures are linked relative to ``root`` (the report's folder)."""
    parts = []
    for block in blocks:
        match block:
            case Heading(text, level):
                parts.append(f"{'#' * level} {text}")
            case Paragraph(text):
                parts.append(text)
            case Bullets(items):
                parts.append("\n".join(f"- {item}" for item in items))
            case Table():
                parts.append(_markdown_table(block))
            case FigureBlock(path, caption):
                parts.append(f"![{path.stem}]({path.relative_to(root).as_posix()})\n\n*{caption}*")
    return "\n\n".join(parts) + "\n"


def _markdown_table(table: Table) -> str:
    def cell(text: str, bold: bool) -> str:
        text = text.replace("|", "\\|")
        return f"**{text}**" if bold else text

    lines = ["| " + " | ".join(cell(h, False) for h in table.header) + " |",
             "|" + "|".join("---" for _ in table.header) + "|"]
    lines += ["| " + " | ".join(cell(text, (i, j) in table.bold) for j, text in enumerate(row)) + " |"
              for i, row in enumerate(table.rows)]
    return "\n".join(lines) + (f"\n\n{table.note}" if table.note else "")


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f3f3f3; }
p.note, figcaption { color: #555; font-size: 0.85rem; }
figure { margin: 1rem 0; }
img { max-width: 100%; }
"""


def _html(blocks: Sequence[Block], title: str) -> str:
    """A self-contained HTML page of the blocks: inline CSS, figures embedded as base64 PNG, all text escaped."""
    esc = html.escape
    body = []
    for block in blocks:
        match block:
            case Heading(text, level):
                body.append(f"<h{level}>{esc(text)}</h{level}>")
            case Paragraph(text):
                body.append(f"<p>{esc(text)}</p>")
            case Bullets(items):
                body.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>")
            case Table():
                body.append(_html_table(block))
            case FigureBlock(path, caption):
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(path.stem)}">'
                            f"<figcaption>{esc(caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _html_table(table: Table) -> str:
    def cell(text: str, bold: bool) -> str:
        return f"<td><strong>{html.escape(text)}</strong></td>" if bold else f"<td>{html.escape(text)}</td>"

    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.header) + "</tr>"
    rows = ["<tr>" + "".join(cell(text, (i, j) in table.bold) for j, text in enumerate(row)) + "</tr>"
            for i, row in enumerate(table.rows)]
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>{note}"


# ----- files ------------------------------------------------------------------------------------------------------
@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` if the block succeeds, removed if not,
    so readers only ever see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not mkstemp: keep the umask's file mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    with _replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _check_results(results: dict) -> None:
    """Name the first missing required key, instead of a KeyError from deep inside the report."""
    if not isinstance(results.get("datasets"), list):
        raise ValueError("results needs 'datasets': a list of dataset dicts")
    for i, dataset in enumerate(results["datasets"]):
        for key in ("name", "primary_metric", "cells"):
            if key not in dataset:
                raise ValueError(f"results['datasets'][{i}] ({dataset.get('name', '?')}) lacks {key!r}")
        for j, cell in enumerate(dataset["cells"]):
            for key in ("ssa", "finetune"):
                if key not in cell:
                    raise ValueError(f"cell {j} of dataset {dataset['name']!r} lacks {key!r}")


def _unique_stems(datasets: Sequence[dict]) -> list[str]:
    """File stems of the datasets, made unique (``_2``, ``_3``...) where two names sanitise alike."""
    stems: list[str] = []
    for dataset in datasets:
        stem = base = _file_stem(str(dataset["name"]))
        k = 2
        while stem in stems:
            stem, k = f"{base}_{k}", k + 1
        stems.append(stem)
    return stems


def _remove_stale_figures(figures_dir: Path, keep: Sequence[Path]) -> None:
    """Delete report figures of an earlier call that this call did not draw (a dataset renamed or removed)."""
    if not figures_dir.is_dir():
        return
    for path in figures_dir.glob("*.png"):
        if path.name.endswith((MEMORY_FIGURE, CURVES_FIGURE)) and path not in keep:
            path.unlink()


def write_report(results: dict, out_dir: str | Path) -> dict[str, Any]:
    """Write ``report.md``, a self-contained ``report.html`` and the PNG figures (``figures/``) of a study into
    ``out_dir``, replacing those of an earlier call.

    ``results``: the study's results dict (see the module docstring for its keys).
    Returns: ``{"markdown": Path, "html": Path, "figures": [Path, ...]}``.
    """
    _check_results(results)
    out_dir = Path(out_dir)
    figures_dir = out_dir / "figures"
    blocks = [*_header_blocks(results), Heading("Summary", 2), *_summary_tables(results)]
    figures: list[Path] = []
    for dataset, stem in zip(results["datasets"], _unique_stems(results["datasets"])):
        section, drawn = _dataset_blocks(dataset, figures_dir, stem)
        blocks += section
        figures += drawn
    _remove_stale_figures(figures_dir, figures)
    markdown, page = out_dir / "report.md", out_dir / "report.html"
    _write_text(markdown, _markdown(blocks, out_dir))
    _write_text(page, _html(blocks, f"Study report: {results.get('name', MISSING)}"))
    return {"markdown": markdown, "html": page, "figures": figures}
