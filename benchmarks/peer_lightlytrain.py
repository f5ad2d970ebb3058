"""Peer benchmark: essa against LightlyTrain, the same SSA step (DINOv2: DINO + iBOT + KoLeo, EMA teacher,
multi-crop), full SSA and APLA (only each block's ``attn.proj`` trains), on the same architecture and head.

    python benchmarks/peer_lightlytrain.py --setup     # once: LightlyTrain in its own virtualenv
    PYTHONPATH=src python benchmarks/peer_lightlytrain.py --json runs/peer_lightlytrain.json

LightlyTrain (AGPL-3.0) is never a dependency of essa, nor imported by essa or its tests: ``--setup`` installs
it with pip into ``benchmarks/.venv-lightlytrain`` (git-ignored), a virtualenv that sees this interpreter's
packages (``--system-site-packages``), so both tools run on the same torch and timm; its side runs in
``benchmarks/_lightlytrain_driver.py`` under that virtualenv's python, through ``lightly_train.pretrain``.

The reference configuration (the defaults): ViT-S/14 with 4 registers (``vit_small_patch14_reg4_dinov2``,
random weights), 112 px global and 2 x 56 px local crops, 8,192 prototypes, head hidden width 1,024 and
bottleneck 256 (3 linear layers, one head shared by DINO and iBOT in both tools), batch 16, 64 chest X-rays,
2 rounds. Each configuration runs in a fresh process, every round runs all of them (the order of the two tools
alternates from round to round, so that load on the machine hits both alike); a row keeps its best throughput and
its highest peak over the rounds, as ``essa bench`` does.

Same rule for both: each optimisation step timed on its own (forward, backward, clipping, AdamW, the teacher's
momentum update; no data loading), the first ``--warmup`` steps dropped, the median of the next ``--steps``;
images/s from wall-clock time, images per CPU-second from the process's CPU time (all threads). Memory: peak
resident set size minus the resident size just before the model was built (CPU).

What differs: essa's step (``essa.bench.ssa_step``) runs on random tensors (the crops made once), LightlyTrain's
on the chest X-rays through its own loader and augmentations (``num_workers=0``; the loading lies between the
timed steps). The recipes are each tool's own (masking, schedules, centering, essa's head-input
standardisation); see the printed notes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-lightlytrain"
DRIVER = HERE / "_lightlytrain_driver.py"
LIGHTLY_TRAIN_VERSION = "0.18.0"
RESULT_PREFIX = "PEER_RESULT "
DATA = HERE.parent.parent / "shared" / "data" / "chest_xray_pneumonia" / "train"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def setup(venv: Path, version: str) -> None:
    """Create the virtualenv (seeing this interpreter's packages: the same torch and timm) and pip-install
    LightlyTrain into it."""
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", f"lightly-train=={version}"], check=True)
    out = subprocess.run([str(venv_python(venv)), "-c", "import lightly_train, torch, timm; "
                          "print(lightly_train.__version__, torch.__version__, timm.__version__)"],
                         check=True, capture_output=True, text=True).stdout.split()
    print(f"LightlyTrain {out[0]} in {venv} (torch {out[1]}, timm {out[2]})")


def pick_images(root: Path, n: int) -> list[str]:
    """``n`` images of ``root``'s class folders, the first of each in name order, as evenly as the classes
    allow."""
    folders = sorted(p for p in root.iterdir() if p.is_dir()) or [root]
    files = [sorted(str(f) for f in d.iterdir() if f.suffix.lower() in {".jpg", ".jpeg", ".png"}) for d in folders]
    picked: list[str] = []
    i = 0
    while len(picked) < n and any(i < len(f) for f in files):
        picked += [f[i] for f in files if i < len(f)]
        i += 1
    if len(picked) < n:
        raise SystemExit(f"{root}: {len(picked)} images, {n} asked for")
    return picked[:n]


def run_lightlytrain(venv: Path, kwargs: dict, timeout: float | None) -> dict:
    env = {**os.environ, "LIGHTLY_TRAIN_EVENTS_DISABLED": "1"}
    proc = subprocess.run([str(venv_python(venv)), str(DRIVER), json.dumps(kwargs)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"LightlyTrain {kwargs['tuner']} failed (exit {proc.returncode}):\n"
                       f"{(proc.stdout + proc.stderr)[-3000:]}")


def run_essa(kwargs: dict, timeout: float | None) -> dict:
    from essa.bench import run_in_fresh_process

    return run_in_fresh_process("essa.bench:ssa_step", kwargs, timeout=timeout)


def names(patterns: list[str]) -> str:
    """The backbone's parameter names (``blocks.*`` patterns, ``mask_token``) that trained, in short."""
    return ", ".join(patterns) if len(patterns) <= 6 else f"{len(patterns)} name patterns"


def keep(rows: dict, key: tuple, result: dict) -> None:
    """``essa bench``'s rule over rounds: best throughput, highest peak (other load only ever slows a run)."""
    row = rows.setdefault(key, {"tool": key[0], "configuration": key[1], **result})
    for k in ("images_per_s", "images_per_cpu_s"):
        row[k] = max(row[k], result[k])
    row["step_s"] = min(row["step_s"], result["step_s"])
    row["peak_mib"] = max(row["peak_mib"], result["peak_mib"])


def table(rows: list[dict]) -> str:
    lines = ["| tool | configuration | trainable backbone params | head (hidden / bottleneck / prototypes, params) "
             "| peak memory (MiB) | images/s (median step) | images per CPU-s | memory vs full "
             "| speed vs full (wall / CPU) |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        full = next(f for f in rows if f["tool"] == r["tool"] and f["configuration"] == "full")
        h = r["head"]
        lines.append(
            f"| {r['tool']} | {r['configuration']} | {r['trainable']:,} | {h['hidden']} / {h['bottleneck']} / "
            f"{h['prototypes']}, {r['head_params']:,} | {r['peak_mib']:.0f} | {r['images_per_s']:.3f} "
            f"| {r['images_per_cpu_s']:.3f} | {r['peak_mib'] / full['peak_mib']:.2f}x "
            f"| {r['images_per_s'] / full['images_per_s']:.2f}x / "
            f"{r['images_per_cpu_s'] / full['images_per_cpu_s']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true",
                    help=f"create {VENV.name} and pip-install lightly-train=={LIGHTLY_TRAIN_VERSION}, then exit")
    ap.add_argument("--venv", type=Path, default=VENV, help="LightlyTrain's virtualenv (default: %(default)s)")
    ap.add_argument("--lightly-train-version", default=LIGHTLY_TRAIN_VERSION, help="for --setup")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("ESSA_PEER_DATA", DATA)),
                    help="image folder (class subfolders allowed; default: %(default)s, or $ESSA_PEER_DATA)")
    ap.add_argument("--images", type=int, default=64, help="images LightlyTrain trains on")
    ap.add_argument("--backbone", default="vit_small_patch14_reg4_dinov2")
    ap.add_argument("--tuners", default="full,apla", help="comma-separated, of full and apla")
    ap.add_argument("--global-size", type=int, default=112)
    ap.add_argument("--local-size", type=int, default=56)
    ap.add_argument("--n-local", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prototypes", type=int, default=8192)
    ap.add_argument("--head-hidden", type=int, default=1024)
    ap.add_argument("--head-bottleneck", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped before the timed ones")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (their median is reported)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    ap.add_argument("--essa-preset", action="append", default=[], metavar="NAME",
                    help="also an essa-only row per round: the SSA preset NAME of essa adapt (e.g. fast; "
                         "LightlyTrain has none), repeatable")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)

    if args.setup:
        setup(args.venv, args.lightly_train_version)
        return 0
    if not venv_python(args.venv).exists():
        print(f"LightlyTrain's virtualenv {args.venv} is missing: run with --setup first", file=sys.stderr)
        return 2
    tuners = args.tuners.split(",")
    from essa.bench import preset_config  # after --setup: essa is only needed to measure
    if not set(tuners) <= {"full", "apla"} or "full" not in tuners:
        ap.error("--tuners: full and apla (full is the reference of the ratios)")
    if args.batch_size > args.images:
        ap.error("--batch-size larger than --images")

    shared = dict(backbone=args.backbone, global_size=args.global_size, local_size=args.local_size,
                  n_local=args.n_local, batch_size=args.batch_size, prototypes=args.prototypes,
                  head_hidden=args.head_hidden, head_bottleneck=args.head_bottleneck, warmup=args.warmup,
                  steps=args.steps)
    images = pick_images(args.data, args.images)
    load_start = os.getloadavg()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)} ({os.cpu_count()} CPUs)")
    print(f"configuration: {args.backbone}, random weights, {args.global_size} px global + {args.n_local} x "
          f"{args.local_size} px local crops, {args.prototypes} prototypes, head hidden {args.head_hidden} / "
          f"bottleneck {args.head_bottleneck}, batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed "
          f"steps, {args.rounds} round(s)")
    print(f"inputs: essa random tensors (essa.bench.ssa_step); LightlyTrain {len(images)} images of {args.data} "
          "through its loader (not timed)", flush=True)

    rows: dict[tuple, dict] = {}
    per_round: list[dict] = []
    presets = [preset_config(name) for name in args.essa_preset]  # (label, tuner, options, step keywords)

    def record(round_: int, tool: str, configuration: str, result: dict, start: float) -> None:
        print(f"  round {round_ + 1}: {tool} {configuration}: {result['images_per_s']:.3f} img/s, "
              f"{result['images_per_cpu_s']:.3f} img/CPU-s, {result['peak_mib']:.0f} MiB "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        keep(rows, (tool, configuration), result)
        per_round.append({"round": round_ + 1, "tool": tool, "configuration": configuration,
                          **{k: result[k] for k in ("peak_mib", "images_per_s", "images_per_cpu_s", "step_s")}})

    for round_ in range(args.rounds):
        tools = ["essa", "LightlyTrain"] if round_ % 2 == 0 else ["LightlyTrain", "essa"]
        for tuner in tuners:
            for tool in tools:
                start = time.perf_counter()
                if tool == "essa":
                    result = run_essa({**shared, "tuner": tuner}, args.timeout)
                    result["head_params"] = result["head"]["params"]
                else:
                    result = run_lightlytrain(args.venv, {**shared, "tuner": tuner, "images": images},
                                              args.timeout)
                    result["trainable"] = result["backbone_trainable"]
                    result["head_params"] = result["head_trainable"]
                record(round_, tool, tuner, result, start)
                if tool == "LightlyTrain":
                    trained, changed = result["trainable_names"], result["changed_names"]
                    print(f"    LightlyTrain {result['lightly_train']}: trainable {names(trained)}, changed by the "
                          f"run {'the same' if changed == trained else names(changed)}; backbone trainable "
                          f"{result['backbone_trainable']:,} of {result['backbone_total']:,}, head "
                          f"{result['head_trainable']:,}, in the optimizer {result['optimizer_total']:,}, "
                          f"teacher trainable {result['teacher_trainable']}", flush=True)
        for label, tuner, options, step in presets:
            start = time.perf_counter()
            result = run_essa({**shared, "tuner": tuner, "options": options, **step}, args.timeout)
            result["head_params"] = result["head"]["params"]
            record(round_, "essa", label, result, start)
    load_end = os.getloadavg()

    ordered = [rows[(tool, tuner)] for tool in ("essa", "LightlyTrain") for tuner in tuners]
    ordered[len(tuners):len(tuners)] = [rows[("essa", label)] for label, *_ in presets]
    print()
    print(table(ordered))
    print()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)}, at end: "
          f"{' '.join(f'{x:.2f}' for x in load_end)} ({os.cpu_count()} CPUs)")
    print("notes: essa steps on random tensors, LightlyTrain on the images (its loading not timed); head params "
          "differ by LightlyTrain's weight-norm gains on the prototypes (one per prototype); both train the "
          "iBOT mask token (not counted in the backbone's trainable params); each tool's own recipe otherwise "
          "(masking ratios, schedules, centering; essa standardises the head's input)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": ordered, "rounds": per_round, "load_start": load_start, "load_end": load_end,
                                         "arguments": {**shared, "images": len(images), "rounds": args.rounds,
                                                       "data": str(args.data)}}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
