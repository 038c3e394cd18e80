"""`mipadapter convert`: rewrite an adapter checkpoint in another layout, losslessly."""

from __future__ import annotations

import argparse

from mipadapter.config import DEFAULT_PRESET, PRESETS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an adapter checkpoint between formats",
        description="Convert between our safetensors format, the authors' MIP .bin layout and the plain "
        "IP-Adapter layout diffusers reads (which drops the text weight).",
    )
    parser.add_argument("input", help="checkpoint: local file or owner/repo/path/file")
    parser.add_argument("output", help="file to write (.safetensors or .bin)")
    parser.add_argument("--to", choices=["mipadapter", "authors", "diffusers"], default="mipadapter")
    parser.add_argument(
        "--base-model",
        default=PRESETS[DEFAULT_PRESET].base_model,
        help="the UNet the checkpoint belongs to (only its config is read), Hub id or folder; 'tiny-sdxl' "
        "and 'tiny-sd15' name the built-in tiny models",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mipadapter.checkpoint import convert_checkpoint

    unet = unet_skeleton(args.base_model)
    print(convert_checkpoint(args.input, args.output, unet, args.to))
    return 0


def unet_skeleton(base_model: str):
    """The base model's UNet built from its config on the ``meta`` device (no weights read)."""
    import torch
    from diffusers import UNet2DConditionModel

    from mipadapter.checkpoint.hub import fetch_failed, resolve_folder

    if base_model in ("tiny-sdxl", "tiny-sd15"):
        from mipadapter.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

        return (tiny_sdxl_pipeline if base_model == "tiny-sdxl" else tiny_sd15_pipeline)().unet
    location, subfolder = resolve_folder(base_model, "base model", "--base-model")
    subfolder = f"{subfolder}/unet" if subfolder else "unet"
    try:
        config = UNet2DConditionModel.load_config(location, subfolder=subfolder)
    except OSError as error:
        raise fetch_failed(base_model, "base model", "--base-model", error) from error
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)
