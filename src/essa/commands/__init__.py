"""The ``essa`` command. Thin: it parses arguments and calls the library.

Each subcommand is a module of this package with ``add_parser(subparsers)``, which registers the subcommand and sets
``func`` (called with the parsed arguments, returning an exit code). The modules import the library (torch, timm)
only inside ``func``, so ``essa --help`` and ``essa COMMAND --help`` stay fast; the library holds no argparse.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import essa

from essa.errors import EssaError, Interrupted

# Modules that each contribute one subcommand, in the order of ``essa --help``.
COMMANDS = ("tuners", "data", "adapt", "finetune", "evaluate", "run", "export", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="essa", description="Efficient self-supervised adaptation of vision foundation models."
    )
    parser.add_argument("--version", action="version", version=f"essa {essa.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the libraries' own notes and warnings (Lightning's start-up block, deprecations)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        importlib.import_module(f"essa.commands.{module}").add_parser(sub)
    return parser


#: The exit code when the reader of stdout went away (``essa adapt --keys | head``): 128 + SIGPIPE, as the shell's.
BROKEN_PIPE_EXIT = 141


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:  # also after --keys or --help exit: what is still buffered meets the closed pipe here
            sys.stdout.flush()
    except BrokenPipeError:
        # stdout's reader closed the pipe: stop without a traceback, and point stdout at /dev/null so that the
        # interpreter's flush at exit does not raise again (the recipe of Python's signal module documentation)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_EXIT


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:  # read where each Trainer is built, in this process and in a study's cell processes
        os.environ["ESSA_VERBOSE"] = "1"
    try:
        return int(args.func(args) or 0)
    except Interrupted as err:  # Ctrl-C, stopped cleanly: what was saved and how to continue
        print(f"essa {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except EssaError as err:  # a mistake in what the user asked for: one line; anything else is a bug (traceback)
        print(f"essa {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"essa {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Under torchrun, stop the process group Lightning started before the interpreter tears down: gloo's threads
    alive at exit abort the process ("terminate called without an active exception"), and torchrun then reports a
    finished run as failed."""
    torch = sys.modules.get("torch")  # a command that never imported torch started no process group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
