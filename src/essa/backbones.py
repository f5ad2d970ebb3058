"""Vision Transformer backbones: a timm name (DINOv2, DINOv3, EVA-02, MAE, supervised), a local weights file, or
random init.

Two timm families (:mod:`essa.families`): ``VisionTransformer`` and ``Eva`` (DINOv3, EVA-02). An Eva is built with
CLS-token pooling unless ``global_pool`` is given (timm's Eva pools the mean of the patches by default; essa's
objectives and probes read the CLS token after the final norm).

Every backbone essa builds remembers how it was built (``model.essa_arch``: the timm name and the keyword
arguments given to ``timm.create_model``), so that the weights files essa writes can describe themselves, and
how its inputs are preprocessed (``model.essa_preprocessing``, :func:`preprocessing`: the mean, std and
interpolation of a weights file's header, or of timm's pretrained config of the name).

Weights whose keys are not timm's (a RETFound or MoCo checkpoint: ``module.``, ``encoder.``, ``backbone.``
prefixes) load with a ``key_map`` (:func:`map_keys`: key prefixes replaced, or dropped with None).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import socket
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import split_model_name_tag
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from essa import export, families
from essa.data import normalize
from essa.errors import EssaError

# Keyword arguments that change the input resolution only: weights built for one value load into another by
# resampling, so a file's header never contradicts them.
RESIZABLE_ARGS = ("img_size", "dynamic_img_size", "dynamic_img_pad")

_HUB_PROBE_TIMEOUT_S = 3.0

#: essa's own ``global_pool``: the CLS token concatenated with the mean of the patch tokens (2 x embed_dim features).
TOKEN_AVG_POOL = "token+avg"


class BackboneError(EssaError, ValueError):
    """A backbone could not be built from what the user asked for."""


#: Licences of pretrained weights that essa notes once and records in the header of what it exports (key
#: ``licence``): timm's ``pretrained_cfg.license`` -> what the note says.
NOTED_LICENCES = {
    "dinov3-license": "Meta's DINOv3 License (https://ai.meta.com/resources/models-and-libraries/dinov3-license/), "
                      "not Apache-2.0",
}
_noted: set[str] = set()


class _TokenAvg:
    """The ``token+avg`` pooling and head, for either family (mixed in before the timm class)."""

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        if (pool_type or self.global_pool) != TOKEN_AVG_POOL:
            return super().pool(x, pool_type)
        return torch.cat([x[:, 0], x[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool != TOKEN_AVG_POOL:
            raise BackboneError(f"a {TOKEN_AVG_POOL} model keeps its pooling; got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head = torch.nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else torch.nn.Identity()
        if num_classes > 0:  # as timm initialises a new head
            torch.nn.init.trunc_normal_(self.head.weight, std=0.02)
            torch.nn.init.zeros_(self.head.bias)


class TokenAvgViT(_TokenAvg, VisionTransformer):
    """A timm ViT whose head reads the CLS token concatenated with the mean of the patch tokens, both after the
    final norm (where pretrained weights have it). Built by ``create(..., global_pool="token+avg")``: the class of
    a timm-built model is swapped, so its parameters and state-dict keys stay timm's; only the head is 2 x wider."""


class TokenAvgEva(_TokenAvg, Eva):
    """:class:`TokenAvgViT` for a timm Eva (DINOv3, EVA-02): CLS token and mean patch token (registers left out)."""


def _token_avg(model: VisionTransformer | Eva, num_classes: int) -> VisionTransformer | Eva:
    model.__class__ = TokenAvgEva if families.is_eva(model) else TokenAvgViT
    model.global_pool = TOKEN_AVG_POOL
    model.head_hidden_size = 2 * model.embed_dim
    model.reset_classifier(num_classes)
    return model


def vit_names(pretrained: bool = False) -> list[str]:
    """timm's architectures essa builds: its Vision Transformers and Eva models (DINOv3, EVA-02), with pretrained
    tags when ``pretrained``."""
    return sorted(n for module in families.MODULES for n in timm.list_models(module=module, pretrained=pretrained))


def _is_eva_name(name: str) -> bool:
    return split_model_name_tag(name)[0] in timm.list_models(module="eva")


def _timm_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments for ``timm.create_model``: for an Eva, CLS-token pooling unless ``global_pool`` is
    given, and ViT's ``fc_norm`` under Eva's name ``use_fc_norm``."""
    if not _is_eva_name(name):
        return dict(kwargs)
    out = {"global_pool": "token", **kwargs}
    if "fc_norm" in out:
        out["use_fc_norm"] = out.pop("fc_norm")
    return out


def licence_of(name: str) -> str | None:
    """The licence timm gives the pretrained weights of ``name`` (its default tag when it has none), when essa
    notes it (:data:`NOTED_LICENCES`); else None."""
    cfg = timm.models.get_pretrained_cfg(name)  # None for a name without one
    licence = getattr(cfg, "license", None) if cfg is not None else None
    return licence if licence in NOTED_LICENCES else None


def note_licence(name: str, licence: str | None) -> None:
    """Say once per process that ``name``'s weights come under ``licence`` (a warning)."""
    if licence is None or licence in _noted:
        return
    _noted.add(licence)
    what = NOTED_LICENCES.get(licence, licence)
    warnings.warn(f"{split_model_name_tag(name)[0]}: these pretrained weights come under {what}; essa records "
                  f"licence={licence} in the header of the weights it exports from them", stacklevel=3)


def _check_name(name: str) -> None:
    arch, tag = split_model_name_tag(name)
    archs = vit_names()
    if arch not in archs:
        close = difflib.get_close_matches(arch, archs, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise BackboneError(
            f"unknown backbone {name!r}: not a timm Vision Transformer (essa builds a {families.FAMILIES}).{hint} "
            f"Valid choices are the {len(archs)} names of timm.list_models(module='vision_transformer') and "
            "timm.list_models(module='eva'), e.g. vit_small_patch14_dinov2.lvd142m, vit_small_patch14_reg4_dinov2, "
            "vit_small_patch16_dinov3.lvd1689m, eva02_tiny_patch14_224, vit_base_patch16_224.mae."
        )
    if tag:
        tags = [n.partition(".")[2] for n in vit_names(pretrained=True) if n.startswith(arch + ".")]
        if tag not in tags:
            raise BackboneError(
                f"backbone {arch!r} has no pretrained tag {tag!r}; valid tags: {', '.join(tags) or 'none'}"
            )


def _hub_reachable() -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_unless_reachable():
    """Without a route to the Hub, use only the local cache: huggingface_hub would otherwise retry for a minute."""
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE
    if not saved and not _hub_reachable():
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


def _offline_message(name: str, err: Exception) -> str:
    return (
        f"could not get the pretrained weights of {name!r}: the Hugging Face Hub is unreachable and they are not "
        f"in the local cache ({type(err).__name__}). Use a local weights file instead: "
        f"essa.backbones.create({split_model_name_tag(name)[0]!r}, weights='path/to/weights.safetensors') in Python, or "
        "`--set backbone.weights=path/to/weights.safetensors` on the command line (safetensors, or a PyTorch "
        "state dict loadable with weights_only=True). On a machine with internet, download once with "
        f"timm.create_model({name!r}, pretrained=True) and copy ~/.cache/huggingface, or set HF_HUB_OFFLINE=1 "
        "to use a populated cache."
    )


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file: (state dict, safetensors header metadata or {})."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return export.load_weights(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types
        raise BackboneError(
            f"could not read {str(path)!r} as a PyTorch state dict with weights_only=True ({err}). "
            "Use a .safetensors file or a plain state dict of tensors."
        ) from err
    for key in ("state_dict", "model", "teacher"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"{str(path)!r} does not hold a state dict of tensors")
    return obj, {}


def _header_arch(meta: dict[str, str], path: Path) -> tuple[str | None, dict[str, Any]]:
    name = meta.get("timm_name")
    try:
        args = json.loads(meta.get("model_args", "{}"))
    except json.JSONDecodeError as err:
        raise BackboneError(f"{str(path)!r}: header field model_args is not JSON: {err}") from err
    return name, args


def _resolve_arch(
    name: str | None, kwargs: dict[str, Any], meta: dict[str, str], path: Path
) -> tuple[str, dict[str, Any]]:
    """Combine the user's name and arguments with a weights file's header; contradictions are errors."""
    head_name, head_args = _header_arch(meta, path)
    if name is None and head_name is None:
        raise BackboneError(
            f"{str(path)!r} does not say which architecture it holds (no timm_name in its header); "
            "name it, e.g. essa.backbones.create('vit_small_patch14_dinov2', weights=...)"
        )
    if name is not None and head_name is not None and split_model_name_tag(name)[0] != split_model_name_tag(head_name)[0]:
        raise BackboneError(
            f"backbone name {name!r} contradicts the header of {str(path)!r}, which says timm_name="
            f"{head_name!r}; leave the name out or give the matching one"
        )
    for key, value in kwargs.items():
        if key in head_args and key not in RESIZABLE_ARGS and head_args[key] != value:
            raise BackboneError(
                f"argument {key}={value!r} contradicts the header of {str(path)!r}, which says "
                f"{key}={head_args[key]!r} (header model_args: {json.dumps(head_args)})"
            )
    return name or head_name, {**head_args, **kwargs}


def preprocessing(name: str | None, meta: dict[str, str] | None = None, *, weights: str | Path | None = None
                  ) -> normalize.Preprocessing:
    """How the inputs of the backbone ``name`` / ``weights`` are preprocessed (mean, std, interpolation), offline:

    - a weights file whose header records it (essa's exports): the header's;
    - another weights file: timm's pretrained config of ``name`` when it carries a tag
      (``vit_large_patch16_224.mae``), else ImageNet's statistics (essa's older exports, which were trained with
      them, and other people's checkpoints: name the tag, or set ``data.normalize``);
    - a timm name: timm's pretrained config of the name (its tag, else the architecture's default tag), e.g.
      CLIP's statistics for ``vit_base_patch16_clip_224.openai``; ImageNet's when timm has none.

    ``meta``: the header of ``weights`` when already read."""
    if weights is not None:
        if meta is None:  # a .pth file or an unreadable one has no header (create says why it cannot read it)
            meta = _header(Path(weights)) or {}
        try:
            found = normalize.from_header(meta, weights)
        except ValueError as err:
            raise BackboneError(str(err)) from None
        if found is not None:
            return found
        if name is None or not split_model_name_tag(name)[1]:
            return dataclasses.replace(normalize.IMAGENET,
                                       source=f"imagenet ({Path(weights).name} records no preprocessing)")
    return (normalize.of_timm_name(name) if name else None) or normalize.IMAGENET


def map_keys(state_dict: dict[str, torch.Tensor], key_map: dict[str, str | None]) -> dict[str, torch.Tensor]:
    """``state_dict`` with each key's longest matching prefix of ``key_map`` replaced by its value (``""``: the
    prefix removed; None: the tensor dropped); keys no prefix matches stay as they are. Two keys mapped onto one
    is an error."""
    prefixes = sorted(key_map, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is not None:
            if key_map[prefix] is None:
                continue
            new = key_map[prefix] + key[len(prefix):]
        else:
            new = key
        if new in out:
            raise BackboneError(f"backbone.key_map {json.dumps(key_map)} maps both {origin[new]!r} and {key!r} to "
                                f"{new!r}; drop one of the prefixes with null, e.g. {{{json.dumps(prefix or key)}: null}}")
        out[new], origin[new] = value, key
    return out


def create(
    name: str | None = None,
    *,
    pretrained: bool = False,
    img_size: int | None = None,
    weights: str | Path | None = None,
    dynamic_img_size: bool = False,
    num_classes: int | None = None,
    key_map: dict[str, str | None] | None = None,
    **model_args: Any,
) -> VisionTransformer:
    """Build a timm Vision Transformer.

    Args:
        name: a timm ViT or Eva name, with or without pretrained tag (``vit_small_patch14_dinov2.lvd142m``,
            ``vit_small_patch16_dinov3.lvd1689m``).
            May be left out when ``weights`` is a file whose header names the architecture.
        pretrained: load the tag's pretrained weights through timm / the Hugging Face Hub.
        img_size: input size; position embeddings of loaded weights are resampled to it.
        weights: a local weights file (safetensors, or a PyTorch state dict read with ``weights_only=True``).
        dynamic_img_size: accept any input size at run time (multi-crop), resampling position embeddings.
        num_classes: size of a classification head (0: none, the model returns pooled features). None: the
            ``num_classes`` in the header of ``weights`` (a classifier export), else 0.
        key_map: for ``weights`` whose keys are not timm's: key prefix -> its replacement (``""`` removes it,
            None drops the tensors), e.g. ``{"module.": ""}`` (:func:`map_keys`); applied before timm's
            ``checkpoint_filter_fn``.
        model_args: further ``timm.create_model`` keyword arguments (``patch_size``, ``drop_path_rate``...), and
            ``global_pool="token+avg"``: a head on the CLS token concatenated with the mean patch token
            (:class:`TokenAvgViT`).

    Returns a timm ``VisionTransformer`` or ``Eva`` (DINOv3, EVA-02; CLS-token pooling unless ``global_pool`` is
    given) whose ``essa_arch`` attribute records ``timm_name`` and ``model_args`` (with ``num_classes`` when the
    model has a head, so that a classifier's weights file rebuilds its head), and ``licence`` when the weights come
    under one of :data:`NOTED_LICENCES` (DINOv3's; said once as a warning), and whose ``essa_preprocessing`` is
    :func:`preprocessing` of the name and weights.
    """
    if pretrained and weights is not None:
        raise BackboneError("give either pretrained=True or weights=PATH, not both")
    if key_map and weights is None:
        raise BackboneError(f"key_map {json.dumps(key_map)} renames the keys of a weights file: give weights=PATH "
                            "(backbone.weights, --weights) too")
    kwargs = dict(model_args)
    if img_size is not None:
        kwargs["img_size"] = int(img_size)
    if dynamic_img_size:
        kwargs["dynamic_img_size"] = True

    state_dict, meta = None, {}
    if weights is not None:
        state_dict, meta = read_state_dict(weights)
        name, kwargs = _resolve_arch(name, kwargs, meta, Path(weights))
    elif name is None:
        raise BackboneError("give a backbone name (e.g. 'vit_small_patch14_dinov2.lvd142m') or weights=PATH")
    _check_name(name)
    header_classes = kwargs.pop("num_classes", 0)
    num_classes = header_classes if num_classes is None else num_classes
    token_avg = kwargs.get("global_pool") == TOKEN_AVG_POOL
    timm_kwargs = _timm_kwargs(name, {**kwargs, "global_pool": "token", "fc_norm": False} if token_avg else kwargs)

    if pretrained:
        # an Eva loads its checkpoint in the layout timm's default pooling gives (EVA-02 keeps its final norm as
        # fc_norm there), then takes essa's pooling
        eva = _is_eva_name(name)
        load_kwargs = {k: v for k, v in timm_kwargs.items() if k not in ("global_pool", "use_fc_norm")} if eva \
            else timm_kwargs
        with _hub_offline_unless_reachable():
            try:
                model = timm.create_model(name, pretrained=True, num_classes=num_classes, **load_kwargs)
            except OSError as err:  # huggingface_hub's "neither reachable nor cached" errors are OSErrors
                raise BackboneError(_offline_message(name, err)) from err
        if eva:
            with torch.device("meta"):
                target = timm.create_model(split_model_name_tag(name)[0], num_classes=num_classes, **timm_kwargs)
            families.adopt_pooling(model, target)
    else:
        model = timm.create_model(split_model_name_tag(name)[0], pretrained=False, num_classes=num_classes, **timm_kwargs)
    reason = families.unsupported(model)
    if reason is not None:
        raise BackboneError(f"{name!r} built {reason}")
    families.prepare(model)
    if token_avg:
        model = _token_avg(model, num_classes)

    model.essa_arch = {"timm_name": split_model_name_tag(name)[0],
                       "model_args": {**kwargs, "num_classes": num_classes} if num_classes else dict(kwargs)}
    # The weights' licence: the header's, else timm's for pretrained weights or a foreign file (not an essa export)
    licence = meta.get("licence") or (licence_of(name) if pretrained or (weights is not None and
                                                                         "timm_name" not in meta) else None)
    if licence:
        model.essa_arch["licence"] = licence
        note_licence(name, licence)
    model.essa_preprocessing = preprocessing(name, meta, weights=weights)
    if state_dict is not None:
        if key_map:
            state_dict = map_keys(state_dict, key_map)
        _load_into(model, state_dict, meta, Path(weights), key_map)
    return model


def _prefix_hint(unexpected: list[str], model_keys: list[str]) -> str:
    """A key_map that would fit: the commonest prefix before a model key among the unexpected keys."""
    counts: dict[str, int] = {}
    for key in unexpected:
        for own in model_keys:
            if key.endswith("." + own):
                prefix = key[: -len(own)]
                counts[prefix] = counts.get(prefix, 0) + 1
                break
    if not counts:
        return ""
    prefix = max(counts, key=counts.get)
    return (f" {counts[prefix]} unexpected keys are model keys behind the prefix {prefix!r}: try "
            f"--key-map {prefix}= (backbone.key_map: {{{json.dumps(prefix)}: ''}}; null drops a prefix's tensors).")


def _keys(keys: list[str], n: int = 5) -> str:
    return f"{len(keys)} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})" if keys else "0"


def _load_into(model: VisionTransformer, state_dict: dict[str, torch.Tensor], meta: dict[str, str], path: Path,
               key_map: dict[str, str | None] | None = None):
    from essa import tuners  # tuners import backbones' neighbours; import here to keep module load light

    tuner = meta.get("essa_tuner")
    if tuner:
        # A file exported from a tuner that cannot fold into plain weights (VPT, AdaptFormer) keeps its modules.
        tuners.apply(model, tuner, **json.loads(meta.get("essa_tuner_options", "{}")))
    _check_geometry(model, state_dict, meta, path)
    state_dict = families.checkpoint_filter(model)(state_dict, model)
    if model.num_classes == 0:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        mapped = f" after backbone.key_map {json.dumps(key_map)}" if key_map else ""
        raise BackboneError(
            f"weights in {str(path)!r}{mapped} do not fit {model.essa_arch['timm_name']} "
            f"{json.dumps(model.essa_arch['model_args'])}: missing keys {_keys(missing)}, unexpected keys "
            f"{_keys(unexpected)}.{_prefix_hint(unexpected, list(model.state_dict()))}"
        )
    if tuner:
        tuners.bake(model)


def _check_geometry(model: VisionTransformer, state_dict: dict[str, torch.Tensor], meta: dict[str, str], path: Path):
    """The patch size and width the architecture (header or arguments) gives must be the tensors': timm would
    silently resample a patch embedding of another size, and a width mismatch is a size-mismatch traceback."""
    weight = state_dict.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        return
    said = "its header says" if meta.get("model_args") or meta.get("timm_name") else "the architecture built has"
    own = model.patch_embed.proj.weight
    if tuple(weight.shape[-2:]) != tuple(own.shape[-2:]):
        raise BackboneError(
            f"{str(path)!r}: {said} patch size {own.shape[-1]} ({model.essa_arch['timm_name']} "
            f"{json.dumps(model.essa_arch['model_args'])}), but its patch embedding holds {weight.shape[-1]} px "
            f"patches ({tuple(weight.shape)}); the header or the backbone arguments do not describe these weights"
        )
    if weight.shape[0] != own.shape[0]:
        raise BackboneError(
            f"{str(path)!r}: {said} width (embed_dim) {own.shape[0]} ({model.essa_arch['timm_name']} "
            f"{json.dumps(model.essa_arch['model_args'])}), but its tensors are {weight.shape[0]} wide "
            f"(patch_embed.proj.weight {tuple(weight.shape)}); the header or the backbone arguments do not describe "
            "these weights"
        )


def check_img_size(img_size: int, patch_size: int, what: str) -> None:
    """Refuse an image size the patch size does not divide (the ViT would use only part of each image)."""
    if img_size % patch_size:
        lower, upper = img_size // patch_size * patch_size, (img_size // patch_size + 1) * patch_size
        sizes = f"{lower} or {upper}" if lower else f"{upper}"
        raise BackboneError(f"{what}={img_size} is not a multiple of the backbone's patch size {patch_size}: "
                            f"use {sizes} (a multiple of {patch_size})")


def patch_size(name: str | None = None, *, weights: str | Path | None = None, **model_args: Any) -> int:
    """The patch size of the backbone :func:`create` would build, without building it (the architecture on the
    meta device; a weights file's header, or its patch embedding's shape), so that image sizes are checked before
    any work."""
    if weights is not None:
        meta = _header(Path(weights))
        if meta is None:
            _, meta = read_state_dict(weights)
        name, model_args = _resolve_arch(name, dict(model_args), meta, Path(weights))
    elif name is None:
        raise BackboneError("give a backbone name (e.g. 'vit_small_patch14_dinov2.lvd142m') or weights=PATH")
    _check_name(name)
    args = _timm_kwargs(name, {k: v for k, v in model_args.items() if k not in ("num_classes", "global_pool")})
    with torch.device("meta"):
        model = timm.create_model(split_model_name_tag(name)[0], pretrained=False, num_classes=0, **args)
    return int(model.patch_embed.patch_size[0])


def _header(path: Path) -> dict[str, str] | None:
    """The header metadata of a readable safetensors file without reading its tensors; None otherwise."""
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # unreadable: read_state_dict says why
        return None
