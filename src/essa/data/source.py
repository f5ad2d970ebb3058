"""``Source``: the records of one dataset, its class names, and how to decode each record."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from PIL import Image

from essa.data import files, images
from essa.data.records import DataError, Record


def task_of(classes: list[str], multilabel: bool = False) -> str | None:
    """Task hint from the labels: ``binary``, ``multiclass``, ``multilabel``, or None when unlabelled."""
    if not classes:
        return None
    if multilabel:
        return "multilabel"
    return "binary" if len(classes) == 2 else "multiclass"


def require_classes(classes: list[str], where: str) -> None:
    """A labelled dataset needs two classes or more."""
    if len(classes) < 2:
        found = f"one class ({classes[0]})" if classes else "no classes"
        raise DataError(
            f"{where} has {found}; a labelled dataset needs at least two "
            "(pass labels=False to read the images without labels)"
        )


class Source:
    """The images of one dataset.

    Attributes:
        path: where it was opened from.
        records: one ``Record`` per 2-D image, in a stable order.
        classes: class names; a record's label indexes this list. Empty when unlabelled.
        task: ``binary``, ``multiclass``, ``multilabel``, ``ordinal`` or None (unlabelled).
        ignored: files found but not read (unsupported extensions), listed so that nothing is skipped silently.
        decode: how DICOM / NIfTI intensities are mapped (``files.Decode``), None where it does not apply.
        notes: what the reader decided that the user should hear (a CSV's repeated rows read once, a label column
            it did not recognise), one line each.
    """

    kind = "source"
    decode: files.Decode | None = None

    def __init__(self, path, records: list[Record], classes: list[str], task: str | None, ignored=()):
        self.path = str(path)
        self.records = list(records)
        self.classes = list(classes)
        self.task = task
        self.ignored = list(ignored)
        self.notes: list[str] = []
        if not self.records:
            raise DataError(f"{self.path} has no images ({files.LOOKED_FOR})")

    def read(self, record: Record) -> Image.Image:
        """Decode a record in its own mode (``L``, ``RGB``, ``I;16``, ``P``...)."""
        raise NotImplementedError

    def load(self, record: Record) -> Image.Image:
        """Decode a record as the 8-bit RGB image the model sees (``images.to_rgb``)."""
        return images.to_rgb(self.read(record))

    def stamp(self, record: Record) -> str:
        """Identity of a record's decoded pixels, for caches: changes when its file or the decoding changes."""
        stat = os.stat(record.file)
        return f"{record.path}|{stat.st_size}|{stat.st_mtime_ns}|{self.decode}"

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        labels = f"{len(self.classes)} classes, {self.task}" if self.classes else "unlabelled"
        return f"<{self.kind} {self.path}: {len(self.records)} images, {labels}>"


class FileSource(Source):
    """Records read from files (image, DICOM, NIfTI), listed by a folder, a CSV manifest or a single path."""

    def __init__(
        self,
        path,
        kind: str,
        entries: Iterable[tuple[str, object, str | None, str | None]],
        classes: list[str],
        decode: files.Decode,
        multilabel: bool = False,
        ignored=(),
    ):
        """``entries``: ``(file, label, group, split)`` per file; DICOM and NIfTI files expand to several records."""
        self.kind = kind
        self.decode = decode
        records = [r for file, label, group, split in entries for r in files.expand(file, decode, label, group, split)]
        super().__init__(path, records, classes, task_of(classes, multilabel), ignored)

    def read(self, record: Record) -> Image.Image:
        return files.read(record, self.decode)


class CombinedSource(Source):
    """The images of several sources as one unlabelled source (SSA on a task's images plus more folders).

    A record keeps its own path; each path is decoded by the source it came from. A path listed by two sources
    (the same file named twice) is kept once, from the first.
    """

    kind = "combined"

    def __init__(self, parts: list[tuple[Source, list[Record]]]):
        self._owner: dict[str, Source] = {}
        records = []
        for source, part in parts:
            for record in part:
                if record.path not in self._owner:
                    self._owner[record.path] = source
                    records.append(dataclasses.replace(record, label=None))
        super().__init__(" + ".join(source.path for source, _ in parts), records, [], None)

    def read(self, record: Record) -> Image.Image:
        return self._owner[record.path].read(record)

    def load(self, record: Record) -> Image.Image:
        return self._owner[record.path].load(record)

    def stamp(self, record: Record) -> str:
        return self._owner[record.path].stamp(record)
