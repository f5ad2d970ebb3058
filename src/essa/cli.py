"""The ``essa`` command. Thin: it parses arguments and calls the library.

Each subcommand lives in a module with ``add_parser(subparsers)``, which registers the subcommand and sets
``func`` (called with the parsed arguments, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

import essa

# Modules that each contribute one subcommand.
COMMANDS = (
    "essa.tuners.cli",
    "essa.data.cli",
    "essa.train.cli",
    "essa.evaluate.cli",
    "essa.study",
)


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="essa", description="Efficient self-supervised adaptation of vision foundation models."
    )
    parser.add_argument("--version", action="version", version=f"essa {essa.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"essa {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Under torchrun, stop the process group Lightning started before the interpreter tears down: gloo's threads
    alive at exit abort the process ("terminate called without an active exception"), and torchrun then reports a
    finished run as failed."""
    torch = sys.modules.get("torch")  # a command that never imported torch started no process group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
