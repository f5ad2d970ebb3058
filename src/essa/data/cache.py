"""An on-disk cache of decoded, downsized images, so that each epoch does not decode full-size files again."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.transforms.v2 import functional as F

from essa import io
from essa.data.records import Record
from essa.data.source import Source


class DiskCache:
    """RGB images with the shorter side resized to at most ``size`` px, as ``.npy`` files under ``folder``.

    Use the transforms' ``img_size`` as ``size``: the eval transform's resize then leaves a cached image as it is,
    so cached and uncached inputs are identical. Entries are keyed by ``Source.stamp`` (path, file size and
    mtime, decoding options) and ``size``, so an edited file or another window is decoded afresh. Writes are
    atomic (write, then rename): DataLoader workers can share one cache.
    """

    def __init__(self, folder: str | Path, size: int = 224):
        self.folder = Path(folder)
        self.size = int(size)

    def _path(self, source: Source, record: Record) -> Path:
        key = hashlib.blake2b(f"{source.stamp(record)}|{self.size}".encode(), digest_size=16).hexdigest()
        return self.folder / key[:2] / f"{key}.npy"

    def load(self, source: Source, record: Record) -> Image.Image:
        """The cached image, decoding and storing it on a miss."""
        path = self._path(source, record)
        try:
            return Image.fromarray(np.load(path))
        except FileNotFoundError:
            pass
        image = source.load(record)
        if min(image.size) > self.size:
            image = F.resize(image, self.size, antialias=True)
        with io.replacing(path) as partial, open(partial, "wb") as handle:
            np.save(handle, np.asarray(image))
        return image
