"""`mipadapter convert`: rewrite an adapter checkpoint in another layout, losslessly."""

from __future__ import annotations

import argparse
import sys

from mipadapter.config import DEFAULT_PRESET, PRESETS
from mipadapter.limits import LARGE_LIMITS, check_number

TINY_BASE_MODELS = ("tiny-sdxl", "tiny-sd15", "tiny-flux")
FORMAT_SUFFIXES = {
    "mipadapter": (".safetensors",),
    "authors": (".safetensors", ".bin"),
    "diffusers": (".safetensors", ".bin"),
    "xlabs": (".safetensors",),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an adapter checkpoint between formats",
        description="Convert between our safetensors format, the authors' MIP .bin layout, the plain "
        "IP-Adapter layout diffusers reads (which drops the text weight) and, for FLUX.1 adapters, XLabs' "
        "published layout. Only the base model's unet/config.json (FLUX: transformer/config.json) is "
        "read, never its weights.",
    )
    parser.add_argument("input", help="checkpoint: local file or owner/repo/path/file")
    parser.add_argument(
        "output", help="file to write: .safetensors (any format) or .bin (authors, diffusers)"
    )
    parser.add_argument(
        "--to",
        choices=sorted(FORMAT_SUFFIXES),
        default="mipadapter",
        help="layout to write; xlabs is for FLUX adapters (default: %(default)s)",
    )
    parser.add_argument(
        "--base-model",
        default=PRESETS[DEFAULT_PRESET].base_model,
        help="the base model the checkpoint belongs to (only its unet/config.json, or a FLUX model's "
        "transformer/config.json, is read): Hub id or folder; 'tiny-sdxl', 'tiny-sd15' and 'tiny-flux' "
        "name the built-in tiny models (default: %(default)s)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        metavar="S",
        help="the default image scale our format stores for a source without one (h94, the authors', XLabs' "
        "files; they carry no scale, and 1.0 is stored otherwise): 0.75 for the authors' model_sdxl.bin and "
        "0.65 for model_sdxl_plus.bin, as the mip-sdxl and mip-sdxl-plus presets use",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mipadapter.checkpoint import convert_checkpoint, read_file
    from mipadapter.fileio import check_output_file
    from mipadapter.hub import resolve_file
    from mipadapter.pipeline.loading import check_adapter_fits

    output = check_output_file(args.output, "output", FORMAT_SUFFIXES[args.to])
    source = resolve_file(args.input, "checkpoint", "input")
    if source.resolve() == output.resolve():
        raise ValueError(
            f"output {args.output!r} is the input file: write the converted checkpoint elsewhere"
        )
    if args.scale is not None:
        check_number(args.scale, "--scale", 0, LARGE_LIMITS.max_scale)
    loaded = read_file(source)  # a corrupt file is named before the base model is looked for
    if loaded.config is not None and args.scale is not None:
        raise ValueError(f"--scale: {args.input!r} is in our format and carries its own default scale")
    model = denoiser_for(args.base_model)
    check_adapter_fits(loaded, model, source, f"--base-model {args.base_model!r}")
    print(convert_checkpoint(source, output, model, args.to, where="input", loaded=loaded, default_scale=args.scale))
    if args.to == "mipadapter" and loaded.config is None and args.scale is None:
        print(f"note: {args.input} carries no default image scale; 1.0 was stored ({scale_hint(model)})", file=sys.stderr)
    return 0


def scale_hint(model) -> str:
    """What to pass as --scale for a file without a default scale: the authors' values on a UNet; on a
    FLUX transformer 1.0 is already the ip-flux preset's (x-flux's default), so only tuning is suggested."""
    if type(model).__name__.startswith("Flux"):
        return "1.0 is the ip-flux preset's scale too; pass --scale to store another"
    return "pass --scale, e.g. 0.75 for the authors' model_sdxl.bin"


def denoiser_for(base_model: str):
    """The model a checkpoint is checked against: a tiny UNet or FLUX transformer by name, else the base
    model's UNet or FLUX transformer built from its config on the ``meta`` device (no weights read)."""
    if base_model in TINY_BASE_MODELS:
        from mipadapter.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

        if base_model == "tiny-flux":
            from mipadapter.testing.flux import tiny_flux_pipeline

            return tiny_flux_pipeline().transformer
        return (tiny_sdxl_pipeline if base_model == "tiny-sdxl" else tiny_sd15_pipeline)().unet
    from mipadapter.pipeline.loading import denoiser_skeleton

    return denoiser_skeleton(base_model, "base model", "--base-model")
