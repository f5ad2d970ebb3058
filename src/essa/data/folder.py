"""Image folders: one folder per class, optionally under split folders; or any nesting without labels.

Layouts::

    root/NORMAL/*.png, root/PNEUMONIA/*.png                 classes, no official split
    root/train/NORMAL/*.png, root/test/NORMAL/*.png, ...    official splits (also val/, Training/, Testing/)
    root/**/*.png                                           labels=False: every image, at any depth

Class folders may nest further (``root/NORMAL/patient1/*.png``): the class is the first folder level.
Hidden files and folders (``.DS_Store``) are skipped; other files that are not images are listed in
``source.ignored``.
"""

from __future__ import annotations

import os
from pathlib import Path

from essa.data import files
from essa.data.records import SPLIT_ALIASES, DataError, split_name
from essa.data.source import FileSource, require_classes


def _walk(folder: Path) -> tuple[list[str], list[str]]:
    """(images, other files) under ``folder`` at any depth, sorted, hidden entries skipped."""
    found, other = [], []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            path = os.path.join(parent, name)
            (found if files.is_image(name) else other).append(path)
    return found, other


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _loose_images(folder: Path) -> list[Path]:
    return [p for p in _files(folder) if files.is_image(p)]


def _split_folders(root: Path) -> list[tuple[str | None, Path]]:
    """``(split, folder)`` pairs: the split folders when the root has them, else ``[(None, root)]``."""
    folders = _subfolders(root)
    splits = [p for p in folders if p.name.lower() in SPLIT_ALIASES]
    if not splits:
        return [(None, root)]
    others = [p.name for p in folders if p not in splits] + [p.name for p in _loose_images(root)]
    if others:
        raise DataError(
            f"{root} has split folders ({', '.join(p.name for p in splits)}) and also {', '.join(others[:5])}; "
            "expected only split folders (train, val, test, Training, Testing), each with one folder per class"
        )
    pairs = [(split_name(p.name, str(p)), p) for p in splits]
    names = [name for name, _ in pairs]
    if len(set(names)) < len(names):
        raise DataError(f"{root} has several folders for one split: {', '.join(p.name for p in splits)}")
    return pairs


def open_folder(path: str | Path, labels: bool | None = None, decode: files.Decode = files.Decode()) -> FileSource:
    """Read an image folder.

    Args:
        labels: True: one folder per class (an error if the layout has none); False: no labels, images at any
            depth; None (default): labelled when every image sits in a class folder, unlabelled otherwise.
        decode: intensity mapping of DICOM / NIfTI files in the folder.
    """
    root = Path(path)
    pairs = _split_folders(root)
    if labels is None:
        labels = all(_subfolders(base) and not _loose_images(base) for _, base in pairs)
    # Other files beside the split or class folders (a README) are listed as ignored, like those deeper down.
    ignored = [str(p) for p in _files(root)] if pairs[0][1] != root else []
    entries = []
    if not labels:
        for split, base in pairs:
            found, other = _walk(base)
            entries += [(f, None, None, split) for f in found]
            ignored += other
        return FileSource(root, "folder", entries, [], decode, ignored=ignored)

    class_dirs = {}
    for split, base in pairs:
        loose = _loose_images(base)
        if not loose and not _subfolders(base):
            raise DataError(f"{base} has no images ({files.LOOKED_FOR})")
        if loose:
            raise DataError(
                f"{base} has images directly inside it ({loose[0].name}...); expected one folder per class "
                "(or pass labels=False to read the images without labels)"
            )
        class_dirs[split] = _subfolders(base)
        ignored += [str(p) for p in _files(base)]
    classes = sorted({d.name for dirs in class_dirs.values() for d in dirs})
    require_classes(classes, str(root))
    for split, dirs in class_dirs.items():
        for folder in dirs:
            found, other = _walk(folder)
            if not found:
                raise DataError(f"{folder} has no images ({files.LOOKED_FOR})")
            label = classes.index(folder.name)
            entries += [(f, label, None, split) for f in found]
            ignored += other
    return FileSource(root, "folder", entries, classes, decode, ignored=ignored)
