"""A preset's SSA against a finished study's, task by task: the study's own SSA run of one tuner, redone with the
preset's keys, then the study's own linear and kNN probes of its export.

    cd <the study's repository root> && python benchmarks/preset_quality.py --study runs/offline_study \
        --preset fast --tuner apla --out runs/preset_quality

For each task of the study whose ``ssa/<tuner>`` run is done, the run's ``config.yaml`` with the preset's keys
over it (``essa.adaptation.PRESETS``: they win, everything else is the study's: data, steps, head, schedules,
seed) runs ``essa adapt`` into ``<out>/<task>/ssa``; each of the study's probes (``probe/pretrained__<budget>``:
its labels, splits and bootstrap) runs on the new export into ``<out>/<task>/probe__<budget>``, and on the study's
export where the study has not probed it yet (``<out>/<task>/study_probe__<budget>``). All resume: SSA from its
last checkpoint, a probe that has its metrics is not run again.

Prints, per task and label budget, the primary metric of the linear probe (test split) with its bootstrap
interval for the study's run and the preset's, whether the preset's lies at or above the low end of the study's
interval, the kNN probe beside it, how far each SSA moved the backbone (weight change) and each DINO loss at the
end against ln(prototypes). ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _probe_rows(path: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads((path / "metrics.json").read_text())}


def _ssa_summary(ssa_dir: Path, weight_change) -> dict:
    """An SSA run's weight change, last DINO loss over ln(prototypes) and training seconds (its metrics and
    resources)."""
    history = json.loads((ssa_dir / "metrics.json").read_text())
    resources = json.loads((ssa_dir / "resources.json").read_text())
    loss, prototypes = (history[-1] if history else {}).get("dino"), resources.get("head", {}).get("prototypes")
    return {"weight_change": weight_change(ssa_dir / "backbone.safetensors"),
            "dino_loss_over_ln_k": loss / math.log(prototypes) if loss and prototypes else None,
            "train_seconds": resources.get("train_seconds")}


def run_task(task_dir: Path, out: Path, preset: str, tuner: str, weight_change) -> list[dict]:
    from essa import config as config_mod
    from essa.adaptation import PRESETS, adapt
    from essa.evaluate.run import evaluate
    from essa.task import TaskDataConfig, load_task

    ssa_dir = task_dir / "ssa" / tuner
    out_ssa = out / "ssa"
    sections = config_mod.overlay(_yaml(ssa_dir / "config.yaml"), PRESETS[preset])
    sections.update(preset=preset, out=str(out_ssa))
    if not (out_ssa / "resources.json").exists():
        adapt(resume=(out_ssa / "config.yaml").exists(), **sections)

    def probe_of(export: Path, probe: dict, into: Path) -> dict[str, dict]:
        """The probe config ``probe`` run on ``export`` into ``into`` (once), and its rows."""
        if not (into / "metrics.json").exists():
            evaluate(**{**probe, "backbone": {**probe["backbone"], "weights": str(export)}, "out": str(into)})
        return _probe_rows(into)

    summaries = {"study": _ssa_summary(ssa_dir, weight_change), "preset": _ssa_summary(out_ssa, weight_change)}
    rows = []
    # the label budgets: every probe of the foundation model; the study's probe of its SSA run, where the study has
    # not run it yet, is run here with the same config (into <out>/study_probe__<budget>)
    for foundation_dir in sorted((task_dir / "probe").glob("pretrained__*")):
        budget = foundation_dir.name.split("__", 1)[1]
        probe_dir = task_dir / "probe" / f"ssa_{tuner}__{budget}"
        probe = _yaml(foundation_dir / "config.yaml")
        probe.pop("out", None)
        study = (_probe_rows(probe_dir) if (probe_dir / "metrics.json").exists()
                 else probe_of(ssa_dir / "backbone.safetensors", probe, out / f"study_probe__{budget}"))
        ours = probe_of(out_ssa / "backbone.safetensors", probe, out / f"probe__{budget}")
        metric = load_task(config_mod.from_dict(TaskDataConfig, probe["data"], "data"), probe["task"],
                           probe["metric"]).primary
        row = {"task": task_dir.name, "budget": budget, "metric": metric}
        for side, probes in (("study", study), ("preset", ours)):
            linear = probes["linear"]
            row[side] = {"linear": linear[metric], "ci": [linear[f"{metric}_ci_low"], linear[f"{metric}_ci_high"]],
                         "knn": probes.get("knn", {}).get(metric), **summaries[side]}
        row["within"] = row["preset"]["linear"] >= row["study"]["ci"][0]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| task | labels | metric | study LP [95 % CI] | preset LP | at or above the CI's low end | "
             "kNN study / preset | weight change study / preset | DINO loss / ln K study / preset |",
             "|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    num = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        s, p = r["study"], r["preset"]
        lines.append(f"| {r['task']} | {r['budget']} | {r['metric']} | {s['linear']:.3f} [{s['ci'][0]:.3f}, "
                     f"{s['ci'][1]:.3f}] | {p['linear']:.3f} | {'yes' if r['within'] else 'no'} | "
                     f"{num(s['knn'])} / {num(p['knn'])} | {pct(s['weight_change'])} / {pct(p['weight_change'])} | "
                     f"{num(s['dino_loss_over_ln_k'])} / {num(p['dino_loss_over_ln_k'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="a study's run directory (its out)")
    parser.add_argument("--preset", default="fast", help="a preset of essa.adaptation.PRESETS")
    parser.add_argument("--tuner", default="apla", help="the study's SSA run to redo (its directory under ssa/)")
    parser.add_argument("--out", default="runs/preset_quality")
    parser.add_argument("--tasks", help="comma-separated task directories of the study (default: all with the run)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    from essa.adaptation import PRESETS
    from essa.config import BackboneConfig, from_dict
    from essa.study import WeightChanges

    if args.preset not in PRESETS:
        parser.error(f"--preset {args.preset!r}: valid choices: {', '.join(PRESETS)}")
    study = Path(args.study)
    config = _yaml(study / "config.yaml")
    weight_change = WeightChanges(from_dict(BackboneConfig, config["backbone"]), config["img_size"])
    wanted = args.tasks.split(",") if args.tasks else None
    tasks = [d for d in sorted(study.iterdir()) if (d / "ssa" / args.tuner / "resources.json").exists()
             and (wanted is None or d.name in wanted)]
    if not tasks:
        parser.error(f"{study} has no finished ssa/{args.tuner} run" + (f" among {wanted}" if wanted else ""))
    rows = []
    for task_dir in tasks:
        rows += run_task(task_dir, Path(args.out) / args.preset / task_dir.name, args.preset, args.tuner,
                         weight_change)
        print(table(rows), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
