"""Atomic file writes: a reader (or a study resumed after a kill) sees the old file or the whole new one, never
half of one; and :func:`read_json`, which reads such a file back.

    from essa import io
    io.write_json(out / "results.json", results)
    io.write_text(out / "report.md", markdown)
    with io.replacing(out / "figure.png") as tmp:   # for writers that take a path (matplotlib, safetensors)
        fig.savefig(tmp, format="png")

Each write goes to a temporary file beside the target (``.<name>.<pid>.tmp``: hidden, on the same file system, one
per process) that is renamed onto it when the write succeeds and removed when it fails.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` if the block succeeds, removed if not.
    The parent folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not mkstemp: keep the umask's file mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def umask() -> int:
    """This process's umask, read without changing it (``/proc/self/status`` on Linux; else set and reset)."""
    try:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError):
        current = os.umask(0o022)
        os.umask(current)
        return current


def umask_mode(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open`` would have (0666 less the umask), e.g. after a library that creates
    its files 0600."""
    os.chmod(path, 0o666 & ~umask())


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, *, default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically; ``default`` as in :func:`json.dumps` (e.g. ``str``
    for paths). NaN is written as ``NaN``, which :func:`json.loads` reads back."""
    return write_text(path, json.dumps(obj, indent=2, default=default))


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``; None when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None
