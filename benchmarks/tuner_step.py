"""One supervised training step (forward, backward, AdamW) per tuner, each configuration in a fresh process.

    python benchmarks/tuner_step.py                       # ViT-S/16 and ViT-B/16 at 224 px, batch 16, CPU
    python benchmarks/tuner_step.py --models vit_small_patch16_224 --batch-size 8 --steps 2

Prints peak training memory and images/s per tuner, and each as a ratio to full fine-tuning measured in the same
run, then checks the targets: APLA (whole W_O) >= 1.25x the throughput and <= 0.75x the memory of full; APLA r=64
at least as fast as whole-W_O APLA; APLA faster than LoRA (r=8 on qkv).
"""

from __future__ import annotations

import argparse
import json

from essa.bench import markdown_table, measure_grid

CONFIGS = [
    ("full", "full", {}),
    ("apla", "apla", {}),
    ("apla r=64", "apla", {"r": 64}),
    ("lora r=8", "lora", {"r": 8}),
    ("bitfit", "bitfit", {}),
    ("vpt deep 10", "vpt", {"tokens": 10}),
    ("adaptformer", "adaptformer", {"bottleneck": 64}),
    ("ssf", "ssf", {}),
    ("linear", "linear", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=None, help="comma-separated labels to run (full is always run)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the grid; best throughput is kept")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()

    models = args.models.split(",")
    configs = [c for c in CONFIGS if args.only is None or c[0] in args.only.split(",") + ["full"]]
    rows = measure_grid("essa.bench:supervised_step", models, configs, repeats=args.repeats,
                        img_size=args.img_size, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, device=args.device)
    print(f"\nbatch {args.batch_size}, {args.img_size} px, {args.steps} timed steps after {args.warmup} warm-up, "
          f"device {args.device}")
    print(markdown_table(rows))
    # CPU seconds per image are robust to other load on a shared machine; on a GPU, wall-clock time is the cost.
    speed = "images_per_cpu_s" if args.device == "cpu" else "images_per_s"
    print(f"\ntargets (speed measured as {speed}):")
    for model in models:
        get = {r["label"]: r for r in rows if r["model"] == model}
        if not {"apla", "apla r=64", "lora r=8"} <= set(get):
            continue
        checks = [
            ("APLA throughput >= 1.25x full", get["apla"][f"{speed}_ratio"] >= 1.25),
            ("APLA memory <= 0.75x full", get["apla"]["peak_mib_ratio"] <= 0.75),
            ("APLA r=64 at least as fast as APLA", get["apla r=64"][speed] >= get["apla"][speed]),
            ("APLA faster than LoRA r=8", get["apla"][speed] > get["lora r=8"][speed]),
        ]
        for text, ok in checks:
            print(f"  {model}: {text}: {'met' if ok else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
