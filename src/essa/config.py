"""Typed configs: nested dataclasses loaded from YAML, overridden from the command line, validated with errors
that name the bad key and the valid ones.

    cfg = load(AdaptConfig, "adapt.yaml", overrides=["tuner.name=apla", "tuner.options={r: 64}"])

Each override is ``dotted.key=value`` with the value parsed as YAML (``64`` is an int, ``[0, 1]`` a list).

The sections the commands share live here: ``backbone`` (:class:`BackboneConfig`), ``tuner`` (:class:`TunerConfig`),
``trainer`` (:class:`TrainerConfig`), and :class:`StageOptimConfig`, the ``optim`` fields of both training stages.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from essa.errors import EssaError

T = TypeVar("T")


class ConfigError(EssaError, ValueError):
    """A config file or override that does not fit the config's schema."""


@dataclasses.dataclass
class BackboneConfig:
    """The backbone section shared by every command: a timm name, its pretrained weights or a local file."""

    name: str | None = None  # e.g. vit_small_patch14_dinov2.lvd142m; may be left out with a weights file
    pretrained: bool = True
    weights: str | None = None  # a local file; overrides pretrained
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # more timm.create_model arguments
    # weights whose keys are not timm's: key prefix -> replacement ("" strips it, null drops those tensors), e.g.
    # {"module.": ""} for a DDP checkpoint (essa.backbones.map_keys); applied before timm's checkpoint_filter_fn
    key_map: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        for prefix, new in self.key_map.items():
            if not isinstance(prefix, str) or not prefix or not (new is None or isinstance(new, str)):
                raise ConfigError(f"backbone.key_map: {prefix!r}: {new!r}; give key prefixes mapped to their "
                                  "replacement ('' strips the prefix, null drops those tensors), e.g. "
                                  "{'module.': ''}")
        if self.key_map and not self.weights:
            raise ConfigError("backbone.key_map renames the keys of a weights file: give backbone.weights (--weights)")

    def build(self, **kwargs):
        from essa import backbones  # configs load without importing torch and timm

        # a None argument (evaluate's img_size when not given) leaves model_args' value, not timm's default
        kwargs = {**self.model_args, **{k: v for k, v in kwargs.items() if v is not None}}
        if self.weights:
            return backbones.create(self.name, weights=self.weights, key_map=self.key_map or None, **kwargs)
        return backbones.create(self.name, pretrained=self.pretrained, **kwargs)

    def check_img_size(self, what: str, *sizes: int | None) -> None:
        """Refuse image sizes (``what``: their config keys, comma-separated) that the backbone's patch size does
        not divide, before any work (the architecture only is built, on the meta device)."""
        from essa import backbones

        patch = backbones.patch_size(self.name, weights=self.weights, **self.model_args)
        for key, size in zip(what.split(","), sizes):
            if size is not None:
                backbones.check_img_size(size, patch, key.strip())


@dataclasses.dataclass
class TunerConfig:
    """The tuner section: a name of ``essa.tuners.names()`` and its options, or a combination of tuners trained
    together, named by joining theirs with ``+`` and with options by part::

        tuner: {name: apla+lora, options: {apla: {r: 64}, lora: {targets: [qkv]}}}

    A combination may also be written as a list of tuners, which :meth:`coerce` turns into that form (so a run's
    saved config.yaml holds the mapping)::

        tuner: [{name: apla, options: {r: 64}}, {name: lora, options: {targets: [qkv]}}]
    """

    name: str = "apla"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def coerce(cls, value: Any, where: str = "tuner") -> Any:
        """The mapping form of a list of tuners (each a name or a mapping ``{name, options}``); other values as
        they are. A list of one tuner is that tuner."""
        if not isinstance(value, (list, tuple)):
            return value
        if not value:
            raise ConfigError(f"{where}: an empty list of tuners; give at least one, e.g. [{{name: apla}}]")
        names, options = [], {}
        for i, entry in enumerate(value):
            at = f"{where}[{i}]"
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, dict):
                raise ConfigError(f"{at}: a tuner of the list is a name or a mapping {{name, options}}, got {entry!r}")
            unknown = sorted(set(entry) - {"name", "options"})
            if unknown:
                raise ConfigError(f"unknown config key {at}.{unknown[0]}; valid keys of {at}: name, options")
            name, opts = entry.get("name"), entry.get("options")
            if not isinstance(name, str) or not name or "+" in name:
                raise ConfigError(f"{at}.name: expected the name of one tuner (essa tuners lists them), got {name!r}")
            if name in names:
                raise ConfigError(f"{at}.name: {name!r} is already in the list; a combination has each tuner once")
            if opts is None:
                opts = {}
            if not isinstance(opts, dict):
                raise ConfigError(f"{at}.options: expected a mapping, got {opts!r}")
            names.append(name)
            options[name] = dict(opts)
        if len(names) == 1:
            return {"name": names[0], "options": options[names[0]]}
        return {"name": "+".join(names), "options": options}


#: ``trainer.strategy`` values: Lightning's choice (one process per device, DDP when several), DistributedDataParallel
#: (every process holds the whole model), FullyShardedDataParallel (parameters, gradients and optimizer state are
#: sharded over the processes, block by block).
STRATEGIES = ("auto", "ddp", "fsdp")
#: ``trainer.precision`` values (Lightning's names); ``auto`` is bf16-mixed on GPU and 32-true on CPU.
#: ``trainer.progress`` values (essa.train.progress): the bar on a terminal and plain lines elsewhere, the bar,
#: plain lines, nothing.
PROGRESS = ("auto", "bar", "lines", "none")
#: ``trainer.logger`` values (essa.train.loggers), and the packages (any one) and extra of those that need one.
LOGGERS = ("csv", "tensorboard", "wandb", "mlflow", "none")
#: ``trainer.keep_checkpoints``: which of ``checkpoints/`` a finished run keeps (essa.train.run_dir.prune).
KEEP_CHECKPOINTS = ("last,best", "last", "best", "all", "none")
_LOGGER_NEEDS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb"),
                 "mlflow": (("mlflow",), "mlflow")}


_UNITS = {"k": 2**-10, "m": 1, "g": 2**10, "t": 2**20}


def memory_mib(value) -> float | None:
    """``trainer.memory_budget`` in MiB: None for ``auto``; ``6GiB``, ``6G``, ``6 GB`` (binary units: 1 GB = 1024
    MiB here), ``800MiB``, or a positive number of MiB."""
    import re

    if value == "auto":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    size = r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT])(?:i?[bB])?\s*"  # 6GiB, 6 GB, 6G, 800MiB
    match = re.fullmatch(size, value) if isinstance(value, str) else None
    if match is None or float(match[1]) <= 0:
        raise ConfigError(f"trainer.memory_budget={value!r}; valid: auto, a size such as 6GiB or 800MiB, or a "
                          "positive number of MiB")
    return float(match[1]) * _UNITS[match[2].lower()]


def check_logger(name: str) -> None:
    """Refuse a logger whose package is not installed, naming the extra that installs it."""
    import importlib.util

    if name in _LOGGER_NEEDS:
        packages, extra = _LOGGER_NEEDS[name]
        if not any(importlib.util.find_spec(p) for p in packages):
            raise ConfigError(f"trainer.logger={name} needs the {packages[0]} package: pip install \"essa[{extra}]\" "
                              "(or choose csv, the default)")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


@dataclasses.dataclass
class TrainerConfig:
    """The trainer section shared by the training commands: where and how the steps run (essa.train.trainer builds
    the Lightning Trainer from it). ``optim.batch_size`` is per process: a step trains on
    ``batch_size * devices * num_nodes * accumulate_grad_batches`` images."""

    accelerator: str = "auto"  # auto, cpu, gpu, cuda, mps
    devices: Any = 1  # processes (devices) per node: a count, -1 for all, "auto", or a list of device indices
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    accumulate_grad_batches: int = 1  # batches whose gradients add up to one optimisation step
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass (timm)
    compile: bool = False  # torch.compile each transformer block
    # auto: Lightning's bar on a terminal, else plain lines (a log file: nohup, SLURM, CI); bar; lines; none
    progress: str = "auto"
    progress_every: float = 30.0  # seconds between two progress lines
    # experiment logger (essa.train.loggers): csv in RUN_DIR/logs, tensorboard, wandb (offline unless
    # WANDB_MODE=online), mlflow, none; each step's loss and lr every log_every_n_steps steps, each epoch's row
    logger: str = "csv"
    log_every_n_steps: int = 10
    # what checkpoints/ keeps once the run is finished and exported: last,best; last; best; all (also
    # epoch_NNN.ckpt at every epoch end); none (the exports are the run's result). A finished run pruned to less
    # than last,best cannot be resumed (its export could not be redone)
    keep_checkpoints: str = "last,best"
    # the memory an SSA step may use, which decides how many blocks recompute their frozen stretches under
    # optim.recompute_frozen: auto (essa.train.memory.plan_recompute): auto (90 % of the GPU's free memory, half of
    # a CPU machine's available memory), or a size: 6GiB, 800MiB, or a number of MiB
    memory_budget: Any = "auto"

    def validate(self) -> None:
        memory_mib(self.memory_budget)
        devices = self.devices
        valid_list = isinstance(devices, list) and devices and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
        valid_int = isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)
        if not (valid_int or valid_list or devices == "auto"):
            raise ConfigError(f"trainer.devices={devices!r}; valid: a count of at least 1, -1 (all devices), "
                              "'auto', or a list of device indices such as [0, 1]")
        if self.num_nodes < 1:
            raise ConfigError(f"trainer.num_nodes={self.num_nodes} must be at least 1")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"trainer.strategy={self.strategy!r}; valid choices: {', '.join(STRATEGIES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={self.precision!r}; valid choices: {', '.join(PRECISIONS)}")
        if self.accumulate_grad_batches < 1:
            raise ConfigError(f"trainer.accumulate_grad_batches={self.accumulate_grad_batches} must be at least 1")
        if self.logger not in LOGGERS:
            raise ConfigError(f"trainer.logger={self.logger!r}; valid choices: {', '.join(LOGGERS)}")
        check_logger(self.logger)
        if self.log_every_n_steps < 1:
            raise ConfigError(f"trainer.log_every_n_steps={self.log_every_n_steps} must be at least 1")
        if self.keep_checkpoints not in KEEP_CHECKPOINTS:
            raise ConfigError(f"trainer.keep_checkpoints={self.keep_checkpoints!r}; valid choices: "
                              f"{', '.join(KEEP_CHECKPOINTS)}")
        if self.progress not in PROGRESS:
            raise ConfigError(f"trainer.progress={self.progress!r}; valid choices: {', '.join(PROGRESS)}")
        if not self.progress_every >= 0:
            raise ConfigError(f"trainer.progress_every={self.progress_every} must be a number of seconds, at least 0")


@dataclasses.dataclass
class StageOptimConfig:
    """The fields of the optim section that both training stages have; each stage's ``OptimConfig`` subclasses it
    with its own fields and its own default of ``epochs``. ``batch_size`` is per process; ``lr`` None: the tuner's
    default (essa.train.optim.default_lr: 1e-4 for the full tuner, 1e-3 for the others); the cosine ends at
    ``min_lr``."""

    epochs: int = 100
    batch_size: int = 64
    lr: float | None = None
    min_lr: float = 1e-6


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Coerce/validate a YAML value against a type annotation (int, float, str, bool, lists, dicts, Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if _is_dataclass_type(tp):
        value = _coerce(tp, value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {', '.join(_field_types(tp))}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def _coerce(tp: type, value: Any, where: str) -> Any:
    """A section's other YAML forms turned into its mapping, by the section class's own ``coerce`` classmethod (as
    :meth:`TunerConfig.coerce` does for a list of tuners); the value as it is for a class without one."""
    coerce = getattr(tp, "coerce", None)
    return coerce(value, where) if coerce is not None else value


def _coerce_sections(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each section of ``cls`` in its mapping form (before overrides that address its keys)."""
    types_ = _field_types(cls)
    return {key: _coerce(types_[key], value, key) if _is_dataclass_type(types_.get(key)) else value
            for key, value in data.items()}


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, refusing unknown keys."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys{' of ' + where if where else ''}: "
            f"{', '.join(types_)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _check_value(value, types_[name], key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate:
        validate()
    return obj


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``dotted`` (``optim.lr``) in the nested mapping ``data``. In a list (a study's ``datasets``), a key is an
    index (``datasets.0.data.max_train``) or the ``name`` of one of its mappings (``datasets.breast.data.root``)."""
    keys = dotted.split(".")
    node = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = _list_item(node, key, dotted, ".".join(keys[:i]))
            continue
        node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted!r}: {key} is not a section")
    if isinstance(node, list):
        raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:-1])} is a list; name an item and its key, e.g. "
                          f"{'.'.join(keys[:-1])}.0.{keys[-1]}")
    node[keys[-1]] = value


def _list_item(items: list, key: str, dotted: str, where: str) -> dict:
    """The item of ``items`` that ``key`` names: its index, or the ``name`` of a mapping in it."""
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if key.lstrip("-").isdigit():
        index = int(key)
        if not -len(items) <= index < len(items):
            raise ConfigError(f"override {dotted!r}: {where} has {len(items)} items (indices 0..{len(items) - 1})")
        item = items[index]
    elif key in names:
        item = next(item for item in items if isinstance(item, dict) and item.get("name") == key)
    else:
        raise ConfigError(f"override {dotted!r}: {where} has no item {key!r}; give an index (0..{len(items) - 1}) "
                          f"or a name: {', '.join(map(str, names)) or 'none has one'}")
    if not isinstance(item, dict):
        raise ConfigError(f"override {dotted!r}: {where}.{key} is {item!r}, not a section")
    return item


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not YAML: {err}") from err


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Config from defaults < YAML file < ``overrides`` (``key=value``)."""
    return resolve(cls, path, overrides=overrides)


def resolve(cls: type[T], config: T | str | Path | None = None, sections: dict[str, Any] | None = None,
            overrides: list[str] | None = None) -> T:
    """A config from an instance, a YAML path or the defaults, then ``sections`` (a dict per section merged into
    it, or top-level values), then ``key=value`` overrides; validated at the end."""
    if isinstance(config, cls):
        data = to_dict(config)
    else:
        data = read_yaml(config) if config is not None else {}
    data = _coerce_sections(cls, data)
    for key, value in _coerce_sections(cls, sections or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    for text in overrides or []:
        set_dotted(data, *parse_override(text))
    if isinstance(config, cls) and data.get("preset") == getattr(config, "preset", None):
        return from_dict(cls, data)  # an instance holds its values: its preset was applied when it was built
    return from_dict(cls, with_preset(cls, data))


def with_preset(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` over the preset its ``preset`` key names (of ``cls.PRESETS``, a mapping of name to config keys):
    every key ``data`` gives wins, the preset fills the others. A section naming another ``name`` than the preset's
    (``tuner: {name: lora}`` under a preset's APLA) replaces the preset's section whole. As it is without a preset."""
    name = data.get("preset")
    presets = getattr(cls, "PRESETS", None)
    if name is None or presets is None:
        return data
    if name not in presets:
        raise ConfigError(f"preset={name!r} is not a preset; valid choices: {', '.join(presets)}")
    return overlay(presets[name], data)


def overlay(base: dict[str, Any], data: dict[str, Any], *, by_name: bool = True) -> dict[str, Any]:
    """``data`` over ``base`` (copies; neither is changed): nested mappings merge, other values replace. With
    ``by_name``, a mapping whose ``name`` differs from ``base``'s replaces it whole (another tuner does not inherit
    the options of the one below)."""
    merged = {key: copy.deepcopy(value) for key, value in base.items()}
    for key, value in data.items():
        below = merged.get(key)
        if isinstance(value, dict) and isinstance(below, dict) and (
                not by_name or value.get("name", below.get("name")) == below.get("name")):
            merged[key] = overlay(below, value, by_name=by_name)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def dump(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
    return path


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the source of ``cls`` and its bases (the subclass's first): the comment at the end
    of the field's line, else the comment lines right above it."""
    import inspect
    import io
    import tokenize

    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        comments: dict[int, str] = {}  # line number (0-based) -> comment text
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0] - 1] = tok.string.lstrip("#").strip()
        names = {f.name for f in dataclasses.fields(klass)}
        for number, line in enumerate(lines):
            name = line.strip().split(":", 1)[0]
            if name not in names or name in docs or not line.startswith("    ") or line.startswith("     "):
                continue
            if number in comments and not line.lstrip().startswith("#"):
                docs[name] = comments[number]
                continue
            above = []
            index = number - 1
            while index >= 0 and lines[index].strip().startswith("#"):
                above.insert(0, comments[index])
                index -= 1
            if above:
                docs[name] = " ".join(above)
    return docs


#: What :func:`key_docs` gives as the default of a key that has none (the config must set it).
REQUIRED = "(required)"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return to_dict(value) if dataclasses.is_dataclass(value) else value
    return REQUIRED


def key_docs(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every key of config class ``cls`` (dotted, as ``--set`` takes it), its default (:data:`REQUIRED` when it has
    none) and what its source comment says of it (empty when nothing does), in the order the config prints them."""
    comments = _field_comments(cls)
    types_ = _field_types(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if _is_dataclass_type(types_[f.name]):
            out += key_docs(types_[f.name], f"{key}.")
        else:
            out.append((key, _default(f), comments.get(f.name, "")))
    return out


def default_of(cls: type, dotted: str) -> Any:
    """The default of config class ``cls``'s key ``dotted`` (:data:`REQUIRED` when it has none; KeyError when
    ``cls`` has no such key)."""
    return {key: default for key, default, _ in key_docs(cls)}[dotted]
