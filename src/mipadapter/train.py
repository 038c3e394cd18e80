"""Training entry point: ``accelerate launch -m mipadapter.train --config configs/train_sdxl.yaml``.

Runs on one GPU or many (one process per GPU, as accelerate launches them, on one node or several);
start it again with the same command after a kill and it continues from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def add_arguments(parser: argparse.ArgumentParser, verbose: bool = False) -> None:
    parser.add_argument("--config", required=True, help="training config (.yaml / .yml / .toml)")
    if verbose:
        parser.add_argument("-v", "--verbose", action="store_true", help="full tracebacks")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set optim.max_steps=100 (repeatable; YAML values)",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEPS",
        help="checkpoint and stop after this many steps of this call (the next call continues)",
    )


def run(args: argparse.Namespace) -> int:
    from mipadapter.training import load_config, train

    config = load_config(args.config, args.overrides)
    result = train(config, stop_after=args.stop_after)
    state = "finished" if result.finished else "stopped"
    print(f"{state} at step {result.step}; checkpoint: {result.last_checkpoint}")
    for name, path in result.exports.items():
        print(f"exported {name}: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mipadapter.train", description=__doc__.splitlines()[0])
    add_arguments(parser, verbose=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as error:  # bad config, data, paths or model files: one line
        if args.verbose:
            raise
        print(f"mipadapter.train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
