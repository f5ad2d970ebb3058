"""The numbers a report reads from a results dict: per-cell seed statistics, the one-class flag, the best cell,
and which cells are which tuner."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from essa.evaluate.metrics import Summary, seed_summary
from essa.names import DEFAULT_OBJECTIVE, NO_SSA

#: Seed-dict keys that are not test metrics: resources and counts that a finetune run stores beside its metrics.
_NOT_METRICS = frozenset({"peak_memory_mib", "images_per_s", "train_seconds", "trainable_params",
                          "auc_skipped_labels", "predicted_share", "label_share", "class_weights",
                          "epoch"})
#: A seed whose most-predicted class takes at least this fraction of the test images (and more than the most
#: frequent true class does) predicts (almost) one class: its cell is flagged and never bolded as best.
ONE_CLASS_SHARE = 0.95


def cell_summary(cell: dict, metric: str) -> Summary:
    """Mean, std and count of ``metric`` over the finished seeds of ``cell`` (seeds lacking the metric are not
    counted), by :func:`essa.evaluate.metrics.seed_summary`: a NaN (or JSON null) value makes the mean NaN (a
    broken seed should show, not vanish from the mean); the std (ddof=1) is NaN below two seeds."""
    return seed_summary(seed[metric] for seed in (cell.get("seeds") or {}).values() if metric in seed)


def number(value: Any) -> float:
    return math.nan if value is None else float(value)


def finished(summary: Summary) -> bool:
    return summary.n >= 1 and not math.isnan(summary.mean)


def one_class_seeds(cell: dict) -> int:
    """How many finished seeds of ``cell`` predict (almost) one class: the fraction of the test images in the
    most-predicted class (``predicted_share``, written by ``essa finetune`` for single-label tasks) is at least
    :data:`ONE_CLASS_SHARE` and above the fraction of the most frequent true class (``label_share``), so that a
    test split that is itself that skewed is not flagged. Seeds without ``predicted_share`` are not counted."""
    count = 0
    for seed in (cell.get("seeds") or {}).values():
        share = seed.get("predicted_share")
        if share is not None and share >= ONE_CLASS_SHARE and share > number(seed.get("label_share", 0.0)):
            count += 1
    return count


def seed_epochs(cell: dict) -> list[int | None]:
    """The epoch each finished seed of the cell was tested at, in seed order (-1: the linear-probe head of
    ``head.init: lp``; None: not recorded)."""
    return [seed.get("epoch") for seed in (cell.get("seeds") or {}).values()]


def lp_head_only(cell: dict) -> bool:
    """Whether the cell has finished seeds and every one was tested at epoch -1: with the linear-probe head of
    ``head.init: lp``, because no epoch of fine-tuning beat it on the val split."""
    epochs = seed_epochs(cell)
    return bool(epochs) and all(e is not None and e < 0 for e in epochs)


def best(cells: Sequence[dict], metric: str, healthy: bool = False) -> tuple[dict, Summary] | None:
    """The cell with the highest finite mean ``metric`` (the first one on ties), or None if no cell has one;
    ``healthy``: among the cells none of whose seeds predicts one class (:func:`one_class_seeds`)."""
    candidates = [(cell, cell_summary(cell, metric)) for cell in cells if not (healthy and one_class_seeds(cell))]
    candidates = [(cell, s) for cell, s in candidates if finished(s)]
    return max(candidates, key=lambda pair: pair[1].mean) if candidates else None


def ssa_tuner(cell: dict) -> str:
    """The name of a cell's SSA tuner, lowercased (``"apla"``; ``"none"``: no SSA), whatever its label: the
    ``ssa_tuner`` name the study records beside the label; for results written before it did (e.g.
    ``docs/offline_study/results.json``), the label's first word, which is the name under the default labels
    (``"apla r=64"`` -> ``"apla"``)."""
    tuner = cell.get("ssa_tuner") or {}
    if tuner.get("name"):
        return str(tuner["name"]).lower()
    label = str(cell["ssa"])
    return label.split()[0].lower() if label.strip() else ""


def is_baseline(cell: dict) -> bool:
    """Whether the cell fine-tunes the foundation model as it is: its SSA tuner is ``none`` (in results written
    before the study recorded ``ssa_tuner``: its label is ``none``)."""
    if (cell.get("ssa_tuner") or {}).get("name"):
        return ssa_tuner(cell) == NO_SSA
    return cell["ssa"] == NO_SSA


def objective(entry: dict) -> str | None:
    """The SSA objective of a cell or probe (None: no SSA): its recorded ``objective``; for results written before
    the study recorded it (e.g. ``docs/offline_study/results.json``), dinov2, the only objective a study ran then."""
    if "objective" in entry:
        return None if entry["objective"] is None else str(entry["objective"])
    if "finetune" in entry:  # a cell
        baseline = is_baseline(entry)
    else:  # a probe
        baseline = entry.get("ssa") == NO_SSA or entry.get("backbone") == "pretrained"
    return None if baseline else DEFAULT_OBJECTIVE


def shows_objective(entries) -> bool:
    """Whether tables of these cells or probes get an objective column: any of them has an objective but dinov2
    (a study that ran dinov2 only, or wrote no objective, reads as before)."""
    return any(objective(e) not in (None, DEFAULT_OBJECTIVE) for e in entries)


def _is_metric(key: str) -> bool:
    return key not in _NOT_METRICS and not key.endswith(("_ci_low", "_ci_high"))


def metric_names(dataset: dict) -> list[str]:
    """The primary metric, then every other metric found in the seeds of the dataset's cells, in order seen."""
    found = (key for cell in dataset["cells"] for seed in (cell.get("seeds") or {}).values() for key in seed)
    return list(dict.fromkeys([dataset["primary_metric"], *(key for key in found if _is_metric(key))]))
