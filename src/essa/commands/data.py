"""``essa data``: look at a dataset before training on it."""

from __future__ import annotations

import json

import yaml

from essa.errors import InputError


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"-o expects KEY=VALUE (e.g. -o labels=false, -o window=[40,400]), got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise InputError(f"-o {text!r}: the value is not YAML ({problem}); quote it, e.g. -o 'window=[40, 400]'") from None


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="inspect datasets")
    commands = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    inspect = commands.add_parser(
        "inspect", help="dataset card: counts per class and split, sizes, modes, duplicates, unreadable files"
    )
    inspect.add_argument("path", help="image folder, CSV manifest, MedMNIST .npz (or name), DICOM or NIfTI file")
    inspect.add_argument("--json", action="store_true", help="print the card as JSON")
    inspect.add_argument("--near", action="store_true", help="also find near duplicates (perceptual hash)")
    inspect.add_argument("--threshold", type=int, default=2, help="near: largest phash distance in bits (default 2)")
    inspect.add_argument("--no-scan", action="store_true", help="counts only: do not decode the images")
    inspect.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: this one)")
    inspect.add_argument(
        "-o", "--option", action="append", default=[], metavar="KEY=VALUE",
        help="source option, value in YAML: labels=false, axis=1, window=[40,400], label_column=finding",
    )
    inspect.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from essa.data.card import dataset_card, format_card

    options = dict(_option(o) for o in args.option)
    card = dataset_card(args.path, scan=not args.no_scan, near=args.near, threshold=args.threshold,
                        workers=args.workers, **options)
    print(json.dumps(card, indent=2) if args.json else format_card(card))
    return 0
