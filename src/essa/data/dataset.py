"""``ImageDataset``: a torch Dataset over records that survives unreadable files and reports them."""

from __future__ import annotations

import random
import warnings

import torch
from torchvision.transforms import v2

from essa.data.cache import DiskCache
from essa.data.records import DataError, Record
from essa.data.source import Source
from essa.data.transforms import eval_transform, interpolation_mode, tensor_steps


class ImageDataset(torch.utils.data.Dataset):
    """``(image, label)`` per record.

    ``image`` is ``transform(source.load(record))`` (default ``eval_transform(224)``: a (3, 224, 224) float tensor).
    ``label`` is the class index (int); for multi-label records a float 0/1 tensor of shape (len(classes),);
    -1 for unlabelled records (SSA), so that batches still collate.

    A record that cannot be decoded is replaced by the next readable record (the batch keeps its size), warned
    about, and listed in ``report``, also when it failed in a DataLoader worker process: the failures are flagged
    in shared memory. ``cache`` (a ``DiskCache``) serves decoded, downsized images from disk.
    """

    def __init__(
        self, source: Source, records: list[Record] | None = None, transform=None, cache: DiskCache | None = None
    ):
        self.source = source
        self.records = list(source.records if records is None else records)
        self.transform = transform or eval_transform()
        self.cache = cache
        # Shared with worker processes (a tensor in shared memory), so the main process sees their failures.
        self._failed = torch.zeros(len(self.records), dtype=torch.bool).share_memory_()
        self._reasons: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _label(self, record: Record):
        if record.label is None:
            return -1
        if isinstance(record.label, tuple):
            target = torch.zeros(len(self.source.classes))
            target[list(record.label)] = 1.0
            return target
        return record.label

    def _load(self, record: Record):
        return self.cache.load(self.source, record) if self.cache else self.source.load(record)

    def __getitem__(self, i: int):
        for step in range(len(self)):
            j = (i + step) % len(self)
            if self._failed[j]:
                continue
            record = self.records[j]
            try:
                image = self._load(record)
            except Exception as err:  # decoders raise many types; one bad file must not end the run
                self._failed[j] = True
                self._reasons[j] = f"{type(err).__name__}: {err}"
                warnings.warn(f"skipped unreadable image {record.path}: {self._reasons[j]}", stacklevel=2)
                continue
            return self.transform(image), self._label(record)
        raise DataError(f"none of the {len(self)} images from {self.source.path} could be read: {self.report[:3]}")

    def _reason(self, j: int) -> str:
        # A worker's message stays in the worker; decoding again here recovers it.
        if j not in self._reasons:
            try:
                self._load(self.records[j])
                self._reasons[j] = "failed in a worker process, readable now"
            except Exception as err:
                self._reasons[j] = f"{type(err).__name__}: {err}"
        return self._reasons[j]

    @property
    def report(self) -> list[dict]:
        """``{"path", "reason"}`` for each record skipped so far, in record order."""
        failed = self._failed.nonzero().flatten().tolist()
        return [{"path": self.records[j].path, "reason": self._reason(j)} for j in failed]


def dataset_stats(
    source: Source, records: list[Record] | None = None, img_size: int = 224, max_images: int = 1000,
    seed: int = 0, workers: int = 0, interpolation: str = "bilinear",
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel ``(mean, std)`` (population) of pixel values in 0..1, over the eval view (resize the shorter side
    to ``img_size`` with ``interpolation``, centre crop) of at most ``max_images`` records (a seeded sample);
    unreadable records are skipped. ``data.normalize: dataset`` (:func:`essa.data.normalize.resolve`) uses them."""
    records = list(source.records if records is None else records)
    if len(records) > max_images:
        records = random.Random(seed).sample(records, max_images)
    plain = v2.Compose([v2.Resize(img_size, interpolation=interpolation_mode(interpolation), antialias=True),
                        v2.CenterCrop(img_size), *tensor_steps()])
    loader = torch.utils.data.DataLoader(ImageDataset(source, records, plain), batch_size=64, num_workers=workers)
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for batch, _ in loader:
        pixels = batch.double().transpose(0, 1).reshape(3, -1)
        total += pixels.sum(1)
        squares += (pixels**2).sum(1)
        count += pixels.shape[1]
    mean = total / count
    std = (squares / count - mean**2).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
