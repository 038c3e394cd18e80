"""Train a MIP-Adapter from a YAML/TOML config (one process; several GPUs: accelerate launch -m mipadapter.train).

The same as ``python -m mipadapter.train``; see ``configs/train_sdxl.yaml``.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from mipadapter.train import add_arguments

    parser = subparsers.add_parser(
        "train",
        help="train a MIP-Adapter (see configs/train_sdxl.yaml)",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mipadapter.train import run as run_training

    return run_training(args)
