"""The tuner interface and registry.

A tuner is a dataclass of its options (so it serialises to JSON next to the weights) with three duties:
``inject`` makes its parameters trainable in an already-frozen timm ViT (adding modules where it must),
``fold`` turns the tuned model back into a plain timm ViT in place (mergeable tuners only), and
``extra_state`` names the non-parameter tensors (buffers) that a saved tuner state must carry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from essa.errors import EssaError

REGISTRY: dict[str, type["Tuner"]] = {}
#: What joins the parts of a combination's name (``apla+lora``), and the function that builds one (registered by
#: essa.tuners.combined, which the package imports).
COMBINE = "+"
COMBINATIONS: list = []


class TunerError(EssaError, ValueError):
    """Bad tuner name or options."""


def register(name: str):
    """Class decorator: make a tuner dataclass available as ``apply(model, name, ...)``."""

    def deco(cls):
        cls = dataclasses.dataclass(cls)
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


class Tuner:
    name: ClassVar[str]
    #: False when the tuner adds computation that no plain ViT weight can express (its export keeps the modules).
    mergeable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        """Validate options that need no model (subclasses extend)."""

    def check(self, model: VisionTransformer) -> None:
        """Refuse a model this tuner cannot apply to, before ``apply`` changes anything (subclasses extend)."""

    def inject(self, model: VisionTransformer) -> None:
        raise NotImplementedError

    def fold(self, model: VisionTransformer) -> None:
        """Fold the tuner into plain weights in place. Tuners that only unfreeze existing weights do nothing."""

    def extra_state(self, model: VisionTransformer) -> dict[str, torch.Tensor]:
        """Buffers that belong to the tuner state (e.g. APLA's chosen rows)."""
        return {}

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build(name: str, options: dict[str, Any]) -> Tuner:
    """Instantiate a registered tuner, or a combination of them named ``"apla+lora"`` (options by part:
    ``{"apla": {"r": 64}}``), turning a bad name or option into an error that lists the valid ones."""
    if not isinstance(name, str):
        raise TunerError(f"a tuner name is a string, got {name!r}; valid choices: {', '.join(sorted(REGISTRY))}")
    if COMBINE in name and COMBINATIONS:
        return COMBINATIONS[0](name, options)
    if name not in REGISTRY:
        raise TunerError(f"unknown tuner {name!r}; valid choices: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TunerError(
            f"tuner {name!r} has no option {', '.join(map(repr, unknown))}; valid options: "
            f"{', '.join(fields) or 'none'}"
        )
    return cls(**options)


#: ``blocks: "last:N"``: a block-index option naming a model's last N blocks, whatever its depth.
LAST_BLOCKS = "last:"


def select_blocks(model: VisionTransformer, blocks: list[int] | str | None, tuner: str) -> list[int]:
    """Validate a block-index option: a list of indices, ``"last:N"`` (the model's last N blocks) or None (every
    block)."""
    depth = len(model.blocks)
    if blocks is None:
        return list(range(depth))
    if isinstance(blocks, str):
        count = blocks[len(LAST_BLOCKS):] if blocks.startswith(LAST_BLOCKS) else ""
        if not (count.isdigit() and 1 <= int(count) <= depth):
            raise TunerError(f"{tuner}: blocks={blocks!r}: give a list of block indices or 'last:N' with N in "
                             f"1..{depth} (the model's depth)")
        return list(range(depth - int(count), depth))
    bad = [b for b in blocks if not isinstance(b, int) or not 0 <= b < depth]
    if bad or not blocks:
        raise TunerError(
            f"{tuner}: blocks={blocks!r} is not a non-empty list of block indices or 'last:N'; valid indices: "
            f"0..{depth - 1}"
        )
    return sorted(set(blocks))


def positive_int(value: Any, option: str, tuner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TunerError(f"{tuner}: {option}={value!r} must be a positive integer")
    return value


def kind(module: nn.Module) -> str:
    """A module's type for messages: ``APLAProjection``, ``LayerNorm``; others qualified (peft's LoRA ``Linear`` is
    ``peft.tuners.lora.layer.Linear``, no nn.Linear)."""
    cls = type(module)
    short = cls.__module__.startswith(("essa.", "torch.nn.", "timm."))
    return cls.__qualname__ if short else f"{cls.__module__}.{cls.__qualname__}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def remove_hooks(module: nn.Module, fn) -> None:
    """Drop every forward (pre-)hook of ``module`` that is the function ``fn``.

    Hook-based tuners register plain module-level functions that read their state from the module they sit on,
    so hooks survive ``copy.deepcopy`` and pickling, and can be found again here without handles.
    """
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
