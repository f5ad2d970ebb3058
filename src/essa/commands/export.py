"""``essa export``: the command-line face of :func:`essa.hub.export` (and :func:`essa.hub.push`)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="a finished run's model as a Hugging Face Hub folder timm loads (weights, "
                                      "config with its preprocessing, model card), optionally pushed")
    p.add_argument("run_dir", metavar="RUN_DIR", help="an essa adapt run directory, or one seed_N directory of "
                                                      "essa finetune")
    p.add_argument("--out", required=True, help="the folder to write (must not exist yet, or be empty)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to the Hugging Face Hub as REPO "
                                                         "(e.g. me/ssa-apla; needs the network and a token)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from essa import hub

    folder = hub.export(args.run_dir, args.out, repo_id=args.push_to_hub)
    print(f"exported: {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    print(f'load it: timm.create_model("local-dir:{folder.resolve()}", pretrained=True)')
    if args.push_to_hub:
        url = hub.push(folder, args.push_to_hub, private=args.private)
        print(f"pushed: {url}")
    return 0
