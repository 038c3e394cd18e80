"""The generation recipe: everything needed to rerun one generated image, stored inside the image.

This module is the ONE code path that builds, writes and reads it, for the CLI and the web page::

    recipe = build_recipe(pipe, output, seed=420, subjects=[RecipeSubject("cat", ["cat.jpg"])],
                          models=ModelRecord(base_model=..., adapter=..., image_encoder=...))
    write_image(output.images[0], "out.png", recipe, image_index=0)   # atomic (fileio.atomic_write)
    recipe = read_recipe("out.png")                                     # validated; errors name the file
    verify_inputs(recipe, "out.png")                                    # photos / masks still the same?

Where it is stored: a PNG keeps the JSON in its ``mipadapter`` text chunk (tEXt, ASCII JSON); a JPEG keeps
``mipadapter:`` + the JSON in a COM (comment) segment, which every JPEG reader skips and Pillow reads
back as ``info["comment"]`` (EXIF UserComment would need an EXIF writer and has the same 64 KiB limit).
Other extensions are refused (``IMAGE_SUFFIXES``).

Schema (``recipe_version`` 2; files from before it carry no ``recipe_version`` and cannot be rerun)::

    recipe_version  2
    prompt          str
    negative_prompt str | null       the negative prompt actually used (null: none)
    seed            int              of a CPU torch.Generator (what the CLI uses)
    steps           int
    guidance        float            the guidance scale actually used (never null; FLUX: the distilled one)
    true_cfg_scale  float            FLUX only (absent elsewhere): true classifier-free guidance, 1 = off
    negative_image  "black" | "zeros"  what the unconditional side saw instead of the photos (absent in
                                     files written before it, which all used "zeros")
    negative_prompt_embeds  true     present only when the call's negative was given as embeddings, which
                                     the recipe cannot hold: such an image cannot be rerun
    prompt_2        str              FLUX only, when given: the text T5 encoded (CLIP read ``prompt``)
    max_sequence_length  int         FLUX only: T5's length of the call
    height, width   int              pixels
    num_images      int              images generated together by the call (they share one generator)
    image_index     int              which of them this file is (0-based)
    rule            "official" | "paper" | "uniform"
    text_weight     bool             the learned text weight was used
    multi_image     "mean" | "each"
    region_mode     "replace" | "multiply"   how the regions acted ("replace" when no subject has one)
    scheduler       str              the diffusers scheduler class
    subjects        [{name, photos: [{path, sha256} | {name, sha256}], scale, region, adapter?}]
                    photos: {name, sha256} for a photo uploaded to the web page (its file name; the
                            server's path is private and temporary), else {path, sha256}
                    scale: float (resolved) | [float, …] (FLUX, one per double block) | diffusers' UNet
                           dict form {"down": …, "mid": …, "up": …} (``mipadapter.scales``)
                    region: null | [x0, y0, x1, y1] (output pixels) | {path, sha256} (mask file)
                            | {png_base64} (a mask that has no file, e.g. painted on the web page)
                    adapter: the name of the adapter that encoded its photos ("default" or one of
                            models.adapters); present only when the pipeline held several adapters
    models          {base_model, adapter, image_encoder, preset: str | null, tiny: null | an architecture of
                    the CLI's --tiny ("sdxl", "sd15", "flux"), adapter_sha256?, adapters?}
                    adapter_sha256: the default adapter file's SHA-256 (absent for the tiny models' built-in
                            adapter and in files written before it)
                    adapters: [{name, adapter, sha256, image_encoder, preset?}], the adapters added beside the
                            default one (``--adapter NAME=FILE``; absent when there were none): the file
                            (absolute path or Hub id), its SHA-256, the image encoder it read, and
                            the preset that named it (absent for a file)
    model_family    "SDXL" | "SD1.5" | "FLUX" | …   the base model's (``model_family``; absent in files
                                     written before it)
    device, dtype   str
    versions        {mipadapter, torch, diffusers, transformers}: str | null
    tokenizers      {tokenizer, tokenizer_2, …: str}   the identity (``provenance.tokenizer_identity``, 16
                                     hex) of each tokenizer of the diffusers pipeline: the same recipe gives
                                     another image with another vocabulary (absent in files written before
                                     it; ``tokenizer_mismatch`` compares it on a rerun)

Layer 3, beside ``pipeline`` (it reads a pipeline and its output; CLI and web, layer 5, use it).

Photo and mask paths are absolute, so a rerun finds them from any folder; their SHA-256 tells a rerun
that a file changed. Resolved values (guidance, size, negative prompt, per-subject scales, scheduler)
come from ``MIPAdapterOutput.settings``, what the pipeline reports it resolved; an output without them
cannot make a recipe.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from mipadapter.config import ADAPTER_NAME, DEFAULT_ADAPTER, PRESETS, RegionMode
from mipadapter.fileio import atomic_write
from mipadapter.limits import (
    DEFAULT_MAX_PIXELS,
    LARGE_LIMITS,
    MAX_EMBEDDED_MASK_PIXELS,
    MAX_RECIPE_BYTES,
    SEED_RANGE,
)
from mipadapter.provenance import file_sha256, tokenizer_identity

RECIPE_VERSION = 2
PNG_KEY = "mipadapter"
JPEG_PREFIX = b"mipadapter:"
# A COM segment holds up to 65,533 bytes, but Pillow's encoder writes the JPEG's headers through one
# 64 KiB buffer (ImageFile.MAXBLOCK): SOI and the JFIF segment (20 bytes), the COM segment's own 4 bytes
# and a spare byte leave 65,511 for the comment; one more fails as "broken data stream".
JPEG_COMMENT_LIMIT = 65511
JPEG_QUALITY = 95
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VERSIONED_PACKAGES = ("mipadapter", "torch", "diffusers", "transformers")
RULES = ("official", "paper", "uniform")
MODEL_FAMILIES = (  # diffusers pipeline class-name prefix → the family a person knows; longest first
    ("StableDiffusion3", "SD3"),
    ("StableDiffusionXL", "SDXL"),
    ("StableDiffusion", "SD1.5"),
    ("Flux", "FLUX"),
)
MULTI_IMAGE_MODES = ("mean", "each")
REGION_MODES = ("replace", "multiply")
DTYPES = ("float32", "float16", "bfloat16", "float64")  # a Python caller may run in float64
# what str(torch.device) writes for a device that holds weights ("meta" holds none: refused)
DEVICE_PATTERN = re.compile(r"^(cpu|cuda|mps|xpu|npu|hpu|mtia|xla|hip)(:\d{1,3})?$")


class RecipeError(ValueError):
    """An image's recipe is missing, unreadable or malformed; the message names the file."""


# ----------------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class RecipeSubject:
    """A subject's files as the caller gave them: its photo files and its region: a box
    ``(x0, y0, x1, y1)``, a mask file path, a PIL mask without a file, or None. Its scale is not here:
    the recipe records the one the pipeline reports it used."""

    name: str
    photos: Sequence[str | os.PathLike]
    region: Any = None


@dataclass(frozen=True)
class AdapterRecord:
    """An adapter added beside the default one (``--adapter NAME=FILE``): its name, its file (absolute
    path or Hub id) with the file's SHA-256, the image encoder it read (a folder, a Hub id, or the tiny
    models' built-in one), and the preset that named it (``--adapter face=ip-sdxl-plus-face``; None: a
    file), whose default scale a subject added on a rerun gets."""

    name: str
    adapter: str
    sha256: str
    image_encoder: str
    preset: str | None = None

    def to_dict(self) -> dict[str, str]:
        record = {"name": self.name, "adapter": self.adapter, "sha256": self.sha256, "image_encoder": self.image_encoder}
        if self.preset is not None:
            record["preset"] = self.preset
        return record


@dataclass(frozen=True)
class ModelRecord:
    """Which models made the image (Hub ids or local paths, as loaded); ``tiny`` names the built-in tiny
    architecture when the tiny models were used; adapter_sha256: the default adapter file's (None: the
    tiny built-in adapter); adapters: those added beside the default one."""

    base_model: str
    adapter: str
    image_encoder: str
    preset: str | None = None
    tiny: str | None = None
    adapter_sha256: str | None = None
    adapters: tuple[AdapterRecord, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "base_model": self.base_model,
            "adapter": self.adapter,
            "image_encoder": self.image_encoder,
            "preset": self.preset,
            "tiny": self.tiny,
        }
        if self.adapter_sha256 is not None:
            record["adapter_sha256"] = self.adapter_sha256
        if self.adapters:
            record["adapters"] = [added.to_dict() for added in self.adapters]
        return record


def model_family(pipe) -> str:
    """The base model's family ("SDXL", "SD1.5", "FLUX" …), read from the class name of the wrapped
    diffusers pipeline (``pipe.pipe``; a diffusers pipeline itself is also accepted). An unknown class
    gives its own name without the ``Pipeline`` suffix. Recorded in every recipe; the web page shows it."""
    name = type(getattr(pipe, "pipe", pipe)).__name__
    for prefix, family in MODEL_FAMILIES:
        if name.startswith(prefix):
            return family
    return name.removesuffix("Pipeline") or name


def file_record(path: str | os.PathLike) -> dict[str, str]:
    """``{"path": absolute path, "sha256": hex}`` of an input file."""
    path = Path(path).expanduser().resolve()
    return {"path": str(path), "sha256": file_sha256(path)}


def upload_record(path: str | os.PathLike) -> dict[str, str]:
    """``{"name": file name, "sha256": hex}`` of a photo uploaded to the web page: a rerun asks for the
    photo by its name; the server's own path would mean nothing elsewhere, and would show where the
    server keeps other people's uploads."""
    return {"name": Path(path).name, "sha256": file_sha256(path)}


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on (None when one is not installed)."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def tokenizer_identities(base) -> dict[str, str]:
    """``{component name: tokenizer_identity}`` of every tokenizer of a diffusers pipeline ``base``
    (``tokenizer``, ``tokenizer_2`` …; those it lacks or holds as None are left out)."""
    return {
        name: tokenizer_identity(component)
        for name, component in sorted(base.components.items())
        if name.startswith("tokenizer") and component is not None
    }


def tokenizer_mismatch(recipe: Mapping[str, Any], base, source: str | os.PathLike) -> str | None:
    """One warning line when the tokenizers of ``base`` (a diffusers pipeline about to rerun ``recipe``)
    are not those recorded in ``source``, naming both hashes of each that differs; None when they are the
    same or the recipe records none (written before the field)."""
    recorded = recipe.get("tokenizers")
    if not recorded:
        return None
    current = tokenizer_identities(base)
    differing = [
        f"{name} {recorded.get(name)} there, {current.get(name)} here"
        for name in sorted(set(recorded) | set(current))
        if recorded.get(name) != current.get(name)
    ]
    if not differing:
        return None
    return (
        f"warning: {str(source)!r} was made with other tokenizers than this environment's "
        f"({'; '.join(differing)}): the image may differ (e.g. the tests' fallback vocabulary vs CLIP's real BPE)"
    )


SETTINGS_KEYS = (  # what every ``MIPAdapterPipeline`` call reports in ``output.settings``
    "prompt", "negative_prompt", "negative_image", "guidance_scale", "num_inference_steps", "height", "width",
    "num_images_per_prompt", "rule", "use_text_weight", "multi_image", "region_mode", "names", "scales",
    "scheduler",
)  # fmt: skip
OPTIONAL_SETTINGS = ("adapters", "true_cfg_scale", "prompt_2", "max_sequence_length")  # only some calls


def resolved_settings(output) -> dict[str, Any]:
    """The settings a ``MIPAdapterPipeline`` call reports it ran with (``output.settings``, described in
    ``MIPAdapterOutput``), with None for the keys only some calls carry (``OPTIONAL_SETTINGS``) and
    ``negative_prompt_embeds`` as a bool. A recipe records what the pipeline resolved, never a guess at
    its defaults: an output lacking any of ``SETTINGS_KEYS`` is a ``ValueError`` naming them."""
    given = dict(getattr(output, "settings", None) or {})
    missing = [key for key in SETTINGS_KEYS if key not in given]
    if missing:
        raise ValueError(
            "a recipe records the settings the pipeline reports, and this output's settings lack "
            + ", ".join(missing)
            + " (a MIPAdapterPipeline output carries them all)"
        )
    optional = {key: given.get(key) for key in OPTIONAL_SETTINGS}
    return {**given, **optional, "negative_prompt_embeds": bool(given.get("negative_prompt_embeds"))}


def _subject_entries(subjects: Sequence[RecipeSubject], settings: Mapping[str, Any]) -> list[tuple]:
    """(scale, adapter name or None) of each subject, in subject order, as the pipeline resolved them (by
    subject label: "dog", "dog#2" for a repeated name); the adapter is None for every subject when the
    pipeline held one adapter (nothing to record). ``ValueError`` when ``subjects`` are not the subjects
    the call ran with, in its order."""
    from mipadapter.alignment import subject_labels

    names, ran = [subject.name for subject in subjects], list(settings["names"])
    if names != ran:
        raise ValueError(f"the recipe's subjects {names} are not those the pipeline ran with, {ran}")
    adapters = settings["adapters"]
    return [
        (settings["scales"][label], None if adapters is None else adapters[label])
        for label in subject_labels(names)
    ]


def _region_record(region) -> Any:
    if region is None:
        return None
    if isinstance(region, (str, os.PathLike)):
        return file_record(region)
    from PIL import Image

    if isinstance(region, Image.Image):  # a mask without a file
        buffer = io.BytesIO()
        region.convert("L").save(buffer, format="PNG", optimize=True)
        return {"png_base64": base64.b64encode(buffer.getvalue()).decode("ascii")}
    values = [float(v) for v in region]
    if len(values) != 4:
        raise ValueError(f"a region box has 4 numbers x0, y0, x1, y1, got {region!r}")
    return values


def build_recipe(
    pipe,
    output,
    *,
    seed: int,
    subjects: Sequence[RecipeSubject],
    models: ModelRecord,
    uploaded: bool = False,
) -> dict[str, Any]:
    """The recipe of one ``MIPAdapterPipeline`` call (shared by all its images; ``write_image`` adds the
    image index).

    pipe: the ``MIPAdapterPipeline`` that ran; output: its ``MIPAdapterOutput``; seed: the seed of the CPU
    generator given to the call; subjects: the subjects in call order, with their files; models: what was
    loaded; uploaded: the photos were uploaded to the web page, recorded by
    file name and SHA-256 (``upload_record``) instead of by path.
    """
    settings = resolved_settings(output)
    entries = _subject_entries(subjects, settings)
    from mipadapter.pipeline.encoding import denoiser

    parameter = next(denoiser(pipe.pipe).parameters())
    recipe = {
        "recipe_version": RECIPE_VERSION,
        "prompt": settings["prompt"],
        "negative_prompt": settings["negative_prompt"],
        "seed": int(seed),
        "steps": settings["num_inference_steps"],
        "guidance": settings["guidance_scale"],
        **({} if settings["true_cfg_scale"] is None else {"true_cfg_scale": settings["true_cfg_scale"]}),
        **{
            key: settings[key]
            for key in ("negative_image", "prompt_2", "max_sequence_length")
            if settings[key] is not None
        },
        **({"negative_prompt_embeds": True} if settings["negative_prompt_embeds"] else {}),
        "height": settings["height"],
        "width": settings["width"],
        "num_images": settings["num_images_per_prompt"],
        "image_index": 0,
        "rule": settings["rule"],
        "text_weight": settings["use_text_weight"],
        "multi_image": settings["multi_image"],
        "region_mode": settings["region_mode"] or RegionMode.REPLACE.value,  # None: no subject has a region
        "scheduler": settings["scheduler"],
        "subjects": [
            {
                "name": subject.name,
                "photos": [(upload_record if uploaded else file_record)(photo) for photo in subject.photos],
                "scale": scale,
                "region": _region_record(subject.region),
                **({} if adapter is None else {"adapter": adapter}),
            }
            for subject, (scale, adapter) in zip(subjects, entries, strict=True)
        ],
        "models": models.to_dict(),
        "model_family": model_family(pipe),
        "device": str(parameter.device),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "versions": package_versions(),
        "tokenizers": tokenizer_identities(pipe.pipe),
    }
    validate_recipe(recipe, "the new recipe")
    return recipe


# ----------------------------------------------------------------------------------------------- writing
def encode_recipe(recipe: Mapping[str, Any], image_index: int) -> str:
    """The JSON stored in an image: ``recipe`` with ``image_index`` set (validated first)."""
    stored = {**recipe, "image_index": int(image_index)}
    validate_recipe(stored, "the recipe to write")
    return json.dumps(stored, sort_keys=False)


def write_image(image, path: str | os.PathLike, recipe: Mapping[str, Any], image_index: int = 0) -> Path:
    """Write ``image`` (PIL) to ``path`` with its recipe, atomically: whole or not at all.

    ``.png``: lossless, recipe in the ``mipadapter`` text chunk. ``.jpg`` / ``.jpeg``: a real JPEG
    (quality 95), recipe in a COM segment. Any other extension is a ``ValueError``.
    """
    return atomic_write(path, image_writer(image, path, recipe, image_index))


def image_writer(image, path: str | os.PathLike, recipe: Mapping[str, Any], image_index: int):
    """The ``write(tmp)`` function ``write_image`` hands to ``fileio.atomic_write`` (the recipe validated
    and the format checked now): for writing several images all or none with ``fileio.atomic_write_all``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"{str(path)!r}: images are written as {', '.join(IMAGE_SUFFIXES)}, not {suffix!r}")
    text = encode_recipe(recipe, image_index)
    if suffix == ".png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text(PNG_KEY, text)

        def write(tmp: Path) -> None:
            image.save(tmp, format="PNG", pnginfo=info)

    else:
        comment = JPEG_PREFIX + text.encode("utf-8")
        if len(comment) > JPEG_COMMENT_LIMIT:
            raise ValueError(
                f"{str(path)!r}: the recipe ({len(comment)} bytes) does not fit a JPEG comment "
                f"({JPEG_COMMENT_LIMIT} bytes); write a .png"
            )

        def write(tmp: Path) -> None:
            image.convert("RGB").save(tmp, format="JPEG", quality=JPEG_QUALITY, comment=comment)

    return write


# ----------------------------------------------------------------------------------------------- reading
def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe stored in a PNG or JPEG written by ``write_image``, validated.

    Raises ``FileNotFoundError`` or ``RecipeError`` (a ``ValueError``); every message names the file.
    """
    from PIL import Image, UnidentifiedImageError

    from mipadapter.photos import special_kind

    path = Path(path).expanduser()
    name = str(path)
    kind = special_kind(path)
    if kind is not None:  # a FIFO is never opened: reading it would wait forever
        raise RecipeError(f"{name!r} is {kind}, not an image")
    if not path.is_file():
        raise FileNotFoundError(f"{name!r} not found")
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                from mipadapter.photos import PhotoError, image_size

                try:  # the pixels are decoded (a truncated file is refused): never a bomb
                    image_size(path, "the image", max_pixels=DEFAULT_MAX_PIXELS)
                except PhotoError as error:  # it names the file
                    raise RecipeError(str(error)) from None
                image.load()  # text chunks after the image data are read only on load
                text = image.text.get(PNG_KEY)
            elif image.format == "JPEG":
                comment = image.info.get("comment", b"")  # bytes (Pillow ≥ 9.4)
                text = (
                    comment[len(JPEG_PREFIX) :].decode("utf-8") if comment.startswith(JPEG_PREFIX) else None
                )
            else:
                raise RecipeError(f"{name!r} is a {image.format} image; recipes live in PNG and JPEG files")
    except RecipeError:  # ours, whole: the ValueError clause below would wrap it in "cannot be read"
        raise
    except UnidentifiedImageError:
        raise RecipeError(f"{name!r} is not an image file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{name!r} cannot be read: {error}") from None
    except ValueError as error:  # Pillow's limit on text chunks ("Decompressed data too large" …)
        raise RecipeError(f"{name!r} cannot be read: {error}") from None
    if text is None:
        raise RecipeError(
            f"{name!r} carries no mipadapter recipe (it was not written by mipadapter generate)"
        )
    recipe = parse_recipe_json(text, repr(name))
    validate_recipe(recipe, repr(name))
    return recipe


def parse_recipe_json(text: str, where: str) -> Any:
    """The recipe JSON ``text`` parsed, within ``MAX_RECIPE_BYTES`` and a sane nesting depth; a
    ``RecipeError`` starting with ``where`` (the file) otherwise."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{where}: its mipadapter recipe is {size} bytes, above the {MAX_RECIPE_BYTES} byte limit"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise RecipeError(f"{where}: its mipadapter recipe is not valid JSON ({error.msg})") from None
    except RecursionError:
        raise RecipeError(f"{where}: its mipadapter recipe is nested too deeply to be a recipe") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_file_record(value) -> bool:
    return (
        isinstance(value, Mapping)
        and set(value) == {"path", "sha256"}
        and isinstance(value["path"], str)
        and _is_sha256(value["sha256"])
    )


def _is_adapter_name(value) -> bool:
    return isinstance(value, str) and bool(ADAPTER_NAME.fullmatch(value))


def _non_empty_string() -> tuple[str, Any]:
    return "a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())


def _scale_ok(scale) -> bool:
    from mipadapter.scales import check_scale

    if scale is None:
        return False
    try:
        check_scale(scale, "scale")
    except ValueError:
        return False
    return True
def _is_photo_record(value) -> bool:
    """{path, sha256}, or {name, sha256} of a photo uploaded to the web page (a bare file name)."""
    if _is_file_record(value):
        return True
    return (
        isinstance(value, Mapping)
        and set(value) == {"name", "sha256"}
        and _is_file_record({"path": value["name"], "sha256": value["sha256"]})
        and bool(value["name"])
        and Path(value["name"]).name == value["name"]
        and "\\" not in value["name"]
    )


def _is_tokenizer_record(value) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(name, str) and isinstance(identity, str) and 0 < len(identity) <= 64
        for name, identity in value.items()
    )


def _region_ok(region) -> bool:
    if region is None or _is_file_record(region):
        return True
    if isinstance(region, Mapping):
        return set(region) == {"png_base64"} and isinstance(region["png_base64"], str)
    return isinstance(region, list) and len(region) == 4 and all(_is_number(v) for v in region)


def _int_in(low: int, high: int) -> tuple[str, Any]:
    """A field rule: an integer in ``low..high`` (its description and its test)."""
    return f"an integer in {low}..{high}", lambda v: _is_int(v) and low <= v <= high


def _number_in(low: float, high: float) -> tuple[str, Any]:
    """A field rule: a finite number in ``[low, high]``."""
    return f"a finite number in {low:g}..{high:g}", lambda v: _is_number(v) and low <= v <= high


_FIELDS: dict[str, tuple[str, Any]] = {  # bounds: what --allow-large permits (limits.LARGE_LIMITS)
    "prompt": ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())),
    "negative_prompt": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "seed": ("an integer in 0..2**64-1", lambda v: _is_int(v) and SEED_RANGE[0] <= v <= SEED_RANGE[1]),
    "steps": _int_in(1, LARGE_LIMITS.max_steps),
    "guidance": _number_in(0, LARGE_LIMITS.max_guidance),
    "height": _int_in(1, LARGE_LIMITS.max_side),
    "width": _int_in(1, LARGE_LIMITS.max_side),
    "num_images": _int_in(1, LARGE_LIMITS.max_images),
    "image_index": ("an integer ≥ 0", lambda v: _is_int(v) and v >= 0),
    "rule": (f"one of {RULES}", lambda v: v in RULES),
    "text_weight": ("true or false", lambda v: isinstance(v, bool)),
    "multi_image": (f"one of {MULTI_IMAGE_MODES}", lambda v: v in MULTI_IMAGE_MODES),
    "region_mode": (f"one of {REGION_MODES}", lambda v: v in REGION_MODES),
    "scheduler": ("a string", lambda v: isinstance(v, str)),
    "subjects": ("a non-empty list", lambda v: isinstance(v, list) and bool(v)),
    "models": ("an object", lambda v: isinstance(v, Mapping)),
    "device": (
        "a device such as cpu, cuda, cuda:1, mps",
        lambda v: isinstance(v, str) and bool(DEVICE_PATTERN.match(v)),
    ),
    "dtype": (f"one of {DTYPES}", lambda v: v in DTYPES),
    "versions": ("an object", lambda v: isinstance(v, Mapping)),
}
_SUBJECT_FIELDS: dict[str, tuple[str, Any]] = {
    "name": ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())),
    "photos": (
        "a non-empty list of {path, sha256} or {name, sha256}",
        lambda v: isinstance(v, list) and bool(v) and all(_is_photo_record(p) for p in v),
    ),
    "scale": (
        f"a finite number in 0..{LARGE_LIMITS.max_scale:g}, a list of them, or diffusers' dict form {{down, mid, up}}",
        lambda v: _scale_ok(v),
    ),
    "region": ("null, [x0, y0, x1, y1], {path, sha256} or {png_base64}", _region_ok),
}
_OPTIONAL_SUBJECT_FIELDS: dict[str, tuple[str, Any]] = {
    "adapter": ("an adapter name (letters, digits, '_', '-', '.')", _is_adapter_name),
}
_OPTIONAL_FIELDS: dict[str, tuple[str, Any]] = {  # written only where they apply, or by later versions
    "true_cfg_scale": _number_in(0, LARGE_LIMITS.max_guidance),
    "negative_image": ('"black" or "zeros"', lambda v: v in ("black", "zeros")),
    "negative_prompt_embeds": ("true", lambda v: v is True),
    "prompt_2": ("a string", lambda v: isinstance(v, str)),
    "max_sequence_length": _int_in(1, 512),
    "model_family": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "tokenizers": ("an object of names and hashes (strings)", lambda v: _is_tokenizer_record(v)),
}
_MODEL_FIELDS: dict[str, tuple[str, Any]] = {
    "base_model": ("a string", lambda v: isinstance(v, str)),
    "adapter": ("a string", lambda v: isinstance(v, str)),
    "image_encoder": ("a string", lambda v: isinstance(v, str)),
    "preset": ("a string or null", lambda v: v is None or isinstance(v, str)),
    # the architectures themselves are listed once, in the CLI's --tiny table
    "tiny": ("null or an architecture name", lambda v: v is None or (isinstance(v, str) and bool(v))),
}
_OPTIONAL_MODEL_FIELDS: dict[str, tuple[str, Any]] = {
    "adapter_sha256": ("64 lowercase hex digits", _is_sha256),
    "adapters": ("a non-empty list of {name, adapter, sha256, image_encoder}", lambda v: isinstance(v, list) and bool(v)),
}
_ADDED_ADAPTER_FIELDS: dict[str, tuple[str, Any]] = {
    "name": (
        f"an adapter name (letters, digits, '_', '-', '.') other than {DEFAULT_ADAPTER!r}",
        lambda v: _is_adapter_name(v) and v != DEFAULT_ADAPTER,
    ),
    "adapter": _non_empty_string(),
    "sha256": ("64 lowercase hex digits", _is_sha256),
    "image_encoder": _non_empty_string(),
}
_OPTIONAL_ADDED_ADAPTER_FIELDS: dict[str, tuple[str, Any]] = {
    "preset": (f"one of the presets ({', '.join(PRESETS)})", lambda v: isinstance(v, str) and v in PRESETS),
}


def _check_fields(
    where: str,
    data: Mapping,
    fields: Mapping[str, tuple[str, Any]],
    optional: Mapping[str, tuple[str, Any]] | None = None,
) -> None:
    """Every key of ``fields`` present and valid; those of ``optional`` valid where present."""
    missing = [key for key in fields if key not in data]
    if missing:
        raise RecipeError(f"{where}: the recipe lacks {', '.join(missing)}")
    present = {key: check for key, check in (optional or {}).items() if key in data}
    for key, (wanted, ok) in {**fields, **present}.items():
        if not ok(data[key]):
            raise RecipeError(f"{where}: recipe field {key!r} must be {wanted}, got {_shown(data[key])}")


def _shown(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a recorded value may be a megabyte of text)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} characters)"


def validate_recipe(recipe: Any, where: str) -> None:
    """Raise a ``RecipeError`` starting with ``where`` (the file) unless ``recipe`` follows the schema."""
    if not isinstance(recipe, Mapping):
        raise RecipeError(f"{where}: the recipe is a {type(recipe).__name__}, not a JSON object")
    version = recipe.get("recipe_version")
    if version is None:
        raise RecipeError(
            f"{where} was written by an older mipadapter whose metadata cannot be rerun "
            f"(no recipe_version; this reads version {RECIPE_VERSION})"
        )
    if version != RECIPE_VERSION:
        raise RecipeError(
            f"{where}: recipe version {version!r}, this mipadapter reads version {RECIPE_VERSION}"
        )
    _check_fields(where, recipe, _FIELDS, _OPTIONAL_FIELDS)
    if recipe["image_index"] >= recipe["num_images"]:
        raise RecipeError(
            f"{where}: image_index {recipe['image_index']} is not below num_images {recipe['num_images']}"
        )
    for index, subject in enumerate(recipe["subjects"]):
        if not isinstance(subject, Mapping):
            raise RecipeError(f"{where}: subject #{index + 1} is not an object")
        _check_fields(f"{where} subject #{index + 1}", subject, _SUBJECT_FIELDS, _OPTIONAL_SUBJECT_FIELDS)
        if isinstance(subject["region"], Mapping) and "png_base64" in subject["region"]:
            embedded_mask_bytes(subject["region"], f"{where} subject #{index + 1}")
    _check_fields(f"{where} models", recipe["models"], _MODEL_FIELDS, _OPTIONAL_MODEL_FIELDS)
    _check_adapter_names(recipe, where)


def _check_adapter_names(recipe: Mapping[str, Any], where: str) -> None:
    """The added adapters are valid and named once each, and every subject's adapter is one of them or
    the default one."""
    added = recipe["models"].get("adapters", [])
    names = [DEFAULT_ADAPTER]
    for index, adapter in enumerate(added):
        what = f"{where} models adapter #{index + 1}"
        if not isinstance(adapter, Mapping):
            raise RecipeError(f"{what} is not an object")
        _check_fields(what, adapter, _ADDED_ADAPTER_FIELDS, _OPTIONAL_ADDED_ADAPTER_FIELDS)
        if adapter["name"] in names:
            raise RecipeError(f"{what}: the adapter name {adapter['name']!r} is recorded twice")
        names.append(adapter["name"])
    for index, subject in enumerate(recipe["subjects"]):
        if subject.get("adapter", DEFAULT_ADAPTER) not in names:
            raise RecipeError(
                f"{where} subject #{index + 1}: its adapter {subject['adapter']!r} is not one the recipe "
                f"records ({', '.join(names)})"
            )


def embedded_mask_bytes(region: Mapping[str, str], where: str) -> bytes:
    """The PNG bytes of a recorded ``{png_base64}`` region, checked from its header (an image within
    ``MAX_EMBEDDED_MASK_PIXELS``) without decoding its pixels: a 35 KB PNG can hold gigabytes of pixels.
    A ``RecipeError`` starting with ``where`` and naming the field otherwise."""
    from mipadapter.photos import PhotoError, image_size

    try:
        data = base64.b64decode(region["png_base64"], validate=True)
    except ValueError:
        raise RecipeError(f"{where}: recipe field 'png_base64' is not base64 text") from None
    try:
        image_size(data, "the embedded mask", MAX_EMBEDDED_MASK_PIXELS)
    except PhotoError as error:
        raise RecipeError(f"{where}: recipe field 'png_base64': {error}") from None
    return data


# ----------------------------------------------------------------------------------------------- rerunning
def verify_inputs(recipe: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Check that every photo and mask file the recipe records still exists with the same SHA-256.

    source: the image the recipe came from (named in the errors). Raises ``FileNotFoundError`` for a
    missing file and ``RecipeError`` for a changed one, naming the file and its subject.
    """
    for index, subject in enumerate(recipe["subjects"]):
        name = subject["name"]
        _refuse_uploaded_photos(subject, f"subject #{index + 1} {name!r}", source)
        records = [(f"recorded photo {k + 1} of {name!r}", p) for k, p in enumerate(subject["photos"])]
        if isinstance(subject["region"], Mapping) and "path" in subject["region"]:
            records.append((f"the recorded region mask of {name!r}", subject["region"]))
        for what, record in records:
            check_recorded_file(record, what, source)


def _refuse_uploaded_photos(subject: Mapping[str, Any], label: str, source: str | os.PathLike) -> None:
    """A RecipeError asking for the photos of ``subject`` again, by name, when one was uploaded to the
    web page (the recipe names it, but has no path to it)."""
    uploaded = [(k, photo) for k, photo in enumerate(subject["photos"]) if "name" in photo]
    if not uploaded:
        return
    k, photo = uploaded[0]
    names = ",".join(p.get("name") or p["path"] for p in subject["photos"])
    raise RecipeError(
        f"recorded photo {k + 1} {photo['name']!r} of {label} (SHA-256 {photo['sha256'][:12]}…) was uploaded to the "
        f"web page, so {str(source)!r} names it without a path: give the photos again, "
        f"e.g. --subject {subject['name']}={names}"
    )


def check_recorded_file(record: Mapping[str, str], what: str, source: str | os.PathLike) -> Path:
    """A recorded ``{path, sha256}`` input, still there and unchanged; ``FileNotFoundError`` or
    ``RecipeError`` naming ``what``, the file and the image it was recorded in otherwise. Returns the path."""
    from mipadapter.photos import special_kind

    path = Path(record["path"])
    kind = special_kind(path)
    if kind is not None:  # never hashed: reading a FIFO would block
        raise RecipeError(f"{what} {record['path']!r}, recorded in {str(source)!r}, is {kind}, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {record['path']!r}, recorded in {str(source)!r}, is missing")
    if file_sha256(path) != record["sha256"]:
        raise RecipeError(
            f"{what} {record['path']!r} has changed since {str(source)!r} was made (its SHA-256 differs)"
        )
    return path


def recorded_region(region: Any, what: str = "the embedded mask"):
    """A recorded region as the pipeline takes it: a box tuple, a PIL mask ("L"), or None. An embedded
    mask is checked by its header (``embedded_mask_bytes``) before it is decoded; what: how errors name it."""
    if region is None:
        return None
    if isinstance(region, list):
        return tuple(float(v) for v in region)
    from mipadapter.photos import open_photo

    if "png_base64" in region:
        data = embedded_mask_bytes(region, what)
        return open_photo(data, what, max_pixels=MAX_EMBEDDED_MASK_PIXELS, mode="L", turn=False)
    return open_photo(region["path"], "region mask", mode="L")
