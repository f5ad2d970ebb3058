"""The figures of a report, as PNG files in its ``figures/`` folder: the primary metric against peak training
memory, and the SSA kNN curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from essa.evaluate.plots import accuracy_vs_memory_png
from essa.io import replacing
from essa.report.document import FigureBlock
from essa.report.stats import cell_summary, finished, number

MEMORY_FIGURE = "_metric_vs_memory.png"
CURVES_FIGURE = "_ssa_curves.png"


def memory_figure(dataset: dict, path: Path) -> FigureBlock | None:
    """Primary metric against peak training memory, one point per cell with a finished seed and a measured
    memory; None when no cell has both."""
    metric = dataset["primary_metric"]
    rows, left_out = [], []
    for cell in dataset["cells"]:
        summary = cell_summary(cell, metric)
        memory = peak_memory(cell)
        if not finished(summary) or memory is None:
            left_out.append(f"{cell['ssa']} → {cell['finetune']}")
            continue
        rows.append({"label": _literal(f"{cell['ssa']} → {cell['finetune']}"),
                     "group": _literal(f"fine-tuning {cell['finetune']}"),
                     "memory_mib": memory, "mean": summary.mean,
                     "std": summary.std if summary.n >= 2 else 0.0})
    if not rows:
        return None
    with replacing(path) as tmp:
        accuracy_vs_memory_png(rows, tmp, metric_name=_literal(metric), title=_literal(str(dataset["name"])))
    caption = (f"{metric} (mean over seeds, error bar ± std; none for a single seed) against peak training memory "
               "of each cell, the larger of its SSA and fine-tuning peaks. Colour and marker: fine-tuning tuner; "
               "label: SSA tuner → fine-tuning tuner.")
    if left_out:
        caption += f" Not shown (no finished seed or no memory measured): {', '.join(left_out)}."
    return FigureBlock(path, caption)


def peak_memory(cell: dict) -> float | None:
    """The larger of the cell's SSA and fine-tuning peak memory (MiB): what a GPU must hold to run the cell."""
    peaks = [float(resources["peak_memory_mib"])
             for resources in (cell.get("ssa_resources"), cell.get("finetune_resources"))
             if resources and resources.get("peak_memory_mib") is not None]
    return max(peaks) if peaks else None


def curves_figure(dataset: dict, path: Path) -> FigureBlock | None:
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
        points = [(row.get("epoch", i), number(row[key])) for i, row in enumerate(rows) if _has(row, key)]
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
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    if key == "knn_bal_acc":
        caption = "Weighted-kNN balanced accuracy of the SSA backbone per epoch, one line per SSA tuner."
    else:
        caption = ("SSA loss per epoch, one line per SSA tuner: no curve has kNN values (no labelled val split was "
                   "used during SSA), so the loss is plotted instead; a lower loss does not imply better features.")
    if left_out:
        caption += f" Not shown (no {key} values): {', '.join(left_out)}."
    return FigureBlock(path, caption)


def remove_stale_figures(figures_dir: Path, keep: Sequence[Path]) -> None:
    """Delete report figures of an earlier call that this call did not draw (a dataset renamed or removed)."""
    if not figures_dir.is_dir():
        return
    for path in figures_dir.glob("*.png"):
        if path.name.endswith((MEMORY_FIGURE, CURVES_FIGURE)) and path not in keep:
            path.unlink()


def _has(row: dict, key: str) -> bool:
    return row.get(key) is not None


def _literal(text: str) -> str:
    """``text`` for a matplotlib label: ``$`` escaped, so a name like ``cost $5 $x`` is not parsed as math."""
    return text.replace("$", r"\$")
