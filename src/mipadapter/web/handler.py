"""The web demo's handler: a plain function from what the page holds to images and routing maps.

Nothing here imports gradio: the page (``mipadapter.web.app``) flattens its widgets into a
``GenerateRequest``, calls ``generate`` and shows the ``GenerateResult``; tests call ``generate``
directly. Problems a person can fix (a name missing from the prompt, an unreadable upload, too many
subjects …) come back as messages attached to the subject slot that caused them, never as exceptions.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mipadapter.alignment import SubjectAlignmentError
from mipadapter.config import DEFAULT_ADAPTER
from mipadapter.limits import (
    LimitError,
    Limits,
    check_guidance,
    check_images,
    check_number,
    check_output_pixels,
    check_scale,
    check_seed,
    check_side,
    check_steps,
    native_side,
    side_multiple,  # noqa: F401  (the page's name)
)

logger = logging.getLogger(__name__)


def default_guidance(pipe) -> float | None:
    """The guidance scale a call without one uses: the pipeline's ``default_guidance_scale`` when it has
    one, else the default of the wrapped diffusers pipeline's own ``__call__`` (5.0 for SDXL, 7.5 for
    SD1.5, 3.5 for FLUX); None when neither says."""
    import inspect

    value = getattr(pipe, "default_guidance_scale", None)
    if value is None:
        parameter = inspect.signature(type(pipe.pipe).__call__).parameters.get("guidance_scale")
        value = (
            None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
        )
    return None if value is None else float(value)


def page_number(value: Any) -> Any:
    """A number as the page's field sends it, made exact for the checks: a whole float (JSON's ``64.0``,
    ``1e20``) becomes an int; anything else (None, 4.5, NaN, text) is passed on unchanged, for the checks
    to refuse with the CLI's message."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def on_slider(value: Any, minimum: float, maximum: float, step: float) -> int | float:
    """The value a slider from ``minimum`` to ``maximum`` in steps of ``step`` holds nearest to ``value``
    (clamped to its ends, rounded to its steps; its minimum for what is no number): what the page's
    slider sends when a number typed into it is off its scale, shown in the field instead."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        return page_number(float(minimum))
    steps = round((min(max(number, minimum), maximum) - minimum) / step)
    nearest = minimum + steps * step
    if nearest > maximum:  # a scale whose end is off its steps
        nearest -= step
    return page_number(round(float(nearest), 10))


def slot_color(slot: int) -> tuple[int, int, int]:
    """The colour of subject slot ``slot`` (0-based): its title, its region and its routing maps."""
    from mipadapter.figures import PALETTE

    return PALETTE[slot % len(PALETTE)]


def model_family(pipe) -> str:
    """The base model's family for the page ("SDXL", "SD1.5", "FLUX" …): the recipe's (one rule for both)."""
    from mipadapter.recipe import model_family as family

    return family(pipe)


def adapter_scale(pipe, name: str | None) -> float:
    """The strength a subject on adapter ``name`` starts at: that adapter's default scale, as a CLI
    subject without ``--scale`` gets (a preset's, e.g. 0.6 for the face adapters)."""
    adapter = (getattr(pipe, "adapters", None) or {}).get(name) if name else None
    return (pipe.adapter if adapter is None else adapter).config.default_scale


BY_THE_ADAPTERS = "by the adapters: official, or paper where a subject's adapter has no text weight"
"""The page's first rule choice when the server holds several adapters: the rule left to the call."""


def offered_rules(pipe) -> list[tuple[str, str]]:
    """The merge rules the page offers, as (label, value): every rule, but ``official`` only where an
    adapter can have the text weight it needs — not on FLUX, where none has been trained (the pipeline
    and the CLI refuse it too). With several adapters the first is ``BY_THE_ADAPTERS`` (value ""): the
    call picks the rule as the CLI does without ``--rule`` (``pipeline.adapters.mixed_rule``), so a
    subject given a face adapter is not refused for the default adapter's ``official``."""
    from mipadapter.config import MergeRule
    from mipadapter.pipeline.encoding import is_flux

    flux = is_flux(pipe.pipe)
    rules = [(rule.value, rule.value) for rule in MergeRule if not (flux and rule == MergeRule.OFFICIAL)]
    return ([(BY_THE_ADAPTERS, "")] if len(adapter_choices(pipe)) > 1 else []) + rules


def first_rule(pipe) -> str:
    """The rule choice the page starts with (a value of ``offered_rules``)."""
    return offered_rules(pipe)[0][1] if len(adapter_choices(pipe)) > 1 else pipe.adapter.config.default_rule.value


def takes_true_cfg(pipe) -> bool:
    """Whether the page shows FLUX's true-CFG scale (and the negative prompt acts only with it)."""
    from mipadapter.pipeline.encoding import is_flux

    return is_flux(pipe.pipe)


def adapter_choices(pipe) -> list[str]:
    """The names of the pipeline's adapters, the default one first: the page offers a choice per subject
    when there is more than one (``MIPAdapterPipeline.add_adapter``)."""
    return list(getattr(pipe, "adapter_names", None) or [DEFAULT_ADAPTER])


@dataclass
class SubjectForm:
    """One subject slot of the page, as the page holds it.

    photos: uploaded file paths (or PIL images); box: four numbers ``x0, y0, x1, y1`` in output pixels,
    each ``None`` when left blank; painted: the region editor's value (a dict with ``layers`` of RGBA
    arrays, as gradio's ImageEditor gives, or one [H, W(, C)] array / PIL image), ``None`` if unused;
    adapter: the name of the pipeline's adapter for this subject (``adapter_choices``), None or "" for
    the default one.
    """

    name: str = ""
    photos: Sequence[Any] = ()
    strength: float | None = None
    box: Sequence[Any] | None = None
    painted: Any = None
    adapter: str | None = None


@dataclass
class GenerateRequest:
    """What the page sends. negative_prompt: None = the pipeline's default (the preset's), "" = none;
    guidance: None = the pipeline's default; region_mode: ``replace`` or ``multiply`` a subject's
    routing map by its region; multi_image: ``mean`` or ``each`` (several photos of one subject);
    true_cfg_scale: FLUX only, true classifier-free guidance ≥ 1 (None or 1: off; FLUX uses the negative
    prompt only above 1, as diffusers' FluxPipeline)."""

    prompt: str
    subjects: Sequence[SubjectForm]
    rule: str | None = None
    seed: int = 420
    steps: int = 30
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    negative_prompt: str | None = None
    guidance: float | None = None
    region_mode: str = "replace"
    multi_image: str = "mean"
    true_cfg_scale: float | None = None


@dataclass
class GenerateResult:
    """images: the generated images; maps: (image tinted by one subject's routing map, caption) pairs,
    for every image every subject; subject_errors: slot index → message; subject_warnings: slot index
    → the pipeline's warnings about that subject (the image was made, but e.g. the subject got almost
    no share of it); error: a message about the request as a whole (the prompt, the size …); status:
    one line for the page; settings: the resolved call settings the pipeline reports (guidance and
    negative prompt actually used …), empty when it reports none; recipe: the generation's recipe
    (``mipadapter.recipe``) when ``generate`` was given the models, every photo has a file and the pipeline
    reported its settings. images are PIL images, or the PNG files written with the recipe when
    ``generate`` was given an output folder."""

    images: list = field(default_factory=list)
    recipe: dict | None = None
    maps: list[tuple[Any, str]] = field(default_factory=list)
    subject_errors: dict[int, str] = field(default_factory=dict)
    subject_warnings: dict[int, str] = field(default_factory=dict)
    error: str | None = None
    status: str = ""
    settings: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.subject_errors and self.error is None


class _Problems:
    """Collects messages per slot (``None`` for the request as a whole)."""

    def __init__(self) -> None:
        self.by_slot: dict[int, list[str]] = {}
        self.general: list[str] = []

    def add(self, slot: int | None, message: str) -> None:
        (self.general if slot is None else self.by_slot.setdefault(slot, [])).append(message)

    def __bool__(self) -> bool:
        return bool(self.by_slot or self.general)

    def result(self) -> GenerateResult:
        subject_errors = {slot: " ".join(messages) for slot, messages in sorted(self.by_slot.items())}
        error = " ".join(self.general) or None
        status = "Not generated."
        if error:
            status += f" {error}"
        if subject_errors:
            slots = ", ".join(str(slot + 1) for slot in subject_errors)
            status += f" See the message{'s' if len(subject_errors) > 1 else ''} at subject {slots}."
        return GenerateResult(subject_errors=subject_errors, error=error, status=status)


def is_blank(form: SubjectForm, max_painted_pixels: int | None = Limits.max_painted_pixels) -> bool:
    """An untouched slot: no name, no photo, no box, nothing painted (a painted layer that cannot be
    read, or is too large, is something: the slot reports it)."""
    if (
        (form.name or "").strip()
        or list(form.photos or ())
        or any(str(value).strip() for value in (form.box or ()) if value is not None)
    ):
        return False
    try:
        return painted_mask(form.painted, max_painted_pixels) is None
    except ValueError:
        return False


def _bytes(count: int) -> str:
    return f"{count / 2**20:.1f} MB" if count >= 2**20 else f"{count / 2**10:.1f} kB"


def photo_path(item: Any) -> Path | None:
    """The file behind an uploaded photo (a path, or an object with ``.path``/``.name``); None for a
    PIL image."""
    if isinstance(item, (str, os.PathLike)):  # a Path has a .name too: its last part, not the file
        return Path(item)
    if hasattr(item, "size") and hasattr(item, "convert"):
        return None
    return Path(getattr(item, "path", None) or getattr(item, "name", None) or item)


def check_upload_size(item: Any, limits: Limits) -> str:
    """An uploaded file's size within ``limits.max_upload_bytes``; its name (the person's, not the upload
    folder's). Raises ValueError ("cat.jpg is 11.0 MB; the limit is 10.0 MB") otherwise."""
    path = photo_path(item)
    label = path.name
    try:
        size = path.stat().st_size
    except OSError:
        raise ValueError(f"{label} could not be read (the upload is missing)") from None
    if size > limits.max_upload_bytes:
        raise ValueError(f"{label} is {_bytes(size)}; the limit is {_bytes(limits.max_upload_bytes)}")
    return label


def read_photo(item: Any, limits: Limits):
    """An uploaded file (path, or an object with ``.name``/``.path``) or PIL image → RGB PIL image, upright
    (EXIF) and at full size: the same pixels ``mipadapter generate`` reads from that file, so that a
    downloaded image's recipe reruns to the same result.

    Raises ValueError with a readable reason (too large, not an image …) naming the file by its name
    (the upload's folder means nothing to a person); the caller names the subject.
    """
    from mipadapter.photos import PhotoError, open_photo, photo_size, upright

    path = photo_path(item)
    if path is None:
        image, label = item, "a photo"
        width, height = image.size
    else:
        label = check_upload_size(item, limits)
        try:
            width, height = photo_size(path, label, max_pixels=None)
        except (PhotoError, FileNotFoundError):
            raise ValueError(f"{label} is not a readable image (JPEG, PNG, WebP …)") from None
    if width * height > limits.max_photo_pixels:
        raise ValueError(
            f"{label} is {width}×{height} pixels; the limit is {limits.max_photo_pixels / 1e6:g} megapixels"
        )
    if path is None:
        return upright(image).convert("RGB")
    try:
        return open_photo(path, label, max_pixels=None)
    except (PhotoError, FileNotFoundError):
        raise ValueError(f"{label} is not a readable image (the file is damaged)") from None


def parse_box(values: Sequence[Any] | None) -> tuple[float, float, float, float] | None:
    """Four box fields → ``(x0, y0, x1, y1)``; all blank → None. Raises ValueError if only some are filled."""
    values = [value.strip() if isinstance(value, str) else value for value in values or ()]
    if not any(value not in (None, "") for value in values):
        return None
    if len(values) != 4 or any(value in (None, "") for value in values):
        raise ValueError("fill in all four box fields x0, y0, x1, y1 (or leave all four blank)")
    try:
        box = tuple(float(value) for value in values)
    except (TypeError, ValueError):
        raise ValueError(f"the box fields must be numbers, got {values}") from None
    if not all(math.isfinite(value) for value in box):
        raise ValueError(f"the box fields must be finite numbers, got {values}")
    return box  # type: ignore[return-value]


BOX_CLEARED = "The box was cleared: a subject takes a box or a painted region, and you painted one."
PAINT_CLEARED = (
    "The painted region was cleared: a subject takes a box or a painted region, and you typed a box."
)


def paint_stretched(width: int, height: int) -> str:
    """The note at a painted region that the page stretched onto the canvas of a new output size."""
    return f"The painted region was stretched to the new {width}×{height} size: check that it lies where you want it."


BOX_FIELDS_BLANK = ("", "", "", "")


@dataclass(frozen=True)
class SlotRegion:
    """One subject slot's region as the page's preview last drew it, kept on the server per page.

    The page's change events do not say reliably what changed: Gradio runs an event that fired while
    the previous one ran again afterwards with fresh values but the first event's target, and an event
    whose values include a painted canvas exports and uploads it first, so it can reach the server
    after a later one. Comparing what an event carries with what is kept here tells what changed,
    whatever the event's target or arrival order (``settle_region``).

    painted: the editor's value as it arrived (its layers undecoded); digest: ``painted_digest`` of it
    (None: nothing painted, or unreadable); cleared: the digest of the painting the page was last told
    to clear, so that the same painting arriving late is not taken for a new stroke."""

    name: str = ""
    box: tuple[str, ...] = BOX_FIELDS_BLANK
    painted: Any = None
    digest: str | None = None
    cleared: str | None = None


def painted_digest(painted: Any, max_painted_pixels: int | None = Limits.max_painted_pixels) -> str | None:
    """A fingerprint of what is painted (its mask's shape and values, not how its layers were encoded);
    None when nothing is painted or the painting cannot be read (it then counts as no region: the
    preview says why)."""
    import hashlib

    try:
        mask = painted_mask(painted, max_painted_pixels)
    except ValueError:
        return None
    if mask is None:
        return None
    return hashlib.sha256(repr(mask.shape).encode() + np.ascontiguousarray(mask).tobytes()).hexdigest()


_KEEP = object()


def settle_region(
    kept: SlotRegion,
    *,
    name: Any = _KEEP,
    box: Any = _KEEP,
    painted: Any = _KEEP,
    max_painted_pixels: int | None = Limits.max_painted_pixels,
) -> tuple[SlotRegion, str | None]:
    """What a slot holds after an event that carries its ``name``, ``box`` (four fields) and/or
    ``painted`` (each left out: as ``kept``; None: blank), and which way of giving its region was
    cleared (``"box"``, ``"painted"`` or None).

    A subject has a box or a painted region, never both: when an event leaves both set, the one that
    changed (against ``kept``) stays and the other is cleared. A box counts as set when any field holds
    something (even half-typed); an unreadable painting counts as none. A painting equal to the one
    last cleared is that painting arriving late, not a new one: it is dropped."""
    name = kept.name if name is _KEEP else (name or "")
    box = (
        kept.box
        if box is _KEEP
        else tuple("" if value is None else str(value) for value in box or BOX_FIELDS_BLANK)
    )
    digest = kept.digest
    if painted is _KEEP:
        painted = kept.painted
    else:
        digest = painted_digest(painted, max_painted_pixels)
        if digest is not None and digest == kept.cleared:
            painted, digest = None, None
    settled = SlotRegion(name=name, box=box, painted=painted, digest=digest, cleared=kept.cleared)
    if digest is None or not any(value.strip() for value in box):
        return settled, None
    if box != kept.box:  # typed last: the painting makes way
        return replace(settled, painted=None, digest=None, cleared=digest), "painted"
    if digest != kept.digest:  # painted last: the box makes way
        return replace(settled, box=BOX_FIELDS_BLANK), "box"
    return settled, None


def _layer_array(layer: Any, max_pixels: int | None) -> np.ndarray:
    """One painted layer → its [H, W] coverage array (alpha, else brightness), its pixel count checked
    first: from the header for a PNG given as bytes or a file (nothing is decoded before), from the size
    for a PIL image or an array (nothing is copied before)."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    if isinstance(layer, (bytes, bytearray, memoryview, str, Path)):
        source = io.BytesIO(layer) if isinstance(layer, (bytes, bytearray, memoryview)) else layer
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
                with Image.open(source) as image:
                    _check_layer_pixels(*image.size, max_pixels)
                    image.load()
                    return _layer_array(image, None)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError):
            raise ValueError("a painted layer is not a readable image") from None
    if hasattr(layer, "convert"):
        _check_layer_pixels(*layer.size, max_pixels)
        return np.asarray(layer.getchannel("A") if "A" in layer.getbands() else layer.convert("L"))
    array = np.asarray(layer)
    if array.ndim >= 2:
        _check_layer_pixels(array.shape[1], array.shape[0], max_pixels)
    if array.ndim == 3:
        array = array[..., 3] if array.shape[-1] == 4 else array.max(axis=-1)
    if array.ndim != 2:
        raise ValueError(f"a painted region must be an image, got an array of shape {array.shape}")
    return array


def _check_layer_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"a painted layer is {width}×{height} pixels; the limit is {max_pixels / 1e6:g} megapixels"
        )


def painted_mask(value: Any, max_pixels: int | None = Limits.max_painted_pixels) -> np.ndarray | None:
    """A region editor's value → [H, W] float mask in [0, 1] (painted = 1); None if nothing is painted.

    value: gradio ImageEditor's dict (its ``layers`` are PNG bytes or files as the page's editor passes
    them undecoded, RGBA arrays or PIL images; the background is ignored), or a single array / PIL image
    (alpha if it has one, else brightness). max_pixels: the most pixels one layer may have (None: no
    limit), checked before the layer is decoded or copied. Raises ValueError with a readable reason.
    """
    if value is None:
        return None
    layers = value.get("layers") if isinstance(value, dict) else [value]
    masks = []
    for layer in layers or ():
        if layer is None:
            continue
        array = np.asarray(_layer_array(layer, max_pixels), dtype=np.float32)
        masks.append(array / 255.0 if array.max() > 1 else array)
    if not masks or not any(float(mask.max()) > 0 for mask in masks):
        return None
    shape = masks[0].shape
    if any(mask.shape != shape for mask in masks):
        raise ValueError("the painted layers have different sizes")
    return np.clip(np.max(np.stack(masks), axis=0), 0.0, 1.0)


def mask_image(mask: np.ndarray | None):
    """A [H, W] mask in [0, 1] → an 8-bit greyscale PIL image (None stays None): the form the pipeline
    is given and the recipe stores, so that a rerun sees the very same mask."""
    if mask is None:
        return None
    from PIL import Image

    return Image.fromarray(np.uint8(np.rint(np.clip(mask, 0.0, 1.0) * 255)), mode="L")


def _recipe(pipe, output, request, recipe_subjects, models) -> dict:
    """The generation's recipe (``mipadapter.recipe``, the one code path the CLI uses too), naming each
    photo by its file name and SHA-256."""
    from mipadapter.recipe import RecipeSubject, build_recipe

    subjects = [RecipeSubject(name, paths, region=region) for name, paths, region in recipe_subjects]
    return build_recipe(
        pipe,
        output,
        seed=int(request.seed),
        subjects=subjects,
        models=models,
        uploaded=True,  # by file name and SHA-256: the server's upload path is no one else's business
    )


def _write_images(images, recipe: dict, output_dir: Path, seed: int) -> list[Path]:
    """Write each image as a PNG carrying ``recipe`` into a new folder under ``output_dir``."""
    import tempfile

    from mipadapter.recipe import write_image

    folder = Path(tempfile.mkdtemp(prefix="run-", dir=output_dir))
    return [
        write_image(image, folder / f"mipadapter-seed{seed}-{index + 1}.png", recipe, image_index=index)
        for index, image in enumerate(images)
    ]


def _owner_of(message: str, names: dict[int, str]) -> int | None:
    """The slot whose subject a library error names (``subject 'cat' …``), longest name first."""
    for slot, name in sorted(names.items(), key=lambda item: -len(item[1])):
        if f"{name!r}" in message:
            return slot
    return None


def generate(
    pipe,
    request: GenerateRequest,
    limits: Limits | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    models=None,
    output_dir: str | Path | None = None,
    routing_maps: bool = True,
) -> GenerateResult:
    """Check the request, run ``pipe`` (a ``MIPAdapterPipeline``) and tint each image by each subject's
    routing map. progress: called as ``progress(step, total)`` after every denoising step.

    models: a ``mipadapter.recipe.ModelRecord`` of the loaded models; with it (and every photo given as
    a file) the result carries the generation's recipe. output_dir: with ``models``, each image is also
    written there as a PNG carrying that recipe (``mipadapter.recipe.write_image``, in a new folder per
    generation), and ``result.images`` holds those files, so that what the page shows and serves for
    download is the file with its recipe. routing_maps: False skips recording them (a compiled UNet
    runs without the per-layer Python code that records them).
    """
    import torch

    from mipadapter.config import MergeRule, MultiImageMode, RegionMode
    from mipadapter.figures import overlay_map
    from mipadapter.pipeline import Subject
    from mipadapter.pipeline.encoding import tokenizers_of

    limits = limits or Limits.for_pipeline(pipe)
    problems = _Problems()
    prompt = (request.prompt or "").strip()
    if not prompt:
        problems.add(None, "Write a prompt that names each subject.")

    width = native_side(pipe) if request.width is None else request.width
    height = native_side(pipe) if request.height is None else request.height
    # the same checks (and messages) as mipadapter generate's, with this server's limits
    size_problems = []
    for value, what in ((width, "The width"), (height, "The height")):
        try:
            check_side(value, what, limits)
        except LimitError as error:
            size_problems.append(f"{error}.")
    if not size_problems:  # two whole sides: their product
        try:
            check_output_pixels(width, height, limits)
        except LimitError as error:
            size_problems.append(f"{error}.")
    for message in size_problems:
        problems.add(None, message)
    checks = (
        lambda: check_steps(request.steps, "Steps", limits),
        lambda: check_images(request.num_images, "Images", limits),
        lambda: check_seed(request.seed, "The seed"),
    )
    for check in checks:
        try:
            check()
        except LimitError as error:
            problems.add(None, f"{error}.")
    rule = None
    if request.rule:
        try:
            rule = MergeRule.parse(request.rule)
        except ValueError as error:
            problems.add(None, f"{error}.")
    guidance = request.guidance
    if guidance is not None:
        try:
            check_guidance(guidance, "Guidance", limits)
        except LimitError as error:
            problems.add(None, f"{error}.")
    true_cfg = request.true_cfg_scale
    if true_cfg is not None and not takes_true_cfg(pipe):
        problems.add(None, "True CFG is FLUX's classifier-free guidance; this model's is Guidance.")
    elif true_cfg is not None:
        try:
            check_number(true_cfg, "True CFG (1: off)", 1, limits.max_guidance)
        except LimitError as error:
            problems.add(None, f"{error}.")
    modes = {}
    for label, enum, value in (
        ("region mode", RegionMode, request.region_mode),
        ("multi-image mode", MultiImageMode, request.multi_image),
    ):
        try:
            modes[label] = enum(value)
        except ValueError:
            choices = ", ".join(repr(member.value) for member in enum)
            problems.add(None, f"The {label} must be one of {choices}, got {value!r}.")

    filled = [
        (slot, form)
        for slot, form in enumerate(request.subjects)
        if not is_blank(form, limits.max_painted_pixels)
    ]
    if not filled:
        problems.add(None, "Add at least one subject: a name and one or more photos.")
    if len(filled) > limits.max_subjects:
        extra = [str(slot + 1) for slot, _ in filled[limits.max_subjects :]]
        problems.add(
            None,
            f"Too many subjects: {len(filled)} given, this server takes at most {limits.max_subjects} "
            f"(remove subject{'s' if len(extra) > 1 else ''} {', '.join(extra)}).",
        )

    choices = adapter_choices(pipe)
    subjects, names, slot_of_subject, recipe_subjects = [], {}, [], []
    for slot, form in filled:
        name = (form.name or "").strip()
        label = f"subject {name!r}" if name else f"subject {slot + 1}"
        if not name:
            problems.add(slot, "Give this subject a name: the words the prompt uses for it (e.g. 'cat').")
        elif name in names.values():
            problems.add(slot, f"Another subject is already called {name!r}: give each its own name.")
        photos = []
        uploads = list(form.photos or ())
        if not uploads:
            problems.add(slot, f"Upload at least one photo of {label}.")
        elif len(uploads) > limits.max_photos:
            problems.add(
                slot, f"Too many photos of {label}: at most {limits.max_photos}, got {len(uploads)}."
            )
        else:
            for upload in uploads:
                try:
                    photos.append(read_photo(upload, limits))
                except ValueError as error:
                    problems.add(slot, f"Photo of {label}: {error}.")
        region = None
        try:
            box, mask = parse_box(form.box), painted_mask(form.painted, limits.max_painted_pixels)
            if box is not None and mask is not None:
                raise ValueError("give a box or a painted region, not both")
            region = box if box is not None else mask_image(mask)
        except ValueError as error:
            problems.add(slot, f"Region of {label}: {error}.")
        strength = form.strength
        if strength is not None:
            try:
                check_scale(strength, f"The strength of {label}", limits)
            except LimitError as error:
                problems.add(slot, f"{error}.")
        adapter = form.adapter.strip() if isinstance(form.adapter, str) else form.adapter
        if adapter and adapter not in choices:
            problems.add(
                slot,
                f"The adapter of {label}: no adapter named {adapter!r}; this server has "
                f"{', '.join(map(repr, choices))}.",
            )
        if name:
            names[slot] = name
        if name and photos and slot not in problems.by_slot:
            subjects.append(
                Subject(
                    name,
                    photos,
                    scale=None if strength is None else float(strength),
                    region=region,
                    region_mode=modes.get("region mode", RegionMode.REPLACE),
                    # the default by None: a single-adapter call stays exactly what it was
                    adapter=adapter if adapter and adapter != choices[0] else None,
                )
            )
            slot_of_subject.append(slot)
            recipe_subjects.append((name, [photo_path(upload) for upload in uploads], region))

    if prompt:  # every missing name at once, each next to its subject
        tokenizers = tokenizers_of(pipe.pipe)
        from mipadapter.alignment import align_subjects

        for slot, name in names.items():
            try:
                align_subjects(tokenizers, prompt, [name])
            except SubjectAlignmentError as error:
                problems.add(slot, f"{error}.")
    if problems:
        return problems.result()

    total = int(request.steps)

    def on_step_end(_pipe, step, _timestep, callback_kwargs):
        if progress is not None:
            progress(step + 1, total)
        return callback_kwargs

    call = {  # the pipeline's keyword arguments (it reports them resolved in output.settings)
        "rule": rule,
        "multi_image": modes["multi-image mode"],
        "negative_prompt": request.negative_prompt,
        "guidance_scale": None if guidance is None else float(guidance),
        "num_inference_steps": total,
        "height": height,
        "width": width,
        "num_images_per_prompt": int(request.num_images),
        **({} if true_cfg is None or not takes_true_cfg(pipe) else {"true_cfg_scale": float(true_cfg)}),
    }
    try:
        output = pipe(
            prompt,
            subjects,
            **call,
            generator=torch.Generator().manual_seed(int(request.seed)),  # on the CPU, as the CLI's
            return_relevance=routing_maps,
            show_progress=False,
            callback_on_step_end=on_step_end,
        )
    except (ValueError, TypeError) as error:  # SubjectAlignmentError is a ValueError
        slot = _owner_of(str(error), names)
        problems.add(slot, str(error) if slot is None else f"{error}.")
        return problems.result()

    maps = []
    for index, relevance in enumerate(output.relevance or ()):  # None when routing_maps is off
        image = output.images[index]
        for slot, subject in zip(slot_of_subject, subjects, strict=True):
            caption = subject.name if len(output.images) == 1 else f"{subject.name} (image {index + 1})"
            maps.append((overlay_map(image, relevance[subject.name], slot_color(slot)), caption))
    warnings: dict[int, list[str]] = {}
    for warning in getattr(output, "warnings", None) or ():  # by index: two subjects may share a name
        warnings.setdefault(slot_of_subject[warning.index], []).append(warning.message)
    settings = dict(getattr(output, "settings", None) or {})
    count = len(output.images)
    described = [
        repr(s.name)
        + ("" if s.region is None else " (box)" if isinstance(s.region, tuple) else " (painted region)")
        + (f" (adapter {s.adapter or choices[0]})" if len(choices) > 1 else "")
        for s in subjects
    ]
    status = (
        f"Generated {count} image{'s' if count > 1 else ''} of {width}×{height} in {total} step{'s' if total > 1 else ''} "
        f"(seed {int(request.seed)}, rule {settings.get('rule') or (rule or pipe.adapter.config.default_rule).value}"
        + (f", guidance {settings['guidance_scale']:g}" if settings.get("guidance_scale") is not None else "")
        + ") with "
        + ", ".join(described)
        + "."
    )
    if warnings:
        slots = ", ".join(str(slot + 1) for slot in sorted(warnings))
        status += f" See the warning{'s' if len(warnings) > 1 else ''} at subject {slots}."
    recipe, images = None, list(output.images)
    recordable = all(path is not None for _, paths, _ in recipe_subjects for path in paths)
    if models is not None and settings and recordable:  # without the pipeline's settings, a recipe would guess
        recipe = _recipe(pipe, output, request, recipe_subjects, models)
        if output_dir is not None:
            images = _write_images(output.images, recipe, Path(output_dir), int(request.seed))
    return GenerateResult(
        images=images,
        recipe=recipe,
        maps=maps,
        subject_warnings={slot: " ".join(messages) for slot, messages in sorted(warnings.items())},
        status=status,
        settings=settings,
    )
