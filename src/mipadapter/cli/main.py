"""`mipadapter` command: dispatches to one sub-command module per verb.

Each sub-command module under `mipadapter.cli` exposes `register(subparsers)`, which adds its parser and
sets `func` (a `(args) -> int` callable) as a default. Modules whose optional dependencies are missing are
still listed; they fail with a readable message when run. `-v` is accepted before or after the verb.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

SUBCOMMANDS = ("generate", "convert", "train", "data", "eval", "web")

DESCRIPTION = """\
Personalized text-to-image generation from several reference photos at once (MIP-Adapter on
diffusers): each photo goes to the object its name denotes in the prompt, with no finetuning."""

EPILOG = """\
examples:
  mipadapter generate --prompt "a cat wearing a backpack" --subject cat=cat.jpg --subject backpack=bag.jpg -o out.png
  mipadapter generate --tiny --prompt "a cat" --subject cat=cat.jpg     # offline smoke test, tiny models
  mipadapter generate --preset ip-flux --prompt "a dog with a duck toy" --subject dog=dog.jpg --subject "duck toy"=toy.jpg
  mipadapter generate --from-png out.png --seed 7 -o again.png            # rerun a recorded generation
  mipadapter convert model_sdxl.bin model_sdxl.safetensors
  mipadapter web

Run 'mipadapter COMMAND --help' for a command's options. Errors are one line on stderr with exit status
2; add -v for library logs and full tracebacks."""


class CLIError(Exception):
    """An error the CLI reports as one readable line (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mipadapter",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"mipadapter.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith("mipadapter.cli"):
                continue  # sub-command not shipped in this build
            raise
        module.register(subparsers)
    _verbose_everywhere(subparsers)
    return parser


def _verbose_everywhere(subparsers: argparse._SubParsersAction) -> None:
    """Accept -v after every verb (and nested verb: ``data build -v``)."""
    for sub in subparsers.choices.values():
        verbose = sub._option_string_actions.get("-v")
        if verbose is None:
            verbose = sub.add_argument("-v", "--verbose", action="store_true", help="as mipadapter -v")
        verbose.default = argparse.SUPPRESS  # not given after the verb: the value before it stays
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _verbose_everywhere(action)


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
        print(f"mipadapter {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message from a dependency is joined)."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    if isinstance(error, KeyError) and text.startswith("'"):
        text = f"missing key {text}"
    return text or type(error).__name__


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
