"""The preprocessing of a backbone: the per-channel ``mean`` / ``std`` its inputs are normalised with and the
``interpolation`` images are resized with, in one place for every stage (SSA views, fine-tuning, probes, kNN,
``essa evaluate``).

- :class:`Preprocessing`: the three values and where they came from (``source``).
- :func:`of_model`: a model's own: what ``essa.backbones.create`` attached (``model.essa_preprocessing``: the
  header of an essa weights file, or timm's pretrained config of the name), else timm's
  ``resolve_model_data_config`` of the model, else :data:`IMAGENET`.
- :func:`resolve`: what a stage normalises with under the config key ``data.normalize``: ``model`` (the model's
  own, given as ``own``), ``imagenet`` (:data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`) or ``dataset`` (per-channel
  statistics of at most ``max_images`` training images after resizing to the model's size, a seeded sample,
  cached in a JSON file).
- :func:`header` / :func:`from_header`: the safetensors header fields (``mean``, ``std``: JSON lists;
  ``interpolation``; ``normalize``: the mode and source) that an exported model carries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from essa.data.transforms import IMAGENET_MEAN, IMAGENET_STD
#: ``data.normalize`` values.
MODES = ("model", "imagenet", "dataset")
#: Header fields of an exported model's preprocessing.
HEADER_KEYS = ("mean", "std", "interpolation", "normalize")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """``mean``, ``std``: 3 floats (pixels in 0..1 become ``(x - mean) / std``); ``interpolation``: how images are
    resized (``bilinear``, ``bicubic``, ``nearest``); ``source``: where the values came from (for run records)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    source: str = "imagenet"

    def __post_init__(self):
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ValueError(f"preprocessing needs 3 means and 3 positive stds, got mean={self.mean}, std={self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def with_stats(self, mean, std, source: str) -> Preprocessing:
        return dataclasses.replace(self, mean=tuple(mean), std=tuple(std), source=source)

    def describe(self) -> str:
        """``mean (0.481, 0.458, 0.408), std (0.269, 0.261, 0.276), bicubic: <source>``."""
        def fmt(values):
            return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"

        return f"mean {fmt(self.mean)}, std {fmt(self.std)}, {self.interpolation}: {self.source}"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "source": self.source}


#: The fallback: ImageNet's statistics, bilinear resizing (what essa used for every model before it read timm's
#: pretrained configs, so also what its older weights files, without these header fields, were trained with).
IMAGENET = Preprocessing()


def from_timm_cfg(cfg: dict[str, Any] | None, source: str) -> Preprocessing | None:
    """The preprocessing of a timm pretrained config (a dict with ``mean``, ``std``, ``interpolation``); None when
    it has none."""
    if not cfg or cfg.get("mean") is None or cfg.get("std") is None:
        return None
    interpolation = cfg.get("interpolation") or "bicubic"
    return Preprocessing(tuple(cfg["mean"]), tuple(cfg["std"]),
                         interpolation if interpolation in INTERPOLATIONS else "bicubic", source)


def of_timm_name(name: str) -> Preprocessing | None:
    """timm's pretrained config of a model name (with its tag, or the architecture's default tag), offline."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # an unknown name or tag: no config (the name is checked elsewhere)
        return None
    return from_timm_cfg(cfg.to_dict() if cfg is not None else None, f"timm pretrained config of {name}")


def of_model(model) -> Preprocessing:
    """The model's own preprocessing: ``model.essa_preprocessing`` (set by ``essa.backbones.create`` and by the
    stages that train it), else timm's data config of ``model.pretrained_cfg``, else :data:`IMAGENET`."""
    own = getattr(model, "essa_preprocessing", None)
    if own is not None:
        return own
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg:
        from timm.data import resolve_model_data_config

        found = from_timm_cfg(resolve_model_data_config(model), f"timm pretrained config of "
                                                                f"{cfg.get('architecture')}.{cfg.get('tag')}")
        if found is not None:
            return found
    return IMAGENET


def header(pre: Preprocessing) -> dict[str, str]:
    """Safetensors header fields recording ``pre``."""
    return {"mean": json.dumps(list(pre.mean)), "std": json.dumps(list(pre.std)), "interpolation": pre.interpolation,
            "normalize": pre.source}


def from_header(meta: dict[str, str], path: str | Path) -> Preprocessing | None:
    """The preprocessing a weights file's header records; None when it records none (older files)."""
    if "mean" not in meta or "std" not in meta:
        return None
    try:
        mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
        return Preprocessing(tuple(mean), tuple(std), meta.get("interpolation", "bicubic"),
                             meta.get("normalize") or f"header of {path}")
    except (ValueError, TypeError) as err:
        raise ValueError(f"{str(path)!r}: header fields mean={meta['mean']!r}, std={meta['std']!r}, interpolation="
                         f"{meta.get('interpolation')!r} do not describe a preprocessing ({err})") from err


def check_mode(mode: str, where: str = "data.normalize") -> None:
    if mode not in MODES:
        raise ValueError(f"{where}={mode!r}; valid choices: {', '.join(MODES)} (model: the backbone's own "
                         "statistics, imagenet: ImageNet's, dataset: computed from the training images)")


def dataset_key(source, records, img_size: int, max_images: int, seed: int, interpolation: str) -> str:
    """What identifies the dataset statistics of ``records`` (for the cache)."""
    stamps = hashlib.sha256(json.dumps([source.stamp(r) for r in records], default=str).encode()).hexdigest()
    return json.dumps({"img_size": img_size, "max_images": max_images, "seed": seed, "interpolation": interpolation,
                       "images": len(records), "stamps": stamps}, sort_keys=True)


def resolve(mode: str, own: Preprocessing, source=None, records=None, *, img_size: int | None = None,
            max_images: int = 1000, seed: int = 0, cache: str | Path | None = None) -> Preprocessing:
    """What a stage normalises with (``mode``: :data:`MODES`). ``own``: the backbone's own preprocessing
    (:func:`of_model`; it gives the interpolation in every mode, and the statistics with ``model``); ``dataset``
    needs ``source``, ``records`` (the training images) and ``img_size``, and reads / writes ``cache`` (JSON) when
    given."""
    check_mode(mode)
    if mode == "model":
        return own
    if mode == "imagenet":
        return own.with_stats(IMAGENET_MEAN, IMAGENET_STD, "imagenet")
    if source is None or records is None or img_size is None:
        raise ValueError("data.normalize=dataset needs the training images and the image size")
    from essa.data.dataset import dataset_stats

    key = dataset_key(source, records, img_size, max_images, seed, own.interpolation)
    path = Path(cache) if cache is not None else None
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return own.with_stats(saved["mean"], saved["std"], saved["source"])
        except (ValueError, KeyError):
            pass  # an unreadable cache is computed again
    n = min(len(records), max_images)
    mean, std = dataset_stats(source, records, img_size=img_size, max_images=max_images, seed=seed,
                              interpolation=own.interpolation)
    pre = own.with_stats(mean, std, f"dataset ({n} images of {source.path} at {img_size} px)")
    if path is not None:
        from essa import io

        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_json(path, {"key": key, **pre.to_dict()})
    return pre
