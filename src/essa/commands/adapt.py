"""``essa adapt``: the command-line face of :func:`essa.adaptation.adapt`."""

from __future__ import annotations

from essa import config as config_mod
from essa.commands.common import (SCALE_FLAGS, add_common, add_scale_flags, config_help, config_path, overrides,
                                  print_config)


#: ``--objective`` choices: the names of :data:`essa.objectives.OBJECTIVES` (listed here so that the parser imports
#: no torch; tests/test_cli_errors.py checks that the two agree).
OBJECTIVES = ("dinov2", "mae", "simmim")


def add_parser(sub) -> None:
    p = sub.add_parser("adapt", help="self-supervised adaptation (DINOv2, MAE or SimMIM objective) with any tuner",
                       formatter_class=config_help("essa.adaptation:AdaptConfig", ADAPT_FLAGS))
    add_common(p, "essa.adaptation:AdaptConfig")
    add_scale_flags(p)
    p.add_argument("--objective", choices=OBJECTIVES,
                   help="SSA objective (dinov2: student + EMA teacher, DINO + iBOT + KoLeo; mae: masked "
                        "autoencoder, the encoder on visible patches only; simmim: mask tokens, linear decoder)")
    p.add_argument("--val", help="labelled image folder (one folder per class) for the kNN monitor")
    p.add_argument("--preset", help="a named preset under the config (fast: APLA on the last 4 blocks, truncated "
                                    "backward, PatchDropout 0.5); flags, --set and the config file override it")
    p.set_defaults(func=run_adapt)


ADAPT_FLAGS = {
    "backbone": "backbone.name", "weights": "backbone.weights", "normalize": "data.normalize", "data": "data.root",
    "val": "data.val", "preset": "preset", "tuner": "tuner.name", "objective": "objective", "epochs": "optim.epochs",
    "batch_size": "optim.batch_size", "img_size": "ssl.global_size", "seed": "seed", "out": "out", **SCALE_FLAGS,
}


def run_adapt(args) -> int:
    from essa.adaptation import AdaptConfig, adapt
    from essa.train.trainer import is_global_zero

    cfg = config_mod.load(AdaptConfig, config_path(args), overrides=overrides(args, ADAPT_FLAGS))
    if args.print_config:
        return print_config(cfg)
    result = adapt(cfg, resume=args.resume)
    if not is_global_zero():  # a distributed run prints once
        return 0
    last = result["metrics"][-1] if result["metrics"] else {}
    print(f"adapted backbone: {result['backbone']}")
    print(f"tuner state:      {result['tuner']}")
    if "knn_bal_acc" in last:
        print(f"kNN balanced accuracy (last epoch): {last['knn_bal_acc']:.4f}")
    return 0
