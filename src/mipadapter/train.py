"""Training entry point: ``accelerate launch -m mipadapter.train --config configs/train_sdxl.yaml``.

Runs on one GPU or many (one process per GPU, as accelerate launches them, on one node or several; on
CPUs ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N``); start it again with
the same command after a kill and it continues from the newest checkpoint. ``--tiny`` trains on tiny
random models, offline (a smoke test of the whole loop).
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
    parser.add_argument(
        "--allow-change",
        dest="allow_change",
        action="append",
        default=[],
        metavar="KEY",
        help="resume with this setting changed (e.g. optim.learning_rate; repeatable): it takes effect at "
        "the resumed step and config.json and logs/metrics.jsonl record it",
    )
    parser.add_argument(
        "--tiny",
        nargs="?",
        const="sdxl",
        choices=TINY_ARCHS,
        help="tiny random base model and image encoder (offline smoke test; sdxl when no value): "
        "model.base_model and model.image_encoder are not used, a set model.adapter_init becomes a "
        "fabricated tiny IP-Adapter",
    )


TINY_ARCHS = ("sdxl", "sd15")
TINY_SEED = 0  # the seed of eval --tiny's base model: a --tiny export evaluates on the model it trained on


def tiny_components(config, arch: str):
    """The tiny models of ``--tiny`` training: the tiny base model of ``arch``, the tiny image encoder of
    ``model.projection`` and, when ``model.adapter_init`` is set, a fabricated tiny IP-Adapter."""
    from mipadapter.testing.mip import ARCHS, tiny_adapter, tiny_parts
    from mipadapter.training.components import components_from_pipeline

    model = config.model
    pipe, encoder, _ = tiny_parts(arch, model.projection, seed=TINY_SEED)
    components = components_from_pipeline(pipe, encoder, model.arch)
    if model.adapter_init is not None:
        spec = ARCHS[arch][0]
        encoder_spec = spec.basic_image_encoder if model.projection == "basic" else spec.plus_image_encoder
        components.start_adapter = tiny_adapter(pipe.unet, encoder_spec, model.projection, False, TINY_SEED)
    return components


def run(args: argparse.Namespace) -> int:
    from mipadapter.training import load_config, train

    config = load_config(args.config, args.overrides)
    components = identities = None
    if args.tiny:
        from mipadapter.training.runrecord import tiny_identities

        model = config.model
        identities = tiny_identities(args.tiny, model.projection, TINY_SEED, model.adapter_init is not None)
        components = lambda: tiny_components(config, args.tiny)  # noqa: E731 (built after the checks)
    result = train(
        config,
        components=components,
        identities=identities,
        stop_after=args.stop_after,
        allow_change=args.allow_change,
        notify=lambda line: print(line, file=sys.stderr),
    )
    if not result.main_process:
        return 0  # the main process reports for every process
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
    except KeyboardInterrupt:
        print("mipadapter.train: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # bad config, data, paths, model files or launch: one line
        if args.verbose:
            raise
        from mipadapter.cli.main import one_line

        print(f"mipadapter.train: error: {one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
