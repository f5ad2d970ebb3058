import base64
import copy
import math
import re

import numpy as np
import pytest
from PIL import Image

from essa.report import cell_summary, one_class_seeds, summary_markdown, verdict, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL_NAME = r"<script>alert(1)</script> derm/x=1 $\bad$"  # html, a path and invalid matplotlib math


def seeds(metric, values, **other):
    """Per-seed metric dicts: ``metric`` takes ``values``; every key of ``other`` its own list of the same length."""
    return {str(i): {metric: v, **{k: vs[i] for k, vs in other.items()}} for i, v in enumerate(values)}


def resources(params, memory, speed):
    return {"trainable_params": params, "peak_memory_mib": memory, "images_per_s": speed, "train_seconds": 10.0}


def cell(ssa, finetune, seed_metrics, status="done", ssa_res=None, ft_res=None, error=None):
    return {"ssa": ssa, "finetune": finetune, "status": status, "error": error, "seeds": seed_metrics,
            "ssa_resources": ssa_res, "finetune_resources": ft_res}


FULL_SSA = resources(21_669_514, 1765.0, 0.26)
APLA_SSA = {**resources(1_774_080, 1100.0, 0.40), "weight_change": 0.0012345}
FT = resources(21_669_514, 1384.0, 3.2)

# Known answers for the verdict, fine-tuning "full": apla-SSA beats no-SSA by 0.10 with stds 0.01 -> helped;
# "linear": lora-SSA is 0.02 above no-SSA with stds 0.05 -> within noise; "apla": apla-SSA is 0.20 below -> hurt.
PNEUMONIA_CELLS = [
    cell("none", "full", seeds("auc", [0.80, 0.82, 0.81], balanced_accuracy=[0.70, 0.72, 0.74],
                               auc_ci_low=[0.7, 0.7, 0.7]), ft_res=FT),
    cell("apla", "full", seeds("auc", [0.90, 0.91, 0.92], balanced_accuracy=[0.80, 0.80, 0.83]),
         ssa_res=APLA_SSA, ft_res=FT),
    cell("full", "full", seeds("auc", [0.85, 0.70, 0.95], balanced_accuracy=[0.75, 0.70, 0.80]),
         ssa_res=FULL_SSA, ft_res=FT),
    cell("none", "linear", seeds("auc", [0.70, 0.75, 0.80], balanced_accuracy=[0.6, 0.6, 0.6])),
    cell("lora r=8", "linear", seeds("auc", [0.72, 0.77, 0.82], balanced_accuracy=[0.6, 0.6, 0.6])),
    cell("full", "linear", seeds("auc", [math.nan], balanced_accuracy=[0.5]), status="partial"),
    cell("none", "apla", seeds("auc", [0.80, 0.81, 0.82], balanced_accuracy=[0.7, 0.7, 0.7])),
    cell("apla", "apla", seeds("auc", [0.60, 0.61, 0.62], balanced_accuracy=[0.5, 0.5, 0.5]), ssa_res=APLA_SSA),
    cell("full", "apla", {}, status="failed", error="CUDA out of memory.\nTried to allocate 2 GiB | retry"),
    cell("lora r=8", "full", {}, status="pending"),
]
# One seed per cell: no noise estimate.
DERM_CELLS = [
    cell("none", "full", seeds("balanced_accuracy", [0.61], accuracy=[0.7]), ft_res=FT),
    cell("apla r=64", "full", seeds("balanced_accuracy", [0.66], accuracy=[0.72]), ssa_res=APLA_SSA, ft_res=FT),
]


def make_results():
    return {
        "name": "quickstart",
        "backbone": "vit_small_patch14_dinov2.lvd142m",
        "wall_seconds": 612.3,
        "budget": {"img_size": 112, "batch_size": 32, "ssa_epochs": 5, "seeds": [0, 1, 2]},
        "notes": ["SSA uses the train split only", "learning rates from method.md"],
        "datasets": [
            {"name": "pneumonia", "task": "binary", "primary_metric": "auc",
             "description": "chest_xray_pneumonia: binary, train 300 / val 50 / test 624 images",
             "cells": copy.deepcopy(PNEUMONIA_CELLS),
             "probes": [{"backbone": "pretrained", "ssa": "none", "method": "knn",
                         "metrics": {"auc": 0.8, "balanced_accuracy": 0.7}},
                        {"backbone": "ssa apla", "ssa": "apla", "method": "linear_probe", "metrics": {"auc": 0.85}}],
             "ssa_curves": {"full": [{"epoch": e, "loss": 9 - e, "knn_bal_acc": 0.6 + 0.01 * e} for e in range(3)],
                            "apla": [{"epoch": e, "loss": 8 - e, "knn_bal_acc": 0.62 + 0.02 * e} for e in range(3)],
                            "lora r=8": [{"epoch": 0, "loss": 7.0}]}},
            {"name": EVIL_NAME, "task": "multiclass", "primary_metric": "balanced_accuracy",
             "description": "derm images", "cells": copy.deepcopy(DERM_CELLS), "probes": [],
             "ssa_curves": {"apla r=64": [{"epoch": e, "loss": 5.0 - e} for e in range(3)]}},
        ],
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    results = make_results()
    return out, results, write_report(results, out)


def table_rows(markdown, first_header):
    """The body rows (lists of cell texts) of every markdown table whose first header cell is ``first_header``."""
    tables, current = [], None
    for line in markdown.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if current is None:
                current = [] if cells[0] == first_header else "skip"
                if current != "skip":
                    tables.append(current)
            elif current != "skip":
                current.append(cells)
        elif not line.startswith("|---"):
            current = None
    return tables


def expected(values, n_shown=True):
    values = np.asarray(values, dtype=float)
    text = f"{values.mean():.4f}" + (f" ± {values.std(ddof=1):.4f}" if len(values) >= 2 else "")
    return f"{text} (n={len(values)})" if n_shown else text


def test_files_and_figures(report):
    out, _, paths = report
    assert paths["markdown"] == out / "report.md" and paths["markdown"].is_file()
    assert paths["html"] == out / "report.html" and paths["html"].is_file()
    names = sorted(p.name for p in paths["figures"])
    assert names == ["pneumonia_metric_vs_memory.png", "pneumonia_ssa_curves.png",
                     "script_alert_1_script_derm_x_1_bad_metric_vs_memory.png",
                     "script_alert_1_script_derm_x_1_bad_ssa_curves.png"]
    for path in paths["figures"]:
        assert path.parent == out / "figures"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            assert image.width > 100 and image.height > 100
    assert not list(out.rglob("*.tmp"))


def test_header(report):
    _, _, paths = report
    md = paths["markdown"].read_text()
    assert "# Study report: quickstart" in md
    assert "Backbone: vit_small_patch14_dinov2.lvd142m" in md
    assert "Total wall time: 10 min 12 s" in md
    assert "Cells: 9 done, 1 partial, 1 pending, 1 failed (of 12)" in md
    for line in ["img_size: 112", "batch_size: 32", "ssa_epochs: 5", "seeds: 0, 1, 2",
                 "- SSA uses the train split only", "- learning rates from method.md"]:
        assert line in md


def test_the_header_counts_cells_as_essa_run_does_and_the_table_rows_apart(tmp_path):
    from essa.report.tables import header_blocks

    base = {"name": "s", "backbone": "b", "wall_seconds": 1.0, "budget": {}, "notes": [],
            "datasets": [{"name": "d", "cells": [{"status": "done"}, {"status": "pending"}]}]}
    runs = {"done": 4, "failed": 1, "total": 105, "by_kind": {"ssa": {"done": 3, "failed": 1, "total": 12},
                                                              "probe": {"done": 1, "failed": 0, "total": 21},
                                                              "finetune": {"done": 0, "failed": 0, "total": 72}}}
    lines = header_blocks({**base, "runs": runs})[1].items
    assert "Cells: 4 of 105 done, 1 failed (SSA runs 3 of 12, probes 1 of 21, fine-tuning seeds 0 of 72)" in lines
    assert ("Fine-tuning rows (an SSA tuner, a fine-tuning tuner and a label budget, over the seeds): 1 done, "
            "0 partial, 1 pending, 0 failed (of 2)") in lines
    assert "Cells: 1 done, 0 partial, 1 pending, 0 failed (of 2)" in header_blocks(base)[1].items  # older results


def test_metric_table_one_row_per_cell_with_mean_std(report):
    _, results, paths = report
    md = paths["markdown"].read_text()
    tables = table_rows(md, "SSA")  # per dataset: the metrics table, then the resources table
    assert len(tables) == 4
    for dataset, metrics_rows in zip(results["datasets"], tables[::2]):
        assert [row[:2] for row in metrics_rows] == [[c["ssa"], c["finetune"]] for c in dataset["cells"]]
    header = next(line for line in md.splitlines() if line.startswith("| SSA | fine-tuning | status | auc"))
    assert header == "| SSA | fine-tuning | status | auc (primary) | balanced_accuracy |"  # no CI-bound column
    rows = tables[0]
    for row, c in zip(rows, PNEUMONIA_CELLS):
        aucs = [s["auc"] for s in c["seeds"].values()]
        bal = [s["balanced_accuracy"] for s in c["seeds"].values()]
        if aucs:
            assert row[3].strip("*") == expected(aucs)
            assert row[4] == expected(bal, n_shown=False)
        else:
            assert row[3] == row[4] == "–"
    assert rows[0][3] == "0.8100 ± 0.0100 (n=3)"
    assert rows[5][2:4] == ["partial", "nan (n=1)"]  # a NaN seed shows, it is not dropped
    assert rows[8][2].startswith("failed: CUDA out of memory. Tried to allocate 2 GiB \\| retry")
    assert rows[9][2] == "pending"
    assert tables[2][1][3] == "**0.6600 (n=1)**"  # one seed: no std


def test_best_primary_in_bold(report):
    _, _, paths = report
    rows = table_rows(paths["markdown"].read_text(), "SSA")[0]
    bold = [i for i, row in enumerate(rows) for text in row if text.startswith("**")]
    assert bold == [1]  # apla -> full, mean 0.91
    assert rows[1][3] == "**0.9100 ± 0.0100 (n=3)**"
    assert "<strong>0.9100 ± 0.0100 (n=3)</strong>" in paths["html"].read_text()


def test_resources_table(report):
    _, _, paths = report
    rows = table_rows(paths["markdown"].read_text(), "SSA")[1]
    assert rows[1][2:] == ["1,774,080", "1,100", "0.40", "21,669,514", "1,384", "3.20"]
    assert rows[0][2:5] == ["–", "–", "–"]  # no SSA
    assert rows[3][2:] == ["–"] * 6  # no resources at all


def test_probes_table(report):
    _, _, paths = report
    md = paths["markdown"].read_text()
    assert table_rows(md, "backbone") == [[["pretrained", "knn", "0.8000", "0.7000"],
                                           ["ssa apla", "linear_probe", "0.8500", "–"]]]


def test_html_is_self_contained_and_escaped(report):
    _, _, paths = report
    page = paths["html"].read_text()
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    assert r"<h2>Dataset: &lt;script&gt;alert(1)&lt;/script&gt; derm/x=1 $\bad$</h2>" in page
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == len(paths["figures"]) == 4
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_SIGNATURE
    # header + one row per cell or probe; the summary: one row per dataset and SSA tuner, per dataset and FT tuner
    assert page.count("<tr>") == 2 * (1 + 10) + 2 * (1 + 2) + (1 + 2) + (1 + 4 + 2) + (1 + 3 + 1)


def test_summary_tables_pivot_cells_by_ssa_tuner_and_match_the_report(report):
    _, results, paths = report
    md = paths["markdown"].read_text()
    summary, resources = table_rows(md, "task")
    assert [row[:3] for row in summary] == [
        ["pneumonia", "auc", "none"], ["pneumonia", "auc", "apla"], ["pneumonia", "auc", "full"],
        ["pneumonia", "auc", "lora r=8"], [EVIL_NAME, "balanced_accuracy", "none"],
        [EVIL_NAME, "balanced_accuracy", "apla r=64"]]
    header = next(line for line in md.splitlines() if line.startswith("| task | metric"))
    assert header == ("| task | metric | SSA | FT full | FT linear | FT apla | knn probe | linear_probe probe | "
                      "SSA params | SSA peak MiB | SSA images/s | SSA weight change |")
    # apla SSA: fine-tuning full (the best cell, bold), linear (no such cell), apla; its probe; its SSA resources
    assert summary[1][3:] == ["**0.9100 ± 0.0100 (n=3)**", "–", "0.6100 ± 0.0100 (n=3)", "–", "0.8500",
                              "1,774,080", "1,100", "0.40", "0.12 %"]
    assert summary[0][3:8] == ["0.8100 ± 0.0100 (n=3)", "0.7500 ± 0.0500 (n=3)", "0.8100 ± 0.0100 (n=3)",
                               "0.8000", "–"]  # no SSA: the foundation model's probe
    assert summary[2][5] == "–" and summary[3][3] == "–"  # a failed and a pending cell
    assert summary[2][-1] == "–"  # full SSA: no weight change recorded
    assert summary[5][3:5] == ["**0.6600 (n=1)**", "–"]
    assert resources == [["pneumonia", "full", "21,669,514", "1,384", "3.20"],
                         ["pneumonia", "linear", "–", "–", "–"], ["pneumonia", "apla", "–", "–", "–"],
                         [EVIL_NAME, "full", "21,669,514", "1,384", "3.20"]]
    assert summary_markdown(results) in md  # what a README quotes is what the report says


def test_figure_captions(report):
    _, _, paths = report
    md = paths["markdown"].read_text()
    assert "![pneumonia_metric_vs_memory](figures/pneumonia_metric_vs_memory.png)" in md
    assert "the larger of its SSA and fine-tuning peaks" in md
    assert "Not shown (no finished seed or no memory measured): none → linear" in md
    assert "Weighted-kNN balanced accuracy" in md and "Not shown (no knn_bal_acc values): lora r=8." in md
    assert "no curve has kNN values" in md  # the second dataset plots its loss


def test_verdict_known_cases():
    results = make_results()
    lines = verdict(results["datasets"][0])
    assert lines[0] == "Best cell: SSA apla + fine-tuning full, auc 0.9100 ± 0.0100 (n=3)."
    by_tuner = {line.split(":")[0]: line for line in lines[1:4]}
    assert "SSA helped" in by_tuner["Fine-tuning full"] and "+0.1000" in by_tuner["Fine-tuning full"]
    assert "within noise" in by_tuner["Fine-tuning linear"] and "helped" not in by_tuner["Fine-tuning linear"]
    assert "SSA hurt" in by_tuner["Fine-tuning apla"] and "-0.2000" in by_tuner["Fine-tuning apla"]
    apla_vs_full = [line for line in lines if "vs SSA full" in line]
    assert len(apla_vs_full) == 1  # fine-tuning full; with apla fine-tuning the full-SSA cell failed
    assert f"auc {0.91 - np.mean([0.85, 0.70, 0.95]):+.4f}" in apla_vs_full[0]
    assert "within noise" in apla_vs_full[0]  # full SSA's std (0.126) covers the 0.077
    assert f"SSA peak memory ×{1100 / 1765:.2f}" in apla_vs_full[0]
    assert f"SSA throughput ×{0.40 / 0.26:.2f}" in apla_vs_full[0]

    derm = verdict(results["datasets"][1])
    assert "single seed: no noise estimate" in derm[1] and "+0.0500" in derm[1]


def test_the_verdict_reads_each_cells_tuner_not_its_label():
    """A cell's SSA tuner is its recorded ``ssa_tuner`` name: custom labels stay in the no-SSA and APLA-vs-full
    comparisons, and a label that merely starts with a tuner's name is not taken for it."""
    def tuned(label, name, values, ssa_res=None):
        return {**cell(label, "full", seeds("auc", values), ssa_res=ssa_res),
                "ssa_tuner": {"name": name, "options": {}}, "finetune_tuner": {"name": "full", "options": {}}}

    cells = [tuned("foundation", "none", [0.80, 0.81, 0.82]),
             tuned("cheap adapter", "apla", [0.90, 0.91, 0.92], ssa_res=APLA_SSA),
             tuned("everything", "full", [0.85, 0.86, 0.87], ssa_res=FULL_SSA),
             tuned("apla baseline", "lora", [0.70, 0.71, 0.72])]
    lines = verdict({"name": "d", "primary_metric": "auc", "cells": cells})
    assert lines[1].startswith("Fine-tuning full: best SSA cell (cheap adapter) 0.9100 (n=3) vs no SSA 0.8100 (n=3)")
    apla_vs_full = [line for line in lines if "vs SSA everything" in line]
    assert len(apla_vs_full) == 1  # the LoRA cell labelled "apla baseline" is not an APLA cell
    assert apla_vs_full[0].startswith("Fine-tuning full: SSA cheap adapter vs SSA everything: auc +0.0500")
    assert f"SSA peak memory ×{1100 / 1765:.2f}" in apla_vs_full[0]
    # without ssa_tuner (results written before the study recorded it) the labels are read: none says "none" or
    # starts with "full", so neither comparison is made
    old = [{k: v for k, v in c.items() if k not in ("ssa_tuner", "finetune_tuner")} for c in cells]
    lines = verdict({"name": "d", "primary_metric": "auc", "cells": old})
    assert "no SSA comparison yet" in lines[1] and not any("vs SSA" in line for line in lines)


def test_verdict_without_finished_cells():
    dataset = {"name": "d", "primary_metric": "auc", "cells": [cell("none", "full", {}, status="pending")]}
    assert verdict(dataset) == ["No cell has a finished seed with a auc value yet."]


def test_cell_summary():
    c = cell("apla", "full", seeds("auc", [0.9, 0.8, 0.7]))
    mean, std, n = cell_summary(c, "auc")
    assert (mean, n) == (pytest.approx(0.8), 3) and std == pytest.approx(np.std([0.9, 0.8, 0.7], ddof=1))
    mean, std, n = cell_summary(cell("a", "b", seeds("auc", [0.9])), "auc")
    assert mean == 0.9 and math.isnan(std) and n == 1
    assert math.isnan(cell_summary(cell("a", "b", seeds("auc", [0.9, None])), "auc").mean)  # JSON null = NaN
    assert cell_summary(cell("a", "b", {}), "auc")[2] == 0


def test_second_call_overwrites(tmp_path):
    results = make_results()
    write_report(results, tmp_path)
    pending = results["datasets"][0]["cells"][9]
    pending.update(status="done", seeds=seeds("auc", [0.99, 0.97]))
    results["datasets"][1]["name"] = "derm"
    results["datasets"][1]["ssa_curves"] = {}
    paths = write_report(results, tmp_path)
    md = paths["markdown"].read_text()
    assert "**0.9800 ± 0.0141 (n=2)**" in md and "Cells: 10 done, 1 partial, 0 pending, 1 failed" in md
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(p.name for p in paths["figures"])
    assert "derm_ssa_curves.png" not in md  # no curves: no plot
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".*"))


def test_missing_required_key(tmp_path):
    results = make_results()
    del results["datasets"][0]["cells"][0]["finetune"]
    with pytest.raises(ValueError, match="cell 0 of dataset 'pneumonia' lacks 'finetune'"):
        write_report(results, tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_interrupted_call_keeps_previous_report(tmp_path, monkeypatch):
    results = make_results()
    write_report(results, tmp_path)
    before = (tmp_path / "report.md").read_text()

    def fail(rows, path, **kwargs):
        path.write_bytes(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr("essa.report.figures.accuracy_vs_memory_png", fail)
    results["datasets"][0]["cells"][9].update(status="done", seeds=seeds("auc", [0.99]))
    with pytest.raises(KeyboardInterrupt):
        write_report(results, tmp_path)
    assert (tmp_path / "report.md").read_text() == before
    assert (tmp_path / "figures" / "pneumonia_metric_vs_memory.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_classifier_that_predicts_one_class_is_flagged_and_never_bolded(tmp_path):
    # The quickstart's full fine-tuning: 154 of 156 test images predicted "benign" (114 of them are): AUC 0.93 is
    # the best number of the dataset, but the classifier is useless at its decision threshold.
    collapsed = seeds("auc", [0.93], balanced_accuracy=[0.524], predicted_share=[154 / 156], label_share=[114 / 156])
    healthy = seeds("auc", [0.80], balanced_accuracy=[0.71], predicted_share=[0.70], label_share=[114 / 156])
    # A test split that is itself 97 % one class: predicting that class as often as it occurs is not a collapse.
    skewed = seeds("auc", [0.75], balanced_accuracy=[0.60], predicted_share=[0.97], label_share=[0.97])
    cells = [cell("none", "full", collapsed), cell("none", "apla", healthy), cell("apla", "apla", skewed),
             cell("apla", "full", seeds("auc", [0.70]))]  # no shares (an older run): not flagged
    results = {"name": "flag", "datasets": [{"name": "breast", "task": "binary", "primary_metric": "auc",
                                             "cells": cells}]}
    assert [one_class_seeds(c) for c in cells] == [1, 0, 0, 0]
    paths = write_report(results, tmp_path)
    md = paths["markdown"].read_text()
    rows = table_rows(md, "SSA")[0]
    assert rows[0][3] == "0.9300 (n=1) ⚠ one class (1/1 seeds)"
    assert rows[1][3] == "**0.8000 (n=1)**"  # the best healthy cell is bold, not the higher collapsed one
    assert [row[3] for row in rows[2:]] == ["0.7500 (n=1)", "0.7000 (n=1)"]
    assert "predicted_share" not in md and "label_share" not in md  # no column for the shares
    assert "⚠ one class: seeds whose most-predicted class takes at least 95% of the test images" in md
    summary = table_rows(md, "task")[0]
    assert summary[0][3:5] == ["0.9300 (n=1) ⚠ one class (1/1 seeds)", "**0.8000 (n=1)**"]
    lines = verdict(results["datasets"][0])
    assert lines[0] == "Best cell: SSA none + fine-tuning apla, auc 0.8000 (n=1)."
    assert lines[1].startswith("Predicts (almost) one class, so its auc is not a usable result: "
                               "SSA none + fine-tuning full (1/1 seeds)")
    assert "<strong>0.8000 (n=1)</strong>" in paths["html"].read_text()

    # healthy results: no flag, no note
    results["datasets"][0]["cells"] = cells[1:]
    md = write_report(results, tmp_path)["markdown"].read_text()
    assert "one class" not in md and not any("one class" in line for line in verdict(results["datasets"][0]))


def test_a_study_of_two_objectives_shows_each_cells_objective_and_compares_apla_with_full_per_objective(tmp_path):
    """Results of ssa.objectives: [dinov2, mae]: an objective column beside every SSA column (– without SSA), and
    APLA-SSA compared with the full-SSA cell of its own objective; results without the key (or dinov2 only) get no
    column, as a study of one objective always did."""
    def tuned(label, name, objective, values, ssa_res=None):
        return {**cell(label, "full", seeds("auc", values), ssa_res=ssa_res), "objective": objective,
                "ssa_tuner": {"name": name, "options": {}}, "finetune_tuner": {"name": "full", "options": {}}}

    cells = [tuned("none", "none", None, [0.80, 0.81, 0.82]),
             tuned("apla (dinov2)", "apla", "dinov2", [0.90, 0.91, 0.92], ssa_res=APLA_SSA),
             tuned("apla (mae)", "apla", "mae", [0.70, 0.71, 0.72], ssa_res=APLA_SSA),
             tuned("full (dinov2)", "full", "dinov2", [0.85, 0.86, 0.87], ssa_res=FULL_SSA),
             tuned("full (mae)", "full", "mae", [0.95, 0.96, 0.97], ssa_res=FULL_SSA)]
    probes = [{"backbone": "pretrained", "ssa": "none", "objective": None, "method": "knn", "metrics": {"auc": 0.7}},
              {"backbone": "ssa apla (mae)", "ssa": "apla (mae)", "objective": "mae", "method": "knn",
               "metrics": {"auc": 0.75}}]
    results = {"name": "two", "datasets": [{"name": "breast", "task": "binary", "primary_metric": "auc",
                                                   "cells": cells, "probes": probes}]}
    md = write_report(results, tmp_path)["markdown"].read_text()
    lines = md.splitlines()
    assert "| SSA | objective | fine-tuning | status | auc (primary) |" in lines
    assert ("| SSA | objective | fine-tuning | SSA params | SSA peak MiB | SSA images/s | FT params | FT peak MiB | "
            "FT images/s |") in lines
    assert "| backbone | objective | method | auc |" in lines
    assert next(line for line in lines if line.startswith("| task |")).startswith(
        "| task | metric | SSA | objective | FT full | knn probe |")
    metrics, resources_rows = table_rows(md, "SSA")
    assert [row[:3] for row in metrics] == [["none", "–", "full"], ["apla (dinov2)", "dinov2", "full"],
                                            ["apla (mae)", "mae", "full"], ["full (dinov2)", "dinov2", "full"],
                                            ["full (mae)", "mae", "full"]]
    assert metrics[4][4] == "**0.9600 ± 0.0100 (n=3)**"  # the bold primary metric, one column further right
    assert [row[1] for row in resources_rows] == ["–", "dinov2", "mae", "dinov2", "mae"]
    assert table_rows(md, "backbone") == [[["pretrained", "–", "knn", "0.7000"],
                                           ["ssa apla (mae)", "mae", "knn", "0.7500"]]]
    summary = table_rows(md, "task")[0]
    assert [row[2:6] for row in summary] == [["none", "–", "0.8100 ± 0.0100 (n=3)", "0.7000"],
                                             ["apla (dinov2)", "dinov2", "0.9100 ± 0.0100 (n=3)", "–"],
                                             ["apla (mae)", "mae", "0.7100 ± 0.0100 (n=3)", "0.7500"],
                                             ["full (dinov2)", "dinov2", "0.8600 ± 0.0100 (n=3)", "–"],
                                             ["full (mae)", "mae", "**0.9600 ± 0.0100 (n=3)**", "–"]]
    apla_vs_full = [line for line in verdict(results["datasets"][0]) if " vs SSA full" in line]
    assert [line.split(": auc")[0] for line in apla_vs_full] == [
        "Fine-tuning full: SSA apla (dinov2) vs SSA full (dinov2)",
        "Fine-tuning full: SSA apla (mae) vs SSA full (mae)"]
    assert "auc +0.0500; APLA-SSA better" in apla_vs_full[0] and "auc -0.2500; APLA-SSA worse" in apla_vs_full[1]

    # dinov2 only, or no objective recorded (results.json of a study before the axis): no objective column
    for keep in (lambda c: {**c, "objective": c["objective"] and "dinov2"},
                 lambda c: {k: v for k, v in c.items() if k != "objective"}):
        plain = copy.deepcopy(results)
        plain["datasets"][0]["cells"] = [keep(c) for c in cells]
        plain["datasets"][0]["probes"] = [keep(p) for p in probes]
        md = write_report(plain, tmp_path)["markdown"].read_text()
        assert "objective" not in md and "| SSA | fine-tuning | status | auc (primary) |" in md.splitlines()


def test_the_environment_block_names_versions_machine_and_load_and_old_results_render_without_it(tmp_path):
    from essa.report.tables import environment_lines, header_blocks
    from essa.study.results import environment

    env = environment("2026-12-01 15:54 UTC", [1.5, 2.0, 2.25])
    import torch

    import essa

    assert env["essa"] == essa.__version__ and env["torch"] == torch.__version__ and env["gpus"] == []
    assert env["session_started"] == "2026-12-01 15:54 UTC" and len(env["load_average_now"]) == 3
    lines = environment_lines({**env, "platform": "Linux-6", "cpu_cores": 2, "written": "2026-12-01 18:00 UTC",
                               "load_average_now": [4.0, 3.5, 3.0]})
    assert lines[0] == (f"essa {essa.__version__}, torch {torch.__version__}, timm {env['timm']}, "
                        f"Lightning {env['lightning']}, Python {env['python']}")
    assert lines[1] == "Machine: Linux-6, 2 CPU cores, GPUs: none"
    assert lines[2] == "Written 2026-12-01 18:00 UTC by the session started 2026-12-01 15:54 UTC"
    assert lines[3].startswith("Load average (1 / 5 / 15 min): 1.50 / 2.00 / 2.25 when the session started, "
                               "4.00 / 3.50 / 3.00 when this was written")
    base = {"name": "s", "datasets": []}
    assert not any(getattr(b, "text", None) == "Environment" for b in header_blocks(base))
    assert any(getattr(b, "text", None) == "Environment" for b in header_blocks({**base, "environment": env}))


def test_cells_tested_with_their_linear_probe_head_are_marked_and_named(tmp_path):
    # The offline study's breast cells: fine-tuning lost the LP head's val AUC in its first epoch and never got it
    # back, so every seed tested epoch -1 and the "fine-tuning" number is the linear probe's.
    probe_only = seeds("auc", [0.8678, 0.8678, 0.8678], epoch=[-1, -1, -1])
    mixed = seeds("auc", [0.80, 0.82, 0.79], epoch=[-1, 4, 5])
    trained = seeds("auc", [0.85, 0.86, 0.84], epoch=[5, 5, 5])
    cells = [cell("none", "apla", probe_only), cell("apla", "apla", mixed), cell("full", "apla", trained)]
    results = {"name": "lp", "datasets": [{"name": "breast", "task": "binary", "primary_metric": "auc",
                                           "cells": cells}]}
    md = write_report(results, tmp_path)["markdown"].read_text()
    rows = table_rows(md, "SSA")[0]
    assert [row[3] for row in rows] == ["LP (3/3)", "LP, 4, 5", "5 (3/3)"]  # the tested-epoch column
    assert rows[0][4] == "**0.8678 ± 0.0000 (n=3)**"  # the metric column moved right, still bold
    assert "epoch" not in metric_names_of(md)  # the epoch is no metric column
    summary = table_rows(md, "task")[0]
    assert summary[0][3] == "**0.8678 ± 0.0000 (n=3) †**"
    assert summary[1][3] == "0.8033 ± 0.0153 (n=3)" and summary[2][3] == "0.8500 ± 0.0100 (n=3)"
    assert "†: every seed was tested with its linear-probe head" in md
    lines = verdict(results["datasets"][0])
    assert lines[1] == ("Fine-tuning never beat its linear-probe start on the val split, so every seed was tested "
                        "with the linear-probe head (these cells measure the probe, not fine-tuning): "
                        "SSA none + fine-tuning apla.")

    # results without epochs (older studies): no column, no mark, no line
    for c in cells:
        for seed in c["seeds"].values():
            del seed["epoch"]
    md = write_report(results, tmp_path)["markdown"].read_text()
    assert "tested epoch" not in md and "†" not in md
    assert not any("linear-probe start" in line for line in verdict(results["datasets"][0]))


def metric_names_of(markdown):
    """The header cells of the per-dataset metrics table."""
    header = next(line for line in markdown.splitlines() if line.startswith("| SSA |"))
    return [c.strip() for c in header.split("|")[1:-1]]
