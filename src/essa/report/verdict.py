"""The verdict of a study on one dataset: conclusions computed from its cells' numbers, one line each."""

from __future__ import annotations

from collections.abc import Sequence

from essa.evaluate.metrics import format_summary
from essa.report.formatting import cell_name, format_resource
from essa.report.stats import (
    ONE_CLASS_SHARE,
    Summary,
    best,
    cell_summary,
    finished,
    is_baseline,
    lp_head_only,
    objective,
    one_class_seeds,
    ssa_tuner,
)


def verdict(dataset: dict) -> list[str]:
    """Conclusions computed from one dataset's cells, one line each (also printed by the study to the terminal):
    the best cell (of those not flagged for predicting one class); the flagged cells; the cells tested with their
    linear-probe head on every seed (:func:`lp_head_only`); per fine-tuning tuner, the
    best SSA cell against the cell without SSA ("helped", "within noise", "hurt", or "single seed: no noise
    estimate"); and APLA-SSA against full-SSA cells of the same SSA objective (metric, SSA peak memory and
    throughput ratios) where both exist. A cell's SSA tuner is its recorded ``ssa_tuner`` name, whatever its label
    (:func:`ssa_tuner`)."""
    metric = dataset["primary_metric"]
    cells = dataset["cells"]
    flagged = [f"{cell_name(c)} ({one_class_seeds(c)}/{len(c.get('seeds') or {})} seeds)"
               for c in cells if one_class_seeds(c)]
    flag_line = ([f"Predicts (almost) one class, so its {metric} is not a usable result: {'; '.join(flagged)} "
                  f"(at least {ONE_CLASS_SHARE:.0%} of the test images in one class, more than the test split "
                  "holds)."] if flagged else [])
    found = best(cells, metric, healthy=True)
    if found is None:
        return [f"No cell has a finished seed with a {metric} value yet"
                + (" that does not predict one class." if flagged else "."), *flag_line]
    cell, summary = found
    lines = [f"Best cell: {cell_name(cell)}, {metric} {format_summary(summary, with_n=True)}.", *flag_line]
    probe_only = [cell_name(c) for c in cells if lp_head_only(c)]
    if probe_only:
        lines.append(f"Fine-tuning never beat its linear-probe start on the val split, so every seed was tested "
                     f"with the linear-probe head (these cells measure the probe, not fine-tuning): "
                     f"{'; '.join(probe_only)}.")
    finetune_tuners = list(dict.fromkeys(str(c["finetune"]) for c in cells))
    lines += [_ssa_effect(cells, tuner, metric) for tuner in finetune_tuners]
    lines += [line for tuner in finetune_tuners for line in _apla_vs_full(cells, tuner, metric)]
    return lines


def _ssa_effect(cells: Sequence[dict], finetune: str, metric: str) -> str:
    """Whether SSA helped fine-tuning with ``finetune``: its best SSA cell against its cell without SSA."""
    same = [c for c in cells if str(c["finetune"]) == finetune]
    baseline = best([c for c in same if is_baseline(c)], metric)
    adapted = best([c for c in same if not is_baseline(c)], metric)
    if baseline is None or adapted is None:
        return (f"Fine-tuning {finetune}: no SSA comparison yet (needs a finished cell without SSA and one "
                "with SSA).")
    (cell, a), (_, b) = adapted, baseline
    judged = _judge(a, b, better="SSA helped", worse="SSA hurt",
                    neutral="SSA did not help beyond seed-to-seed noise")
    return (f"Fine-tuning {finetune}: best SSA cell ({cell['ssa']}) {a.mean:.4f} (n={a.n}) vs no SSA "
            f"{b.mean:.4f} (n={b.n}): {metric} {a.mean - b.mean:+.4f}; {judged}.")


def _apla_vs_full(cells: Sequence[dict], finetune: str, metric: str) -> list[str]:
    """APLA-SSA cells against the best full-SSA cell of the same SSA objective, both fine-tuned with ``finetune``:
    metric difference, and the ratios of SSA peak memory and SSA throughput (the efficiency claim of the method)."""
    same = [c for c in cells if str(c["finetune"]) == finetune]
    lines = []
    for cell in same:
        a = cell_summary(cell, metric)
        if ssa_tuner(cell) != "apla" or not finished(a):
            continue
        full = best([c for c in same if ssa_tuner(c) == "full" and objective(c) == objective(cell)], metric)
        if full is None:
            continue
        full_cell, b = full
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
            f"({format_resource(key, value)} vs {format_resource(key, base)} {unit})")
