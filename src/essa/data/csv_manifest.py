"""CSV manifests: one row per file, with its label(s), and optionally a patient/group id and an official split.

Columns (found by name, case-insensitive, unless named explicitly):

- path: ``path``, ``file``, ``filename``, ``image`` or ``image_path``; relative to the CSV's folder (or ``root``);
- label: ``label``, ``labels``, ``class`` or ``target``: a class name, or several joined by ``|`` (multi-label);
  integers 0..K-1 are class indices (classes ``"0"``..``"K-1"``, so that label == value);
- or ``label_columns``: several 0/1 columns, one per class (multi-label, e.g. ChestX-ray14 findings);
- group: ``group``, ``patient``, ``patient_id`` or ``subject``; split: ``split`` (train/val/test, any alias).

A ``.tsv`` file is read tab-separated.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from essa.data import files
from essa.data.records import DataError, split_name
from essa.data.source import FileSource, require_classes

PATH_COLUMNS = ("path", "file", "filename", "image", "image_path")
LABEL_COLUMNS = ("label", "labels", "class", "target")
GROUP_COLUMNS = ("group", "patient", "patient_id", "subject")
SPLIT_COLUMNS = ("split",)
MULTI_LABEL_SEPARATOR = "|"
_INTEGER = re.compile(r"^\d+(\.0*)?$")  # non-negative, "2.0" as written by pandas
_FLAGS = {"0": 0, "0.0": 0, "1": 1, "1.0": 1}


def _column(name: str, header: list[str], given: str | None, aliases: tuple[str, ...]) -> str | None:
    """The column named ``given`` (an error if absent), else the first of ``aliases`` present, else None."""
    if given is not None:
        if given not in header:
            raise DataError(f"{name} has no column {given!r}; its columns are: {', '.join(header)}")
        return given
    lower = {h.lower(): h for h in header}
    return next((lower[a] for a in aliases if a in lower), None)


def _class_index(name: str, rows: list[tuple[int, list[str]]], classes: list[str] | None) -> tuple[list[str], dict]:
    """Class names and name -> index, from the label names of all rows (``(row number, names)``)."""
    if classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        for row, names in rows:
            for label in names:
                if label not in index:
                    raise DataError(f"{name} row {row}: label {label!r} is not one of the classes {', '.join(classes)}")
        return list(classes), index
    first_row, first = rows[0][0], rows[0][1][0]
    if not _INTEGER.match(first):
        found = sorted({label for _, names in rows for label in names})
        return found, {c: i for i, c in enumerate(found)}
    for row, names in rows:
        for label in names:
            if not _INTEGER.match(label):
                raise DataError(
                    f"{name} row {row}: label {label!r} is not a non-negative integer like row {first_row}'s "
                    f"{first!r} (integer labels are class indices 0..K-1)"
                )
    top = max(int(float(label)) for _, names in rows for label in names)
    found = [str(i) for i in range(top + 1)]
    return found, {label: int(float(label)) for _, names in rows for label in names}


def _cell(row: dict, column: str | None) -> str:
    return (row.get(column) or "").strip() if column else ""


def _read(path: Path) -> tuple[list[str], list[dict]]:
    """Header and rows; a ``.tsv`` is tab-separated, a byte-order mark is ignored."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if files.extension(path) == ".tsv" else ",")
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        rows = list(reader)
    if not rows:
        raise DataError(f"{path} has no rows (expected a header line, then one row per image)")
    return header, rows


def _flags(row: dict, columns: list[str], where: str) -> tuple[int, ...]:
    """Indices of the 0/1 ``columns`` that are 1."""
    values = [_cell(row, c) for c in columns]
    for column, value in zip(columns, values):
        if value not in _FLAGS:
            raise DataError(f"{where}: column {column!r} is {value!r}, expected 0 or 1")
    return tuple(i for i, value in enumerate(values) if _FLAGS[value])


def open_csv(
    path: str | Path,
    *,
    root: str | Path | None = None,
    labels: bool | None = None,
    path_column: str | None = None,
    label_column: str | None = None,
    label_columns: list[str] | None = None,
    group_column: str | None = None,
    split_column: str | None = None,
    classes: list[str] | None = None,
    decode: files.Decode = files.Decode(),
) -> FileSource:
    """Read a CSV manifest (see the module docstring for the columns).

    Args:
        root: folder that relative paths start from (default: the CSV's folder).
        labels: False: ignore labels; True: require them; None (default): use them when there is a label column.
        classes: the class names in index order; labels outside them are errors (default: found in the file).
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    name = str(path)
    header, rows = _read(path)
    columns = ", ".join(header)
    file_col = _column(name, header, path_column, PATH_COLUMNS)
    if file_col is None:
        raise DataError(f"{name} has no path column (looked for {', '.join(PATH_COLUMNS)}); its columns are: {columns}")
    group_col = _column(name, header, group_column, GROUP_COLUMNS)
    split_col = _column(name, header, split_column, SPLIT_COLUMNS)
    for column in label_columns or ():
        _column(name, header, column, ())
    label_col = None
    if labels is not False and not label_columns:
        label_col = _column(name, header, label_column, LABEL_COLUMNS)
        if label_col is None and labels:
            raise DataError(
                f"{name} has no label column (looked for {', '.join(LABEL_COLUMNS)}); its columns are: {columns} "
                "(name it with label_column=, or use label_columns= for 0/1 columns)"
            )

    entries, missing, label_names = [], [], []
    seen: dict[str, tuple[int, tuple]] = {}  # file -> (first row, its cells)
    repeated, relabelled = [], []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{name} row {number}"
        file = _cell(row, file_col)
        if not file:
            raise DataError(f"{where}: empty {file_col!r}")
        cells = tuple(_cell(row, c) for c in (label_col, group_col, split_col, *(label_columns or ())))
        if file in seen:
            first, first_cells = seen[file]
            (repeated if cells == first_cells else relabelled).append((number, first, file))
            if cells == first_cells:
                continue  # the same row again: read once
        seen[file] = (number, cells)
        if not files.is_image(file):
            raise DataError(f"{where}: {file} is not a supported image file ({files.LOOKED_FOR})")
        if not (root / file).is_file():
            missing.append(f"row {number}: {root / file}")
        if label_col is not None:
            value = _cell(row, label_col)
            if not value:
                raise DataError(f"{where}: empty label in column {label_col!r}")
            label_names.append((number, [v.strip() for v in value.split(MULTI_LABEL_SEPARATOR)]))
        label = _flags(row, label_columns, where) if label_columns else None
        split = _cell(row, split_col)
        split = split_name(split, where) if split else None
        entries.append([str(root / file), label, _cell(row, group_col) or None, split])
    if relabelled:
        listed = "; ".join(f"{file} (rows {first} and {row})" for row, first, file in relabelled[:5])
        raise DataError(
            f"{name}: {len(relabelled)} file(s) are listed in several rows with different labels, group or split: "
            f"{listed}{'; ...' if len(relabelled) > 5 else ''}. Give each file one row; several labels of one "
            f"image go in one cell joined by {MULTI_LABEL_SEPARATOR!r} (multi-label)"
        )
    if missing:
        raise DataError(
            f"{name}: {len(missing)} row(s) point at missing files (paths are relative to {root}): "
            + "; ".join(missing[:5]) + ("; ..." if len(missing) > 5 else "")
        )

    found, multilabel = list(label_columns or ()), bool(label_columns)
    if label_col is not None:
        found, index = _class_index(name, label_names, classes)
        multilabel = any(len(names) > 1 for _, names in label_names)
        for entry, (_, names) in zip(entries, label_names):
            entry[1] = tuple(sorted({index[n] for n in names})) if multilabel else index[names[0]]
    if found:
        require_classes(found, f"{name} column {label_col or ', '.join(label_columns)}")
    source = FileSource(path, "csv", [tuple(e) for e in entries], found, decode, multilabel=multilabel)
    if repeated:
        source.notes.append(
            f"{len(repeated)} duplicate row(s) repeat an earlier row and were read once: "
            + "; ".join(f"row {row} repeats row {first} ({file})" for row, first, file in repeated[:5])
            + ("; ..." if len(repeated) > 5 else ""))
    others = [h for h in header if h not in (file_col, group_col, split_col)]
    if labels is None and label_col is None and not label_columns and others:
        source.notes.append(
            f"read without labels: no label column recognised (looked for {', '.join(LABEL_COLUMNS)}); its columns "
            f"are: {columns}; name one with label_column= (-o label_column=COLUMN), or label_columns= for 0/1 columns")
    return source
