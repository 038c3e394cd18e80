"""`mipadapter eval`: benchmark runs (Concept101, DreamBench), the relevance experiment, reports.

mipadapter eval concept101 --benchmark-dir DIR --out RUN [--variants official|rules|table4|all,...]
mipadapter eval dreambench --dataset-dir DIR --subjects single|multi --out RUN
mipadapter eval relevance --benchmark-dir DIR --out RUN [--model base|adapter]
mipadapter eval report RUN [RUN ...] [--markdown]
mipadapter eval compare RUN_BEFORE RUN_AFTER --out DIR      (Fig. 6: image attention of two checkpoints)

Generation shards over processes and machines with ``accelerate launch -m mipadapter.eval concept101 ...``
(each rank a disjoint slice; rerun the same command to fill what is missing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ints(value: str) -> list[int]:
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _model_arguments(parser: argparse.ArgumentParser, *, ip: bool = True) -> None:
    from mipadapter.config import DEFAULT_PRESET, PRESETS

    group = parser.add_argument_group("models")
    group.add_argument(
        "--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET, help="the adapter under test"
    )
    group.add_argument("--base-model")
    group.add_argument("--adapter")
    group.add_argument("--image-encoder")
    if ip:
        group.add_argument(
            "--ip-preset", choices=sorted(PRESETS), default="ip-sdxl", help="plain IP-Adapter baseline"
        )
        group.add_argument("--ip-base-model")
        group.add_argument("--ip-adapter")
        group.add_argument("--ip-image-encoder")
    group.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIP for CLIP-T / CLIP-I")
    group.add_argument("--dino", default="facebook/dino-vits16", help="DINO ViT-S/16 for the DINO score")
    group.add_argument("--detector", default="IDEA-Research/grounding-dino-base", help="Grounding DINO model")
    group.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda …")
    group.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    group.add_argument("--tiny", action="store_true", help="tiny random models, offline (a smoke test)")


def _generation_arguments(parser: argparse.ArgumentParser) -> None:
    from mipadapter.eval.variants import AUTHORS_NEGATIVE_PROMPT

    group = parser.add_argument_group("generation")
    group.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30, the authors')")
    group.add_argument("--guidance", type=float, help="guidance scale (default: the base model's usual)")
    group.add_argument("--scale", type=float, help="image scale of every subject (default: the adapter's)")
    group.add_argument("--height", type=int, help="image height (default: the base model's)")
    group.add_argument("--width", type=int, help="image width (default: the base model's)")
    group.add_argument(
        "--negative-prompt",
        default=AUTHORS_NEGATIVE_PROMPT,
        help=f'default: the authors\' {AUTHORS_NEGATIVE_PROMPT!r}; "" for none',
    )
    group.add_argument(
        "--multi-image",
        choices=["mean", "each"],
        default="mean",
        help="several photos of a subject: mean of their tokens (the authors') or each its own condition",
    )
    group.add_argument(
        "--allow-large",
        action="store_true",
        help="raise the caps on steps, sizes, guidance, scale and images per prompt to what a big GPU can "
        "run (docs/limits.md), as generate's flag does",
    )


def _reference_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    group = parser.add_argument_group("references")
    group.add_argument(
        "--references",
        choices=["crop", "whole"],
        default=default,
        help="crop: each reference cropped to its object's box, fitted and padded white to 224 (the "
        "authors' Concept101 preparation); whole: the whole photos",
    )
    group.add_argument(
        "--reference-boxes",
        type=Path,
        metavar="DIR",
        help="the authors' json_data folder (<concept>/<photo stem>.json, box of mask[1]); without it "
        "boxes are detected with --detector and cached in the run folder",
    )


def _run_arguments(parser: argparse.ArgumentParser, default_images: int) -> None:
    parser.add_argument("--out", required=True, help="run folder (an existing one is resumed)")
    parser.add_argument(
        "--variants",
        default="official",
        help="comma-separated variants or groups: official, paper, uniform, ip-adapter, ip-adapter-weighted, "
        "t4-local-add, t4-relevance, t4-text-weight; groups rules, table4, baselines, all",
    )
    parser.add_argument(
        "--rule", choices=["official", "paper", "uniform"], help="shorthand for --variants RULE"
    )
    parser.add_argument("--seeds", type=_ints, default=[420], help="comma-separated, e.g. 420,421,422")
    parser.add_argument("--images-per-prompt", type=int, default=default_images)
    parser.add_argument(
        "--figures", action="store_true", help="record routing maps; draw figures and contact sheets"
    )
    parser.add_argument("--no-score", action="store_true", help="only generate")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="benchmarks, the relevance experiment and reports", description=__doc__.splitlines()[0]
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    c101 = verbs.add_parser("concept101", help="CustomConcept101 multi-object benchmark (CLIP-T ×2.5)")
    c101.add_argument(
        "--benchmark-dir", required=True, help="dataset_multiconcept.json, prompts/, benchmark_dataset/"
    )
    c101.add_argument("--combinations", type=_ints, help="only these combination indices")
    c101.add_argument("--on-quirk", choices=["flag", "skip"], default="flag", help="known dataset errors")
    c101.add_argument(
        "--authors-scoring",
        action="store_true",
        help="score as the authors' evaluation does, quirks included, to match their table to the digit: "
        "CLIP-T against the prompt read back from their file names ('..._gen.' without a final period), "
        "a prompt repeated in a combination counted once (their file is overwritten), combinations "
        "weighted equally (default: every image scored against its own prompt, all images equal)",
    )
    _run_arguments(c101, 1)
    _generation_arguments(c101)
    _reference_arguments(c101, "crop")
    _model_arguments(c101)

    db = verbs.add_parser("dreambench", help="DreamBench single- or multi-subject benchmark (CLIP-T raw)")
    db.add_argument("--dataset-dir", required=True, help="subject folders and prompts_and_classes.txt")
    db.add_argument("--subjects", choices=["single", "multi"], default="single")
    db.add_argument("--only", help="comma-separated subject folders (default: all present)")
    db.add_argument(
        "--pairs",
        type=Path,
        help="multi: a file of 'subject_a,subject_b' lines (default: a seeded draw of 30)",
    )
    db.add_argument(
        "--unique-token", default="", help="DreamBooth's identifier token (empty for encoder methods)"
    )
    _run_arguments(db, 4)
    _generation_arguments(db)
    _reference_arguments(db, "whole")
    _model_arguments(db)

    rel = verbs.add_parser("relevance", help="the paper's §4 relevance experiment on Concept101 prompts")
    rel.add_argument(
        "--benchmark-dir", required=True, help="dataset_multiconcept.json, prompts/ (photos: --model adapter)"
    )
    rel.add_argument("--out", required=True, help="run folder (an existing one is resumed)")
    rel.add_argument(
        "--model",
        choices=["base", "adapter"],
        default="base",
        help="base: the preset's base model alone, no adapter (the paper's setting); adapter: the MIP pipeline",
    )
    rel.add_argument("--combinations", type=_ints, help="only these combination indices")
    rel.add_argument("--seed", type=int, default=420, help="the seed of every image of a pair")
    rel.add_argument("--noise-level", type=float, default=0.5, help="noise std as a fraction of rms(Z_text)")
    rel.add_argument(
        "--noise-seed", type=int, default=0, help="seed of the noise draws (same for both modes)"
    )
    rel.add_argument("--box-threshold", type=float, default=0.35, help="Grounding DINO box threshold")
    rel.add_argument("--text-threshold", type=float, default=0.25, help="Grounding DINO text threshold")
    rel.add_argument(
        "--reference-boxes", type=Path, metavar="DIR", help="--model adapter: the authors' json_data folder"
    )
    _generation_arguments(rel)
    _model_arguments(rel, ip=False)

    rep = verbs.add_parser("report", help="markdown tables of run folders (one per CLIP-T convention)")
    rep.add_argument("runs", nargs="+", type=Path)
    rep.add_argument("--markdown", action="store_true", help="markdown (the only format; kept for clarity)")
    rep.add_argument("--output", type=Path, help="write the report here instead of printing it")

    cmp_ = verbs.add_parser(
        "compare",
        help="Fig. 6: each subject's image attention in two runs (e.g. before and after training)",
        description="Both runs: the same benchmark, variants and seeds with --figures, and two checkpoints.",
    )
    cmp_.add_argument("before", type=Path, help="the first run folder (e.g. the IP-Adapter you started from)")
    cmp_.add_argument("after", type=Path, help="the second run folder (e.g. your trained adapter)")
    cmp_.add_argument("--out", required=True, type=Path, help="folder for the figures")
    cmp_.add_argument("--labels", default="before,after", help="the two runs' labels (default: before,after)")
    parser.set_defaults(func=run)


def _options(args):
    from mipadapter.cli.options import pick_device_dtype
    from mipadapter.eval.api import ModelOptions

    device, dtype = pick_device_dtype(args.device, args.dtype, args.tiny)
    return ModelOptions(
        preset=args.preset,
        base_model=args.base_model,
        adapter=args.adapter,
        image_encoder=args.image_encoder,
        ip_preset=getattr(args, "ip_preset", "ip-sdxl"),
        ip_base_model=getattr(args, "ip_base_model", None),
        ip_adapter=getattr(args, "ip_adapter", None),
        ip_image_encoder=getattr(args, "ip_image_encoder", None),
        clip=args.clip,
        dino=args.dino,
        detector=args.detector,
        box_threshold=getattr(args, "box_threshold", 0.35),
        text_threshold=getattr(args, "text_threshold", 0.25),
        device=device,
        torch_dtype=dtype,
        tiny=args.tiny,
    )


_FLAGS = {
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "height": "--height",
    "width": "--width",
    "scale": "--scale",
    "multi_image": "--multi-image",
}


def _settings(args):
    from mipadapter.eval.variants import GenerationSettings

    try:
        return GenerationSettings(
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
            negative_prompt=args.negative_prompt,
            scale=args.scale,
            multi_image=args.multi_image,
        )
    except ValueError as error:  # name the flag, not the field
        text = str(error)
        for field, flag in _FLAGS.items():
            if text.startswith(field + " "):
                text = flag + text[len(field) :]
        raise ValueError(text) from None


def _check_generation_caps(args) -> None:
    """Steps, sizes, guidance, scale and images per prompt within generate's caps (``limits``; the
    large ones with --allow-large), each refusal naming its flag."""

    from mipadapter import limits

    caps, allow = (
        (limits.LARGE_LIMITS, None) if getattr(args, "allow_large", False) else (limits.DEFAULT_LIMITS, limits.ALLOW_LARGE)
    )
    limits.check_steps(args.steps, "--steps", caps, allow=allow)
    if getattr(args, "images_per_prompt", None) is not None:
        limits.check_images(args.images_per_prompt, "--images-per-prompt", caps, allow=allow)
    if args.guidance is not None:
        limits.check_guidance(args.guidance, "--guidance", caps, allow=allow)
    if args.scale is not None:
        limits.check_scale(args.scale, "--scale", caps, allow=allow)
    sides = limits.latent_sides(caps)
    for flag in ("height", "width"):
        if getattr(args, flag) is not None:
            limits.check_side(getattr(args, flag), "--" + flag, sides, allow=allow)
    if args.height is not None and args.width is not None:
        limits.check_output_pixels(args.width, args.height, caps, allow=allow)


def _check_common(args) -> None:
    """What can be checked before any model loads: numbers, folders, the run folder."""
    from mipadapter.fileio import check_creatable_dir

    _check_generation_caps(args)
    if hasattr(args, "seeds") and not args.seeds:
        raise ValueError("--seeds: give at least one seed")
    from mipadapter.limits import check_seed

    for seed in getattr(args, "seeds", None) or []:
        check_seed(seed, "--seeds")
    for flag in ("seed", "noise_seed"):  # the relevance experiment's
        if getattr(args, flag, None) is not None:
            check_seed(getattr(args, flag), "--" + flag.replace("_", "-"))
    boxes = getattr(args, "reference_boxes", None)
    if boxes is not None and not boxes.is_dir():
        raise FileNotFoundError(f"--reference-boxes {str(boxes)!r} is not a folder")
    if boxes is not None and getattr(args, "references", "crop") != "crop":
        raise ValueError("--reference-boxes goes with --references crop")
    check_creatable_dir(args.out, "--out")  # made by the run once every check has passed


def _common(args) -> dict:
    _check_common(args)
    return {
        "options": _options(args),
        "variants": args.rule or args.variants,
        "seeds": args.seeds,
        "images_per_prompt": args.images_per_prompt,
        "settings": _settings(args),
        "references": args.references,
        "reference_boxes": args.reference_boxes,
        "figures": args.figures,
        "score": not args.no_score,
        "progress": True,
    }


def _summary(results) -> str:
    if results is None:
        return "generated (not scored)"
    lines = []
    for name, variant in results["variants"].items():
        agg = variant["aggregate"]
        lines.append(
            f"{name}: CLIP-T {agg['clip_t']['mean']:.4f} CLIP-I {agg['clip_i']['mean']:.4f} "
            f"(min {agg['clip_i_min']['mean']:.4f}) DINO {agg['dino']['mean']:.4f} (min {agg['dino_min']['mean']:.4f})"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.verb == "concept101":
        from mipadapter.eval.api import evaluate_concept101

        if not Path(args.benchmark_dir).is_dir():
            raise FileNotFoundError(f"--benchmark-dir {args.benchmark_dir!r} is not a folder")
        results = evaluate_concept101(
            args.benchmark_dir,
            args.out,
            combinations=args.combinations,
            on_quirk=args.on_quirk,
            authors_scoring=args.authors_scoring,
            **_common(args),
        )
        print(_summary(results))
    elif args.verb == "dreambench":
        from mipadapter.eval.api import evaluate_dreambench

        pairs = None
        if args.pairs is not None:
            pairs = [
                tuple(part.strip() for part in line.split(","))
                for line in args.pairs.read_text().splitlines()
                if line.strip()
            ]
            bad = [pair for pair in pairs if len(pair) != 2]
            if bad:
                raise ValueError(f"{args.pairs}: each line must be 'subject_a,subject_b', got {bad[0]}")
        only = [part.strip() for part in args.only.split(",")] if args.only else None
        if not Path(args.dataset_dir).is_dir():
            raise FileNotFoundError(f"--dataset-dir {args.dataset_dir!r} is not a folder")
        results = evaluate_dreambench(
            args.dataset_dir,
            args.out,
            mode=args.subjects,
            subjects=only,
            pairs=pairs,
            unique_token=args.unique_token,
            **_common(args),
        )
        print(_summary(results))
    elif args.verb == "relevance":
        from mipadapter.eval.api import evaluate_relevance

        if not Path(args.benchmark_dir).is_dir():
            raise FileNotFoundError(f"--benchmark-dir {args.benchmark_dir!r} is not a folder")
        if args.noise_level < 0:
            raise ValueError(f"--noise-level must be >= 0, got {args.noise_level}")
        if args.reference_boxes is not None and args.model != "adapter":
            raise ValueError(
                "--reference-boxes goes with --model adapter (the base model uses no references)"
            )
        _check_common(args)
        settings = _settings(args)
        results = evaluate_relevance(
            args.benchmark_dir,
            args.out,
            options=_options(args),
            model=args.model,
            combinations=args.combinations,
            seed=args.seed,
            level=args.noise_level,
            noise_seed=args.noise_seed,
            settings=settings,
            reference_boxes=args.reference_boxes,
            progress=True,
        )
        print(
            json.dumps(
                {
                    "S_relevance": results["S_relevance"],
                    "detected": results["detected"],
                    "pairs": results["pairs"],
                }
            )
        )
    elif args.verb == "report":
        from mipadapter.eval.report import report

        if args.output:
            from mipadapter.fileio import atomic_write_text, check_output_file

            check_output_file(args.output, "--output")
        text = report(args.runs)
        if args.output:
            atomic_write_text(args.output, text)
        else:
            print(text)
    elif args.verb == "compare":
        from mipadapter.eval.figures import compare_runs
        from mipadapter.fileio import check_output_dir

        labels = tuple(part.strip() for part in args.labels.split(","))
        if len(labels) != 2 or not all(labels):
            raise ValueError(f"--labels takes two comma-separated labels, got {args.labels!r}")
        for flag, run_dir in (("before", args.before), ("after", args.after)):
            if not run_dir.is_dir():
                raise FileNotFoundError(f"{flag} run {str(run_dir)!r} is not a folder")
        check_output_dir(args.out, "--out")
        print(f"{compare_runs(args.before, args.after, args.out, labels)} figures in {args.out}")
    else:  # argparse restricts the verbs
        raise ValueError(f"unknown eval verb {args.verb!r}")
    return 0
