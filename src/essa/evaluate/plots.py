"""PNG figures of evaluation results: confusion matrices and accuracy against training memory.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so nothing opens a window, no global
backend is switched and no figure stays registered after saving.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from essa.evaluate.metrics import to_numpy

_MARKERS = "osD^vP*X<>"


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def confusion_matrix_png(cm, class_names: Sequence[str], path, title: str | None = None) -> Path:
    """Draw a (C, C) confusion matrix (rows = true class, columns = predicted) as a PNG at ``path``.

    Cells are coloured by the fraction of their row (the per-class recall on the diagonal), so rare classes stay
    readable next to common ones, and labelled with their counts.
    Returns: ``path``.
    """
    cm = to_numpy(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    if len(class_names) != cm.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {cm.shape[0]}x{cm.shape[1]} confusion matrix")
    if (cm < 0).any() or not np.isfinite(cm).all():
        raise ValueError("confusion matrix counts must be finite and non-negative")
    c = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    fraction = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)

    size = 1.5 + 0.5 * c
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    for (i, j), count in np.ndenumerate(cm):
        ax.text(j, i, f"{count:g}", ha="center", va="center", color="white" if fraction[i, j] > 0.5 else "black")
    ax.set_xticks(range(c), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(c), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def accuracy_vs_memory_png(
    rows: Sequence[dict], path, metric_name: str = "accuracy", title: str | None = None
) -> Path:
    """Scatter a metric (y, mean with std-over-seeds error bars) against peak training memory (x, MiB), one point
    per labelled method, as in figure 1 of the APLA paper.

    ``rows``: dicts with ``label`` (str, unique), ``memory_mib``, ``mean``, ``std`` (numbers) and optionally
    ``group`` (e.g. the SSA tuner), which sets the colour and marker and gets a legend entry.
    Returns: ``path``.
    """
    if not rows:
        raise ValueError("accuracy_vs_memory_png needs at least one row")
    required = ("label", "memory_mib", "mean", "std")
    for i, row in enumerate(rows):
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(f"row {i} ({row.get('label', '?')}) lacks {missing}; each row needs {list(required)}")
    labels = [str(row["label"]) for row in rows]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise ValueError(f"labels {duplicated} appear more than once; give one row per method")

    groups = list(dict.fromkeys(row.get("group") for row in rows))
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for k, group in enumerate(groups):
        members = [row for row in rows if row.get("group") == group]
        ax.errorbar(
            [float(row["memory_mib"]) for row in members],
            [float(row["mean"]) for row in members],
            yerr=[float(row["std"]) for row in members],
            fmt=_MARKERS[k % len(_MARKERS)],
            color=f"C{k % 10}",
            capsize=3,
            label=None if group is None else str(group),
        )
        for row in members:
            xy = (float(row["memory_mib"]), float(row["mean"]))
            ax.annotate(str(row["label"]), xy, textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("peak training memory (MiB)")
    ax.set_ylabel(f"{metric_name} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if any(group is not None for group in groups):
        ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)
