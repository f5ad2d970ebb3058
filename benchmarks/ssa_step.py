"""One SSA step of the full objective per objective and tuner, each configuration in a fresh process.

    python benchmarks/ssa_step.py                          # ViT-S/14 and ViT-B/14, 224/98 px, 2+8 crops, batch 4
    python benchmarks/ssa_step.py --models vit_small_patch14_dinov2 --batch-size 2 --prototypes 4096
    python benchmarks/ssa_step.py --only apla --no-recompute --loss-chunk 0   # as before the memory work
    python benchmarks/ssa_step.py --objectives dinov2,mae,simmim   # every objective x tuner
    python benchmarks/ssa_step.py --only apla --patch-drop 0.5 --apla-blocks last:4   # the two speed knobs

With ``--objectives`` (default dinov2), each objective's rows are measured against full SSA with the same
objective (MAE and SimMIM: one crop of ``--global-size`` px per image, the objective's default masks and decoder).

A step: student on 2 masked global crops and 8 local crops, teacher on the 2 global crops, DINO + iBOT + KoLeo,
backward, gradient clipping, AdamW, momentum update, set up as ``essa adapt`` sets it up (frozen block stretches
recomputed, optim.recompute_frozen; the loss scored 64 rows at a time). Prints peak training memory and images/s
per tuner and the ratio of each to full SSA measured in the same run, where the memory goes (weights, gradients,
AdamW states, activations kept for the backward pass, the rest: transients and allocator slack), the FLOPs of a step
(counted, so independent of the machine and its load: full SSA's over a tuner's is the speed-up that a machine
whose time goes to matrix products can show), then checks the
targets (ahead of the reference 0.60x memory, 1.25x throughput): APLA-SSA (whole W_O) at most 0.55x the peak memory
and at least 1.35x the throughput of full SSA, on each model.

``--patch-drop P`` adds each chosen tuner with ``ssl.patch_drop=P`` (PatchDropout on the student's CLS-only views);
``--apla-blocks last:N`` adds APLA on the last N blocks with the truncated backward (``ssl.truncated_backward=auto``)
and without it (``off``), and with both flags also with PatchDropout; every row against full SSA of the same run.
"""

from __future__ import annotations

import argparse
import json

from essa.bench import breakdown_table, compute_table, markdown_table, measure_objectives

CONFIGS = [
    ("full", "full", {}),
    ("apla", "apla", {}),
    ("apla r=64", "apla", {"r": 64}),
    ("lora r=8", "lora", {"r": 8}),
    ("bitfit", "bitfit", {}),
    ("vpt deep 10", "vpt", {"tokens": 10}),
]


def speed_configs(configs: list[tuple], patch_drop: float | None, apla_blocks: str | None) -> list[tuple]:
    """``configs`` and the rows of ``--patch-drop`` and ``--apla-blocks`` (see the module docstring)."""
    out = list(configs)
    if patch_drop is not None:
        out += [(f"{label} patch_drop={patch_drop:g}", tuner, options, {"ssl_options": {"patch_drop": patch_drop}})
                for label, tuner, options in configs]
    if apla_blocks is not None:
        blocks = apla_blocks if apla_blocks.startswith("last:") else [int(b) for b in apla_blocks.split(",")]
        label = f"apla blocks {apla_blocks}"
        out += [(f"{label}, truncation off", "apla", {"blocks": blocks}, {"ssl_options": {"truncated_backward": "off"}}),
                (f"{label}, truncated", "apla", {"blocks": blocks})]
        if patch_drop is not None:
            out.append((f"{label}, truncated, patch_drop={patch_drop:g}", "apla", {"blocks": blocks},
                        {"ssl_options": {"patch_drop": patch_drop}}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_small_patch14_dinov2,vit_base_patch14_dinov2")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=None, help="comma-separated labels to run (full is always run)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the grid; best throughput is kept")
    parser.add_argument("--no-recompute", action="store_true",
                        help="keep the activations of frozen stretches (optim.recompute_frozen=false)")
    parser.add_argument("--loss-chunk", type=int, default=None,
                        help="rows of (rows x prototypes) logits scored at a time (default: the loss's own, 64); "
                             "0: all at once")
    parser.add_argument("--objectives", default="dinov2",
                        help="comma-separated SSA objectives (dinov2, mae, simmim); each tuner runs with each")
    parser.add_argument("--patch-drop", type=float, default=None,
                        help="also run each chosen tuner with ssl.patch_drop=P (the share of patches dropped)")
    parser.add_argument("--apla-blocks", default=None,
                        help="also run APLA on these blocks (last:N for the last N) with the truncated backward "
                             "and without it")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()

    models = args.models.split(",")
    configs = speed_configs([c for c in CONFIGS if args.only is None or c[0] in args.only.split(",") + ["full"]],
                            args.patch_drop, args.apla_blocks)
    objectives = args.objectives.split(",")
    rows = measure_objectives(objectives, models, configs, repeats=args.repeats,
                              global_size=args.global_size, local_size=args.local_size, n_local=args.n_local,
                              batch_size=args.batch_size, prototypes=args.prototypes, steps=args.steps,
                              warmup=args.warmup, device=args.device, recompute_frozen=not args.no_recompute,
                              loss_chunk="default" if args.loss_chunk is None else args.loss_chunk or None)
    if objectives != ["dinov2"]:
        print(f"\nobjectives: {', '.join(objectives)} (rows labelled 'objective tuner'; ratios against full SSA "
              "with the same objective)")
    views = []
    if "dinov2" in objectives:
        views.append(f"dinov2: 2 x {args.global_size} px + {args.n_local} x {args.local_size} px crops each, "
                     f"{args.prototypes} prototypes")
    if set(objectives) - {"dinov2"}:
        views.append(f"{'/'.join(o for o in objectives if o != 'dinov2')}: one {args.global_size} px crop each, "
                     "the objective's default masks and decoder")
    print(f"\nbatch {args.batch_size} images ({'; '.join(views)}), {args.steps} timed steps after {args.warmup} warm-up, "
          f"device {args.device}, frozen stretches {'kept' if args.no_recompute else 'recomputed'}, loss chunk "
          f"{'default' if args.loss_chunk is None else args.loss_chunk or 'none'}")
    print(markdown_table(rows, "SSA tuner"))
    print("\nwhere the peak memory goes (MiB; weights count the teacher's own copies once):")
    print(breakdown_table(rows, "SSA tuner"))
    print("\ncompute per step (matrix products and attention, forward + backward + recomputation; the same on any "
          "machine): full SSA's FLOPs over a tuner's bound the speed-up where matrix products dominate the time")
    print(compute_table(rows, "SSA tuner"))
    if args.patch_drop is not None or args.apla_blocks is not None:
        print("\nthe frozen prefix per row (ssl.truncated_backward): blocks run without autograd on views without a "
              "mask token; shared: the teacher's prefix of the unmasked global crops reused by the student")
        for r in rows:
            t = r.get("truncated_backward")
            if t:
                print(f"  {r['model']} {r['label']}: {t['frozen_blocks']} blocks"
                      f"{', shared with the teacher' if t['shared_prefix'] else ''}"
                      f"{'' if t['reason'] is None else ' (' + t['reason'] + ')'}")
    # CPU seconds per image are robust to other load on a shared machine; on a GPU, wall-clock time is the cost.
    speed = "images_per_cpu_s" if args.device == "cpu" else "images_per_s"
    print(f"\ntargets, APLA (whole W_O) against full SSA on the same model (speed measured as {speed}):")
    for model in models:
        apla = next((r for r in rows if r["model"] == model and r["label"] in ("apla", "dinov2 apla")), None)
        if apla is None:
            continue
        print(f"  {model}: APLA memory <= 0.55x full: {'met' if apla['peak_mib_ratio'] <= 0.55 else 'NOT met'} "
              f"({apla['peak_mib_ratio']:.3f}x)")
        print(f"  {model}: APLA throughput >= 1.35x full: "
              f"{'met' if apla[f'{speed}_ratio'] >= 1.35 else 'NOT met'} ({apla[f'{speed}_ratio']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
