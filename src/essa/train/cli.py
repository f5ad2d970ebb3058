"""``essa adapt``: the command-line face of :func:`essa.adapt.adapt`."""

from __future__ import annotations

from essa import config as config_mod


def add_common(p) -> None:
    """Flags shared by the training commands; each maps to one config key."""
    p.add_argument("--config", help="YAML config file; flags and --set override it")
    p.add_argument("--backbone", help="timm ViT name, e.g. vit_small_patch14_dinov2.lvd142m")
    p.add_argument("--weights", help="local backbone weights (safetensors or PyTorch state dict)")
    p.add_argument("--data", help="image folder")
    p.add_argument("--tuner", help="tuner name (essa tuners lists them)")
    p.add_argument("--tuner-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="tuner option, repeatable, e.g. --tuner-opt r=64")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--img-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, repeatable, e.g. --set optim.lr=5e-4")


def overrides(args, mapping: dict[str, str]) -> list[str]:
    """``key=value`` overrides from the flags that were given (``mapping``: flag attribute -> config key)."""
    out = []
    for attr, key in mapping.items():
        value = getattr(args, attr)
        if value is not None:
            out.append(f"{key}={value}")
    if args.weights:
        out.append("backbone.pretrained=false")
        if args.backbone is None:
            out.append("backbone.name=null")  # the weights file's header names the architecture
    out += [f"tuner.options.{opt}" for opt in args.tuner_opt]
    return out + list(args.set)


def add_parser(sub) -> None:
    p = sub.add_parser("adapt", help="self-supervised adaptation (DINOv2 objective) with any tuner")
    add_common(p)
    p.add_argument("--val", help="labelled image folder (one folder per class) for the kNN monitor")
    p.set_defaults(func=run_adapt)


ADAPT_FLAGS = {
    "backbone": "backbone.name", "weights": "backbone.weights", "data": "data.root", "val": "data.val",
    "tuner": "tuner.name", "epochs": "optim.epochs", "batch_size": "optim.batch_size",
    "img_size": "ssl.global_size", "seed": "seed", "out": "out",
}


def run_adapt(args) -> int:
    from essa.adapt import AdaptConfig, adapt

    path = args.config
    if args.resume and path is None and args.out:
        from pathlib import Path

        saved = Path(args.out) / "config.yaml"
        path = saved if saved.exists() else None
    cfg = config_mod.load(AdaptConfig, path, overrides=overrides(args, ADAPT_FLAGS))
    result = adapt(cfg, resume=args.resume)
    last = result["metrics"][-1] if result["metrics"] else {}
    print(f"adapted backbone: {result['backbone']}")
    print(f"tuner state:      {result['tuner']}")
    if "knn_bal_acc" in last:
        print(f"kNN balanced accuracy (last epoch): {last['knn_bal_acc']:.4f}")
    return 0
