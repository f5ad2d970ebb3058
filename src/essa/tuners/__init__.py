"""Parameter-efficient tuners for timm Vision Transformers and Eva models (DINOv3, EVA-02; :mod:`essa.families`).

    model = essa.backbones.create("vit_small_patch14_dinov2.lvd142m", pretrained=True)
    essa.tuners.apply(model, "apla", r=64)        # only 64 rows of each attn.proj train
    ...train...
    essa.tuners.save(model, "apla.safetensors")   # small: the tuner's tensors and options
    plain = essa.tuners.merge(model)              # a plain timm ViT with identical outputs

One module per method (apla, lora, bitfit, vpt, adaptformer, ssf, full, linear), all behind ``apply``. Several
train together as one tuner named by joining theirs with ``+`` (:mod:`essa.tuners.combined`):

    essa.tuners.apply(model, "apla+lora", apla={"r": 64}, lora={"targets": ["qkv"]})
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from essa import export, families
from essa.tuners.base import REGISTRY, Tuner, TunerError, build, register

# Importing the method modules registers them.
from essa.tuners import adaptformer, apla, bitfit, full, linear, lora, ssf, vpt  # noqa: F401,E402
from essa.tuners.combined import Combination  # noqa: E402

__all__ = [
    "REGISTRY", "Tuner", "TunerError", "Combination", "register", "names", "apply", "tuner_of", "trainable_parameters",
    "count_parameters", "state_dict", "save", "load", "merge", "save_merged", "bake",
]

_STATE_KIND = "essa-tuner-state"


def names() -> list[str]:
    return sorted(REGISTRY)


def apply(model: VisionTransformer, name: str, *, train_head: bool = True, **options) -> VisionTransformer:
    """Apply tuner ``name`` to ``model`` in place: afterwards only the tuner's parameters (and the
    classification head, when the model has one and ``train_head``) require gradients. A combination
    (``"apla+lora"``) takes its options by part: ``apply(model, "apla+lora", apla={"r": 64})``."""
    families.check(model, TunerError, "tuners")
    current = tuner_of(model)
    if current is not None:
        raise TunerError(
            f"the model already has tuner {current.name!r}; merge it first (essa.tuners.merge) to stack another"
        )
    tuner = build(name, options)
    tuner.check(model)
    families.prepare(model)  # an Eva's fused qkv runs as a module call, so wrappers and hooks on it take effect
    model.requires_grad_(False)
    tuner.inject(model)
    if train_head:
        model.head.requires_grad_(True)
    model.essa_tuner = tuner
    return model


def tuner_of(model: nn.Module) -> Tuner | None:
    return getattr(model, "essa_tuner", None)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters an optimiser should see, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _require_tuner(model: nn.Module) -> Tuner:
    tuner = tuner_of(model)
    if tuner is None:
        raise TunerError("the model has no tuner; call essa.tuners.apply(model, name, ...) first")
    return tuner


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tuner state: trainable parameters plus the tuner's own buffers (e.g. APLA rows)."""
    tuner = _require_tuner(model)
    state = {n: p.detach() for n, p in trainable_parameters(model).items()}
    state.update(tuner.extra_state(model))
    return state


def save(model: nn.Module, path: str | Path) -> Path:
    """Save the tuner state (a small file) with the tuner's name and options in the header."""
    tuner = _require_tuner(model)
    meta = {
        "essa_kind": _STATE_KIND,
        "essa_tuner": tuner.name,
        "essa_tuner_options": json.dumps(tuner.options()),
        **export.arch_metadata(model),
    }
    return export.save_weights(state_dict(model), path, meta)


def load(model: VisionTransformer, path: str | Path) -> VisionTransformer:
    """Load a saved tuner state into ``model``: applies the tuner first when the model has none."""
    tensors, meta = export.load_weights(path)
    if meta.get("essa_kind") != _STATE_KIND:
        raise TunerError(f"{str(path)!r} is not an essa tuner state (use essa.backbones.create(weights=...))")
    name, options = meta["essa_tuner"], json.loads(meta["essa_tuner_options"])
    current = tuner_of(model)
    if current is None:
        apply(model, name, **options)
    elif current.name != name or current.options() != options:
        raise TunerError(
            f"{str(path)!r} holds tuner {name!r} {options}, but the model has {current.name!r} {current.options()}"
        )
    own = model.state_dict()
    unknown = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(tensors) & set(own) if tensors[k].shape != own[k].shape)
    if unknown or wrong:
        raise TunerError(
            f"{str(path)!r} does not fit this model: unknown tensors {unknown[:5]}, shape mismatches {wrong[:5]}"
        )
    model.load_state_dict(tensors, strict=False)
    return model


def merge(model: VisionTransformer) -> VisionTransformer:
    """A copy of ``model`` with the tuner folded in: a plain timm ViT with the same outputs.

    Tuners that add computation no plain weight can hold (VPT prompts, AdaptFormer adapters) keep their modules;
    a warning says so, and the weights they export carry the tuner in their header so that they load back whole.
    """
    tuner = tuner_of(model)
    merged = copy.deepcopy(model)
    if tuner is not None:
        if tuner.mergeable:
            tuner.fold(merged)
        else:
            warnings.warn(
                f"tuner {tuner.name!r} cannot be folded into a plain ViT: the merged model keeps its modules "
                "(its exported weights record the tuner, and essa.backbones.create(weights=...) rebuilds it)",
                stacklevel=2,
            )
            merged.essa_kept_tuner = {"name": tuner.name, "options": tuner.options()}
        del merged.essa_tuner
    merged.requires_grad_(True)
    return merged


def bake(model: VisionTransformer) -> None:
    """Make a tuned model's current modules its base: no tuner record, every parameter trainable again."""
    tuner = tuner_of(model)
    if tuner is not None:
        model.essa_kept_tuner = {"name": tuner.name, "options": tuner.options()}
        del model.essa_tuner
    model.requires_grad_(True)


def save_merged(model: VisionTransformer, path: str | Path) -> Path:
    """Merge and save the whole model as safetensors, with its architecture in the header."""
    merged = merge(model) if tuner_of(model) is not None else model
    meta = export.arch_metadata(merged)
    kept = getattr(merged, "essa_kept_tuner", None)
    if kept:
        meta.update({"essa_tuner": kept["name"], "essa_tuner_options": json.dumps(kept["options"])})
    return export.save_weights(merged.state_dict(), path, meta)
