"""``essa finetune``: the command-line face of :func:`essa.finetuning.finetune`."""

from __future__ import annotations

from essa import config as config_mod
from essa.commands.common import (SCALE_FLAGS, add_common, add_scale_flags, config_help, config_path, int_list,
                                  overrides, print_config)


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="supervised adaptation of a (self-supervised adapted) backbone to a "
                                        "labelled task, over seeds, with test metrics",
                       formatter_class=config_help("essa.finetuning:FinetuneConfig", FINETUNE_FLAGS))
    add_common(p, "essa.finetuning:FinetuneConfig")
    add_scale_flags(p)
    p.add_argument("--seeds", type=int_list, help="training seeds, e.g. 0,1,2 (one run directory each); "
                                                  "--seed N is the same as --seeds N")
    p.add_argument("--task", help="binary, multiclass, multilabel or ordinal (default: what the data says)")
    p.add_argument("--metric", help="primary metric (default: auc for binary and multilabel, kappa for ordinal, "
                                    "balanced_accuracy for multiclass)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4 for full, 1e-3 for other tuners)")
    p.set_defaults(func=run_finetune)


FINETUNE_FLAGS = {
    "backbone": "backbone.name", "weights": "backbone.weights", "normalize": "data.normalize", "data": "data.root",
    "tuner": "tuner.name", "epochs": "optim.epochs", "batch_size": "optim.batch_size", "lr": "optim.lr",
    "img_size": "img_size", "seeds": "seeds", "task": "task", "metric": "metric", "out": "out", **SCALE_FLAGS,
}


def run_finetune(args) -> int:
    from essa.finetuning import FinetuneConfig, finetune
    from essa.train.trainer import is_global_zero

    if args.seed is not None and args.seeds is None:
        args.seeds = [args.seed]
    cfg = config_mod.load(FinetuneConfig, config_path(args), overrides=overrides(args, FINETUNE_FLAGS))
    if args.print_config:
        return print_config(cfg)
    result = finetune(cfg, resume=args.resume)
    if not is_global_zero():  # a distributed run prints once
        return 0
    print(result["table"])
    print(f"run directory: {result['run_dir']} (summary.json, seed_N/metrics.json, seed_N/classifier.safetensors)")
    return 0
