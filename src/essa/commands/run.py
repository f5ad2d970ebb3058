"""``essa run``: the command-line face of :class:`essa.study.Study`."""

from __future__ import annotations

import json
import sys

from essa.commands.common import (SCALE_FLAGS, add_keys, add_preprocessing_flags, add_print_config, add_scale_flags,
                                  config_help, int_list, key_map, print_config)


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="a whole study: datasets x SSA tuner x fine-tuning tuner x seeds, with a report",
                       formatter_class=config_help("essa.study.config:StudyConfig", RUN_FLAGS))
    p.add_argument("--config", required=True, help="study YAML, e.g. examples/quickstart.yaml")
    p.add_argument("--backbone", help="timm ViT name (overrides backbone.name)")
    p.add_argument("--weights", help="local backbone weights instead of the pretrained ones, e.g. "
                                     "../shared/models/vit_tiny_p4_32_cifar10.safetensors")
    add_preprocessing_flags(p)
    p.add_argument("--data", help="data.root of every dataset that names none (a folder, .csv or .npz); it "
                                  "replaces the source, so the config's source options (data.options) are dropped")
    p.add_argument("--seeds", type=int_list, help="fine-tuning seeds, e.g. 0,1,2")
    p.add_argument("--out", help="study directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any study config key, repeatable, e.g. --set img_size=64 --set ssa.epochs=2")
    p.add_argument("--list", action="store_true", help="list the cells and whether each is done, then exit")
    p.add_argument("--save-record", metavar="DIR",
                   help="copy the study's record (every file of its directory but checkpoints, exports and locks: "
                        "what its results and report read) to DIR, e.g. to keep a long study in git, then exit; "
                        "copied back into the study's directory, essa run continues from it")
    p.add_argument("--screenshot", action="store_true",
                   help="also save the report as it looks in a browser, 800 px wide: OUT/report.png (needs a "
                        "headless Chromium, e.g. apt-get install chromium), and say what does not fit")
    add_print_config(p)
    add_keys(p, "essa.study.config:StudyConfig")
    add_scale_flags(p)
    p.set_defaults(func=run_command)


#: The flags that set one study config key (what their help shows the default of; :func:`_overrides` sets them).
RUN_FLAGS = {"backbone": "backbone.name", "weights": "backbone.weights", "seeds": "seeds", "out": "out",
             "normalize": "data.normalize", **SCALE_FLAGS}


def _overrides(args) -> list[str]:
    out = []
    if args.backbone:
        out.append(f"backbone.name={args.backbone}")
    if args.weights:
        out += [f"backbone.weights={args.weights}", "backbone.pretrained=false"]
        if not args.backbone:
            out.append("backbone.name=null")  # the weights file's header names the architecture
    if args.key_map:
        out.append(f"backbone.key_map={json.dumps(key_map(args.key_map))}")
    if args.normalize:
        out.append(f"data.normalize={args.normalize}")  # every dataset's, and so every cell's
    if args.data:
        out += [f"data.root={args.data}", "data.options={}"]
    if args.seeds:
        out.append(f"seeds={args.seeds}")
    if args.out:
        out.append(f"out={args.out}")
    out += [f"{key}={getattr(args, attr)}" for attr, key in SCALE_FLAGS.items() if getattr(args, attr) is not None]
    return out + list(args.set)


def run_command(args) -> int:
    from essa.report import verdict
    from essa.study import Study

    study = Study(args.config, overrides=_overrides(args))
    if args.print_config:
        return print_config(study.cfg)
    if args.list:
        for cell in study.cells:
            print(f"{'done' if study.finished(cell) else 'todo'}  {cell.kind:8s} {cell.id}")
        return 0
    if args.save_record:
        print(f"record of {study.out}: {study.save_record(args.save_record)}")
        return 0
    result = study.run()
    for dataset in result["results"]["datasets"]:
        print(f"\n{dataset['name']}:")
        for line in verdict(dataset):
            print(f"  {line}")
    print(f"\nreport: {result['markdown']} and {result['html']}")
    if args.screenshot:
        from essa.report import browser

        png = browser.screenshot(result["html"], result["html"].with_name("report.png"))
        print(f"screenshot: {png}")
        for problem in browser.problems(browser.measure(result["html"])):
            print(f"  report.html at {browser.PAGE_WIDTH} px: {problem}", file=sys.stderr)
    if result["failed"]:
        print(f"\n{len(result['failed'])} of {len(study.cells)} cells failed:", file=sys.stderr)
        for cell_id, error in result["failed"].items():
            print(f"  {cell_id}: {error}", file=sys.stderr)
        return 1
    return 0
