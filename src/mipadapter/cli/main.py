"""`mipadapter` command: dispatches to one sub-command module per verb.

Each sub-command module under `mipadapter.cli` exposes `register(subparsers)`, which adds its parser and
sets `func` (a `(args) -> int` callable) as a default. Modules whose optional dependencies are missing are
still listed; they fail with a readable message when run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

SUBCOMMANDS = ("generate", "convert", "train", "data", "eval", "web")


class CLIError(Exception):
    """An error the CLI reports as one readable line (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mipadapter", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"mipadapter.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith("mipadapter.cli"):
                continue  # sub-command not shipped in this build
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:  # library chatter (e.g. transformers' image-processor backend notes) only with -v
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("mipadapter: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every library error becomes one line unless --verbose
        if args.verbose:
            raise
        print(f"mipadapter {args.command}: error: {error}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
