"""``open_source``: which source a path is, and the options each source takes."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path

from essa.data import files, medmnist
from essa.data.csv_manifest import open_csv
from essa.data.folder import open_folder
from essa.data.records import DataError
from essa.data.source import FileSource, Source
from essa.errors import NotFoundError

DECODE_OPTIONS = ("window", "percentiles", "axis")


def open_file(path: str | Path, decode: files.Decode = files.Decode()) -> FileSource:
    """One image, DICOM or NIfTI file, unlabelled: its frames or slices are the records."""
    return FileSource(path, "file", [(str(path), None, None, None)], [], decode)


def open_medmnist_name(name: str, size: int = 28, root: str | Path | None = None) -> medmnist.MedMNISTSource:
    """A MedMNIST dataset by name, downloaded into ``root`` (default ``~/.medmnist``) by the medmnist package."""
    return medmnist.MedMNISTSource(medmnist.download(name, size, root))


def _call(opener, what: str, path, options: dict) -> Source:
    """Call ``opener(path, **options)``, naming the valid options when one is unknown."""
    params = list(inspect.signature(opener).parameters)[1:]
    if "labels" not in params and options.get("labels") is False:  # a source without labels: nothing to ignore
        options = {k: v for k, v in options.items() if k != "labels"}
    takes_decode = "decode" in params
    allowed = [p for p in params if p != "decode"] + (list(DECODE_OPTIONS) if takes_decode else [])
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) or "none"
        raise DataError(f"unknown option {unknown[0]!r} for {what} {path}; valid options: {valid}")
    if takes_decode:
        decode = files.Decode(**{k: options.pop(k) for k in DECODE_OPTIONS if k in options})
        options = {**options, "decode": decode}
    return opener(path, **options)


def open_source(path_or_config: str | Path | Mapping, **options) -> Source:
    """Open a dataset; what the path is decides how.

    - a folder: ``open_folder`` (options: ``labels``);
    - a ``.csv`` / ``.tsv`` manifest: ``open_csv`` (``root``, ``labels``, ``path_column``, ``label_column``,
      ``label_columns``, ``group_column``, ``split_column``, ``classes``);
    - a ``.npz``: a MedMNIST file;
    - an image, DICOM or NIfTI file: that file alone, unlabelled;
    - a MedMNIST name (``"breastmnist"``) that is not an existing path: downloaded with the ``medmnist``
      package (``size``, ``root``).

    Sources that read DICOM / NIfTI files also take ``window=(centre, width)``, ``percentiles=(low, high)`` and
    ``axis`` (see ``files.Decode``). ``path_or_config`` may be a dict with ``path`` and any of these options.
    """
    if isinstance(path_or_config, Mapping):
        options = {**path_or_config, **options}
        if "path" not in options:
            raise DataError(f"a source config needs a 'path'; got keys {', '.join(options) or 'none'}")
        path_or_config = options.pop("path")
    path = Path(path_or_config)
    if not path.exists():
        if medmnist.NAME.fullmatch(str(path_or_config)):
            return _call(open_medmnist_name, "MedMNIST dataset", str(path_or_config), options)
        raise NotFoundError(f"{path} does not exist (expected a folder, a .csv manifest, a .npz or an image file)")
    if path.is_dir():
        return _call(open_folder, "image folder", path, options)
    kind = files.extension(path)
    if kind in (".csv", ".tsv"):
        return _call(open_csv, "CSV manifest", path, options)
    if kind == ".npz":
        return _call(medmnist.MedMNISTSource, "MedMNIST file", path, options)
    if files.is_image(path):
        return _call(open_file, "file", path, options)
    raise DataError(
        f"{path}: unsupported file type {kind or '(no extension)'}; expected a folder, a .csv/.tsv manifest, "
        f"a MedMNIST .npz, or an image file ({' '.join(files.EXTENSIONS)})"
    )
