"""``essa evaluate``: the command-line face of :func:`essa.evaluate.run.evaluate`."""

from __future__ import annotations

from essa import config as config_mod
from essa.commands.common import add_keys, add_preprocessing_flags, config_help, overrides


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="kNN / linear probe of a backbone's frozen features, test metrics of a "
                                        "fine-tuned classifier",
                       formatter_class=config_help("essa.evaluate.run:EvalConfig", EVALUATE_FLAGS))
    p.add_argument("--config", help="YAML config file; flags and --set override it")
    p.add_argument("--backbone", help="timm ViT name whose frozen features to evaluate (kNN, linear probe)")
    p.add_argument("--weights", help="local backbone weights to evaluate (e.g. backbone.safetensors of essa adapt)")
    add_preprocessing_flags(p)
    p.add_argument("--checkpoint", help="a classifier: an essa finetune run directory (every seed), one seed_N "
                                        "directory, or a classifier.safetensors")
    p.add_argument("--data", help="labelled data (folder, .csv, MedMNIST .npz); default: the checkpoint run's data")
    p.add_argument("--task", help="binary, multiclass, multilabel or ordinal (default: what the data says)")
    p.add_argument("--metric", help="primary metric (default: the task's)")
    p.add_argument("--protocols", type=_names, help="comma-separated subset of knn,linear,classifier "
                                                    "(default: knn,linear for a backbone; classifier for a checkpoint)")
    p.add_argument("--k", type=int, help="kNN neighbours (default 20)")
    p.add_argument("--temperature", type=float, help="kNN vote temperature (default 0.07)")
    p.add_argument("--img-size", type=int, help="input size (default: the model's own)")
    p.add_argument("--batch-size", type=int, help="images per forward pass")
    p.add_argument("--out", help="output directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, repeatable, e.g. --set data.split_seed=1")
    add_keys(p, "essa.evaluate.run:EvalConfig")
    p.set_defaults(func=run_evaluate)


EVALUATE_FLAGS = {
    "backbone": "backbone.name", "weights": "backbone.weights", "normalize": "data.normalize",
    "checkpoint": "checkpoint", "data": "data.root", "task": "task", "metric": "metric", "protocols": "protocols",
    "k": "knn.k", "temperature": "knn.temperature", "img_size": "img_size", "batch_size": "batch_size", "out": "out",
}


def run_evaluate(args) -> int:
    from essa.evaluate.run import EvalConfig, evaluate

    cfg = config_mod.load(EvalConfig, args.config, overrides=overrides(args, EVALUATE_FLAGS))
    result = evaluate(cfg)
    print(result["table"])
    print(f"output directory: {result['out']} (metrics.json, *_predictions.csv, *_confusion_matrix.png)")
    return 0
