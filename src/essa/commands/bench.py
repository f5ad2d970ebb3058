"""``essa bench``: memory, speed and FLOPs of one training step per tuner, each in a fresh process, in one run."""

from __future__ import annotations

import sys

DEFAULT_TUNERS = ("full", "apla", "apla:r=64", "lora:r=8", "bitfit")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="peak memory, images/s, images per CPU-second and counted FLOPs of one "
                                     "training step per tuner (each in a fresh process), with ratios to full")
    p.add_argument("--stage", choices=("ssa", "supervised"), default="ssa",
                   help="ssa: one SSA step of each --objectives (default); supervised: one fine-tuning step")
    p.add_argument("--models", default="vit_small_patch14_dinov2",
                   help="comma-separated timm names (random weights: nothing downloads) (default "
                        "vit_small_patch14_dinov2)")
    p.add_argument("--tuner", action="append", metavar="NAME[:KEY=VALUE...]",
                   help="a tuner to measure, repeatable, e.g. --tuner apla:r=64 --tuner lora:r=8 --tuner "
                        "apla:blocks=last:4 (default: " + ", ".join(DEFAULT_TUNERS) + "); full is always measured, "
                        "as the reference")
    p.add_argument("--objectives", default="dinov2", help="--stage ssa: comma-separated dinov2, mae, simmim "
                                                          "(default dinov2)")
    p.add_argument("--img-size", type=int, default=224, help="image (SSA: global crop) size (default 224)")
    p.add_argument("--local-size", type=int, default=98, help="dinov2: local crop size (default 98)")
    p.add_argument("--n-local", type=int, default=8, help="dinov2: local crops per image (default 8)")
    p.add_argument("--prototypes", type=int, default=65536, help="dinov2: head prototypes (default 65536)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (default 4)")
    p.add_argument("--patch-drop", type=float, default=None,
                   help="dinov2: also measure each tuner with ssl.patch_drop=P (PatchDropout)")
    p.add_argument("--preset", action="append", metavar="NAME",
                   help="--stage ssa: also measure an SSA preset of essa adapt (its tuner and ssl keys), "
                        "repeatable, e.g. --preset fast")
    p.add_argument("--recompute", choices=("auto", "all", "none"), default="auto",
                   help="dinov2: which blocks recompute their frozen stretches (optim.recompute_frozen): auto, as "
                        "essa adapt, as few as fit --memory-budget; all (the least memory); none (default auto)")
    p.add_argument("--no-recompute", action="store_true", help="--recompute none")
    p.add_argument("--memory-budget", default="auto",
                   help="trainer.memory_budget for --recompute auto: auto or a size, e.g. 2GiB (default auto)")
    p.add_argument("--steps", type=int, default=3, help="timed steps; the median counts (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the grid; the best speed is kept (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--precision", default="auto",
                   help="auto (bf16 autocast on CUDA, fp32 on CPU, as training), bf16-mixed, 32-true, or several "
                        "comma-separated: each tuner at each, ratios against full at the first, e.g. "
                        "32-true,bf16-mixed (default auto)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw peak memory against speed per tuner")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    import json

    from essa import bench
    from essa.errors import InputError

    try:
        configs = [bench.parse_tuner(text) for text in (args.tuner or DEFAULT_TUNERS)]
    except ValueError as err:
        raise InputError(str(err)) from None
    if not any(label == "full" for label, _, _ in configs):
        configs.insert(0, ("full", "full", {}))
    if args.patch_drop is not None:
        if args.stage != "ssa":
            raise InputError("--patch-drop applies to --stage ssa (the dinov2 objective)")
        configs += [(f"{label} patch_drop={args.patch_drop:g}", tuner, options,
                     {"ssl_options": {"patch_drop": args.patch_drop}}) for label, tuner, options in list(configs)]
    if args.preset:
        if args.stage != "ssa":
            raise InputError("--preset applies to --stage ssa (a preset of essa adapt)")
        try:
            configs += [bench.preset_config(name) for name in args.preset]
        except ValueError as err:
            raise InputError(str(err)) from None
    precisions = [p for p in args.precision.split(",") if p]
    if bad := [p for p in precisions if p not in bench.PRECISIONS]:
        raise InputError(f"--precision {bad[0]!r}; valid: {', '.join(bench.PRECISIONS)}")
    if precisions != ["auto"]:  # every tuner at every precision; the first's rows keep their labels (full: the
        # reference of every ratio), the others' are labelled with theirs
        configs = [(label if i == 0 else f"{label} {precision}", tuner, options,
                    {**(step[0] if step else {}), "precision": precision})
                   for i, precision in enumerate(precisions) for label, tuner, options, *step in configs]
    models = [m for m in args.models.split(",") if m]
    print(f"essa bench: {args.stage} step, {len(models) * len(configs)} configurations, each in a fresh process "
          f"({args.warmup} warm-up + {args.steps} timed steps, the median step counts)", flush=True)
    if args.stage == "ssa":
        recompute = "none" if args.no_recompute else args.recompute
        rows = bench.measure_objectives(
            args.objectives.split(","), models, configs, repeats=args.repeats, global_size=args.img_size,
            local_size=args.local_size, n_local=args.n_local, batch_size=args.batch_size,
            prototypes=args.prototypes, steps=args.steps, warmup=args.warmup, device=args.device,
            recompute_frozen={"auto": "auto", "all": True, "none": False}[recompute], memory_budget=args.memory_budget)
    else:
        rows = bench.measure_grid("essa.bench:supervised_step", models, configs, repeats=args.repeats,
                                  img_size=args.img_size, batch_size=args.batch_size, steps=args.steps,
                                  warmup=args.warmup, device=args.device)
    print()
    print(bench.markdown_table(rows, "SSA tuner" if args.stage == "ssa" else "tuner"))
    if all("gflop" in r for r in rows):
        print("\ncounted FLOPs per step (the same on any machine):")
        print(bench.compute_table(rows, "SSA tuner" if args.stage == "ssa" else "tuner"))
    if len(precisions) > 1:
        print(f"\nfirst-step loss at each precision (the same weights, batch and masks), against {precisions[0]}:")
        first = {(r["model"], r["label"]): r for r in rows}
        for r in rows:
            for precision in precisions[1:]:
                if r["label"].endswith(f" {precision}"):
                    base = first[(r["model"], r["label"].removesuffix(f" {precision}"))]
                    print(f"  {r['model']} {r['label']}: {r['loss']:.5f} vs {base['loss']:.5f} "
                          f"({abs(r['loss'] - base['loss']) / abs(base['loss']):.2%} apart)")
    from essa.study.results import load_average

    load = load_average()
    if load is not None:
        print(f"\nload average (1, 5, 15 min) at the end: {load}; times and speeds depend on it, FLOPs do not",
              file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"rows: {args.json}")
    if args.plot:
        bench.plot(rows, args.plot, "images_per_cpu_s" if args.device == "cpu" else "images_per_s")
        print(f"plot: {args.plot}")
    return 0

