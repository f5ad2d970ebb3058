"""What the commands share: flags that map to config keys, their parsing, and the run directory's saved config."""

from __future__ import annotations

import argparse
import importlib
import json
import textwrap
from pathlib import Path


def _config_class(spec: str):
    """``"essa.adaptation:AdaptConfig"`` -> the class (imported only when help or the key listing is asked for)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def config_help(config: str, flags: dict[str, str]) -> type[argparse.HelpFormatter]:
    """A help formatter (``add_parser(formatter_class=...)``) that ends each flag's help with the config key it sets
    and that key's default, read from config class ``config`` (``"module:Class"``) when the help is shown; ``flags``:
    flag attribute -> config key."""

    class ConfigHelpFormatter(argparse.HelpFormatter):
        def _get_help_string(self, action: argparse.Action) -> str:
            text = action.help or ""
            key = flags.get(action.dest)
            if key is None or text == argparse.SUPPRESS:
                return text
            from essa import config as config_mod

            try:
                default = config_mod.default_of(_config_class(config), key)
            except KeyError:
                default = None
            tail = f"config {key}" if default is None else f"config {key}, default {_shown(default)}"
            tail = tail.replace("%", "%%")
            return f"{text} ({tail})" if text else tail

    return ConfigHelpFormatter


def _shown(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def add_keys(p, config: str) -> None:
    """``--keys``: list every key of config class ``config`` (``"module:Class"``) with its default and doc, then
    exit."""
    p.add_argument("--keys", action=_KeysAction, config=config,
                   help="list every config key (what --set and a YAML config take) with its default and what it "
                        "does, then exit")


class _KeysAction(argparse.Action):
    def __init__(self, option_strings, dest, config: str, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self.config = config

    def __call__(self, parser, namespace, values, option_string=None):
        print_keys(_config_class(self.config))
        parser.exit(0)


def print_keys(cls) -> None:
    """One entry per key: ``key: default`` and, indented below, what the config's source says of it."""
    from essa import config as config_mod

    for key, default, doc in config_mod.key_docs(cls):
        print(f"{key}: {_shown(default)}")
        if doc:
            print(textwrap.fill(doc, width=100, initial_indent="    ", subsequent_indent="    "))


def add_common(p, config: str) -> None:
    """Flags shared by the training commands; each maps to one config key of ``config`` (``"module:Class"``)."""
    p.add_argument("--config", help="YAML config file; flags and --set override it")
    p.add_argument("--backbone", help="timm ViT name, e.g. vit_small_patch14_dinov2.lvd142m")
    p.add_argument("--weights", help="local backbone weights (safetensors or PyTorch state dict)")
    add_preprocessing_flags(p)
    p.add_argument("--data", help="images: a folder (finetune: also a .csv manifest or a MedMNIST .npz)")
    p.add_argument("--tuner", help="tuner name (essa tuners lists them), or several joined with +, e.g. apla+lora")
    p.add_argument("--tuner-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="tuner option, repeatable, e.g. --tuner-opt r=64; a combination's by part, e.g. "
                        "--tuner-opt apla.r=64 --tuner-opt 'lora.targets=[qkv]'")
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--batch-size", type=int, help="images per optimisation step and process")
    p.add_argument("--img-size", type=int, help="input size in pixels")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, repeatable, e.g. --set optim.lr=5e-4")
    add_print_config(p)
    add_keys(p, config)


#: ``--normalize`` choices (essa.data.normalize.MODES, listed here so that the parser imports no torch).
NORMALIZE_MODES = ("model", "imagenet", "dataset")


def add_preprocessing_flags(p) -> None:
    """``--key-map`` (backbone.key_map) and ``--normalize`` (data.normalize)."""
    p.add_argument("--key-map", action="append", default=[], metavar="PREFIX=REPLACEMENT",
                   help="rename the keys of a --weights file that are not timm's, repeatable: the key prefix PREFIX "
                        "becomes REPLACEMENT (empty: removed; null: those tensors dropped), e.g. --key-map module.= "
                        "(backbone.key_map)")
    p.add_argument("--normalize", choices=NORMALIZE_MODES,
                   help="mean/std images are normalised with: model (the backbone's own, an essa file's header or "
                        "timm's pretrained config, e.g. CLIP's), imagenet, or dataset (computed from the training "
                        "images)")


def key_map(entries: list[str]) -> dict[str, str | None]:
    """``["module.=", "a.=b."]`` -> ``{"module.": "", "a.": "b."}``; ``PREFIX=null`` drops the prefix's tensors."""
    from essa.config import ConfigError

    out: dict[str, str | None] = {}
    for entry in entries:
        prefix, sep, new = entry.partition("=")
        if not sep or not prefix:
            raise ConfigError(f"--key-map {entry!r}: expected PREFIX=REPLACEMENT, e.g. --key-map module.= (strips "
                              "the prefix module.) or --key-map encoder.=null (drops those tensors)")
        out[prefix] = None if new == "null" else new
    return out


def add_print_config(p) -> None:
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults < --config < flags < --set) as YAML and exit; every key "
                        "it prints can be given to --set")


def print_config(cfg) -> int:
    """Print a resolved config as the YAML a run's ``config.yaml`` holds; the command's exit code (0)."""
    import yaml

    from essa import config as config_mod

    print(yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False), end="")
    return 0


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
    if getattr(args, "key_map", None):
        out.append(f"backbone.key_map={json.dumps(key_map(args.key_map))}")
    out += [f"tuner.options.{opt}" for opt in getattr(args, "tuner_opt", [])]
    return out + list(args.set)


def config_path(args) -> str | Path | None:
    """``--config``, or with ``--resume`` and no ``--config`` the run's own ``OUT/config.yaml``."""
    if args.resume and args.config is None and args.out:
        saved = Path(args.out) / "config.yaml"
        if not saved.exists() and getattr(args, "data", None) is None:
            from essa.train.run_dir import RunDirError

            raise RunDirError(f"nothing to resume in {args.out}: it holds no run (no config.yaml); leave out --resume "
                              "and give --data to start one")
        return saved if saved.exists() else None
    return args.config


def int_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (an argparse type)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def _positive_int(text: str) -> int:
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return int(text)


def _devices(text: str) -> str:
    """``--devices``: a count, -1 (all), ``auto``, or device indices ``0,1``; returned as the YAML of the value."""
    parts = [part.strip() for part in text.split(",")]
    if text == "auto" or (len(parts) == 1 and (text == "-1" or (text.isdigit() and int(text) >= 1))):
        return text
    if len(parts) > 1 and all(part.isdigit() for part in parts):
        return "[" + ", ".join(parts) + "]"
    raise argparse.ArgumentTypeError(f"expected a count of at least 1, -1 (all devices), auto, or device indices "
                                     f"such as 0,1; got {text!r}")


def add_scale_flags(p) -> None:
    """Where and how the training steps run: the ``trainer`` config section (:data:`SCALE_FLAGS` maps each flag to
    its key). Shared by every command that trains; see docs/distributed.md."""
    from essa.config import KEEP_CHECKPOINTS, PRECISIONS, STRATEGIES

    g = p.add_argument_group("devices, memory and disk (docs/distributed.md)")
    g.add_argument("--devices", type=_devices,
                   help="processes (devices) per node: a count, -1 for all, auto, or indices such as 0,1 "
                        "(with torchrun or srun: the processes per node it starts)")
    g.add_argument("--num-nodes", type=_positive_int, help="nodes (machines) of a multi-node run")
    g.add_argument("--strategy", choices=STRATEGIES,
                   help="ddp: a whole model per process; fsdp: parameters, gradients and optimizer state sharded "
                        "over the processes; auto: Lightning's choice (DDP with several processes)")
    g.add_argument("--accelerator", help="auto, cpu, gpu, cuda or mps")
    g.add_argument("--precision", choices=PRECISIONS, help="auto: bf16-mixed on GPU, 32-true on CPU")
    g.add_argument("--accumulate-grad-batches", type=_positive_int,
                   help="batches per optimisation step (each process); a step trains on batch size x processes x "
                        "this many images")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block's activations in the backward pass instead of storing them")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each transformer block")
    g.add_argument("--keep-checkpoints", choices=KEEP_CHECKPOINTS,
                   help="what checkpoints/ keeps once the run is finished and exported (all: also each epoch "
                        "end's; none: only the exports remain; a run pruned to less than last,best cannot be "
                        "resumed)")


#: :func:`add_scale_flags`' flags (argparse attribute) -> ``trainer`` config keys.
SCALE_FLAGS = {
    "devices": "trainer.devices", "num_nodes": "trainer.num_nodes", "strategy": "trainer.strategy",
    "accelerator": "trainer.accelerator", "precision": "trainer.precision",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches", "grad_checkpointing": "trainer.grad_checkpointing",
    "compile": "trainer.compile", "keep_checkpoints": "trainer.keep_checkpoints",
}
