"""`mipadapter data build|score|merge`: build, score or re-merge a multi-subject training set."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

DESCRIPTION = """Build a multi-subject training set (caption with BLIP-2, ground the caption's objects with
Grounding DINO, segment them with SAM, score each image with CLIP's object quality score, keep the
top K), or score an existing set in the authors' layout. Runs on one process, or on many with
`accelerate launch -m mipadapter.data build ...`; rerun the same command to resume."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", required=True, help="output folder (resumable: rerun with the same settings)"
    )
    parser.add_argument("--config", help="YAML or TOML file of DataConfig fields (unknown keys are errors)")
    parser.add_argument("--top-k", type=int, dest="top_k", help="images to select (default: config, 100000)")
    parser.add_argument(
        "--mode", choices=("multi", "single"), help="multi: S_single + S_pair; single: S_single only"
    )
    parser.add_argument(
        "--batch-size", type=int, dest="batch_size", help="images per chunk through the stages"
    )
    parser.add_argument(
        "--images-per-shard", type=int, dest="images_per_shard", help="shard size for folder/authors inputs"
    )
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "float16", "bfloat16"), help="model dtype (auto: fp16 on CUDA)"
    )
    parser.add_argument(
        "--device", help="device for the models (default: accelerate's device for this process)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--allow-change",
        dest="allow_change",
        action="append",
        default=[],
        metavar="KEY",
        help="resume with this config key changed (e.g. box_threshold, filters.min_score; repeatable): it "
        "applies to the shards not finished yet and run.json records it",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="offline smoke test: shape-reading stand-ins for the captioner, grounder and segmenter "
        "(mipadapter.testing.shapes; try --input tests/assets/shapes) and a tiny random CLIP scorer",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    verbs = parser.add_subparsers(dest="verb", required=True)
    build = verbs.add_parser(
        "build",
        help="caption, ground, segment, score and select raw images",
        description="Input: a folder of SA-1B tar shards (sa_<id>.jpg + sa_<id>.json), one tar, "
        "or a folder of images.",
    )
    build.add_argument("--input", required=True, help="tar shard(s) folder, a .tar file, or an image folder")
    build.add_argument("--layout", choices=("auto", "tar", "folder"), default="auto")
    _common(build)
    score = verbs.add_parser(
        "score",
        help="score and rank an existing set in the authors' layout",
        description="Input: images/<id>.png, masks/<id>.png, jsons/<id>.json.",
    )
    score.add_argument("--input", required=True, help="the set's root folder")
    score.add_argument("--layout", choices=("authors",), default="authors")
    score.add_argument(
        "--ids", help="text file (one id a line) or JSON list of the ids to score (default: all)"
    )
    _common(score)
    merge = verbs.add_parser(
        "merge", help="redo the final merge of a finished run (e.g. with another --top-k)"
    )
    merge.add_argument("--output", required=True)
    merge.add_argument("--top-k", type=int, dest="top_k")
    for verb in (build, score, merge):
        verb.set_defaults(func=run)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="build or score a multi-subject training set", description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


_OVERRIDES = ("top_k", "mode", "batch_size", "images_per_shard", "dtype")


_FLAGS = {
    "top_k": "--top-k",
    "mode": "--mode",
    "batch_size": "--batch-size",
    "images_per_shard": "--images-per-shard",
}


def _check_paths(args: argparse.Namespace) -> None:
    """The flags' paths, before any model or data is read: one line naming the flag."""
    from pathlib import Path

    from mipadapter.fileio import check_output_dir

    if getattr(args, "input", None) is not None and not Path(args.input).exists():
        raise FileNotFoundError(f"--input {args.input!r} does not exist")
    if getattr(args, "config", None) is not None and not Path(args.config).is_file():
        raise FileNotFoundError(f"--config {args.config!r} is not a file")
    if getattr(args, "ids", None) is not None and not Path(args.ids).is_file():
        raise FileNotFoundError(f"--ids {args.ids!r} is not a file")
    if args.verb == "merge":
        if not Path(args.output).is_dir():
            raise FileNotFoundError(f"--output {args.output!r} is not the folder of a data run")
    elif Path(args.output).exists():  # a file, or a folder we cannot write: refused now
        check_output_dir(args.output, "--output", create=False)
    if getattr(args, "top_k", None) is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")


def _with_overrides(config, args: argparse.Namespace):
    """The config with the flags that override it; a bad value is reported by its flag."""
    overrides = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k, None) is not None}
    try:
        return dataclasses.replace(config, **overrides)
    except ValueError as error:
        text = str(error)
        for field, flag in _FLAGS.items():
            text = text.replace(f"DataConfig.{field}", flag)
        raise ValueError(text) from None


_BUILD_MODELS = ("caption_model", "grounding_model", "segment_model", "clip_model")
_MODEL_WHAT = {
    "caption_model": "captioner (BLIP-2)",
    "grounding_model": "detector (Grounding DINO)",
    "segment_model": "segmenter (SAM)",
    "clip_model": "CLIP model",
}
TINY_SEED = 0
_TINY_MODELS = {
    "caption_model": {"tiny": "shape captioner"},
    "grounding_model": {"tiny": "shape grounder"},
    "segment_model": {"tiny": "shape segmenter"},
    "clip_model": {"tiny": "clip", "seed": TINY_SEED},
}


def _identities(config, keys: Sequence[str], tiny: bool) -> dict:
    """``{config key: identity}`` of the models a run uses (see `mipadapter.provenance`), found without
    loading them; a model that is neither on disk nor reachable fails here, naming its config key."""
    if tiny:
        return {key: _TINY_MODELS[key] for key in keys}
    from mipadapter.hub import resolve_folder_file
    from mipadapter.provenance import source_identity

    found = {}
    for key in keys:
        source = getattr(config, key)
        marker = resolve_folder_file(source, "config.json", _MODEL_WHAT[key], key)
        found[key] = source_identity(source, marker.parent, folder_marker=marker)
    return found


def run(args: argparse.Namespace) -> int:
    from mipadapter import data

    _check_paths(args)
    if args.verb == "merge":
        report = data.merge_dataset(args.output, top_k=args.top_k)
        print(report.text())
        return 0
    config = data.load_data_config(args.config) if args.config else data.DataConfig()
    config = _with_overrides(config, args)
    stages = _BUILD_MODELS if args.verb == "build" else ("clip_model",)
    common = {
        "device": args.device,
        "progress": not args.no_progress,
        "models": _identities(config, stages, args.tiny),  # before any model loads or file is written
        "allow_change": args.allow_change,
    }
    if args.tiny:
        from mipadapter.testing.shapes import shape_backends

        common["backends"] = shape_backends(config, TINY_SEED)
    if args.verb == "build":
        report = data.build_dataset(args.input, args.output, config, layout=args.layout, **common)
    else:
        from mipadapter.data.sources import read_id_list

        ids = read_id_list(args.ids) if args.ids else None
        report = data.score_dataset(args.input, args.output, config, ids=ids, **common)
    if report.merged:
        print(report.text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mipadapter.data ...` without the top-level `mipadapter` command."""
    parser = argparse.ArgumentParser(prog="mipadapter data", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("mipadapter data: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one readable line unless --verbose
        if args.verbose:
            raise
        print(f"mipadapter data: error: {error}", file=sys.stderr)
        return 2
