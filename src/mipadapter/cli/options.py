"""Argument helpers shared by the CLI's sub-commands (and the web shell): parsing, checking, model loading.

Everything here that checks runs before any model is loaded; errors are one line naming the flag.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mipadapter import limits
from mipadapter.alignment import subject_labels
from mipadapter.limits import SEED_RANGE  # noqa: F401  (the CLI's name for it)
from mipadapter.recipe import ModelRecord

MODEL_FLAGS = {"base_model": "--base-model", "adapter": "--adapter", "image_encoder": "--image-encoder"}
TINY_ADAPTER = "built-in tiny (random)"
VAE_FACTOR = 8  # SD1.5 and SDXL pixel sides per latent side
FLUX_CELL = 16  # FLUX.1: the VAE's factor 8 times the transformer's 2×2 latent patches


@dataclass(frozen=True)
class TinyArch:
    """One built-in tiny architecture of ``--tiny ARCH``: offline random models with the real structure."""

    name: str
    vae_factor: int  # output sides are multiples of this: the pixel side of one cell of the latent grid
    native_side: int  # output side when --height/--width are not given
    family: str = "unet"  # "unet" or "flux" (which guidance flags apply)


TINY_ARCHS = {
    "sdxl": TinyArch("sdxl", vae_factor=8, native_side=64),
    "sd15": TinyArch("sd15", vae_factor=8, native_side=64),
    "flux": TinyArch("flux", vae_factor=FLUX_CELL, native_side=64, family="flux"),
}
"""``--tiny`` choices (``--tiny`` alone is ``sdxl``); a new architecture is one more row."""
DEFAULT_TINY = "sdxl"


def add_model_flags(parser) -> None:
    """``--base-model``, ``--adapter``, ``--image-encoder`` (each defaulting to the preset's), the same
    for every command that loads a MIP pipeline (``generate``, ``web``, and ``eval`` with ``help``)."""
    parser.add_argument(
        "--base-model", help="diffusers base model: Hub id or local folder (default: the preset's)"
    )
    parser.add_argument(
        "--adapter", help="adapter checkpoint: local file or owner/repo/path/file (default: the preset's)"
    )
    parser.add_argument(
        "--image-encoder",
        help="CLIP image encoder: local folder or owner/repo/subfolder (default: the preset's)",
    )


def add_tiny_argument(parser, purpose: str) -> None:
    """``--tiny [ARCH]`` on a command's parser (one definition for every command that offers it)."""
    parser.add_argument(
        "--tiny",
        nargs="?",
        const=DEFAULT_TINY,
        choices=sorted(TINY_ARCHS),
        metavar="ARCH",
        help=f"built-in tiny random models, offline ({purpose}): ARCH is one of {', '.join(sorted(TINY_ARCHS))} "
        f"({DEFAULT_TINY} for --tiny alone); an --adapter given with it is loaded onto the tiny models "
        "(default: off, the preset's models)",
    )


def tiny_arch(value) -> str | None:
    """``args.tiny`` as an architecture name: None (not tiny), True (a ``store_true`` flag) → the default."""
    if value in (None, False):
        return None
    return DEFAULT_TINY if value is True else str(value)


# ----------------------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class Keyed:
    """``NAME=VALUE`` or ``NAME#K=VALUE`` (the K-th subject called NAME, from 1)."""

    name: str
    occurrence: int | None
    value: str

    @property
    def label(self) -> str:
        return self.name if self.occurrence is None else f"{self.name}#{self.occurrence}"


_OCCURRENCE = re.compile(r"^(?P<name>.+?)#(?P<k>\d+)$")


def parse_keyed(values: Sequence[str], flag: str, *, occurrences: bool = True) -> list[Keyed]:
    """``["cat=a", "dog#2=b"]`` → ``Keyed`` items (split at the first '='; names may hold spaces)."""
    parsed = []
    for value in values:
        name, sep, rest = value.partition("=")
        name, rest = name.strip(), rest.strip()
        if not sep or not name or not rest:
            form = "NAME=VALUE or NAME#K=VALUE" if occurrences else "NAME=VALUE"
            raise ValueError(f"{flag} takes {form}, got {value!r}")
        match = _OCCURRENCE.match(name) if occurrences else None
        if match:
            if int(match["k"]) < 1:
                raise ValueError(f"{flag} {value!r}: subjects are counted from #1")
            parsed.append(Keyed(match["name"].strip(), int(match["k"]), rest))
        else:
            parsed.append(Keyed(name, None, rest))
    return parsed


def address(items: Sequence[Keyed], names: Sequence[str], flag: str) -> dict[int, str]:
    """Subject index → value: ``NAME`` addresses every subject of that name, ``NAME#K`` the K-th one.

    Raises for a name no ``--subject`` gives, an occurrence beyond the subjects of that name, or one
    subject addressed twice.
    """
    positions: dict[str, list[int]] = {}
    for index, name in enumerate(names):  # labels as the pipeline's subject_labels: "dog", "dog#2"
        positions.setdefault(name, []).append(index)
    chosen: dict[int, str] = {}
    given: dict[int, str] = {}
    for item in items:
        if item.name not in positions:
            raise ValueError(
                f"{flag} {item.label}: no --subject is called {item.name!r} (subjects: {list(names)})"
            )
        found = positions[item.name]
        if item.occurrence is not None and item.occurrence > len(found):
            raise ValueError(
                f"{flag} {item.label}: there {'is' if len(found) == 1 else 'are'} only {len(found)} "
                f"subject{'s' if len(found) > 1 else ''} called {item.name!r}"
            )
        targets = found if item.occurrence is None else [found[item.occurrence - 1]]
        for index in targets:
            if index in chosen:
                raise ValueError(
                    f"{flag} gives subject #{index + 1} {names[index]!r} twice ({given[index]} and {item.label})"
                )
            chosen[index], given[index] = item.value, item.label
    return chosen


@dataclass(frozen=True)
class SubjectArg:
    """One ``--subject``: its name and photo paths (checked to exist and be images by ``open_photos``);
    recorded: the photos come from a ``--from-png`` recipe, not a flag (errors say so)."""

    name: str
    photos: tuple[Path, ...]
    recorded: bool = False


def parse_subjects(values: Sequence[str]) -> list[SubjectArg]:
    """``--subject cat=a.jpg,b.jpg`` (repeatable; the same name twice is two subjects)."""
    subjects = []
    for item in parse_keyed(values, "--subject", occurrences=False):
        photos = tuple(Path(part.strip()).expanduser() for part in item.value.split(",") if part.strip())
        if not photos:
            raise ValueError(f"--subject {item.name}: give at least one photo")
        subjects.append(SubjectArg(item.name, photos))
    return subjects


def parse_scale(
    value: str, label: str, caps: limits.Limits = limits.DEFAULT_LIMITS, allow: str | None = None
) -> float:
    """``--scale NAME=S``'s number, finite, in ``0 … caps.max_scale`` (``allow``: the flag that raises it)."""
    try:
        scale = float(value)
    except ValueError:
        raise ValueError(f"--scale {label}={value}: the scale must be a number") from None
    return limits.check_scale(scale, f"--scale {label}", caps, allow=allow)


def parse_box(value: str, label: str) -> tuple[float, float, float, float] | None:
    """``x0,y0,x1,y1`` → a box (checked: finite, x0 < x1, y0 < y1, not negative); None if not 4 numbers."""
    parts = value.split(",")
    if len(parts) != 4:
        return None
    try:
        box = tuple(float(part) for part in parts)
    except ValueError:
        return None
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box) or min(box) < 0 or not (x0 < x1 and y0 < y1):
        raise ValueError(
            f"--region {label}={value}: a box is x0,y0,x1,y1 in pixels with 0 ≤ x0 < x1 and 0 ≤ y0 < y1"
        )
    return box  # type: ignore[return-value]


def check_box_fits(box, label: str, height: int | None, width: int | None) -> None:
    x0, y0, x1, y1 = box
    if (width is not None and x1 > width) or (height is not None and y1 > height):
        raise ValueError(
            f"--region {label}={','.join(f'{v:g}' for v in box)}: the box reaches beyond the {width}×{height} "
            "output (x1 ≤ width, y1 ≤ height)"
        )


# ----------------------------------------------------------------------------------------------- checks
def check_side(value: int | None, flag: str, factor: int) -> int | None:
    if value is not None and (value <= 0 or value % factor):
        why = "the VAE's factor" if factor == VAE_FACTOR else "one latent cell: FLUX packs 2×2 VAE latents"
        raise ValueError(f"{flag} must be a positive multiple of {factor} ({why}), got {value}")
    return value


def check_true_cfg_scale(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 1):
        raise ValueError(f"--true-cfg-scale must be a finite number ≥ 1 (1 is off), got {value}")
    return value


def base_model_kind(models) -> str:
    """``flux`` or ``unet``: the kind of base model ``models`` (``tiny``, ``preset``, ``base_model``) will
    load, known before loading it: the tiny architecture, else the base model's ``model_index.json`` (read
    from its folder or the Hub), else the preset's base model."""
    arch = tiny_arch(getattr(models, "tiny", None))
    if arch is not None:
        return TINY_ARCHS[arch].family
    if getattr(models, "base_model", None):
        from mipadapter.pipeline.loading import denoiser_kind

        return denoiser_kind(models.base_model, "base model", MODEL_FLAGS["base_model"])
    from mipadapter.config import PRESETS

    preset = PRESETS[models.preset]
    declared = getattr(preset, "architecture", None)  # config.Preset may name it; else its base model does
    return declared or ("flux" if "/flux" in preset.base_model.lower() else "unet")


def check_model_flags(args) -> None:
    """``--tiny`` picks the base model and image encoder (an ``--adapter`` loads onto them): the other
    model flags are errors with it."""
    if tiny_arch(getattr(args, "tiny", None)) is None:
        return
    for key in ("base_model", "image_encoder"):
        if getattr(args, key, None):
            raise ValueError(
                f"{MODEL_FLAGS[key]} cannot be used with --tiny (it picks the tiny base model and image encoder)"
            )
    if getattr(args, "preset_given", False):
        raise ValueError("--preset cannot be used with --tiny (it picks the tiny models)")


def pick_device_dtype(device: str, dtype: str, tiny: bool | str | None = False):
    """The CLI's choice (the library never chooses): cuda, then mps, then cpu; half precision on GPUs."""
    import torch

    if device == "auto":
        device = (
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps …)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here")
    if dtype == "auto":
        dtype = "float16" if device.type in ("cuda", "mps") and not tiny else "float32"
    return device, getattr(torch, dtype)


# ----------------------------------------------------------------------------------------------- loading
def load_pipeline(args, device, dtype):
    """Build the pipeline the arguments describe; returns it and a ``ModelRecord`` of what was loaded.

    args: ``tiny`` (None, True, or an architecture of ``TINY_ARCHS``), ``preset``, ``base_model``,
    ``adapter``, ``image_encoder``. Small things are checked before big ones (see
    ``mipadapter.pipeline.loading``); errors name the flags.
    """
    check_model_flags(args)
    arch = tiny_arch(getattr(args, "tiny", None))
    if arch is not None:
        from mipadapter.pipeline.encoding import denoiser

        pipe, record = load_tiny(arch, getattr(args, "adapter", None))
        pipe.to(device)
        if dtype != denoiser(pipe.pipe).dtype:
            pipe.to(dtype=dtype)
        return pipe, record
    from mipadapter.config import PRESETS
    from mipadapter.pipeline import MIPAdapterPipeline

    preset = PRESETS[args.preset]
    record = ModelRecord(
        base_model=_recorded_path(args.base_model or preset.base_model),
        adapter=_recorded_path(args.adapter or preset.adapter),
        image_encoder=_recorded_path(args.image_encoder or preset.image_encoder),
        preset=args.preset,
    )
    pipe = MIPAdapterPipeline.from_pretrained(
        args.base_model,
        args.adapter,
        args.image_encoder,
        preset=args.preset,
        torch_dtype=dtype,
        argument_names=MODEL_FLAGS,
    )
    return pipe.to(device), record


def _recorded_path(source) -> str:
    """A local file or folder as an absolute path (so a recipe works from any folder); a Hub id as it is."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def load_tiny(arch: str, adapter: str | Path | None = None):
    """The tiny pipeline of ``arch``; with ``adapter`` (a file trained or saved on the tiny models; for
    ``flux`` also an XLabs-layout file sized for the tiny FLUX) that adapter on the tiny base model and the
    tiny image encoder its projection needs."""
    from mipadapter.testing.mip import tiny_mip_pipeline

    if arch not in TINY_ARCHS:
        raise ValueError(f"--tiny {arch!r}: choose one of {', '.join(TINY_ARCHS)}")
    base = f"tiny-{arch} (random)"
    if adapter is None:
        pipe = tiny_mip_pipeline(arch, "basic", text_weight=True)
        _as_default_preset(pipe)
        return pipe, ModelRecord(base, TINY_ADAPTER, f"tiny {arch} basic (random)", None, arch)
    from mipadapter.hub import resolve_file
    from mipadapter.testing.mip import tiny_pipeline_with_adapter

    path = resolve_file(adapter, "adapter", "--adapter")
    tiny, projection = tiny_pipeline_with_adapter(arch, path, f"--tiny {arch}")
    record = ModelRecord(base, str(path.resolve()), f"tiny {arch} {projection} (random)", None, arch)
    _as_default_preset(tiny)
    return tiny, record


def _as_default_preset(pipe) -> None:
    """A tiny MIP adapter (one with a text weight) on a UNet stands for the default preset, ``mip-sdxl``:
    it takes that preset's default negative prompt (the authors'), as a real run would."""
    from mipadapter.config import DEFAULT_PRESET, PRESETS

    if pipe.adapter.config.text_weight and pipe.architecture == "unet":
        pipe.default_negative_prompt = PRESETS[DEFAULT_PRESET].negative_prompt


# ----------------------------------------------------------------------------------------------- photos
def open_photos(subjects: Sequence[SubjectArg], max_pixels: int | None):
    """Every subject's photos decoded, upright (EXIF), each refused by its header above ``max_pixels``."""
    from mipadapter.photos import open_photo

    labels = subject_labels([s.name for s in subjects])

    def what(subject: SubjectArg, label: str, number: int) -> str:
        return f"recorded photo {number} of {label!r}" if subject.recorded else f"--subject {label}"

    return [
        [
            open_photo(photo, what(subject, label, number), max_pixels=max_pixels)
            for number, photo in enumerate(subject.photos, start=1)
        ]
        for subject, label in zip(subjects, labels, strict=True)
    ]


def output_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out_1.png``, ``out_2.png``… for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{index + 1}{output.suffix}") for index in range(count)]
