"""What every source yields: one ``Record`` per 2-D image, and the error raised for bad input."""

from __future__ import annotations

from dataclasses import dataclass

from essa.errors import EssaError

# Canonical split names, and the folder names / CSV values that mean them (compared lower-cased).
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}


class DataError(EssaError, ValueError):
    """Input data that essa cannot use; the message names the file and what was expected."""


@dataclass(frozen=True)
class Record:
    """One 2-D image of a source.

    Attributes:
        path: the image file, or a key inside a file: ``file.npz#train/12`` (MedMNIST row),
            ``scan.dcm#frame=3`` (DICOM frame), ``volume.nii.gz#axis2=40`` (NIfTI slice). Unique within a source.
        label: class index into ``source.classes``; a tuple of class indices for multi-label; None if unlabelled.
        group: patient / group id; records of one group never go to different splits. None if unknown.
        split: ``"train"``, ``"val"``, ``"test"`` or None (no official split).
        index: frame, slice or row inside ``file`` when the path is a key; None for a plain image file.
    """

    path: str
    label: int | tuple[int, ...] | None = None
    group: str | None = None
    split: str | None = None
    index: int | None = None

    @property
    def file(self) -> str:
        """The file on disk that holds the image (``path`` without its ``#`` key)."""
        return self.path.rpartition("#")[0] if self.index is not None else self.path


def split_name(value: str, where: str) -> str:
    """Canonical split name of a folder name or CSV value (``Training`` -> ``train``)."""
    name = SPLIT_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise DataError(f"{where}: split {value!r} is not one of {', '.join(sorted(SPLIT_ALIASES))}")
    return name
