"""How a report writes its values: resources, durations, budget values, cell names, statuses and the one-class
mark (seed summaries: :func:`essa.evaluate.metrics.format_summary`)."""

from __future__ import annotations

import math
from typing import Any

from essa.report.stats import ONE_CLASS_SHARE, one_class_seeds

MISSING = "–"
ONE_CLASS_MARK = "⚠ one class"
ONE_CLASS_RULE = (f"seeds whose most-predicted class takes at least {ONE_CLASS_SHARE:.0%} of the test images, more "
                  "than the test split's most frequent class does (the classifier predicts (almost) one class)")
_MAX_ERROR_CHARS = 200


def format_resource(key: str, value: Any) -> str:
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


def format_duration(seconds: float | None) -> str:
    """``612.3`` -> ``"10 min 12 s"``; hours from one hour on."""
    if seconds is None or not math.isfinite(float(seconds)):
        return MISSING
    seconds = round(float(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def format_value(value: Any) -> str:
    """A budget value: lists comma-joined, everything else as ``str``."""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return MISSING if value is None else str(value)


def cell_name(cell: dict) -> str:
    return f"SSA {cell['ssa']} + fine-tuning {cell['finetune']}"


def status_text(cell: dict) -> str:
    """The cell's status, with its error (on one line, shortened) when it has one."""
    status = str(cell.get("status") or "pending")
    error = cell.get("error")
    if not error:
        return status
    error = " ".join(str(error).split())
    if len(error) > _MAX_ERROR_CHARS:
        error = error[: _MAX_ERROR_CHARS - 1] + "…"
    return f"{status}: {error}"


def one_class_note(cell: dict) -> str:
    """``" ⚠ one class (1/3 seeds)"`` for a flagged cell, else ``""``."""
    k = one_class_seeds(cell)
    return f" {ONE_CLASS_MARK} ({k}/{len(cell.get('seeds') or {})} seeds)" if k else ""
