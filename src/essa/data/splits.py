"""Deterministic, seeded, stratified and grouped train/val/test splits."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import replace

from essa.data.records import SPLITS, DataError, Record


def _quotas(sizes: list[int], fraction: float) -> list[int]:
    """Per-stratum counts summing to round(fraction * total): floors, plus one for the largest remainders."""
    exact = [fraction * n for n in sizes]
    quotas = [math.floor(e) for e in exact]
    short = round(fraction * sum(sizes)) - sum(quotas)
    by_remainder = sorted(range(len(sizes)), key=lambda i: quotas[i] - exact[i])  # stable: ties by stratum order
    for i in by_remainder[:short]:
        quotas[i] += 1
    return quotas


def _stratum(records: list[Record], stratify: bool):
    """The label a unit (the records of one group) is stratified by: its most common label."""
    if not stratify:
        return None
    return Counter(r.label for r in records).most_common(1)[0][0]


def _carve(pool: list[Record], fractions: dict[str, float], seed: int, stratify: bool) -> dict[str, list[Record]]:
    """Assign whole groups of ``pool`` to the splits in ``fractions`` (of len(pool)), the rest to train."""
    units = defaultdict(list)  # a group's records stay together; a record without group is its own unit
    for i, record in enumerate(pool):
        units[record.group if record.group is not None else ("record", i)].append(record)
    strata = defaultdict(list)
    for members in units.values():
        strata[_stratum(members, stratify)].append(members)
    order = sorted(strata, key=repr)
    rng = random.Random(seed)
    for key in order:
        rng.shuffle(strata[key])
    sizes = [sum(len(m) for m in strata[key]) for key in order]
    quotas = {name: _quotas(sizes, fraction) for name, fraction in fractions.items()}
    assigned: dict[str, list[Record]] = defaultdict(list)
    for s, key in enumerate(order):
        left = strata[key]
        for name in fractions:
            taken, skipped = 0, []
            for members in left:
                # Take a group when that brings the count closer to the quota (exact for single records).
                if taken + len(members) / 2 < quotas[name][s]:
                    assigned[name] += members
                    taken += len(members)
                else:
                    skipped.append(members)
            left = skipped
        for members in left:
            assigned["train"] += members
    return assigned


def subsample(records: list[Record], n: int, seed: int = 0, *, stratify: bool = True) -> list[Record]:
    """A seeded subset of about ``n`` records (exactly ``n`` without groups) that keeps each class's share and
    each group whole, in their original order; all records when there are at most ``n``."""
    if n < 1:
        raise DataError(f"a subsample needs at least 1 record, got n={n}")
    if len(records) <= n:
        return list(records)
    kept = {id(r) for r in _carve(records, {"kept": n / len(records)}, seed, stratify)["kept"]}
    return [r for r in records if id(r) in kept]


def _check_groups(splits: dict[str, list[Record]]) -> None:
    where = defaultdict(set)
    for name, records in splits.items():
        for record in records:
            if record.group is not None:
                where[record.group].add(name)
    crossing = {g: s for g, s in where.items() if len(s) > 1}
    if crossing:
        group, names = next(iter(crossing.items()))
        raise DataError(
            f"{len(crossing)} group(s) are in more than one official split, e.g. group {group!r} in "
            f"{' and '.join(sorted(names))}; a patient's images must all be in one split "
            "(fix the split column, or pass official=False to re-split)"
        )


def split(
    records: list[Record],
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    *,
    stratify: bool = True,
    official: bool = True,
) -> dict[str, list[Record]]:
    """Split records into ``{"train": [...], "val": [...], "test": [...]}`` (every key present, maybe empty).

    Official splits (``record.split``) are kept when ``official``; each of val and test that has no official
    records is carved from the train pool (records with split ``train`` or None): ``round(fraction * len(pool))``
    records, e.g. an official train/test gets a val set of ``val * len(train)`` carved from train. Carving is
    stratified by label (per class counts by largest remainder, so each class keeps its share), keeps each
    group (patient) in one split, and depends only on ``seed`` and the records. Records keep their order within
    a split and come back with ``split`` set to the split they are in.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(f"val and test must be fractions with val + test < 1, got val={val} test={test}")
    given = {name: [r for r in records if official and r.split == name] for name in SPLITS}
    pool = [r for r in records if not official or r.split in (None, "train")]
    fractions = {name: f for name, f in (("test", test), ("val", val)) if not given[name] and f > 0}
    carved = _carve(pool, fractions, seed, stratify)
    chosen = {id(r): name for name, rs in carved.items() for r in rs}
    chosen.update({id(r): name for name, rs in given.items() if name != "train" for r in rs})
    result = {name: [replace(r, split=name) for r in records if chosen.get(id(r)) == name] for name in SPLITS}
    _check_groups(result)
    return result
