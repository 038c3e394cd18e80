"""Argument parsing helpers shared by the CLI's sub-commands (and the web shell)."""

from __future__ import annotations

import json
from pathlib import Path

import mipadapter


def parse_keyed(values: list[str], flag: str) -> dict[str, str]:
    """``["cat=a", "dog=b"]`` → ``{"cat": "a", "dog": "b"}``; the key is everything before the last '='
    that is followed by no other '=' (names may hold spaces: ``"wooden pot=pot.jpg"``)."""
    parsed: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        name = name.strip()
        if not sep or not name or not rest.strip():
            raise ValueError(f"{flag} takes NAME=VALUE, got {value!r}")
        if name in parsed:
            raise ValueError(f"{flag} names {name!r} twice")
        parsed[name] = rest.strip()
    return parsed


def parse_subjects(values: list[str]) -> dict[str, list[Path]]:
    """``--subject cat=a.jpg,b.jpg`` → ``{"cat": [Path("a.jpg"), Path("b.jpg")]}``; every photo must exist."""
    subjects = {}
    for name, paths in parse_keyed(values, "--subject").items():
        photos = [Path(part.strip()) for part in paths.split(",") if part.strip()]
        missing = [str(photo) for photo in photos if not photo.is_file()]
        if missing:
            raise FileNotFoundError(f"--subject {name}: photo not found: {', '.join(missing)}")
        subjects[name] = photos
    return subjects


def parse_region(value: str):
    """``x0,y0,x1,y1`` → a box tuple; otherwise the path of a mask image."""
    parts = value.split(",")
    if len(parts) == 4:
        try:
            return tuple(float(part) for part in parts)
        except ValueError:
            pass
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"--region {value!r} is neither x0,y0,x1,y1 nor an existing mask image")
    from PIL import Image

    return Image.open(path).convert("L")


def pick_device_dtype(device: str, dtype: str, tiny: bool = False):
    """The CLI's choice (the library never chooses): cuda, then mps, then cpu; half precision on GPUs."""
    import torch

    if device == "auto":
        device = (
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    device = torch.device(device)
    if dtype == "auto":
        dtype = "float16" if device.type in ("cuda", "mps") and not tiny else "float32"
    return device, getattr(torch, dtype)


def load_pipeline(args, device, dtype):
    """Build the pipeline the arguments describe; returns it and the model ids used (for metadata)."""
    if args.tiny:
        from mipadapter.testing.mip import tiny_mip_pipeline

        pipe = tiny_mip_pipeline("sdxl", "basic", text_weight=True).to(device)
        if dtype != pipe.pipe.unet.dtype:
            pipe.to(dtype=dtype)
        return pipe, {
            "base_model": "tiny-sdxl (random)",
            "adapter": "tiny-mip (random)",
            "image_encoder": "tiny",
        }
    from mipadapter.config import PRESETS
    from mipadapter.pipeline import MIPAdapterPipeline

    preset = PRESETS[args.preset]
    models = {
        "base_model": str(args.base_model or preset.base_model),
        "adapter": str(args.adapter or preset.adapter),
        "image_encoder": str(args.image_encoder or preset.image_encoder),
    }
    pipe = MIPAdapterPipeline.from_pretrained(
        args.base_model,
        args.adapter,
        args.image_encoder,
        preset=args.preset,
        torch_dtype=dtype,
        argument_names={"base_model": "--base-model", "adapter": "--adapter", "image_encoder": "--image-encoder"},
    )
    return pipe.to(device), models


def save_png(images, output: Path, parameters: dict) -> list[Path]:
    """Write PNGs carrying the generation parameters (JSON in the ``mipadapter`` text chunk)."""
    from PIL.PngImagePlugin import PngInfo

    output.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        info = PngInfo()
        info.add_text(
            "mipadapter", json.dumps({**parameters, "image_index": index, "version": mipadapter.__version__})
        )
        path = (
            output
            if len(images) == 1
            else output.with_name(f"{output.stem}_{index + 1}{output.suffix or '.png'}")
        )
        image.save(path, format="PNG", pnginfo=info)
        paths.append(path)
    return paths
