"""LoRA through peft: a low-rank update ``B A`` (scaled by ``alpha / r``) beside chosen linear layers.

Targets are timm module names inside the transformer blocks (``qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``),
resolved here to full module names before peft sees them, so that a target never reaches outside the blocks
(a bare ``proj`` would otherwise also hit ``patch_embed.proj``). An Eva with separate query, key and value layers
(EVA-02 B/L: ``attn.q_proj``, ``attn.k_proj``, ``attn.v_proj``) has no ``qkv``: there the default target ``qkv``
means those three. SwiGLU MLPs name their layers ``mlp.fc1_g``, ``mlp.fc1_x`` (or a packed ``mlp.fc1``) and
``mlp.fc2``; the error for a target that matches nothing lists the model's own names.
"""

from __future__ import annotations

import dataclasses
import re

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from essa.tuners.base import Tuner, TunerError, kind, positive_int, register, replace_module

_BLOCK_PREFIX = re.compile(r"^blocks\.\d+\.")
#: Targets that stand for other layers when the model has no layer of that name: an Eva's separate q, k, v.
_ALIASES = {"qkv": ("attn.q_proj", "attn.k_proj", "attn.v_proj")}


def block_linears(model: nn.Module) -> dict[str, str]:
    """Full name -> name inside its block, for every linear layer of the transformer blocks."""
    return {
        name: _BLOCK_PREFIX.sub("", name)
        for name, module in model.named_modules()
        if _BLOCK_PREFIX.match(name) and isinstance(module, nn.Linear)
    }


def resolve_targets(model: nn.Module, targets: list[str], tuner: str) -> list[str]:
    """Full module names for targets given as names inside a block (``qkv`` or ``attn.qkv``)."""
    linears = block_linears(model)
    valid = sorted(set(linears.values()))
    others = {name: kind(module) for name, module in model.named_modules()
              if _BLOCK_PREFIX.match(name) and name not in linears}
    resolved = []
    for target in targets:
        # A target that another tuner replaced (APLA's APLAProjection at attn.proj) is refused, not skipped.
        inner = {full: _BLOCK_PREFIX.sub("", full) for full in others}
        replaced = sorted(full for full, name in inner.items() if name == target or name.endswith("." + target))
        if replaced:
            raise TunerError(
                f"{tuner}: target {target!r} is {replaced[0]} ({others[replaced[0]]}), not a linear layer: LoRA "
                f"cannot wrap it (a tuner applied before LoRA may have replaced it); valid targets here: "
                f"{', '.join(valid)}"
            )
        hits = [full for full, inner in linears.items() if inner == target or inner.endswith("." + target)]
        if not hits and target in _ALIASES:
            hits = [full for full, inner in linears.items() if inner in _ALIASES[target]]
        if not hits:
            raise TunerError(
                f"{tuner}: target {target!r} matches no linear layer in the blocks; valid targets: {', '.join(valid)}"
            )
        resolved += hits
    return sorted(set(resolved))


@register("lora")
class LoRA(Tuner):
    """Options: ``r`` (rank), ``alpha`` (scale numerator), ``dropout``, ``targets``."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["qkv"])

    def __post_init__(self):
        positive_int(self.r, "r", "lora")
        if not self.alpha > 0:
            raise TunerError(f"lora: alpha={self.alpha!r} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise TunerError(f"lora: dropout={self.dropout!r} must be in [0, 1)")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if not self.targets:
            raise TunerError("lora: targets is empty; give at least one of qkv, attn.proj, mlp.fc1, mlp.fc2")

    def inject(self, model):
        modules = resolve_targets(model, self.targets, "lora")
        for name in modules:
            layer = model.get_submodule(name)
            if self.r > min(layer.in_features, layer.out_features):
                raise TunerError(
                    f"lora: r={self.r} exceeds the size of {name} ({layer.out_features}x{layer.in_features})"
                )
        config = LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=modules, bias="none"
        )
        inject_adapter_in_model(config, model)

    def fold(self, model):
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                replace_module(model, name, module.get_base_layer())
        if hasattr(model, "peft_config"):
            del model.peft_config
