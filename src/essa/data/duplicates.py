"""Exact and near duplicate images, within and across splits.

Exact duplicates have identical decoded pixels (a BLAKE2 hash of the RGB image the model sees, so a grey
image and its RGB copy match, and re-encoding the same pixels does not hide a copy). Near duplicates have
64-bit perceptual hashes (``imagehash.phash``) at most ``threshold`` bits apart; groups are the connected
components of that relation, so a chain of near copies is one group.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

import imagehash
import numpy as np
import torch

from essa.data import images
from essa.data.records import DataError, Record
from essa.data.source import Source

POLICIES = ("report", "drop", "error")
SCOPES = ("all", "across")
# When dropping, the copy kept is the one in the first split here: evaluation sets stay as published and the
# training set loses the copies that leak into them.
KEEP_ORDER = ("test", "val", "train", None)


@dataclass(frozen=True)
class Fingerprint:
    """What one pass over a record learns: content hash, perceptual hash, size and mode, or why it failed."""

    record: Record
    digest: str | None = None
    phash: int | None = None
    size: tuple[int, int] | None = None
    mode: str | None = None
    error: str | None = None


def fingerprint(source: Source, record: Record, near: bool) -> Fingerprint:
    """Decode one record and hash it; an unreadable record gives a fingerprint with ``error`` set."""
    try:
        image = source.read(record)
        rgb = images.to_rgb(image)
    except Exception as err:  # any decoder failure makes the file unreadable, not the scan fatal
        return Fingerprint(record, error=f"{type(err).__name__}: {err}")
    digest = hashlib.blake2b(rgb.tobytes(), digest_size=16)
    digest.update(f"{rgb.size}".encode())
    phash = int(str(imagehash.phash(rgb)), 16) if near else None
    return Fingerprint(record, digest.hexdigest(), phash, image.size, image.mode)


class _Fingerprints(torch.utils.data.Dataset):
    def __init__(self, source: Source, records: list[Record], near: bool):
        self.source, self.records, self.near = source, records, near

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Fingerprint:
        return fingerprint(self.source, self.records[i], self.near)


def _as_list(batch: list) -> list:
    return batch


def scan(
    source: Source, records: list[Record] | None = None, near: bool = False, workers: int = 0
) -> list[Fingerprint]:
    """Fingerprint every record (in order), decoding in ``workers`` processes (0: this one)."""
    records = source.records if records is None else records
    loader = torch.utils.data.DataLoader(
        _Fingerprints(source, records, near), batch_size=64, num_workers=workers, collate_fn=_as_list
    )
    return [f for batch in loader for f in batch]


@dataclass(frozen=True)
class DuplicateGroup:
    """Records with the same content (``kind="exact"``) or perceptually close content (``kind="near"``)."""

    kind: str
    records: tuple[Record, ...]

    @property
    def splits(self) -> list[str]:
        """The splits the copies are in (``"none"`` for records without split)."""
        return sorted({r.split or "none" for r in self.records})

    @property
    def crosses_splits(self) -> bool:
        return len(self.splits) > 1

    @property
    def labels(self) -> list:
        return sorted({r.label for r in self.records}, key=repr)

    def to_dict(self) -> dict:
        paths = [r.path for r in self.records]
        return {"kind": self.kind, "splits": self.splits, "labels": self.labels, "paths": paths}


def _near_components(prints: list[Fingerprint], threshold: int) -> list[list[int]]:
    """Indices (into ``prints``, one per distinct digest) of the components of the near relation, size > 1."""
    hashes = np.array([p.phash for p in prints], dtype=np.uint64)
    parent = list(range(len(prints)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(hashes), 1024):  # 1024 x N distances at a time bounds memory
        distances = np.bitwise_count(hashes[start:start + 1024, None] ^ hashes[None, :])
        rows, cols = np.nonzero(distances <= threshold)
        for a, b in zip(rows + start, cols):
            if a < b:  # each pair once, and not an image with itself
                parent[root(a)] = root(b)
    components = defaultdict(list)
    for i in range(len(prints)):
        components[root(i)].append(i)
    return [c for c in components.values() if len(c) > 1]


def group_duplicates(prints: list[Fingerprint], near: bool = False, threshold: int = 2) -> list[DuplicateGroup]:
    """Exact groups (identical digests), then near groups (components of phash distance <= threshold)."""
    by_digest, first = defaultdict(list), {}
    for p in prints:
        if p.digest is not None:
            by_digest[p.digest].append(p.record)
            first.setdefault(p.digest, p)
    groups = [DuplicateGroup("exact", tuple(rs)) for rs in by_digest.values() if len(rs) > 1]
    if near:
        distinct = list(first.values())
        for component in _near_components(distinct, threshold):
            members = [r for i in component for r in by_digest[distinct[i].digest]]
            groups.append(DuplicateGroup("near", tuple(members)))
    return groups


@dataclass
class DuplicateReport:
    """Duplicate groups found in some records, and the records left after the policy.

    Attributes:
        groups: exact groups first, then near groups (a near group includes the exact copies of its members).
        records: the input records, minus ``dropped`` (policy ``"drop"``); in input order.
        dropped: records removed by the policy.
        unreadable: ``{"path", "reason"}`` for records that could not be decoded (kept in ``records``).
    """

    groups: list[DuplicateGroup]
    records: list[Record]
    dropped: list[Record] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """Counts per kind: groups, files in them, extra copies, groups across splits, groups with several labels."""
        out = {}
        for kind in ("exact", "near"):
            groups = [g for g in self.groups if g.kind == kind]
            out[kind] = {
                "groups": len(groups),
                "files": sum(len(g.records) for g in groups),
                "extra_copies": sum(len(g.records) - 1 for g in groups),
                "groups_across_splits": sum(g.crosses_splits for g in groups),
                "groups_with_several_labels": sum(len(g.labels) > 1 for g in groups),
            }
        out["dropped"] = len(self.dropped)
        return out

    def to_dict(self) -> dict:
        return {**self.summary(), "groups": [g.to_dict() for g in self.groups], "unreadable": self.unreadable}


def _drop(groups: list[DuplicateGroup]) -> set[str]:
    """Paths to drop so that each group keeps one record, from the first split in ``KEEP_ORDER``."""
    dropped: set[str] = set()
    for group in groups:  # exact groups first: a near group then sees only the exact copies still kept
        left = [r for r in group.records if r.path not in dropped]
        keep = min(left, key=lambda r: KEEP_ORDER.index(r.split if r.split in KEEP_ORDER else None))
        dropped.update(r.path for r in left if r is not keep)
    return dropped


def find_duplicates(
    source: Source,
    records: list[Record] | dict[str, list[Record]] | None = None,
    *,
    near: bool = False,
    threshold: int = 2,
    policy: str = "report",
    scope: str = "all",
    workers: int = 0,
) -> DuplicateReport:
    """Find exact (and with ``near``, near) duplicates among ``records`` (default: all of ``source``).

    Args:
        records: a list, or the ``{split: records}`` of ``split()``; splits are read from ``record.split``.
        threshold: the largest Hamming distance between 64-bit perceptual hashes that counts as near.
        policy: ``"report"`` only; ``"drop"`` keeps one record per group (its copy in test, else val, else train);
            ``"error"`` raises ``DataError`` when there are groups.
        scope: ``"all"`` groups, or only those ``"across"`` splits, for the policy (all are reported).
        workers: decoding processes (0: this one).
    """
    if policy not in POLICIES or scope not in SCOPES:
        raise DataError(f"policy must be one of {', '.join(POLICIES)} and scope one of {', '.join(SCOPES)}; "
                        f"got policy={policy!r} scope={scope!r}")
    if isinstance(records, dict):
        records = [r for rs in records.values() for r in rs]
    prints = scan(source, records, near, workers)
    groups = group_duplicates(prints, near, threshold)
    unreadable = [{"path": p.record.path, "reason": p.error} for p in prints if p.error]
    kept = [p.record for p in prints]
    report = DuplicateReport(groups, kept, unreadable=unreadable)
    acting = [g for g in groups if scope == "all" or g.crosses_splits]
    if policy == "error" and acting:
        counts = report.summary()
        raise DataError(
            f"{source.path}: {len(acting)} duplicate group(s){' across splits' if scope == 'across' else ''} "
            f"(exact: {counts['exact']['groups']}, near: {counts['near']['groups']}), e.g. "
            f"{', '.join(r.path for r in acting[0].records[:3])}; use policy='drop' to keep one image per group"
        )
    if policy == "drop":
        dropped = _drop(acting)
        report.records = [r for r in kept if r.path not in dropped]
        report.dropped = [r for r in kept if r.path in dropped]
    return report
