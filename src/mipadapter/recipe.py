"""The generation recipe: everything needed to rerun one generated image, stored inside the image.

This module is the ONE code path that builds, writes and reads it, for the CLI and the web page::

    recipe = build_recipe(pipe, output, seed=420, subjects=[RecipeSubject("cat", ["cat.jpg"])],
                          models=ModelRecord(base_model=..., adapter=..., image_encoder=...), call=call_kwargs)
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
    height, width   int              pixels
    num_images      int              images generated together by the call (they share one generator)
    image_index     int              which of them this file is (0-based)
    rule            "official" | "paper" | "uniform"
    text_weight     bool             the learned text weight was used
    multi_image     "mean" | "each"
    region_mode     "replace" | "multiply"
    scheduler       str              the diffusers scheduler class
    subjects        [{name, photos: [{path, sha256} | {name, sha256}], scale: float (resolved), region}]
                    photos: {name, sha256} for a photo uploaded to the web page (its file name; the
                            server's path is private and temporary), else {path, sha256}
                    region: null | [x0, y0, x1, y1] (output pixels) | {path, sha256} (mask file)
                            | {png_base64} (a mask that has no file, e.g. painted on the web page)
    models          {base_model, adapter, image_encoder, preset: str | null, tiny: null | an architecture of
                    the CLI's --tiny ("sdxl", "sd15", "flux")}
    model_family    "SDXL" | "SD1.5" | "FLUX" | …   the base model's (``model_family``; absent in files
                                     written before it)
    device, dtype   str
    versions        {mipadapter, torch, diffusers, transformers}: str | null

Layer 3, beside ``pipeline`` (it reads a pipeline and its output; CLI and web, layer 5, use it).

Photo and mask paths are absolute, so a rerun finds them from any folder; their SHA-256 tells a rerun
that a file changed. Resolved values (guidance, size, negative prompt, per-subject scales, scheduler)
come from ``MIPAdapterOutput.settings`` when the pipeline provides it, else are computed here the way the
pipeline resolves them.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from mipadapter.fileio import atomic_write

RECIPE_VERSION = 2
PNG_KEY = "mipadapter"
JPEG_PREFIX = b"mipadapter:"
JPEG_COMMENT_LIMIT = 65533  # a COM segment's length field is 16 bits and counts itself
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


class RecipeError(ValueError):
    """An image's recipe is missing, unreadable or malformed; the message names the file."""


# ----------------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class RecipeSubject:
    """A subject as the caller gave it: photo files, the scale asked for (None: the adapter's default),
    and the region: a box ``(x0, y0, x1, y1)``, a mask file path, a PIL mask without a file, or None."""

    name: str
    photos: Sequence[str | os.PathLike]
    scale: float | None = None
    region: Any = None


@dataclass(frozen=True)
class ModelRecord:
    """Which models made the image (Hub ids or local paths, as loaded); ``tiny`` names the built-in tiny
    architecture when the tiny models were used."""

    base_model: str
    adapter: str
    image_encoder: str
    preset: str | None = None
    tiny: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "base_model": self.base_model,
            "adapter": self.adapter,
            "image_encoder": self.image_encoder,
            "preset": self.preset,
            "tiny": self.tiny,
        }


@dataclass(frozen=True)
class _Defaults:
    """What the pipeline does with arguments left out (used only when the output carries no settings)."""

    guidance: float
    height: int
    width: int
    rule: str
    text_weight: bool
    default_scale: float
    negative_prompt: str | None = None


def model_family(pipe) -> str:
    """The base model's family ("SDXL", "SD1.5", "FLUX" …), read from the class name of the wrapped
    diffusers pipeline (``pipe.pipe``; a diffusers pipeline itself is also accepted). An unknown class
    gives its own name without the ``Pipeline`` suffix. Recorded in every recipe; the web page shows it."""
    name = type(getattr(pipe, "pipe", pipe)).__name__
    for prefix, family in MODEL_FAMILIES:
        if name.startswith(prefix):
            return family
    return name.removesuffix("Pipeline") or name


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _pipeline_defaults(pipe) -> _Defaults:
    """The values ``MIPAdapterPipeline.__call__`` picks for arguments left out (mirrors it)."""
    base = pipe.pipe
    unet = getattr(base, "unet", None)
    sample_size = unet.config.sample_size if unet is not None else base.default_sample_size  # FLUX: no UNet
    side = sample_size * base.vae_scale_factor
    config = pipe.adapter.config
    return _Defaults(
        guidance=float(pipe.default_guidance_scale),
        height=side,
        width=side,
        rule=config.default_rule.value,
        text_weight=bool(config.text_weight),
        default_scale=float(config.default_scale),
        negative_prompt=getattr(pipe, "default_negative_prompt", None),
    )


def _value(value) -> Any:
    """Enums → their value; everything else as is."""
    return getattr(value, "value", value)


def resolved_settings(pipe, output, call: Mapping[str, Any]) -> dict[str, Any]:
    """The call's resolved settings: ``output.settings`` where the pipeline provides them, completed from
    ``call`` (the keyword arguments given to the pipeline, ``prompt`` included) and the pipeline's defaults.

    Keys: prompt, negative_prompt, guidance_scale, num_inference_steps, height, width,
    num_images_per_prompt, rule, use_text_weight, multi_image, region_mode, scheduler, scales,
    default_scale, and true_cfg_scale on FLUX pipelines (None elsewhere).
    """
    given = dict(getattr(output, "settings", None) or {})
    defaults = _pipeline_defaults(pipe)

    def pick(key: str, fallback):
        if given.get(key) is not None:
            return _value(given[key])
        if call.get(key) is not None:
            return _value(call[key])
        return fallback

    from mipadapter.pipeline.encoding import is_flux  # lazily: the CLI reads recipes before torch loads

    true_cfg = pick("true_cfg_scale", None)
    if true_cfg is None and is_flux(pipe.pipe):  # diffusers' default: off
        true_cfg = 1.0
    if "negative_prompt" in given:  # the pipeline says what it used ("" on FLUX with true CFG is one)
        negative = given["negative_prompt"]
    else:
        negative = call.get("negative_prompt")
        negative = defaults.negative_prompt if negative is None else (negative or None)  # "": none used
    return {
        "prompt": pick("prompt", None),
        "negative_prompt": negative,
        "guidance_scale": float(pick("guidance_scale", defaults.guidance)),
        "num_inference_steps": int(pick("num_inference_steps", 30)),
        "height": int(pick("height", defaults.height)),
        "width": int(pick("width", defaults.width)),
        "num_images_per_prompt": int(pick("num_images_per_prompt", 1)),
        "rule": str(pick("rule", defaults.rule)),
        "use_text_weight": bool(pick("use_text_weight", defaults.text_weight)),
        "multi_image": str(pick("multi_image", "mean")),
        "region_mode": str(pick("region_mode", "replace")),
        "scheduler": str(given.get("scheduler") or type(pipe.pipe.scheduler).__name__),
        "scales": given.get("scales"),
        "default_scale": defaults.default_scale,
        "true_cfg_scale": None if true_cfg is None else float(true_cfg),
    }


def _resolved_scales(subjects: Sequence[RecipeSubject], settings: Mapping[str, Any]) -> list[float]:
    """Per-subject scales in subject order: the pipeline's resolved ones (by subject label: "dog",
    "dog#2" for a repeated name), else the scale asked for or the adapter's default."""
    from mipadapter.alignment import subject_labels

    recorded = settings.get("scales")
    labels = subject_labels([subject.name for subject in subjects])
    if isinstance(recorded, Mapping) and set(labels) <= set(recorded):
        return [float(recorded[label]) for label in labels]
    return [settings["default_scale"] if s.scale is None else float(s.scale) for s in subjects]


def _region_record(region) -> Any:
    if region is None:
        return None
    if isinstance(region, (str, os.PathLike)):
        return file_record(region)
    if hasattr(region, "save") and hasattr(region, "convert"):  # a PIL mask without a file
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
    call: Mapping[str, Any],
    uploaded: bool = False,
) -> dict[str, Any]:
    """The recipe of one ``MIPAdapterPipeline`` call (shared by all its images; ``write_image`` adds the
    image index).

    pipe: the ``MIPAdapterPipeline`` that ran; output: its ``MIPAdapterOutput``; seed: the seed of the CPU
    generator given to the call; subjects: the subjects in call order, with their files; models: what was
    loaded; call: the keyword arguments given to the call, ``prompt`` included (used for what
    ``output.settings`` does not say); uploaded: the photos were uploaded to the web page, recorded by
    file name and SHA-256 (``upload_record``) instead of by path.
    """
    settings = resolved_settings(pipe, output, call)
    if settings["prompt"] is None:
        raise ValueError("build_recipe needs the prompt (in output.settings or call['prompt'])")
    from mipadapter.pipeline.encoding import denoiser

    scales = _resolved_scales(subjects, settings)
    parameter = next(denoiser(pipe.pipe).parameters())
    recipe = {
        "recipe_version": RECIPE_VERSION,
        "prompt": settings["prompt"],
        "negative_prompt": settings["negative_prompt"],
        "seed": int(seed),
        "steps": settings["num_inference_steps"],
        "guidance": settings["guidance_scale"],
        **({} if settings["true_cfg_scale"] is None else {"true_cfg_scale": settings["true_cfg_scale"]}),
        "height": settings["height"],
        "width": settings["width"],
        "num_images": settings["num_images_per_prompt"],
        "image_index": 0,
        "rule": settings["rule"],
        "text_weight": settings["use_text_weight"],
        "multi_image": settings["multi_image"],
        "region_mode": settings["region_mode"],
        "scheduler": settings["scheduler"],
        "subjects": [
            {
                "name": subject.name,
                "photos": [(upload_record if uploaded else file_record)(photo) for photo in subject.photos],
                "scale": scale,
                "region": _region_record(subject.region),
            }
            for subject, scale in zip(subjects, scales, strict=True)
        ],
        "models": models.to_dict(),
        "model_family": model_family(pipe),
        "device": str(parameter.device),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "versions": package_versions(),
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

    return atomic_write(path, write)


# ----------------------------------------------------------------------------------------------- reading
def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe stored in a PNG or JPEG written by ``write_image``, validated.

    Raises ``FileNotFoundError`` or ``RecipeError`` (a ``ValueError``); every message names the file.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    name = str(path)
    if path.is_dir():
        raise RecipeError(f"{name!r} is a folder, not an image")
    if not path.is_file():
        raise FileNotFoundError(f"{name!r} not found")
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.load()  # text chunks after the image data are read only on load
                text = image.text.get(PNG_KEY)
            elif image.format == "JPEG":
                comment = image.info.get("comment", b"")
                comment = comment.encode("latin-1") if isinstance(comment, str) else comment
                text = (
                    comment[len(JPEG_PREFIX) :].decode("utf-8") if comment.startswith(JPEG_PREFIX) else None
                )
            else:
                raise RecipeError(f"{name!r} is a {image.format} image; recipes live in PNG and JPEG files")
    except UnidentifiedImageError:
        raise RecipeError(f"{name!r} is not an image file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{name!r} cannot be read: {error}") from None
    if text is None:
        raise RecipeError(
            f"{name!r} carries no mipadapter recipe (it was not written by mipadapter generate)"
        )
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecipeError(f"{name!r}: its mipadapter recipe is not valid JSON ({error.msg})") from None
    validate_recipe(recipe, repr(name))
    return recipe


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_file_record(value) -> bool:
    return (
        isinstance(value, Mapping)
        and set(value) == {"path", "sha256"}
        and isinstance(value["path"], str)
        and isinstance(value["sha256"], str)
        and len(value["sha256"]) == 64
        and all(c in "0123456789abcdef" for c in value["sha256"])
    )


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


def _region_ok(region) -> bool:
    if region is None or _is_file_record(region):
        return True
    if isinstance(region, Mapping):
        return set(region) == {"png_base64"} and isinstance(region["png_base64"], str)
    return isinstance(region, list) and len(region) == 4 and all(_is_number(v) for v in region)


_FIELDS: dict[str, tuple[str, Any]] = {
    "prompt": ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())),
    "negative_prompt": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "seed": ("an integer in 0..2**64-1", lambda v: _is_int(v) and 0 <= v < 2**64),
    "steps": ("an integer ≥ 1", lambda v: _is_int(v) and v >= 1),
    "guidance": ("a finite number ≥ 0", lambda v: _is_number(v) and v >= 0),
    "height": ("an integer ≥ 1", lambda v: _is_int(v) and v >= 1),
    "width": ("an integer ≥ 1", lambda v: _is_int(v) and v >= 1),
    "num_images": ("an integer ≥ 1", lambda v: _is_int(v) and v >= 1),
    "image_index": ("an integer ≥ 0", lambda v: _is_int(v) and v >= 0),
    "rule": (f"one of {RULES}", lambda v: v in RULES),
    "text_weight": ("true or false", lambda v: isinstance(v, bool)),
    "multi_image": (f"one of {MULTI_IMAGE_MODES}", lambda v: v in MULTI_IMAGE_MODES),
    "region_mode": (f"one of {REGION_MODES}", lambda v: v in REGION_MODES),
    "scheduler": ("a string", lambda v: isinstance(v, str)),
    "subjects": ("a non-empty list", lambda v: isinstance(v, list) and bool(v)),
    "models": ("an object", lambda v: isinstance(v, Mapping)),
    "device": ("a string", lambda v: isinstance(v, str)),
    "dtype": ("a string", lambda v: isinstance(v, str)),
    "versions": ("an object", lambda v: isinstance(v, Mapping)),
}
_SUBJECT_FIELDS: dict[str, tuple[str, Any]] = {
    "name": ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())),
    "photos": (
        "a non-empty list of {path, sha256} or {name, sha256}",
        lambda v: isinstance(v, list) and bool(v) and all(_is_photo_record(p) for p in v),
    ),
    "scale": ("a finite number ≥ 0", lambda v: _is_number(v) and v >= 0),
    "region": ("null, [x0, y0, x1, y1], {path, sha256} or {png_base64}", _region_ok),
}
_OPTIONAL_FIELDS: dict[str, tuple[str, Any]] = {  # written only where they apply, or by later versions
    "true_cfg_scale": ("a finite number ≥ 0", lambda v: _is_number(v) and v >= 0),
    "model_family": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
}
_MODEL_FIELDS: dict[str, tuple[str, Any]] = {
    "base_model": ("a string", lambda v: isinstance(v, str)),
    "adapter": ("a string", lambda v: isinstance(v, str)),
    "image_encoder": ("a string", lambda v: isinstance(v, str)),
    "preset": ("a string or null", lambda v: v is None or isinstance(v, str)),
    # the architectures themselves are listed once, in the CLI's --tiny table
    "tiny": ("null or an architecture name", lambda v: v is None or (isinstance(v, str) and bool(v))),
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
            raise RecipeError(f"{where}: recipe field {key!r} must be {wanted}, got {data[key]!r}")


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
        _check_fields(f"{where} subject #{index + 1}", subject, _SUBJECT_FIELDS)
    _check_fields(f"{where} models", recipe["models"], _MODEL_FIELDS)


# ----------------------------------------------------------------------------------------------- rerunning
def verify_inputs(recipe: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Check that every photo and mask file the recipe records still exists with the same SHA-256.

    source: the image the recipe came from (named in the errors). Raises ``FileNotFoundError`` for a
    missing file and ``RecipeError`` for a changed one, naming the file and its subject.
    """
    for index, subject in enumerate(recipe["subjects"]):
        label = f"subject #{index + 1} {subject['name']!r}"
        _refuse_uploaded_photos(subject, label, source)
        records = [(f"photo {k + 1}", p) for k, p in enumerate(subject["photos"])]
        if isinstance(subject["region"], Mapping) and "path" in subject["region"]:
            records.append(("region mask", subject["region"]))
        for what, record in records:
            check_recorded_file(record, f"{label}'s {what}", source)


def _refuse_uploaded_photos(subject: Mapping[str, Any], label: str, source: str | os.PathLike) -> None:
    """A RecipeError asking for the photos of ``subject`` again, by name, when one was uploaded to the
    web page (the recipe names it, but has no path to it)."""
    uploaded = [(k, photo) for k, photo in enumerate(subject["photos"]) if "name" in photo]
    if not uploaded:
        return
    k, photo = uploaded[0]
    names = ",".join(p.get("name") or p["path"] for p in subject["photos"])
    raise RecipeError(
        f"{label}'s photo {k + 1} {photo['name']!r} (SHA-256 {photo['sha256'][:12]}…) was uploaded to the "
        f"web page, so {str(source)!r} names it without a path: give the photos again, "
        f"e.g. --subject {subject['name']}={names}"
    )


def check_recorded_file(record: Mapping[str, str], what: str, source: str | os.PathLike) -> Path:
    """A recorded ``{path, sha256}`` input, still there and unchanged; ``FileNotFoundError`` or
    ``RecipeError`` naming ``what``, the file and the image it was recorded in otherwise. Returns the path."""
    path = Path(record["path"])
    if not path.is_file():
        raise FileNotFoundError(f"{what} {record['path']!r}, recorded in {str(source)!r}, is missing")
    if file_sha256(path) != record["sha256"]:
        raise RecipeError(
            f"{what} {record['path']!r} has changed since {str(source)!r} was made (its SHA-256 differs)"
        )
    return path


def recorded_region(region: Any):
    """A recorded region as the pipeline takes it: a box tuple, a PIL mask ("L"), or None."""
    if region is None:
        return None
    if isinstance(region, list):
        return tuple(float(v) for v in region)
    from PIL import Image

    if "png_base64" in region:
        return Image.open(io.BytesIO(base64.b64decode(region["png_base64"]))).convert("L")
    from mipadapter.photos import open_photo

    return open_photo(region["path"], "region mask", mode="L")
