"""``essa run``: a tiny study end to end on real ultrasound images, killed midway, resumed, re-run."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image

from essa import report as report_mod, study as study_mod
from essa.commands import main, run as run_command
from essa.errors import InputError, NotFoundError
from tests.conftest import REPO, SHARED

BREAST = SHARED / "data" / "medmnist" / "breastmnist.npz"
pytestmark = pytest.mark.skipif(not BREAST.is_file(), reason=f"shared BreastMNIST not found at {BREAST}")

TINY = {
    "name": "tiny",
    "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False, "model_args": {"patch_size": 8, "depth": 2}},
    "data": {"num_workers": 0, "duplicates": "skip"},
    "datasets": [{"name": "breast", "data": {"root": str(BREAST), "max_train": 48}}],
    "img_size": 32,
    "batch_size": 16,
    "seeds": [0],
    "ssa": {"epochs": 1, "tuners": ["none", {"name": "apla", "options": {"r": 16}}], "max_images": 48,
            "config": {"ssl": {"prototypes": 256, "head_hidden": 128, "head_bottleneck": 64, "n_local": 2},
                       "monitor": {"knn_k": 5, "checkpoint_every_n_steps": 1}}},
    "finetune": {"epochs": 2, "tuners": ["full", "apla"], "config": {"checkpoint_every_n_steps": 1}},
}


def _write(tmp_path, **changes):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**TINY, "out": str(tmp_path / "run"), **changes}))
    return path


def _table_rows(markdown: str, header: str) -> list[list[str]]:
    """The body rows of the first markdown table after the line ``header``."""
    lines = markdown[markdown.index(header):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_a_study_killed_midway_resumes_writes_its_report_and_a_rerun_skips_every_cell(tmp_path, capsys):
    config = _write(tmp_path)
    run = tmp_path / "run" / "breast"
    ssa_export = run / "ssa" / "apla_r16" / "backbone.safetensors"
    first_finetune = run / "finetune" / "apla_r16__full" / "seed_0" / "checkpoints" / "last.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "essa", "run", "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    # the foundation model's cells, the SSA run and its probe finished; its first fine-tuning seed has a checkpoint
    while not first_finetune.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the study did not reach the SSA run's first fine-tuning checkpoint in 300 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stamp = ssa_export.stat().st_mtime_ns
    cells = json.loads((tmp_path / "run" / "cells.json").read_text())
    assert cells[(run / "ssa" / "apla_r16").as_posix()]["status"] == "done"
    assert not (run / "finetune" / "apla_r16__full" / "seed_0" / "classifier.safetensors").exists()

    assert main(["run", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "running: ssa" not in printed and "running: probe" not in printed  # finished cells are skipped
    assert "running: finetune" in printed and ssa_export.stat().st_mtime_ns == stamp
    assert re.search(r"\[study\] 7/7 done\n", printed)  # nothing left: no estimate to give
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["runs"] == {"done": 7, "failed": 0, "total": 7, "by_kind": {
        "ssa": {"done": 1, "failed": 0, "total": 1}, "probe": {"done": 2, "failed": 0, "total": 2},
        "finetune": {"done": 4, "failed": 0, "total": 4}}}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Cells: 7 of 7 done (SSA runs 1 of 1, probes 2 of 2, fine-tuning seeds 4 of 4)" in report

    report = (tmp_path / "run" / "report.md").read_text()
    rows = _table_rows(report, "### Test metrics")
    assert [(r[0], r[1], r[2]) for r in rows] == [("none", "full", "done"), ("none", "apla", "done"),
                                                  ("apla r=16", "full", "done"), ("apla r=16", "apla", "done")]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for row, cell in zip(rows, results["datasets"][0]["cells"], strict=True):
        auc = cell["seeds"]["0"]["auc"]
        # a tiny random-weight ViT on 48 images may predict one class: the report then flags the cell
        value, _, flag = row[4].strip("*").partition(" ⚠ one class")
        assert 0.0 <= auc <= 1.0 and value == f"{auc:.4f} (n=1)"
        epoch = cell["seeds"]["0"]["epoch"]  # the tested checkpoint's (-1: the linear-probe head)
        assert row[3] == ("LP" if epoch == -1 else str(epoch)) + " (1/1)"
        assert bool(flag) == (report_mod.one_class_seeds(cell) > 0)
        assert cell["finetune_resources"]["peak_memory_mib"] > 0 and cell["finetune_resources"]["images_per_s"] > 0
        assert (cell["ssa_resources"] is None) == (cell["ssa"] == "none")
    assert {(p["backbone"], p["method"]) for p in results["datasets"][0]["probes"]} == {
        ("pretrained", "knn"), ("pretrained", "linear"), ("ssa apla r=16", "knn"), ("ssa apla r=16", "linear")}
    assert [p["ssa"] for p in results["datasets"][0]["probes"]] == ["none", "none", "apla r=16", "apla r=16"]
    assert len(results["datasets"][0]["ssa_curves"]["apla r=16"]) == 1  # one SSA epoch, with its kNN
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "apla r=16" in html

    exports = [*run.rglob("backbone.safetensors"), *run.rglob("classifier.safetensors"), *run.rglob("metrics.json")]
    stamps = {p: p.stat().st_mtime_ns for p in exports}
    assert len(stamps) == 1 + 4 + 7  # the SSA export, four classifiers, and the metrics of every cell
    assert main(["run", "--config", str(config)]) == 0
    assert "running:" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    _record_round_trip(tmp_path, config, capsys)

    from essa.report import browser

    if browser.find_browser() is not None:  # the real report, as a reader sees it (tests/test_report_browser.py)
        assert main(["run", "--config", str(config), "--screenshot"]) == 0
        printed = capsys.readouterr()
        assert f"screenshot: {tmp_path / 'run' / 'report.png'}" in printed.out
        assert "report.html at 800 px" not in printed.err  # every image loads, nothing is wider than the page
        with Image.open(tmp_path / "run" / "report.png") as image:
            assert image.width == browser.PAGE_WIDTH


def _record_round_trip(tmp_path, config, capsys):
    """A finished study's record (--save-record: no checkpoints, exports or locks) copied back into an empty study
    directory is the whole study to essa run: nothing runs and the results are the same. With one fine-tuning
    seed's record gone, that seed runs again, and so does the SSA run whose export it starts from (its record moved
    aside), which gives the same export and the same test metrics."""
    import shutil

    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    export = out / "breast/ssa/apla_r16/backbone.safetensors"
    weights = load_file(export)
    assert main(["run", "--config", str(config), "--save-record", str(tmp_path / "record")]) == 0
    assert capsys.readouterr().out == f"record of {out}: {tmp_path / 'record'}\n"
    saved = {p.relative_to(tmp_path / "record").as_posix() for p in (tmp_path / "record").rglob("*") if p.is_file()}
    assert not [p for p in saved if p.endswith((".safetensors", ".ckpt", ".lock")) or "checkpoints/" in p]
    assert {"cells.json", "results.json", "report.md", "breast/ssa/apla_r16/weight_change.json",
            "breast/finetune/apla_r16__apla/seed_0/metrics.json", "breast/probe/pretrained/metrics.json"} <= saved
    assert json.loads((tmp_path / "record" / "breast/ssa/apla_r16/weight_change.json").read_text()) == {
        "weight_change": None, "export": "backbone.safetensors"}  # a random-weight foundation: nothing to compare

    shutil.rmtree(out)
    shutil.copytree(tmp_path / "record", out)
    assert main(["run", "--config", str(config), "--list"]) == 0
    assert capsys.readouterr().out.count("done  ") == 7
    assert main(["run", "--config", str(config)]) == 0
    assert "running:" not in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again["datasets"] == results["datasets"] and again["runs"] == results["runs"]

    (out / "breast/finetune/apla_r16__apla/seed_0/metrics.json").unlink()
    assert main(["run", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "running: ssa" in printed and "running: finetune" in printed and "running: probe" not in printed
    assert "breast/ssa/apla_r16: its export is not here and cells still to run need it" in printed
    assert (out / "breast/ssa/apla_r16.record/resources.json").is_file()
    # the same export: SSA ran here with this process's threads, first with one (float sums in another order)
    redone_weights = load_file(export)
    assert redone_weights.keys() == weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(redone_weights[name], tensor, rtol=1e-4, atol=1e-5)
    redone = json.loads((out / "results.json").read_text())["datasets"][0]
    # the redone fine-tuning seed from the redone export: the same test metrics
    first = results["datasets"][0]["cells"][3]["seeds"]["0"]
    assert redone["cells"][3]["seeds"]["0"] == pytest.approx(first, abs=2e-3)


def test_a_record_keeps_the_weight_change_and_an_ssa_run_counts_done_once_every_cell_after_it_is(tmp_path):
    """save_record writes each export's weight change beside it (here: the shared ViT scaled by 1.01, so exactly
    0.01) and leaves the export out; without its export an SSA run's record is enough only once every cell that
    starts from it is recorded too."""
    from safetensors.torch import load_file, save_file

    weights = SHARED / "models" / "vit_tiny_p4_32_cifar10.safetensors"
    if not weights.is_file():
        pytest.skip(f"shared model not found at {weights}")
    study = study_mod.Study(_write(tmp_path, backbone={"weights": str(weights), "pretrained": False}, probes=["knn"],
                                   finetune={"epochs": 1, "tuners": ["apla"]}))
    ssa = next(c for c in study.cells if c.kind == "ssa")
    after = [c for c in study.cells if c.needs is ssa]
    assert [c.kind for c in after] == ["probe", "finetune"]
    ssa.path.mkdir(parents=True)
    (ssa.path / "resources.json").write_text("{}")
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, ssa.path / "backbone.safetensors")
    assert ssa.done() and study.finished(ssa)

    study.save_record(tmp_path / "record")
    recorded = json.loads((tmp_path / "record" / "breast/ssa/apla_r16/weight_change.json").read_text())
    assert recorded["weight_change"] == pytest.approx(0.01, rel=1e-5)
    assert not (tmp_path / "record" / "breast/ssa/apla_r16/backbone.safetensors").exists()

    (ssa.path / "backbone.safetensors").unlink()
    (ssa.path / "weight_change.json").unlink()
    assert study_mod.WeightChanges(study.cfg.backbone, 32)(ssa.path / "backbone.safetensors") is None  # no record
    (ssa.path / "weight_change.json").write_text(json.dumps(recorded))
    assert study_mod.WeightChanges(study.cfg.backbone, 32)(ssa.path / "backbone.safetensors") == pytest.approx(0.01)
    assert ssa.finished() and not study.finished(ssa)  # a probe and a fine-tuning seed still need the export
    after[0].path.mkdir(parents=True)
    (after[0].path / "metrics.json").write_text("[]")
    assert after[0].finished() and not study.finished(ssa)
    seed = after[1].path
    seed.mkdir(parents=True)
    (seed / "metrics.json").write_text(json.dumps([{"split": "val", "auc": 0.6}]))
    assert not after[1].finished()  # no test row: the seed did not finish
    (seed / "metrics.json").write_text(json.dumps([{"split": "val", "auc": 0.6}, {"split": "test", "auc": 0.5}]))
    assert after[1].finished() and not after[1].done()  # its record, without its classifier
    assert study.finished(ssa)
    assert study.on_disk({c.id: {"status": "done"} for c in study.cells}) == {
        c.id: {"status": "done"} for c in [ssa, *after]}  # the foundation model's cells were never run


def test_save_record_refuses_a_place_inside_the_study_and_a_study_not_run(tmp_path):
    study = study_mod.Study(_write(tmp_path))
    with pytest.raises(NotFoundError, match="holds no study to save the record of"):
        study.save_record(tmp_path / "record")
    (tmp_path / "run").mkdir()
    with pytest.raises(InputError, match="the record goes outside the study's directory"):
        study.save_record(tmp_path / "run" / "record")


def test_cells_and_their_configs(tmp_path):
    study = study_mod.Study(_write(tmp_path, seeds=[0, 1], probes=["knn"]))
    kinds = [c.kind for c in study.cells]
    # the foundation model's probe and 2 fine-tuning tuners x 2 seeds, then the SSA run and the cells after it
    assert kinds == ["probe"] + ["finetune"] * 4 + ["ssa", "probe"] + ["finetune"] * 4
    assert all(c.needs is study.cells[5] for c in study.cells[6:]) and not any(c.needs for c in study.cells[:5])
    ssa = study.adapt_sections(study.datasets[0], study_mod.TunerSpec("apla", {"r": 16}))
    assert ssa["data"]["split"] == "train" and ssa["data"]["val_split"] == "val"
    # the fine-tuning cells' splits, but the whole train split (subsampled by ssa.max_images, not data.max_train)
    assert ssa["data"]["splits"] == {"duplicates": "skip"}
    assert ssa["data"]["max_images"] == 48 and ssa["data"]["extra"] == []
    assert ssa["ssl"]["global_size"] == 32 and ssa["ssl"]["prototypes"] == 256 and ssa["optim"]["epochs"] == 1
    ft = study.finetune_sections(study.datasets[0], study_mod.TunerSpec("apla", {"r": 16}),
                                 study_mod.TunerSpec("full"))
    assert ft["backbone"]["weights"].endswith("breast/ssa/apla_r16/backbone.safetensors")
    assert ft["data"] == {"num_workers": 0, "duplicates": "skip", "root": str(BREAST), "max_train": 48}
    assert (ft["img_size"], ft["optim"]["epochs"], ft["seeds"]) == (32, 2, [0, 1])
    assert study_mod.slug("apla r=64") == "apla_r64" and study_mod.slug("lora r=8 / qkv") == "lora_r8_qkv"


def test_progress_counts_every_cell_and_estimates_from_the_measured_ones(tmp_path):
    study = study_mod.Study(_write(tmp_path, seeds=[0, 1], probes=["knn"]))
    order = ("ssa", "probe", "finetune")
    cells = sorted(study.cells, key=lambda c: order.index(c.kind))  # ssa, probe, probe, 8 x finetune
    assert study.progress({}, cells[0]) == ("[study] 0/11 done, running: ssa " + cells[0].id
                                            + ", 10 left after it (no estimate yet)")
    state = {cells[0].id: {"status": "done", "seconds": 60.0}, cells[1].id: {"status": "failed", "seconds": 1.0}}
    # only the probe and fine-tuning cells are left: no kind of them measured yet (the failed probe does not count)
    assert study.progress(state, cells[2]).endswith(", 1 failed, running: probe " + cells[2].id
                                                     + ", 8 left after it (no estimate yet)")
    state[cells[2].id] = {"status": "done", "seconds": 10.0}
    state[cells[3].id] = {"status": "done", "seconds": 30.0}
    state[cells[4].id] = {"status": "done", "seconds": 50.0}
    # 6 fine-tuning seeds left at their mean, 40 s each
    assert study.progress(state, None) == "[study] 4/11 done, 1 failed, 6 left (about 4 min left)"
    for cell in cells:
        state.setdefault(cell.id, {"status": "done", "seconds": 1.0})
    assert study.progress(state, None) == "[study] 10/11 done, 1 failed"
    assert study.results(state)["runs"]["by_kind"]["probe"] == {"done": 1, "failed": 1, "total": 2}
    # none of these cells has its outputs on disk: recorded done, they are to run again (moved away to be redone)
    assert study.on_disk(state) == {cells[1].id: state[cells[1].id]}
    assert study.progress(study.on_disk(state), None) == "[study] 0/11 done, 1 failed, 10 left (no estimate yet)"


def test_data_normalize_reaches_every_kind_of_cell(tmp_path):
    """A study's data.normalize is SSA's own data key (its statistics: of the SSA images), not a split option, and
    the fine-tuning and probe cells' data key; every cell's config resolves with it."""
    study = study_mod.Study(_write(tmp_path, probes=["knn"], data={"num_workers": 0, "duplicates": "skip",
                                                                   "normalize": "dataset", "normalize_images": 20}))
    apla, full = study_mod.TunerSpec("apla", {"r": 16}), study_mod.TunerSpec("full")
    ssa = study.adapt_sections(study.datasets[0], apla)
    assert (ssa["data"]["normalize"], ssa["data"]["normalize_images"]) == ("dataset", 20)
    assert ssa["data"]["splits"] == {"duplicates": "skip"}
    assert study.finetune_sections(study.datasets[0], apla, full)["data"]["normalize"] == "dataset"
    assert study.probe_sections(study.datasets[0], apla)["data"]["normalize"] == "dataset"
    study.check_configs()


def test_the_preprocessing_flags_of_essa_run_set_the_study_keys():
    from essa.commands import build_parser

    args = build_parser().parse_args(["run", "--config", "s.yaml", "--weights", "w.pth", "--backbone",
                                      "vit_tiny_patch16_224", "--key-map", "module.=", "--normalize", "imagenet"])
    overrides = run_command._overrides(args)
    assert 'backbone.key_map={"module.": ""}' in overrides and "data.normalize=imagenet" in overrides


def test_label_budgets_are_a_grid_axis_that_shares_the_ssa_runs(tmp_path):
    """finetune.label_budgets: fine-tuning cells and probes per budget, each with its own max_train, directory and
    label, all starting from one SSA run per tuner; datasets[i].ssa_epochs sets that task's SSA epochs."""
    datasets = [{"name": "breast", "data": {"root": str(BREAST)}, "ssa_epochs": 3}]
    study = study_mod.Study(_write(tmp_path, datasets=datasets, probes=["linear"], finetune={
        "epochs": 1, "tuners": ["apla"], "label_budgets": [40, "all"]}))
    cells = [(c.kind, c.path.relative_to(tmp_path / "run" / "breast").as_posix()) for c in study.cells]
    assert cells == [("probe", "probe/pretrained__40_labels"), ("probe", "probe/pretrained__all_labels"),
                     ("finetune", "finetune/none__apla__40_labels/seed_0"),
                     ("finetune", "finetune/none__apla__all_labels/seed_0"),
                     ("ssa", "ssa/apla_r16"),
                     ("probe", "probe/ssa_apla_r16__40_labels"), ("probe", "probe/ssa_apla_r16__all_labels"),
                     ("finetune", "finetune/apla_r16__apla__40_labels/seed_0"),
                     ("finetune", "finetune/apla_r16__apla__all_labels/seed_0")]
    dataset, apla = study.datasets[0], study_mod.TunerSpec("apla", {"r": 16})
    assert study.adapt_sections(dataset, apla)["optim"]["epochs"] == 3  # not ssa.epochs (1)
    for budget, max_train in ((40, 40), ("all", None)):
        assert study.finetune_sections(dataset, apla, study_mod.TunerSpec("apla"), budget)["data"]["max_train"] \
            == max_train
        assert study.probe_sections(dataset, apla, budget)["data"]["max_train"] == max_train
    assert study.cells[-1].needs is study.cells[4] and study.cells[-3].needs is study.cells[4]
    # results: one cell per budget, labelled with it; probes named by method and budget
    for budget in ("40_labels", "all_labels"):
        seed_dir = tmp_path / "run" / "breast" / "finetune" / f"apla_r16__apla__{budget}" / "seed_0"
        seed_dir.mkdir(parents=True)
        (seed_dir / "metrics.json").write_text(json.dumps([{"split": "test", "auc": 0.5 + len(budget) / 100}]))
        probe_dir = tmp_path / "run" / "breast" / "probe" / f"pretrained__{budget}"
        probe_dir.mkdir(parents=True)
        (probe_dir / "metrics.json").write_text(json.dumps([{"name": "linear", "auc": 0.6}]))
    results = study.results({})["datasets"][0]
    assert [(c["ssa"], c["finetune"], c["status"]) for c in results["cells"]] == [
        ("none", "apla, 40 labels", "pending"), ("none", "apla, all labels", "pending"),
        ("apla r=16", "apla, 40 labels", "done"), ("apla r=16", "apla, all labels", "done")]
    assert results["cells"][3]["seeds"] == {"0": {"auc": 0.5 + 10 / 100}}
    # beside each label, the tuners it names (the report reads the tuner there, not from the label)
    assert [(c["ssa_tuner"], c["finetune_tuner"]) for c in results["cells"][1:3]] == [
        ({"name": "none", "options": {}}, {"name": "apla", "options": {}}),
        ({"name": "apla", "options": {"r": 16}}, {"name": "apla", "options": {}})]
    assert [p["method"] for p in results["probes"]] == ["linear, 40 labels", "linear, all labels"]
    assert study.results({})["budget"]["label_budgets"] == ["40 labels", "all labels"]
    verdict = report_mod.verdict(results)
    assert any(line.startswith("Fine-tuning apla, 40 labels: no SSA comparison yet") for line in verdict)


#: The cells of TINY (relative to its dataset's directory), as they were before objectives were an axis: a study
#: that runs dinov2 only must keep them, so a running study resumes with the code that has the axis.
TINY_CELLS = ["probe/pretrained", "finetune/none__full/seed_0", "finetune/none__apla/seed_0", "ssa/apla_r16",
              "probe/ssa_apla_r16", "finetune/apla_r16__full/seed_0", "finetune/apla_r16__apla/seed_0"]


def _cells(study, root):
    return [c.path.relative_to(root / "breast").as_posix() for c in study.cells]


def test_one_objective_keeps_the_grid_its_directories_and_labels(tmp_path):
    """No ssa.objectives, or ssa.objectives: [dinov2]: the same cells, directories and labels as before the axis."""
    ssa = TINY["ssa"]
    for changes in ({}, {"ssa": {**ssa, "objectives": ["dinov2"]}}):
        study = study_mod.Study(_write(tmp_path, **changes))
        assert _cells(study, tmp_path / "run") == TINY_CELLS
        assert [s.label for s in study.cfg.ssa.ssa_specs()] == ["none", "apla r=16"]
        assert [s.objective for s in study.cfg.ssa.ssa_specs()] == [None, "dinov2"]
        apla = study_mod.TunerSpec("apla", {"r": 16})
        assert study.adapt_sections(study.datasets[0], apla)["objective"] == "dinov2"
        results = study.results({})
        assert "ssa_objectives" not in results["budget"]
        assert [(c["ssa"], c["objective"]) for c in results["datasets"][0]["cells"]] == [
            ("none", None), ("none", None), ("apla r=16", "dinov2"), ("apla r=16", "dinov2")]
        md = report_mod.summary_markdown(results)
        assert "objective" not in md and "dinov2" not in md  # a dinov2-only report reads as before


def test_objectives_are_a_grid_axis_of_the_ssa_tuners(tmp_path):
    """ssa.objectives: [dinov2, simmim]: every SSA tuner but none once per objective, its directories naming every
    objective but dinov2 (whose runs keep their names), its labels naming each; probes and fine-tuning downstream of
    each SSA run; every cell's resolved config checked."""
    study = study_mod.Study(_write(tmp_path, ssa={**TINY["ssa"], "objectives": ["dinov2", "simmim"]}))
    assert _cells(study, tmp_path / "run") == [
        "probe/pretrained", "finetune/none__full/seed_0", "finetune/none__apla/seed_0",
        "ssa/apla_r16", "probe/ssa_apla_r16", "finetune/apla_r16__full/seed_0", "finetune/apla_r16__apla/seed_0",
        "ssa/simmim__apla_r16", "probe/ssa_simmim__apla_r16", "finetune/simmim__apla_r16__full/seed_0",
        "finetune/simmim__apla_r16__apla/seed_0"]
    dinov2, simmim = study.cells[3], study.cells[7]
    assert [c.needs for c in study.cells] == [None] * 4 + [dinov2] * 3 + [None] + [simmim] * 3
    specs = study.cfg.ssa.ssa_specs()
    assert [(s.label, s.objective, s.dir_name) for s in specs] == [
        ("none", None, "none"), ("apla r=16 (dinov2)", "dinov2", "apla_r16"),
        ("apla r=16 (simmim)", "simmim", "simmim__apla_r16")]
    dataset = study.datasets[0]
    assert [study.adapt_sections(dataset, s)["objective"] for s in specs[1:]] == ["dinov2", "simmim"]
    assert study.adapt_sections(dataset, specs[2])["out"].endswith("breast/ssa/simmim__apla_r16")
    ft = study.finetune_sections(dataset, specs[2], study_mod.TunerSpec("full"))
    assert ft["backbone"]["weights"].endswith("breast/ssa/simmim__apla_r16/backbone.safetensors")
    assert study.probe_sections(dataset, specs[2])["backbone"]["weights"] == ft["backbone"]["weights"]
    study.check_configs()  # each SSA cell resolves an AdaptConfig with its objective
    bad = study_mod.Study(_write(tmp_path, ssa={**TINY["ssa"], "objectives": ["dinov2", "simmim"],
                                                "config": {"simmim": {"mask_ratio": 2}}}))
    with pytest.raises(ValueError, match="cell breast/ssa/apla_r16: simmim.mask_ratio=2"):
        bad.check_configs()  # the first cell's AdaptConfig resolves the simmim section too
    # results: each cell and probe with its objective, labels naming it
    probe_dir = tmp_path / "run" / "breast" / "probe" / "ssa_simmim__apla_r16"
    probe_dir.mkdir(parents=True)
    (probe_dir / "metrics.json").write_text(json.dumps([{"name": "knn", "auc": 0.6}]))
    results = study.results({})
    cells = results["datasets"][0]["cells"]
    assert [(c["ssa"], c["objective"], c["ssa_tuner"]["name"], c["finetune"]) for c in cells] == [
        ("none", None, "none", "full"), ("none", None, "none", "apla"),
        ("apla r=16 (dinov2)", "dinov2", "apla", "full"), ("apla r=16 (dinov2)", "dinov2", "apla", "apla"),
        ("apla r=16 (simmim)", "simmim", "apla", "full"), ("apla r=16 (simmim)", "simmim", "apla", "apla")]
    assert results["datasets"][0]["probes"] == [{"backbone": "ssa apla r=16 (simmim)", "ssa": "apla r=16 (simmim)",
                                                 "objective": "simmim", "method": "knn", "metrics": {"auc": 0.6}}]
    assert results["budget"]["ssa_objectives"] == ["dinov2", "simmim"]
    assert any("with mae or simmim the same decoder" in note for note in results["notes"])


@pytest.mark.slow
def test_a_study_of_the_simmim_objective_runs_it_and_its_report_names_it(tmp_path):
    """ssa.objectives: [simmim], one SSA tuner, one fine-tuning tuner: the SSA cell (in a fresh process, from the
    study's saved config) runs SimMIM and writes its decoder; the report names the objective."""
    config = _write(tmp_path, probes=["knn"],
                    ssa={**TINY["ssa"], "tuners": [{"name": "apla", "options": {"r": 16}}], "objectives": ["simmim"]},
                    finetune={**TINY["finetune"], "epochs": 1, "tuners": ["apla"]})
    assert main(["run", "--config", str(config)]) == 0
    run = tmp_path / "run" / "breast"
    assert sorted(p.relative_to(run).as_posix() for p in run.glob("*/*")) == [
        "finetune/simmim__apla_r16__apla", "probe/ssa_simmim__apla_r16", "ssa/simmim__apla_r16"]
    ssa = run / "ssa" / "simmim__apla_r16"
    assert (ssa / "decoder.safetensors").is_file() and (ssa / "backbone.safetensors").is_file()
    assert yaml.safe_load((ssa / "config.yaml").read_text())["objective"] == "simmim"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    (cell,) = results["datasets"][0]["cells"]
    assert (cell["ssa"], cell["objective"], cell["status"]) == ("apla r=16 (simmim)", "simmim", "done")
    assert [(p["backbone"], p["objective"]) for p in results["datasets"][0]["probes"]] == [
        ("ssa apla r=16 (simmim)", "simmim")]
    assert results["budget"]["ssa_objectives"] == ["simmim"]
    report = (tmp_path / "run" / "report.md").read_text()
    rows = _table_rows(report, "### Test metrics")
    assert [r[:4] for r in rows] == [["apla r=16 (simmim)", "simmim", "apla", "done"]]
    assert "| SSA | objective | fine-tuning | status |" in report and "- ssa_objectives: simmim" in report


@pytest.mark.parametrize("changes, fragment", [
    ({"ssa": {**TINY["ssa"], "objectives": ["dinov2", "byol"]}},
     "ssa.objectives: unknown objective 'byol'; valid choices: dinov2, mae, simmim"),
    ({"ssa": {**TINY["ssa"], "objectives": ["mae", "mae"]}},
     r"ssa.objectives must be distinct, got \['mae', 'mae'\]; valid choices: dinov2, mae, simmim"),
    ({"ssa": {**TINY["ssa"], "objectives": []}}, "ssa.objectives is empty: give at least one of dinov2, mae, simmim"),
    ({"ssa": {**TINY["ssa"], "objectives": ["mae"], "config": {"objective": "mae"}}},
     r"ssa.objectives=\[.mae.\] and ssa.config.objective=.mae. both set the SSA objective: give ssa.objectives "
     "only"),
])
def test_bad_objectives_are_refused_naming_the_valid_ones(tmp_path, changes, fragment):
    from essa.config import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        study_mod.Study(_write(tmp_path, **changes))


@pytest.mark.parametrize("changes, fragment", [
    ({"datasets": []}, "datasets is empty"),
    ({"ssa": {"epochs": 1, "tuners": ["apla", {"name": "apla"}]}}, r"distinct tuners, got \['apla', 'apla'\]"),
    ({"finetune": {"epochs": 1, "tuners": ["aplaa"]}}, "unknown tuner 'aplaa'"),
    ({"probes": ["knn", "svm"]}, "unknown 'svm'; valid choices: knn, linear"),
    ({"datasets": [{"name": "a", "root": "x"}]}, "unknown config key datasets\\[0\\].root"),
    ({"seeds": []}, "non-empty list of distinct integers"),
    ({"finetune": {"epochs": 1, "tuners": ["apla"], "label_budgets": [0]}}, "neither a number of labelled images"),
    ({"finetune": {"epochs": 1, "tuners": ["apla"], "label_budgets": ["most"]}}, "'most' is neither"),
    ({"finetune": {"epochs": 1, "tuners": ["apla"], "label_budgets": ["all", None]}}, "must be distinct"),
    ({"datasets": [{"name": "a", "data": {"root": "x"}, "ssa_epochs": 0}]}, "ssa_epochs must be at least 1"),
])
def test_bad_study_configs_are_explained(tmp_path, changes, fragment):
    with pytest.raises(ValueError, match=fragment):  # ConfigError, or TunerError for a bad tuner
        study_mod.Study(_write(tmp_path, **changes))


def _run_args(*argv):
    """The parsed ``essa run`` arguments of ``--config CONFIG *rest``."""
    from essa.commands import build_parser

    return build_parser().parse_args(["run", "--config", *map(str, argv)])


def test_the_command_lists_cells_maps_scale_flags_and_explains_bad_input(tmp_path, capsys):
    config = _write(tmp_path)
    assert main(["run", "--config", str(config), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7 and all(line.startswith("todo") for line in lines)
    study = study_mod.Study(config, overrides=run_command._overrides(_run_args(
        config, "--devices", "2", "--strategy", "ddp", "--accumulate-grad-batches", "2")))
    assert study.distributed  # several processes: every cell in this one, Lightning starts the others
    ssa = study.adapt_sections(study.datasets[0], study_mod.TunerSpec("apla"))
    assert ssa["trainer"]["devices"] == 2 and ssa["trainer"]["strategy"] == "ddp"
    ft = study.finetune_sections(study.datasets[0], study_mod.TunerSpec("none"), study_mod.TunerSpec("full"))
    assert ft["trainer"]["accumulate_grad_batches"] == 2
    assert main(["run", "--config", str(config), "--set", "img_size=0"]) == 2
    assert "img_size and batch_size must be at least 1" in capsys.readouterr().err


def test_the_offline_study_example_is_the_promised_grid_on_shared_data(monkeypatch):
    """examples/offline_study.yaml: 3 real tasks x 4 SSA tuners x 2 label budgets x APLA fine-tuning x 3 seeds, SSA
    on every train image only, every cell of a task under one budget, from the shared pretrained ViT."""
    if SHARED.resolve() != (REPO.parent / "shared").resolve():
        pytest.skip("the example names ../shared; ESSA_SHARED points elsewhere")
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root
    study = study_mod.Study(REPO / "examples" / "offline_study.yaml")
    kinds = [c.kind for c in study.cells]
    assert kinds.count("finetune") == 3 * 4 * 2 * 3 and kinds.count("ssa") == 3 * 3 and kinds.count("probe") == 24
    assert study.cfg.seeds == [0, 1, 2] and study.cfg.probes == ["knn", "linear"]
    assert study.cfg.backbone.weights.endswith("shared/models/vit_tiny_p4_32_cifar10.safetensors")
    apla = study_mod.TunerSpec("apla")
    for dataset, epochs in zip(study.datasets, (26, 3, 3)):
        task = study.task_of(dataset)  # the data are there and split
        assert len(task.splits["train"]) > 300 and task.splits["val"] and task.splits["test"]
        ssa = study.adapt_sections(dataset, apla)
        assert (ssa["data"]["split"], ssa["data"]["val_split"]) == ("train", "val")
        assert ssa["optim"]["epochs"] == epochs and "max_train" not in ssa["data"]["splits"]
        assert ssa["data"]["max_images"] is None  # SSA: every unlabelled train image
        # about 440 SSA steps on every task
        assert 400 <= epochs * (len(task.splits["train"]) // study.cfg.batch_size) <= 460
        for budget, max_train in ((300, 300), ("all", None)):
            ft = study.finetune_sections(dataset, apla, apla, budget)
            assert ft["data"]["max_train"] == max_train
            assert study.probe_sections(dataset, apla, budget)["data"]["max_train"] == max_train
    brain = study.task_of(study.datasets[2])
    split_of = {r.path: name for name, records in brain.splits.items() for r in records}
    assert brain.duplicates.dropped
    for group in brain.duplicates.groups:  # no image left in two splits
        assert len({split_of[r.path] for r in group.records if r.path in split_of}) <= 1


def test_weight_change_measures_how_far_an_export_moved_from_the_foundation_model(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from essa import backbones, tuners

    torch.manual_seed(0)
    foundation = backbones.create("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    tuners.save_merged(foundation, tmp_path / "foundation.safetensors")
    weights = load_file(tmp_path / "foundation.safetensors")
    moved = dict(weights)
    delta = torch.randn_like(weights["blocks.1.attn.proj.weight"])
    moved["blocks.1.attn.proj.weight"] = weights["blocks.1.attn.proj.weight"] + delta
    save_file(moved, tmp_path / "moved.safetensors")
    backbone = {"name": None, "weights": str(tmp_path / "foundation.safetensors"), "pretrained": False}
    study = study_mod.Study(_write(tmp_path, backbone=backbone))
    norm = sum(float(v.float().square().sum()) for k, v in weights.items() if not k.startswith("head"))
    assert study.weight_change(tmp_path / "foundation.safetensors") == 0.0
    assert study.weight_change(tmp_path / "moved.safetensors") == pytest.approx(
        float(delta.square().sum()) ** 0.5 / norm ** 0.5, rel=1e-5)
    assert study.weight_change(tmp_path / "missing.safetensors") is None
    random_start = study_mod.Study(_write(tmp_path))  # TINY: random weights, no fixed starting point
    assert random_start.weight_change(tmp_path / "moved.safetensors") is None


def test_the_quickstart_and_paper_examples_parse_into_their_grids():
    quickstart = study_mod.Study(REPO / "examples" / "quickstart.yaml")
    kinds = [c.kind for c in quickstart.cells]
    # SSA none / full / apla, probes of the foundation model and both exports, 3 x 2 fine-tuning cells, 1 seed
    assert (kinds.count("ssa"), kinds.count("probe"), kinds.count("finetune")) == (2, 3, 6)
    assert quickstart.cfg.backbone.name == "vit_small_patch14_dinov2.lvd142m" and quickstart.cfg.img_size == 84
    assert quickstart.datasets[0].data["max_train"] == 300
    paper = study_mod.Study(REPO / "examples" / "paper.yaml")
    assert len(paper.cfg.seeds) == 3 and paper.cfg.img_size == 224


def test_a_mistyped_stage_key_of_any_cell_fails_before_any_work(tmp_path, capsys):
    config = _write(tmp_path)
    assert main(["run", "--config", str(config), "--set", "ssa.config.ssl.protoypes=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key ssl.protoypes" in err[0] and "cell breast/ssa/apla_r16" in err[0]
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    assert main(["run", "--config", str(config), "--set", "finetune.config.optim.layer_decay=2"]) == 2
    assert "layer_decay=2" in capsys.readouterr().err
    study = study_mod.Study(config)
    sections = study.probe_sections
    study.probe_sections = lambda *a: {**sections(*a), "knn": {"k": 0}}  # the probe cells resolve EvalConfigs
    with pytest.raises(ValueError, match="cell breast/probe/pretrained: knn.k=0"):
        study.check_configs()


def test_the_command_exits_1_when_a_cell_failed_and_lists_the_failures_last(tmp_path, capsys, monkeypatch):
    config = _write(tmp_path)
    failures = {"breast/finetune/none__full/seed_0": "RuntimeError: boom"}
    monkeypatch.setattr(study_mod.Study, "run", lambda self, log=print: {
        "results": {"datasets": []}, "markdown": "r.md", "html": "r.html", "failed": failures})
    assert main(["run", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].strip() == "breast/finetune/none__full/seed_0: RuntimeError: boom" and "1 of 7 cells" in err[-2]
    monkeypatch.setattr(study_mod.Study, "run", lambda self, log=print: {
        "results": {"datasets": []}, "markdown": "r.md", "html": "r.html", "failed": {}})
    assert main(["run", "--config", str(config)]) == 0


#: Keys of results.json that measure time or memory, which no two runs share.
_MEASURED = {"seconds", "wall_seconds", "train_seconds", "images_per_s", "peak_memory_mib", "eval_seconds",
             "environment", "budget_mib"}  # budget_mib: the memory free when the SSA run started


def _without_measured(value):
    if isinstance(value, dict):
        return {k: _without_measured(v) for k, v in value.items() if k not in _MEASURED}
    if isinstance(value, list):
        return [_without_measured(v) for v in value]
    return value


@pytest.mark.slow
def test_a_study_interrupted_or_a_cell_killed_at_a_seeded_step_resumes_to_the_uninterrupted_results(tmp_path):
    small = {"ssa": {**TINY["ssa"], "tuners": [{"name": "apla", "options": {"r": 16}}]},
             "finetune": {**TINY["finetune"], "tuners": ["apla"]}}  # SSA (3 steps), probes, one fine-tuning
    # every run in a process of one thread: float sums in one order (1 and 2 threads differ in the last bits on
    # some CPUs), so the runs can be compared exactly
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(config, **extra_env):
        return subprocess.run([sys.executable, "-m", "essa", "run", "--config", str(config)], cwd=REPO,
                              env={**env, **extra_env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=600, start_new_session=True)

    (tmp_path / "ref").mkdir()
    reference = _write(tmp_path / "ref", **small)
    assert run(reference).returncode == 0
    written = json.loads((tmp_path / "ref" / "run" / "results.json").read_text())
    assert written["environment"]["session_started"] and written["environment"]["cpu_cores"] >= 1
    assert "## Environment" in (tmp_path / "ref" / "run" / "report.md").read_text()
    expected = _without_measured(written)
    for signal_at, code in (("INT:1", 130), ("KILL:1", 1)):  # the SSA cell's step 1 (ssa/apla_r16)
        (tmp_path / signal_at.replace(":", "_")).mkdir()
        config = _write(tmp_path / signal_at.replace(":", "_"), **small)
        proc = run(config, ESSA_SIGNAL_AT=signal_at)
        assert proc.returncode == code, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        if code == 130:  # Ctrl-C: the cell stopped after its step with a checkpoint, the study with one line
            assert re.fullmatch(r"essa run: interrupted in cell .*breast/ssa/apla_r16: stopped after optimisation "
                                r"step 2 \(epoch 0\), saved in .*last\.ckpt; rerun the same essa run command to "
                                r"continue \(finished cells are kept, this one resumes\)", last), last
        else:  # a killed cell fails, the cells that need it too, and the study says so
            assert "exit code -9" in proc.stderr
        resumed = run(config)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        results = (config.parent / "run" / "results.json").read_text().replace(str(config.parent), str(reference.parent))
        got = _without_measured(json.loads(results))
        assert got == expected, signal_at


def test_a_dataset_key_is_set_from_the_command_line_by_index_or_name(tmp_path, capsys):
    config = _write(tmp_path)
    assert main(["run", "--config", str(config), "--set", "datasets.breast.data.max_train=10",
                 "--set", "datasets.0.ssa_epochs=2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["datasets"][0]["data"]["max_train"] == 10 and printed["datasets"][0]["ssa_epochs"] == 2
    assert not (tmp_path / "run").exists()
