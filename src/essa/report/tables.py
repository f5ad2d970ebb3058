"""The tables of a report: the study's header and summary, and per dataset its test metrics, resources and
frozen-feature probes."""

from __future__ import annotations

import math

import numpy as np

from essa.evaluate.metrics import format_summary
from essa.report.document import Block, Bullets, Heading, Table
from essa.report.formatting import (
    MISSING,
    ONE_CLASS_MARK,
    ONE_CLASS_RULE,
    format_duration,
    format_resource,
    format_value,
    one_class_note,
    status_text,
)
from essa.report.stats import (best, cell_summary, finished, lp_head_only, metric_names, number, objective,
                               one_class_seeds, seed_epochs, shows_objective)

STATUSES = ("done", "partial", "pending", "failed")
KINDS = {"ssa": "SSA runs", "probe": "probes", "finetune": "fine-tuning seeds"}
#: The summary's mark on a fine-tuning cell whose every seed was tested with the linear-probe head.
LP_HEAD_MARK = "†"
#: What the tested-epoch column shows for a seed tested with its linear-probe head (``head.init: lp``, epoch -1).
LP_EPOCH_TEXT = "LP"


def runs_line(runs: dict) -> str:
    """``Cells: 4 of 105 done, 1 failed (SSA runs 3 of 12, probes 1 of 21, fine-tuning seeds 0 of 72)``: the count
    ``essa run``'s progress lines give."""
    kinds = ", ".join(f"{KINDS.get(kind, kind)} {n['done']} of {n['total']}" for kind, n in runs["by_kind"].items())
    failed = f", {runs['failed']} failed" if runs["failed"] else ""
    return f"Cells: {runs['done']} of {runs['total']} done{failed} ({kinds})"


def header_blocks(results: dict) -> list[Block]:
    """Title, backbone, wall time, cell counts, budget and notes of the study."""
    cells = [cell for dataset in results["datasets"] for cell in dataset["cells"]]
    counts = {status: 0 for status in STATUSES}
    for cell in cells:
        status = str(cell.get("status") or "pending")
        counts[status] = counts.get(status, 0) + 1
    count_text = ", ".join(f"{n} {status}" for status, n in counts.items())
    # results that count the cells as essa run does say so; the rows of the results tables are then rows
    rows = (f"Fine-tuning rows (an SSA tuner, a fine-tuning tuner and a label budget, over the seeds): {count_text} "
            f"(of {len(cells)})" if results.get("runs") else f"Cells: {count_text} (of {len(cells)})")
    blocks: list[Block] = [
        Heading(f"Study report: {results.get('name', MISSING)}", 1),
        Bullets([f"Backbone: {results.get('backbone', MISSING)}",
                 f"Total wall time: {format_duration(results.get('wall_seconds'))}",
                 *([runs_line(results["runs"])] if results.get("runs") else []), rows]),
    ]
    env = results.get("environment")
    if env:
        blocks += [Heading("Environment", 2), Bullets(environment_lines(env))]
    budget = results.get("budget") or {}
    if budget:
        blocks += [Heading("Budget", 2), Bullets([f"{key}: {format_value(value)}" for key, value in budget.items()])]
    notes = results.get("notes") or []
    if notes:
        blocks += [Heading("Notes", 2), Bullets([str(note) for note in notes])]
    return blocks


def environment_lines(env: dict) -> list[str]:
    """The environment block: versions, machine, when, and the load that every time and throughput depends on."""
    def load(values) -> str:
        return "unknown" if not values else " / ".join(f"{v:.2f}" for v in values)

    gpus = ", ".join(env.get("gpus") or []) or "none"
    return [f"essa {env.get('essa', MISSING)}, torch {env.get('torch', MISSING)}, timm {env.get('timm', MISSING)}, "
            f"Lightning {env.get('lightning', MISSING)}, Python {env.get('python', MISSING)}",
            f"Machine: {env.get('platform', MISSING)}, {env.get('cpu_cores') or '?'} CPU cores, GPUs: {gpus}",
            f"Written {env.get('written', MISSING)} by the session started {env.get('session_started') or MISSING}",
            f"Load average (1 / 5 / 15 min): {load(env.get('load_average_at_start'))} when the session started, "
            f"{load(env.get('load_average_now'))} when this was written; times and throughputs measured under a "
            f"load above the cores are slower than the machine can do"]


def summary_tables(results: dict) -> list[Table]:
    """The study on one screen: per dataset and SSA tuner, the primary metric of each fine-tuning tuner, the
    frozen-feature probes and the SSA resources; then the fine-tuning resources per dataset and tuner."""
    finetunes = list(dict.fromkeys(str(c["finetune"]) for d in results["datasets"] for c in d["cells"]))
    methods = list(dict.fromkeys(str(p.get("method")) for d in results["datasets"] for p in d.get("probes") or []))
    keys = ("trainable_params", "peak_memory_mib", "images_per_s")
    with_objective = shows_objective(c for d in results["datasets"] for c in d["cells"])
    rows, bold, resource_rows = [], set(), []
    for dataset in results["datasets"]:
        metric, cells = dataset["primary_metric"], dataset["cells"]
        top = best(cells, metric, healthy=True)
        probes = {(str(p.get("ssa")), str(p.get("method"))): (p.get("metrics") or {}).get(metric)
                  for p in dataset.get("probes") or []}
        for ssa in dict.fromkeys(str(c["ssa"]) for c in cells):
            row = [str(dataset["name"]), metric, ssa]
            if with_objective:
                row.append(objective_text(next(c for c in cells if str(c["ssa"]) == ssa)))
            ssa_resources = {}
            for finetune in finetunes:
                cell = next((c for c in cells if str(c["ssa"]) == ssa and str(c["finetune"]) == finetune), None)
                row.append(MISSING if cell is None else
                           format_summary(cell_summary(cell, metric), with_n=True) + one_class_note(cell)
                           + (f" {LP_HEAD_MARK}" if lp_head_only(cell) else ""))
                ssa_resources = ssa_resources or (cell or {}).get("ssa_resources") or {}
                if top is not None and cell is top[0]:
                    bold.add((len(rows), len(row) - 1))
            row += [MISSING if probes.get((ssa, m)) is None else f"{number(probes[(ssa, m)]):.4f}" for m in methods]
            row += [format_resource(key, ssa_resources.get(key)) for key in (*keys, "weight_change")]
            rows.append(row)
        for finetune in dict.fromkeys(str(c["finetune"]) for c in cells):
            measured = [c.get("finetune_resources") or {} for c in cells if str(c["finetune"]) == finetune]
            resource_rows.append([str(dataset["name"]), finetune, *(
                format_resource(key, float(np.mean(values)) if values else None)
                for key in keys for values in [[r[key] for r in measured if r.get(key) is not None]])])
    header = ["task", "metric", "SSA", *(["objective"] if with_objective else []), *(f"FT {f}" for f in finetunes),
              *(f"{m} probe" for m in methods),
              "SSA params", "SSA peak MiB", "SSA images/s", "SSA weight change"]
    note = ("Test split. FT <tuner>: the primary metric after SSA (row) and fine-tuning with that tuner, mean ± std "
            "over seeds (n); bold: the best cell of the task. Probes: frozen features of the SSA backbone (none: "
            "the foundation model). SSA params: trainable backbone parameters during SSA (the DINO head aside). "
            "SSA weight change: ||W_ssa - W_0|| / ||W_0|| of the backbone weights, the SSA export against the "
            "foundation model (near 0: SSA left the model as it was).")
    if with_objective:
        note += f" Objective: what SSA optimised ({MISSING}: no SSA)."
    if any(one_class_seeds(c) for d in results["datasets"] for c in d["cells"]):
        note += f" {ONE_CLASS_MARK}: {ONE_CLASS_RULE}; never bold."
    if any(lp_head_only(c) for d in results["datasets"] for c in d["cells"]):
        note += (f" {LP_HEAD_MARK}: every seed was tested with its linear-probe head (head.init: lp): no epoch of "
                 "fine-tuning beat it on the val split, so the cell measures the linear probe, not fine-tuning.")
    return [Table(header, rows, frozenset(bold), note),
            Table(["task", "fine-tuning", "FT params", "FT peak MiB", "FT images/s"], resource_rows,
                  note="Fine-tuning resources: means over every SSA starting point and seed of the tuner.")]


def metrics_table(dataset: dict) -> Table:
    """One row per cell: tuners, status and every test metric as mean ± std; the best primary mean in bold."""
    primary = dataset["primary_metric"]
    names = metric_names(dataset)
    objectives = _ObjectiveColumn(dataset["cells"])
    rows, primary_means = [], []
    # results written before the study kept each seed's tested epoch have no such column
    with_epochs = any("epoch" in seed for cell in dataset["cells"] for seed in (cell.get("seeds") or {}).values())
    for cell in dataset["cells"]:
        summaries = [cell_summary(cell, name) for name in names]
        n_primary = summaries[0].n
        metric_cells = [format_summary(s, with_n=(i == 0 or s.n != n_primary)) for i, s in enumerate(summaries)]
        metric_cells[0] += one_class_note(cell)
        tested = [tested_epochs(cell)] if with_epochs else []
        rows.append([str(cell["ssa"]), *objectives(cell), str(cell["finetune"]), status_text(cell), *tested,
                     *metric_cells])
        healthy = finished(summaries[0]) and not one_class_seeds(cell)
        primary_means.append(summaries[0].mean if healthy else -math.inf)
    top = max(primary_means, default=-math.inf)
    column = 3 + len(objectives.header) + with_epochs
    bold = frozenset((i, column) for i, mean in enumerate(primary_means) if mean == top and top > -math.inf)
    note = (f"Test split; mean ± std (ddof=1) over finished seeds, n = seeds; the std only with two seeds or more. "
            f"Bold: best {primary} (primary metric, higher is better).")
    if with_epochs:
        note += (f" Tested epoch: the checkpoint each seed was tested with, the best on the val split (0: the first "
                 f"epoch; {LP_EPOCH_TEXT}: the linear-probe head before fine-tuning's first step, kept because no "
                 f"epoch of fine-tuning beat it on val).")
    if any(one_class_seeds(c) for c in dataset["cells"]):
        note += f" {ONE_CLASS_MARK}: {ONE_CLASS_RULE}; never bold."
    header = ["SSA", *objectives.header, "fine-tuning", "status", *(["tested epoch"] if with_epochs else []),
              f"{primary} (primary)", *names[1:]]
    return Table(header, rows, bold, note)


def tested_epochs(cell: dict) -> str:
    """The epochs the cell's finished seeds were tested at, in seed order: ``"LP (3/3)"`` when every seed shares
    one, else ``"LP, 4, 5"``; ``LP`` for the linear-probe head (epoch -1)."""
    texts = [MISSING if e is None else LP_EPOCH_TEXT if e < 0 else str(int(e)) for e in seed_epochs(cell)]
    if not texts:
        return MISSING
    if len(set(texts)) == 1:
        return f"{texts[0]} ({len(texts)}/{len(texts)})"
    return ", ".join(texts)


def resources_table(dataset: dict) -> Table:
    """One row per cell: trainable parameters, peak memory and throughput of its SSA and fine-tuning runs."""
    keys = ("trainable_params", "peak_memory_mib", "images_per_s")
    objectives = _ObjectiveColumn(dataset["cells"])
    rows = []
    for cell in dataset["cells"]:
        ssa = cell.get("ssa_resources") or {}
        finetune = cell.get("finetune_resources") or {}
        rows.append([str(cell["ssa"]), *objectives(cell), str(cell["finetune"]),
                     *(format_resource(key, ssa.get(key)) for key in keys),
                     *(format_resource(key, finetune.get(key)) for key in keys)])
    header = ["SSA", *objectives.header, "fine-tuning", "SSA params", "SSA peak MiB", "SSA images/s",
              "FT params", "FT peak MiB", "FT images/s"]
    return Table(header, rows, note="Fine-tuning (FT) resources are means over its finished seeds; "
                                    f"{MISSING} = not measured (no SSA, or no finished seed).")


def probes_table(dataset: dict) -> Table | None:
    """Frozen-feature probes: backbone x method -> primary metric and balanced accuracy (those present)."""
    probes = dataset.get("probes") or []
    if not probes:
        return None
    candidates = list(dict.fromkeys([dataset["primary_metric"], "balanced_accuracy"]))
    names = [name for name in candidates if any(name in (p.get("metrics") or {}) for p in probes)]
    objectives = _ObjectiveColumn(probes)
    rows = []
    for probe in probes:
        values = probe.get("metrics") or {}
        rows.append([str(probe.get("backbone", MISSING)), *objectives(probe), str(probe.get("method", MISSING)),
                     *(f"{number(values[n]):.4f}" if n in values else MISSING for n in names)])
    return Table(["backbone", *objectives.header, "method", *names], rows,
                 note="Frozen features of the backbone before SSA (pretrained) and after each SSA; test split.")


def objective_text(entry: dict) -> str:
    """A cell's or probe's SSA objective as a table shows it (``mae``; "–" without SSA)."""
    return objective(entry) or MISSING


class _ObjectiveColumn:
    """The objective column of a table of ``entries`` (cells or probes): a header and one value per row when
    any has an objective but dinov2 (:func:`~essa.report.stats.shows_objective`), else none."""

    def __init__(self, entries):
        self.header = ["objective"] if shows_objective(entries) else []

    def __call__(self, entry: dict) -> list[str]:
        return [objective_text(entry)] if self.header else []
