"""Weights on disk: safetensors files that describe the architecture they hold.

The header carries ``timm_name`` and ``model_args`` (JSON of ``timm.create_model`` keyword arguments), so
``essa.backbones.create(weights=PATH)`` rebuilds the model with no other information, and the preprocessing the
model was used with (``mean``, ``std``: JSON lists; ``interpolation``; ``normalize``: where the statistics came
from; :mod:`essa.data.normalize`), which every later stage that loads the file uses under ``data.normalize: model``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import essa
from essa import io
from essa.errors import InputError


def arch_metadata(model: torch.nn.Module) -> dict[str, str]:
    """Header fields describing ``model``'s architecture and its preprocessing (``model.essa_preprocessing``)
    (empty when it was not built by essa)."""
    from essa.data import normalize

    arch = getattr(model, "essa_arch", None)
    if not arch:
        return {}
    pre = getattr(model, "essa_preprocessing", None)
    meta = {"timm_name": arch["timm_name"], "model_args": json.dumps(arch["model_args"], sort_keys=True),
            **(normalize.header(pre) if pre is not None else {})}
    if arch.get("licence"):  # the pretrained weights' licence when not a permissive one (DINOv3's)
        meta["licence"] = arch["licence"]
    return meta


def save_weights(
    state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors to a safetensors file atomically (a killed run never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "essa_version": essa.__version__, **(metadata or {})}
    # safetensors refuses tensors that share memory or are not contiguous: store independent copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with io.replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        io.umask_mode(tmp)  # safetensors writes 0600: colleagues on shared storage could not read it
    return path


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: (tensors, header metadata)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except (SafetensorError, OSError) as err:
        raise InputError(f"could not read {str(path)!r} as safetensors: {err}") from err
