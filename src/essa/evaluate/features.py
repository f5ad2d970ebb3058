"""What a model computes on a labelled set of images, in eval mode: frozen CLS features or class probabilities.

One loop serves every evaluation (the SSA kNN monitor, kNN and linear probes, classifier test metrics):
:func:`forward_images` runs a function of the model over the eval view (resize, centre crop, normalise) of each
image, normalised with the model's preprocessing (:func:`essa.data.normalize.of_model`) unless told otherwise.
:func:`cached_cls_features` keeps features on disk, so that several protocols share one extraction.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from essa import data, export
from essa.data import Record, Source

_FEATURES_KIND = "essa-features"


class Outputs(NamedTuple):
    """``values``: (N, ...) float32 outputs on the CPU; ``labels``: (N,) int64 class indices or (N, L) float 0/1
    multi-hot targets; ``records``: the N images, in order (unreadable images are left out of all three)."""

    values: torch.Tensor
    labels: torch.Tensor
    records: list[Record]


@torch.no_grad()
def forward_images(
    model: nn.Module,
    fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    source: Source,
    records: list[Record] | None = None,
    *,
    img_size: int,
    batch_size: int = 64,
    num_workers: int = 0,
    distributed: bool = False,
    preprocessing: data.normalize.Preprocessing | None = None,
    transform: Callable | None = None,
) -> Outputs:
    """``fn(model, x)`` for batches ``x`` (B, 3, img_size, img_size) of the eval view of ``records`` (default: all
    of ``source``), with ``model`` in eval mode on its own device; its training mode is restored afterwards.
    ``preprocessing``: the mean, std and interpolation of the view (default: the model's own,
    :func:`essa.data.normalize.of_model`). ``transform``: another view instead of the eval view (e.g. the training
    augmentation; it then draws from torch's global random generator, in the order of ``records``).

    ``distributed``: when a torch.distributed process group runs, every process of it must call this; each computes
    an equal block of the images (the last block padded with the last image, so that every process runs the same
    batches: a sharded model gathers its weights batch by batch) and every process gets all outputs, in order.
    """
    preprocessing = preprocessing or data.normalize.of_model(model)
    dataset = data.ImageDataset(source, records,
                                transform=transform or data.transforms.eval_transform(img_size,
                                                                                      preprocessing=preprocessing))
    rank, world = 0, 1
    if distributed and dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    share = math.ceil(len(dataset) / world)
    positions = [min(p, len(dataset) - 1) for p in range(rank * share, (rank + 1) * share)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    values, labels = [], []
    try:
        for x, y in torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, positions), batch_size=batch_size,
                                                num_workers=num_workers):
            values.append(fn(model, x.to(device)).float().cpu())
            labels.append(y)
    finally:
        model.train(was_training)
    mine = (torch.cat(values), torch.cat(labels), {item["path"] for item in dataset.report})
    parts = [mine]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    n = len(dataset)
    out = Outputs(torch.cat([p[0] for p in parts])[:n], torch.cat([p[1] for p in parts])[:n], dataset.records)
    # ImageDataset fills an unreadable image's row with the next readable image (and warns): drop those rows, so
    # that every row is the record it is listed as.
    failed = set().union(*(p[2] for p in parts))
    if failed:
        keep = [i for i, r in enumerate(dataset.records) if r.path not in failed]
        out = Outputs(out.values[keep], out.labels[keep], [dataset.records[i] for i in keep])
    return out


def _cls_token(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)[:, 0]


def cls_features(backbone: nn.Module, source: Source, records: list[Record] | None = None, *, img_size: int,
                 batch_size: int = 64, num_workers: int = 0, distributed: bool = False,
                 preprocessing: data.normalize.Preprocessing | None = None) -> Outputs:
    """CLS token features (N, D) of ``backbone.forward_features`` (a timm ViT, its head ignored)."""
    return forward_images(backbone, _cls_token, source, records, img_size=img_size, batch_size=batch_size,
                          num_workers=num_workers, distributed=distributed, preprocessing=preprocessing)


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """(N, C) class probabilities of (N, C) logits: per-label sigmoids for ``multilabel``, else a softmax."""
    return logits.float().sigmoid() if task == "multilabel" else logits.float().softmax(dim=1)


def _scores(model: nn.Module, x: torch.Tensor, task: str) -> torch.Tensor:
    return probabilities(model(x), task)


def classifier_scores(model: nn.Module, source: Source, records: list[Record] | None = None, *, task: str,
                      img_size: int, batch_size: int = 64, num_workers: int = 0, distributed: bool = False,
                      preprocessing: data.normalize.Preprocessing | None = None) -> Outputs:
    """(N, C) class probabilities of a classifier (a timm ViT with its head)."""
    return forward_images(model, functools.partial(_scores, task=task), source, records, img_size=img_size,
                          batch_size=batch_size, num_workers=num_workers, distributed=distributed,
                          preprocessing=preprocessing)


def cached_cls_features(backbone: nn.Module, source: Source, records: list[Record], path: str | Path,
                        identity: dict[str, Any], *, img_size: int, batch_size: int = 64,
                        num_workers: int = 0, preprocessing: data.normalize.Preprocessing | None = None) -> Outputs:
    """:func:`cls_features`, read from ``path`` (safetensors) when it holds the features of the same images by the
    same model, else computed and written there.

    ``identity``: JSON-serialisable description of the backbone (name, weights file and its size and time...);
    with ``img_size``, the preprocessing (mean, std, interpolation; default the backbone's own) and each record's
    stamp (path, file size and time, decoding) and label it makes the fingerprint that a cached file must match.
    """
    path = Path(path)
    preprocessing = preprocessing or data.normalize.of_model(backbone)
    images = [(source.stamp(r), r.label) for r in records]
    view = {k: v for k, v in preprocessing.to_dict().items() if k != "source"}
    fingerprint = hashlib.sha256(
        json.dumps({"backbone": identity, "img_size": img_size, "preprocessing": view, "images": images},
                   sort_keys=True, default=str).encode()
    ).hexdigest()
    if path.is_file():
        tensors, meta = export.load_weights(path)
        if meta.get("essa_kind") == _FEATURES_KIND and meta.get("fingerprint") == fingerprint:
            by_path = {r.path: r for r in records}
            return Outputs(tensors["features"], tensors["labels"], [by_path[p] for p in json.loads(meta["paths"])])
    out = cls_features(backbone, source, records, img_size=img_size, batch_size=batch_size, num_workers=num_workers,
                       preprocessing=preprocessing)
    meta = {"essa_kind": _FEATURES_KIND, "fingerprint": fingerprint,
            "paths": json.dumps([r.path for r in out.records])}
    export.save_weights({"features": out.values, "labels": out.labels}, path, meta)
    return out
