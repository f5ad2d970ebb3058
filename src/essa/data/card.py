"""Dataset cards: what a dataset holds (counts per class and split, sizes, modes, duplicates, unreadable files)."""

from __future__ import annotations

from collections import Counter

from essa.data import duplicates
from essa.data.dispatch import open_source
from essa.data.records import SPLITS
from essa.data.source import Source

UNLABELLED = "(unlabelled)"
NO_SPLIT = "none"


def _counts(source: Source) -> dict[str, dict[str, int]]:
    """``{split: {class: images}}``; a multi-label image counts once for each of its classes."""
    counts: dict[str, Counter] = {}
    for record in source.records:
        row = counts.setdefault(record.split or NO_SPLIT, Counter())
        labels = record.label if isinstance(record.label, tuple) else (record.label,)
        for label in labels:
            row[UNLABELLED if label is None else source.classes[label]] += 1
    order = [*source.classes, UNLABELLED]
    return {split: {c: row[c] for c in order if row[c]} for split, row in counts.items()}


def dataset_card(path_or_config, *, scan: bool = True, near: bool = False, threshold: int = 2, workers: int = 0,
                 **options) -> dict:
    """The card of a dataset, as a JSON-ready dict.

    Args:
        path_or_config, options: what ``open_source`` takes.
        scan: decode every image for sizes, modes, duplicates and unreadable files (False: counts only).
        near, threshold: also find near duplicates (see ``find_duplicates``).
        workers: decoding processes.
    """
    source = open_source(path_or_config, **options)
    per_split = Counter(r.split or NO_SPLIT for r in source.records)
    splits = sorted(per_split, key=[*SPLITS, NO_SPLIT].index)
    counts = _counts(source)
    card = {
        "path": source.path,
        "kind": source.kind,
        "task": source.task,
        "classes": source.classes,
        "images": len(source.records),
        "images_per_split": {s: per_split[s] for s in splits},
        "counts": {s: counts[s] for s in splits},
        "ignored_files": source.ignored,
        "notes": source.notes,
    }
    if scan:
        prints = duplicates.scan(source, near=near, workers=workers)
        readable = [p for p in prints if p.error is None]
        widths = [p.size[0] for p in readable] or [0]
        heights = [p.size[1] for p in readable] or [0]
        groups = duplicates.group_duplicates(prints, near, threshold)
        report = duplicates.DuplicateReport(groups, source.records)
        summary = report.summary()
        del summary["dropped"]
        card.update({
            "sizes": {
                "min": [min(widths), min(heights)],
                "max": [max(widths), max(heights)],
                "most_common": [[f"{w}x{h}", n] for (w, h), n in Counter(p.size for p in readable).most_common(5)],
            },
            "modes": dict(Counter(p.mode for p in readable).most_common()),
            "duplicates": {**summary, "examples_across_splits": [
                g.to_dict() for g in groups if g.crosses_splits][:5]},
            "unreadable": [{"path": p.record.path, "reason": p.error} for p in prints if p.error],
        })
    return card


def _table(card: dict) -> list[str]:
    columns = [c for c in [*card["classes"], UNLABELLED] if any(c in row for row in card["counts"].values())]
    width = max(len(c) for c in [*columns, "split", "total"]) + 2
    lines = ["split".ljust(8) + "".join(c.rjust(width) for c in [*columns, "total"])]
    for split, row in card["counts"].items():
        values = [row.get(c, 0) for c in columns] + [card["images_per_split"][split]]
        lines.append(split.ljust(8) + "".join(str(v).rjust(width) for v in values))
    return lines


def format_card(card: dict) -> str:
    """The card as terminal text."""
    labels = f"{card['task']}, {len(card['classes'])} classes" if card["classes"] else "unlabelled"
    lines = [f"{card['path']}  ({card['kind']}, {labels}, {card['images']} images)", *_table(card)]
    if "sizes" in card:
        sizes = card["sizes"]
        common = ", ".join(f"{s} ({n})" for s, n in sizes["most_common"])
        smallest, largest = ("x".join(map(str, sizes[k])) for k in ("min", "max"))
        lines.append(f"sizes: {smallest} to {largest}; most common: {common}")
        lines.append("modes: " + ", ".join(f"{m} ({n})" for m, n in card["modes"].items()))
        for kind in ("exact", "near"):
            d = card["duplicates"][kind]
            if kind == "exact" or d["groups"]:
                lines.append(
                    f"{kind} duplicates: {d['groups']} groups, {d['files']} files ({d['extra_copies']} extra copies); "
                    f"{d['groups_across_splits']} groups cross splits, "
                    f"{d['groups_with_several_labels']} have several labels"
                )
        lines.append(f"unreadable: {len(card['unreadable'])}")
        lines += [f"  {u['path']}: {u['reason']}" for u in card["unreadable"][:20]]
        if len(card["unreadable"]) > 20:
            lines.append(f"  ... and {len(card['unreadable']) - 20} more (--json lists all)")
    lines += [f"note: {note}" for note in card["notes"]]
    if card["ignored_files"]:
        lines.append(f"ignored (not images): {len(card['ignored_files'])}, e.g. {', '.join(card['ignored_files'][:3])}")
    return "\n".join(lines)
