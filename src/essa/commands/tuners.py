"""``essa tuners``: what each tuner trains on a given backbone."""

from __future__ import annotations

import json

from essa.errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("tuners", help="table of trainable parameters per tuner for a backbone")
    p.add_argument("--backbone", help="timm ViT or Eva name, e.g. vit_small_patch14_dinov2 or "
                                      "vit_small_patch16_dinov3 (or give --weights)")
    p.add_argument("--img-size", type=int, default=None, help="input size (changes position embeddings only)")
    p.add_argument("--weights", default=None, help="local weights file whose header names the architecture")
    p.add_argument(
        "--options", default="{}", metavar="JSON",
        help='tuner options as JSON by tuner, e.g. \'{"apla": {"r": 64}, "lora": {"r": 16}}\'',
    )
    p.add_argument(
        "--combine", action="append", default=[], metavar="A+B",
        help="also a row for this combination, repeatable, e.g. --combine apla+lora (its parts take their --options)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def parameter_table(backbone: str | None, img_size: int | None = None, weights: str | None = None,
                    options: dict | None = None, combine: list[str] | None = None) -> list[dict]:
    """One row per tuner, then one per combination of ``combine`` (``"apla+lora"``, whose parts take their options
    from ``options``): trainable parameters and their share of the backbone's parameters."""
    from essa import backbones, tuners

    options = options or {}
    unknown = sorted(set(options) - set(tuners.names()))
    if unknown:
        hint = " (a combination's parts take their own entries, e.g. {\"apla\": {\"r\": 64}})" if "+" in unknown[0] else ""
        raise tuners.TunerError(f"unknown tuner {unknown[0]!r} in --options{hint}; valid choices: "
                                f"{', '.join(tuners.names())}")
    configs = [(name, options.get(name, {})) for name in tuners.names()]
    for name in combine or []:
        parts = tuners.combined.part_names(name)
        configs.append((name, {part: options[part] for part in parts if part in options}))
    rows = []
    for name, opts in configs:
        model = backbones.create(backbone, img_size=img_size, weights=weights)
        _, total = tuners.count_parameters(model)
        tuners.apply(model, name, **opts)
        trainable, _ = tuners.count_parameters(model)
        tuner = tuners.tuner_of(model)
        rows.append({"tuner": tuner.name, "options": tuner.options(), "trainable": trainable,
                     "backbone": total, "percent": 100.0 * trainable / total})
    return rows


def run(args) -> int:
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as err:
        raise InputError(f"--options is not JSON: {err}") from err
    if args.backbone is None and args.weights is None:
        raise InputError("give --backbone (a timm ViT name) or --weights (a local file whose header names the "
                         "architecture)")
    rows = parameter_table(args.backbone, args.img_size, args.weights, options, args.combine)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from essa.tuners.combined import option_words

    width = max(12, *(len(row["tuner"]) for row in rows))
    print(f"{'tuner':<{width}} {'trainable':>12} {'% of backbone':>14}  options")
    for row in rows:
        opts = ", ".join(option_words(row["options"]))
        print(f"{row['tuner']:<{width}} {row['trainable']:>12,} {row['percent']:>13.3f}%  {opts}")
    print(f"backbone {args.backbone or args.weights}: {rows[0]['backbone']:,} parameters")
    return 0
