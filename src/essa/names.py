"""Names that a study and its report share: the SSA tuner that means "no SSA", the default SSA objective, and the
file-name forms of labels.

Two slugs, because each names files that already exist on disk and changing either would rename them: a study's
directories (:func:`slug`, e.g. ``finetune/apla_r64__full/``, which a resumed study must find again) and a report's
figures (:func:`file_stem`, e.g. ``figures/brain_MRI_ssa_curves.png``).
"""

from __future__ import annotations

import re

#: The SSA "tuner" that skips SSA: fine-tuning starts from the foundation model.
NO_SSA = "none"
#: The SSA objective of a study that names none (``essa adapt``'s default); its cells' directories and labels do not
#: name it, so a study's directories stay as they were before objectives were an axis of the grid.
DEFAULT_OBJECTIVE = "dinov2"


def slug(label: str) -> str:
    """A directory name for a tuner, budget or dataset label: ``"apla r=64"`` -> ``"apla_r64"`` (``=`` dropped, other
    runs of characters but letters, digits, ``.`` and ``-`` become one ``_``)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", label.replace("=", "")).strip("_") or "_"


def file_stem(name: str) -> str:
    """A file-name-safe form of a dataset name for the report's figures: runs of characters other than letters,
    digits, ``.``, ``-``, ``_`` become ``_`` (so spaces, ``=``, ``/`` and ``<script>`` cannot escape the figures
    folder), at most 80 characters."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80]
    return stem or "dataset"
