"""`mipadapter generate`: one prompt, several subjects, PNG files with their parameters embedded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mipadapter.config import DEFAULT_PRESET, PRESETS, MergeRule, MultiImageMode


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images of a prompt with several reference subjects",
        description="Generate images where each --subject's photos go to the object its name denotes.",
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument(
        "--subject",
        action="append",
        required=True,
        metavar="NAME=PHOTO[,PHOTO...]",
        help="a subject: the words the prompt uses for it and one or more photos (repeat per subject)",
    )
    parser.add_argument(
        "--scale", action="append", default=[], metavar="NAME=S", help="image scale of one subject"
    )
    parser.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="NAME=X0,Y0,X1,Y1|NAME=MASK.png",
        help="where a subject goes: a box in output pixels or a mask image",
    )
    parser.add_argument("--region-mode", choices=["replace", "multiply"], default="replace")
    parser.add_argument("-o", "--output", default="out.png", help="output PNG (several images get _1, _2, …)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET, help="default models")
    parser.add_argument("--base-model", help="diffusers base model: Hub id or local folder")
    parser.add_argument("--adapter", help="adapter checkpoint: local file or owner/repo/path/file")
    parser.add_argument("--image-encoder", help="CLIP image encoder: local folder or owner/repo/subfolder")
    parser.add_argument(
        "--rule", choices=[rule.value for rule in MergeRule], help="merge rule (default: the adapter's)"
    )
    parser.add_argument("--no-text-weight", action="store_true", help="ignore a MIP checkpoint's text weight")
    parser.add_argument("--multi-image", choices=[mode.value for mode in MultiImageMode], default="mean")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the base model's usual)")
    parser.add_argument("--seed", type=int, default=420)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1 …"
    )
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    parser.add_argument(
        "--contact-sheet", metavar="PATH", help="also write references, result and routing maps"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="built-in tiny random models, offline (an install smoke test)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mipadapter.cli.options import (
        load_pipeline,
        parse_keyed,
        parse_region,
        parse_subjects,
        pick_device_dtype,
        save_png,
    )

    subjects_photos = parse_subjects(args.subject)
    scales = {name: float(value) for name, value in parse_keyed(args.scale, "--scale").items()}
    regions = {name: parse_region(value) for name, value in parse_keyed(args.region, "--region").items()}
    unknown = sorted((set(scales) | set(regions)) - set(subjects_photos))
    if unknown:
        raise ValueError(f"--scale/--region name subjects that no --subject gives: {unknown}")

    import torch
    from PIL import Image

    from mipadapter.pipeline import Subject

    photos = {
        name: [Image.open(path).convert("RGB") for path in paths] for name, paths in subjects_photos.items()
    }
    subjects = [
        Subject(
            name, photos[name], scale=scales.get(name), region=regions.get(name), region_mode=args.region_mode
        )
        for name in subjects_photos
    ]
    device, dtype = pick_device_dtype(args.device, args.dtype, tiny=args.tiny)
    pipe, models = load_pipeline(args, device, dtype)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    output = pipe(
        args.prompt,
        subjects,
        rule=args.rule,
        use_text_weight=False if args.no_text_weight else None,
        multi_image=args.multi_image,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        generator=generator,
        return_relevance=bool(args.contact_sheet),
    )
    parameters = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "rule": (args.rule or pipe.adapter.config.default_rule.value),
        "text_weight": pipe.adapter.config.text_weight and not args.no_text_weight,
        "multi_image": args.multi_image,
        "subjects": [
            {
                "name": s.name,
                "photos": [str(p) for p in subjects_photos[s.name]],
                "scale": pipe.adapter.config.default_scale if s.scale is None else s.scale,
                "region": args_region_text(args.region, s.name),
            }
            for s in subjects
        ],
        "models": models,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    paths = save_png(output.images, Path(args.output), parameters)
    if args.contact_sheet:
        from mipadapter.figures import contact_sheet

        sheet = contact_sheet(photos, output.images[0], output.relevance[0])
        sheet.save(args.contact_sheet)
        paths.append(Path(args.contact_sheet))
    for path in paths:
        print(path)
    return 0


def args_region_text(values: list[str], name: str) -> str | None:
    for value in values:
        key, _, rest = value.partition("=")
        if key.strip() == name:
            return rest
    return None


def parameters_of(path: str | Path) -> dict:
    """The generation parameters stored in a PNG written by `generate`."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text["mipadapter"])
