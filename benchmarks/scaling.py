"""Scale-out and memory options of SSA (``essa adapt``), on real chest X-rays, each configuration in a fresh process.

    python benchmarks/scaling.py                                       # ViT-S/16, 96 px, global batch 16
    python benchmarks/scaling.py --model vit_tiny_patch16_224 --img-size 64 --steps 2

Two tables:

1. Throughput of 1 vs 2 processes (torchrun, gloo on CPU, DDP) at the same global batch: training images/s of all
   processes together (optimisation steps only, as ``resources.json`` records them). Each process computes with
   one thread, as each GPU process has its own device: 2 processes at twice the images/s of 1 would be perfect
   scaling, and what is missing is the cost of DDP (gradient all-reduce, gathered health checks, sharded kNN).
2. Peak training memory of one process for full and APLA SSA: plain, with activation checkpointing
   (``trainer.grad_checkpointing``), and with gradient accumulation (``trainer.accumulate_grad_batches=2`` at half
   the batch: the same optimisation step). Memory is ``essa.train.resources.MemoryMeter``'s (CPU: peak resident set size
   minus the size before the model was built).

Random-weight backbones (no download); the DINO head has ``--prototypes`` prototypes. Each run trains ``--steps``
optimisation steps of one epoch; the first step's one-off costs are included, so compare rows, not absolute speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from essa.bench import run_in_fresh_process

REPO = Path(__file__).resolve().parents[1]
XRAYS = Path(os.environ.get("ESSA_SHARED", REPO.parent / "shared")) / "data" / "chest_xray_pneumonia" / "train"


def adapt_resources(model: str, img_size: int, tuner: str, batch_size: int, steps: int, prototypes: int,
                    out: str, trainer: dict | None = None) -> dict:
    """Train ``steps`` SSA steps with ``essa.adapt`` and return its ``resources.json`` (every process runs it)."""
    from essa.adaptation import adapt

    trainer = trainer or {}
    processes = trainer.get("devices", 1) if isinstance(trainer.get("devices", 1), int) else 1
    images = batch_size * processes * trainer.get("accumulate_grad_batches", 1) * steps
    result = adapt(
        backbone={"name": model, "pretrained": False}, tuner={"name": tuner},
        data={"root": str(XRAYS), "max_images": images, "num_workers": 1},
        ssl={"prototypes": prototypes, "global_size": img_size, "n_local": 2},
        optim={"epochs": 1, "batch_size": batch_size, "warmup": 0},
        monitor={"checkpoint_every_n_steps": 0}, trainer=trainer, out=out,
        trainer_kwargs={"enable_progress_bar": False},
    )
    return result["resources"]


def _distributed(args, processes: int, out: Path) -> dict:
    """images/s of ``processes`` torchrun processes at the global batch ``args.batch_size``."""
    kwargs = dict(model=args.model, img_size=args.img_size, tuner="apla", batch_size=args.batch_size // processes,
                  steps=args.steps, prototypes=args.prototypes, out=str(out / f"ddp{processes}"),
                  trainer={"devices": processes, "strategy": "ddp", "accelerator": "cpu"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           __file__, "--worker", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{processes} processes failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / f"ddp{processes}" / "resources.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (even)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prototypes", type=int, default=4096)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one torchrun process
    args = parser.parse_args()
    if args.worker:
        adapt_resources(**json.loads(args.worker))
        return
    if not XRAYS.is_dir():
        sys.exit(f"chest X-rays not found at {XRAYS} (set ESSA_SHARED)")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        print(f"{args.model}, {args.img_size} px global crops (2) + 2 local, APLA SSA, global batch "
              f"{args.batch_size}, {args.steps} steps, {os.cpu_count()} CPU cores")
        print("| processes (1 thread each) | batch per process | images/s (all processes) | speed-up "
              "| peak memory per process (MiB) |")
        print("|---:|---:|---:|---:|---:|")
        single = None
        for processes in (1, 2):
            r = _distributed(args, processes, out)
            single = single or r["images_per_s"]
            print(f"| {processes} | {args.batch_size // processes} | {r['images_per_s']:.2f} "
                  f"| {r['images_per_s'] / single:.2f}x | {r['peak_memory_mib']:.0f} |", flush=True)

        print(f"\n{args.model}, one process, batch {args.batch_size} per optimisation step")
        print("| tuner | memory option | peak memory (MiB) | vs plain | images/s |")
        print("|---|---|---:|---:|---:|")
        options = [("plain", args.batch_size, {}),
                   ("activation checkpointing", args.batch_size, {"grad_checkpointing": True}),
                   ("accumulate 2 x half batch", args.batch_size // 2, {"accumulate_grad_batches": 2})]
        for tuner in ("full", "apla"):
            plain = None
            for label, batch_size, trainer in options:
                r = run_in_fresh_process("benchmarks.scaling:adapt_resources", dict(
                    model=args.model, img_size=args.img_size, tuner=tuner, batch_size=batch_size, steps=args.steps,
                    prototypes=args.prototypes, out=str(out / f"{tuner}-{label}"), trainer=trainer))
                plain = plain or r["peak_memory_mib"]
                print(f"| {tuner} | {label} | {r['peak_memory_mib']:.0f} | {r['peak_memory_mib'] / plain:.2f}x "
                      f"| {r['images_per_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
