"""`mipadapter generate`: one prompt, several subjects; images that carry their own recipe.

Order of work: parse and check every flag, output path and photo (headers, then pixels) → read and check
the adapter file → image encoder → base model → generate → write every output atomically. A mistake
costs seconds, never a model load or a generation, and never leaves half a result.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mipadapter import limits
from mipadapter.alignment import subject_labels
from mipadapter.cli.options import add_model_flags, add_tiny_argument
from mipadapter.config import (
    DEFAULT_ADAPTER,
    DEFAULT_PRESET,
    PRESETS,
    MergeRule,
    MultiImageMode,
    NegativeImage,
    RegionMode,
)
from mipadapter.limits import ALLOW_LARGE, DEFAULT_LIMITS, LARGE_LIMITS

DEFAULTS: dict[str, Any] = {
    "output": "out.png",
    "preset": DEFAULT_PRESET,
    "region_mode": "replace",
    "multi_image": "mean",
    "steps": 30,
    "seed": 420,
    "num_images": 1,
    "device": "auto",
    "dtype": "auto",
    "max_photo_mp": 50.0,
}
"""Defaults applied after ``--from-png`` (a flag left out takes the recorded value first)."""

DESCRIPTION = """\
Generate images in which each --subject's photos go to the object its name denotes in the prompt.

Every output image carries its recipe (prompt, seed, subjects with photo paths and SHA-256, resolved
scales, size, guidance, models, versions); --from-png IMAGE runs it again, bit for bit on the same
machine and versions, and any flag given overrides the recorded value."""

EPILOG = """\
subjects with the same name:
  --subject dog=a.jpg --subject dog=b.jpg is two subjects; the prompt must mention "dog" twice
  ("a dog and a dog on a sofa"): the first mention carries the first --subject, and so on.
  --scale/--region dog=... address every subject called dog; dog#1=..., dog#2=... only the first,
  the second.

several adapters (SDXL, SD1.5; docs/adapters.md):
  --adapter face=ip-sdxl-plus-face --subject-adapter man=face   the man's photos through h94's face
  adapter, the other subjects through the default one; all routed together in one call.

examples:
  mipadapter generate --prompt "a cat wearing a jacket" --subject cat=cat1.jpg,cat2.jpg \\
      --subject jacket=jacket.jpg --scale jacket=0.8 --region jacket=512,300,1024,1024 -o out.png
  mipadapter generate --tiny --prompt "a cat and a dog" --subject cat=c.jpg --subject dog=d.jpg
  mipadapter generate --preset ip-flux --prompt "a cat wearing a jacket in Boston" \\
      --subject cat=cat.jpg --subject jacket=jacket.jpg --negative-prompt "blurry" --true-cfg-scale 4
  mipadapter generate --prompt "a man holding a cat" --subject man=me.jpg --subject cat=cat.jpg \\
      --adapter face=ip-sdxl-plus-face --subject-adapter man=face
  mipadapter generate --from-png out.png --seed 7 -o again.png
  mipadapter generate --from-png out.png --subject cat=my_cat.jpg -o mine.png   # cat keeps its scale, region"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images of a prompt with several reference subjects",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("what to generate")
    what.add_argument("--prompt", help="the text; it must name every subject (required unless --from-png)")
    what.add_argument(
        "--subject",
        action="append",
        metavar="NAME=PHOTO[,PHOTO...]",
        help="a subject: the words the prompt uses for it and one or more photos; repeat per subject, "
        "the same NAME twice for two subjects (required unless --from-png, which records them)",
    )
    what.add_argument(
        "--scale",
        action="append",
        default=[],
        metavar="NAME[#K]=S",
        help="image scale of a subject, a finite number in 0 … 1.5 (100 with --allow-large) (default: the "
        "adapter's, 0.75 for mip-sdxl)",
    )
    what.add_argument(
        "--scale-blocks",
        action="append",
        default=[],
        metavar="NAME[#K]=FILE.json",
        help="per-layer image scales of a subject, as diffusers' set_ip_adapter_scale takes them: on FLUX a "
        'JSON list, one value per double block; on a UNet the dict {"down": {"block_2": [0.0, 1.0]}, '
        '"mid": 0.5, "up": ...} (parts and blocks left out: 0) (default: none, one --scale for all layers)',
    )
    what.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="NAME[#K]=X0,Y0,X1,Y1|NAME[#K]=MASK",
        help="where a subject goes: a box in output pixels or a mask image (white = the subject) "
        "(default: routed automatically)",
    )
    what.add_argument(
        "--subject-adapter",
        action="append",
        default=[],
        metavar="NAME[#K]=ADAPTER",
        help="the adapter that encodes a subject's photos: one added with --adapter ADAPTER=FILE, or "
        "'default' (default: default, the preset's adapter or --adapter FILE)",
    )
    what.add_argument(
        "--region-mode",
        choices=[mode.value for mode in RegionMode],
        help="a region replaces the subject's routing map or multiplies it (default: replace)",
    )
    what.add_argument(
        "--negative-prompt",
        help="negative prompt; '' for none — with FLUX's --true-cfg-scale, '' is an empty negative prompt "
        "(default: the preset's: the authors' for mip-* presets)",
    )
    what.add_argument(
        "--negative-image",
        choices=[choice.value for choice in NegativeImage],
        help="what classifier-free guidance's unconditional side sees instead of the photos: a black image "
        "through the image encoder (diffusers' FLUX pipeline, x-flux) or IP-Adapter's zero embedding "
        "(default: black on FLUX, zeros on SDXL/SD1.5)",
    )
    what.add_argument(
        "--prompt-2", help="FLUX only: the text T5 encodes, where the names are checked (default: --prompt)"
    )
    what.add_argument(
        "--from-png",
        metavar="IMAGE",
        help="rerun the generation recorded in IMAGE (a .png or .jpg written by generate); photos are "
        "read from their recorded paths and checked against their SHA-256; --subject NAME=... replaces the "
        "photos of the recorded subject NAME, which keeps its scale and region, and the other recorded "
        "subjects stay (with a new --prompt, those it names); image k of a batch is rerun alone, at -o",
    )

    how = parser.add_argument_group("sampling")
    how.add_argument(
        "--steps", type=int, help="denoising steps, 1 … 100 (10000 with --allow-large) (default: 30)"
    )
    how.add_argument(
        "--guidance",
        type=float,
        help="guidance scale, 0 … 30 (1000 with --allow-large) (default: the base model's, 5.0 SDXL, 7.5 "
        "SD1.5, 3.5 FLUX: there the distilled guidance, an input of the model, not classifier-free guidance)",
    )
    how.add_argument(
        "--true-cfg-scale",
        type=float,
        metavar="S",
        help="FLUX only: real classifier-free guidance against --negative-prompt, ≥ 1; each step runs the "
        "model twice (default: 1, off)",
    )
    how.add_argument(
        "--max-sequence-length",
        type=int,
        metavar="N",
        help="FLUX only: T5's token length, 1 … 512 (default: 512, diffusers')",
    )
    how.add_argument("--seed", type=int, help="seed of the CPU generator, 0 … 2**64-1 (default: 420)")
    how.add_argument(
        "--height",
        type=int,
        help="output height in pixels, a multiple of 8 (16 on FLUX), at most 1536 (8192 with --allow-large) "
        "(default: the model's)",
    )
    how.add_argument(
        "--width",
        type=int,
        help="output width in pixels, a multiple of 8 (16 on FLUX), at most 1536 (8192 with --allow-large) "
        "(default: the model's)",
    )
    how.add_argument(
        "--num-images",
        type=int,
        help="images generated together, 1 … 4 (64 with --allow-large) (default: 1)",
    )
    how.add_argument(
        "--allow-large",
        action="store_true",
        help="raise the caps on size, steps, images, guidance and scale (1536 pixels a side, 100 steps, 4 "
        "images, guidance 30, scale 1.5) to 8192 a side and 16.8 MP, 10000 steps, 64 images, guidance 1000, "
        "scale 100, for a GPU that can take it (default: off; docs/limits.md)",
    )
    how.add_argument(
        "--rule",
        choices=[rule.value for rule in MergeRule],
        help="merge rule (default: official for MIP adapters, paper for plain IP-Adapters; FLUX: paper or "
        "uniform, official needs a FLUX text weight, which no FLUX adapter has yet)",
    )
    how.add_argument(
        "--text-weight",
        action=argparse.BooleanOptionalAction,
        help="use a MIP adapter's learned text weight (default: when the adapter has one)",
    )
    how.add_argument(
        "--multi-image",
        choices=[mode.value for mode in MultiImageMode],
        help="several photos of a subject: mean of their image tokens, or each its own condition "
        "(default: mean)",
    )

    models = parser.add_argument_group("models")
    models.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help=f"the default models and scale (default: {DEFAULT_PRESET})",
    )
    add_model_flags(models)
    add_tiny_argument(models, "an install smoke test, not a picture")
    models.add_argument(
        "--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1 … (default: auto)"
    )
    models.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights' dtype (default: auto = float16 on GPUs, float32 on the CPU)",
    )
    models.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (FLUX: the transformer) after loading; the first denoising step pays "
        "the compilation (minutes for SDXL on a GPU, again in every new process), so it pays off only over "
        "many steps and images (default: off)",
    )

    out = parser.add_argument_group("output")
    out.add_argument(
        "-o",
        "--output",
        help="output image, .png or .jpg/.jpeg (a real JPEG, recipe in a comment); several images get "
        "_1, _2 … before the extension (default: out.png)",
    )
    out.add_argument(
        "--contact-sheet",
        metavar="PATH",
        help="also write a sheet (.png/.jpg) of the references, every result and each subject's routing map",
    )
    out.add_argument(
        "--max-photo-mp",
        type=float,
        help="refuse photos above this many megapixels, read from their header (default: 50)",
    )
    parser.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------- the plan
@dataclass
class SubjectPlan:
    """One subject as it will be generated and recorded; region: a box, a mask file, a PIL mask or None."""

    name: str
    photos: tuple[Path, ...]
    scale: float | list[float] | dict[str, Any] | None = None  # a list or dict: per-layer scales
    region: Any = None
    recorded_photos: bool = False  # the photos come from --from-png's recipe (named so in errors)
    recorded_scale: bool = False  # the scale comes from the recipe (checked against the caps as such)
    adapter: str = DEFAULT_ADAPTER  # the name of the adapter that encodes its photos


@dataclass
class Plan:
    """Everything ``run`` needs, checked; nothing loaded yet."""

    prompt: str
    negative_prompt: str | None
    subjects: list[SubjectPlan]
    photos: list[list[Any]]
    seed: int
    steps: int
    guidance: float | None
    height: int | None
    width: int | None
    num_images: int
    rule: str | None
    text_weight: bool | None
    multi_image: str
    region_mode: str
    true_cfg_scale: float | None
    outputs: list[Path]
    contact_sheet: Path | None
    models: argparse.Namespace
    device: str
    dtype: str
    source: Path | None = None
    compile: bool = False
    negative_image: str | None = None
    prompt_2: str | None = None
    max_sequence_length: int | None = None
    keep_index: int | None = None  # write only this image of the call (--from-png of image k of a batch)
    same_models_as: dict | None = None  # the --from-png recipe, when its base model is rerun (no model flag)
    rule_origin: str = "--rule"  # how errors name the rule and the text weight: the flag, or the recipe
    text_weight_origin: str = "--text-weight"


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    output, pipe, record = generate(plan)
    write_outputs(plan, output, pipe, record)
    return 0


def make_plan(args: argparse.Namespace) -> Plan:
    """Merge ``--from-png``'s recipe with the flags, check everything that can be checked without a model."""
    from mipadapter.cli import options
    from mipadapter.fileio import check_output_file
    from mipadapter.recipe import IMAGE_SUFFIXES

    recipe, source = _recipe_of(args)
    value = _merger(args, recipe)
    models = _models(args, recipe)
    arch = options.tiny_arch(models.tiny)
    flux = _is_flux(args, models, recipe)
    if recipe is not None:
        _check_same_family(recipe, source, models, flux)
    if flux and models.adapters:
        raise ValueError(f"{models.adapters[0].flag}: {options.ONE_ADAPTER_ON_FLUX}")
    factor = options.FLUX_CELL if flux else options.VAE_FACTOR

    prompt = value("prompt")
    if not prompt or not prompt.strip():
        raise ValueError("--prompt is required (or --from-png IMAGE to rerun a recorded generation)")
    caps, allow = (LARGE_LIMITS, None) if args.allow_large else (DEFAULT_LIMITS, ALLOW_LARGE)
    where = _origin(args, recipe, source)
    steps = limits.check_steps(value("steps"), where("steps"), caps, allow=allow)
    seed = limits.check_seed(value("seed"), where("seed"))
    num_images = limits.check_images(value("num_images"), where("num_images"), caps, allow=allow)
    height, width = (_side(value(dest), where(dest), factor, caps, allow) for dest in ("height", "width"))
    guidance = value("guidance")
    if guidance is not None:
        guidance = limits.check_guidance(guidance, where("guidance"), caps, allow=allow)
    true_cfg_scale = _true_cfg_scale(args, recipe, flux, models, value("negative_prompt"))
    _check_flux_settings(args, recipe, source, flux, models, value)
    if true_cfg_scale is not None:
        what = "--true-cfg-scale" if args.true_cfg_scale is not None else where("true_cfg_scale")
        limits.check_number(
            true_cfg_scale, what, 1, caps.max_guidance, ceiling=LARGE_LIMITS.max_guidance, allow=allow
        )
    max_mp = value("max_photo_mp")
    if not (math.isfinite(max_mp) and max_mp > 0):
        raise ValueError(f"--max-photo-mp must be > 0 and finite, got {max_mp}")

    named_in = None if args.prompt is None and args.prompt_2 is None else (prompt, value("prompt_2") or "")
    subjects = _subjects(args, recipe, named_in)
    if arch and (height is None or width is None):
        side = options.TINY_ARCHS[arch].native_side
        known = (height or side, width or side)
    else:
        known = (height, width)
    if None not in known:
        limits.check_output_pixels(known[1], known[0], caps, allow=allow)
    _apply_overrides(args, subjects, known, caps, allow)
    _apply_subject_adapters(args, subjects, [DEFAULT_ADAPTER, *(a.name for a in models.adapters)], source)
    _check_block_scale_forms(args, subjects, flux, models)
    for subject, label in zip(subjects, subject_labels([s.name for s in subjects]), strict=True):
        # --scale values were checked as parsed; per-layer scales by their form (scales.check_scale)
        if isinstance(subject.scale, (int, float)) and subject.recorded_scale:
            what = f"the scale of {label!r} recorded in {str(source)!r}"
            limits.check_scale(subject.scale, what, caps, allow=allow)

    output = check_output_file(value("output"), "-o", IMAGE_SUFFIXES)
    # rerunning image k of a recorded batch: the call makes the whole batch (its images share one
    # generator), but only image k, the recorded one, is written, at -o itself
    keep_index = recipe["image_index"] if recipe is not None and args.num_images is None else None
    written = 1 if keep_index is not None else num_images
    outputs = [
        check_output_file(path, "-o", IMAGE_SUFFIXES) for path in options.output_paths(output, written)
    ]
    sheet = None
    if args.contact_sheet:
        sheet = check_output_file(args.contact_sheet, "--contact-sheet", IMAGE_SUFFIXES)
    _refuse_overwriting_inputs(outputs, sheet, subjects, source)

    photos = options.open_photos(
        [options.SubjectArg(s.name, s.photos, s.recorded_photos) for s in subjects],
        max_pixels=int(max_mp * 1_000_000),
    )
    device = args.device or (recipe["device"] if recipe else DEFAULTS["device"])
    dtype = args.dtype or (recipe["dtype"] if recipe and not args.device else DEFAULTS["dtype"])
    return Plan(
        prompt=prompt,
        negative_prompt=value("negative_prompt"),
        subjects=subjects,
        photos=photos,
        seed=seed,
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        num_images=num_images,
        rule=value("rule"),
        text_weight=value("text_weight"),
        multi_image=value("multi_image"),
        region_mode=value("region_mode"),
        true_cfg_scale=true_cfg_scale,
        outputs=outputs,
        contact_sheet=sheet,
        models=models,
        device=device,
        dtype=dtype,
        source=source,
        compile=bool(args.compile),
        negative_image=value("negative_image"),
        prompt_2=value("prompt_2"),
        max_sequence_length=value("max_sequence_length"),
        keep_index=keep_index,
        same_models_as=recipe if recipe is not None and not (args.tiny or args.base_model or args.preset) else None,
        rule_origin=_flag_or_recorded("--rule", "the rule", value("rule"), args.rule is None and recipe, source),
        text_weight_origin=_flag_or_recorded(
            "--text-weight", "the text weight", value("text_weight"), args.text_weight is None and recipe, source
        ),
    )


def _flag_or_recorded(flag: str, what: str, value, recorded, source) -> str:
    """How an error names a setting: ``--rule official``, or ``the rule 'official' recorded in 'x.png'``."""
    if recorded:
        return f"{what} {value!r} recorded in {str(source)!r}"
    return flag if isinstance(value, bool) or value is None else f"{flag} {value}"


def _side(side: int | None, what: str, factor: int, caps, allow: str | None) -> int | None:
    """An output side (None: the model's): on the latent grid of ``factor`` pixels, within the caps."""
    from mipadapter.cli import options

    if side is None:
        return None
    options.check_side(side, what, factor)
    sides = dataclasses.replace(caps, min_side=factor, side_multiple=factor)
    return limits.check_side(side, what, sides, allow=allow)


def _is_flux(args, models, recipe) -> bool:
    """Whether the base model is FLUX, decided before loading. A base model given by path or Hub id is
    looked up (its ``model_index.json``) only when it matters: a FLUX-only flag or value (given, or
    recorded by ``--from-png``) or an output size to check; else the pipeline checks what it is given."""
    from mipadapter.cli import options

    if options.tiny_arch(models.tiny) is not None or not models.base_model:
        return options.base_model_kind(models) == "flux"
    recorded_flux = recipe is not None and any(recipe.get(key) is not None for key in FLUX_RECORDED)
    flux_flags = (args.true_cfg_scale, args.prompt_2, args.max_sequence_length, args.scale_blocks or None)
    sized = args.height is not None or args.width is not None
    if all(flag is None for flag in flux_flags) and not sized and not recorded_flux and args.rule != "official":
        return False
    return options.base_model_kind(models) == "flux"


FLUX_RECORDED = ("true_cfg_scale", "prompt_2", "max_sequence_length")
"""Recipe fields only FLUX images carry."""

TINY_FAMILIES = {"sdxl": "SDXL", "sd15": "SD1.5", "flux": "FLUX"}
"""The model family (``recipe.model_family``) of each ``--tiny`` architecture."""


def _check_same_family(recipe, source, models, flux: bool) -> None:
    """A recipe reruns on a model of the family that made it (its settings, e.g. the rule and text weight,
    are that family's): refuse another one, known before loading, in one line naming both. Known: a tiny
    architecture's family, and FLUX or not for any model (a UNet's family is left to the loaded model)."""
    from mipadapter.cli import options

    recorded = recipe.get("model_family")
    if recorded is None and any(recipe.get(key) is not None for key in FLUX_RECORDED):
        recorded = "FLUX"  # written before model_family existed: only FLUX recipes carry these fields
    if recorded is None:
        return
    arch = options.tiny_arch(models.tiny)
    now = TINY_FAMILIES.get(arch) if arch else ("FLUX" if flux else None)
    if now == recorded or (now is None and recorded != "FLUX"):
        return
    if arch:
        given = f"--tiny {arch} is {now}"
    elif now is None:
        given = _not_flux(models)
    else:
        given = f"the base model {models.base_model or models.preset!r} is FLUX"
    raise ValueError(
        f"{str(source)!r} was made on {recorded}, but {given}: a recipe reruns on its own model "
        "family (give --prompt and --subject for a new image on this model)"
    )


def _check_flux_settings(args, recipe, source, flux: bool, models, value) -> None:
    """``--prompt-2`` and ``--max-sequence-length`` need FLUX; ``--rule official`` is not offered there
    (no FLUX adapter has a text weight); a recorded negative given as embeddings cannot be rerun."""
    for flag, dest in (("--prompt-2", "prompt_2"), ("--max-sequence-length", "max_sequence_length")):
        if getattr(args, dest) is not None and not flux:
            raise ValueError(f"{flag} is FLUX's (its T5 text encoder), but {_not_flux(models)}")
    if value("max_sequence_length") is not None:
        limits.check_integer(value("max_sequence_length"), "--max-sequence-length", 1, 512)
    if flux and value("rule") == "official":
        raise ValueError(
            "--rule official is not offered on FLUX: it needs a text weight trained on FLUX, which no FLUX "
            "adapter has yet (use paper or uniform)"
        )
    if recipe is not None and recipe.get("negative_prompt_embeds") and args.negative_prompt is None:
        raise ValueError(
            f"{str(source)!r}: its negative prompt was given as embeddings (negative_prompt_embeds), which the "
            "recipe does not hold; give --negative-prompt to rerun it with a text"
        )


def _not_flux(models) -> str:
    """Why ``models`` is not a FLUX model, for an error line."""
    from mipadapter.cli import options

    if models.tiny:
        return f"--tiny {options.tiny_arch(models.tiny)} is not a FLUX model"
    if models.base_model:
        return f"the base model {models.base_model!r} is not a FLUX model"
    return f"the {models.preset} preset's base model is not FLUX"


def _true_cfg_scale(args, recipe, flux: bool, models, negative_prompt: str | None) -> float | None:
    """``--true-cfg-scale`` (FLUX only; above 1 it needs a negative prompt), else the recorded one on a
    FLUX model. negative_prompt: the flag's or recorded value (None: the preset's default applies)."""
    from mipadapter.cli import options
    from mipadapter.config import PRESETS

    given = options.check_true_cfg_scale(args.true_cfg_scale)
    if given is None:
        recorded = recipe.get("true_cfg_scale") if recipe else None
        return recorded if flux else None
    if not flux:
        raise ValueError(
            f"--true-cfg-scale is FLUX's classifier-free guidance, but {_not_flux(models)} (use --guidance)"
        )
    if negative_prompt is None and not models.tiny:
        negative_prompt = PRESETS[models.preset].negative_prompt
    if given > 1 and negative_prompt is None:  # "" is a negative prompt too (diffusers' FLUX reading)
        raise ValueError(
            f"--true-cfg-scale {given:g} needs a --negative-prompt: true guidance steers away from it "
            "(without one FLUX runs no unconditional pass)"
        )
    return given


def _recipe_of(args):
    if not args.from_png:
        if not args.subject:
            raise ValueError("give at least one --subject NAME=PHOTO (or --from-png IMAGE)")
        return None, None
    from mipadapter.recipe import read_recipe

    source = Path(args.from_png).expanduser()
    return read_recipe(source), source


RECORDED = {  # flag's dest → the recipe's key
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "steps",
    "guidance": "guidance",
    "seed": "seed",
    "height": "height",
    "width": "width",
    "num_images": "num_images",
    "rule": "rule",
    "text_weight": "text_weight",
    "multi_image": "multi_image",
    "region_mode": "region_mode",
}


RECORDED_IF_PRESENT = {  # flag's dest → the recipe's key, for fields written only where they apply
    "negative_image": "negative_image",
    "prompt_2": "prompt_2",
    "max_sequence_length": "max_sequence_length",
}


def _merger(args, recipe):
    """``value(dest)``: the flag when given, else the recorded value, else the default."""

    def value(dest: str):
        given = getattr(args, dest, None)
        if given is not None:
            return given
        if recipe is not None and dest in RECORDED_IF_PRESENT:
            if dest == "negative_image" and dest not in recipe:
                return "zeros"  # written before the field existed: every negative image was the zero embedding
            return recipe.get(RECORDED_IF_PRESENT[dest])
        if recipe is not None and dest in RECORDED:
            recorded = recipe[RECORDED[dest]]
            if dest == "negative_prompt" and recorded is None:
                return ""  # none was used: say so, or the preset's default would apply
            return recorded
        return DEFAULTS.get(dest)

    return value


def _origin(args, recipe, source):
    """``where(dest)``: how an error names a value: its flag when given (or defaulted), else the recipe
    field it was read from (``steps recorded in 'out.png'``)."""

    def where(dest: str) -> str:
        key = RECORDED.get(dest, dest)
        if getattr(args, dest, None) is None and recipe is not None and recipe.get(key) is not None:
            return f"{key} recorded in {str(source)!r}"
        return "--" + dest.replace("_", "-")

    return where


def _models(args, recipe) -> argparse.Namespace:
    """The model flags after ``--from-png``: each recorded model unless its flag is given."""
    from mipadapter.cli import options

    recorded = recipe["models"] if recipe else {}
    if recorded.get("tiny") is not None and recorded["tiny"] not in options.TINY_ARCHS:
        from mipadapter.recipe import RecipeError

        raise RecipeError(
            f"{str(Path(args.from_png).expanduser())!r} models: recipe field 'models.tiny' must be null or "
            f"one of {', '.join(options.TINY_ARCHS)}, got {recorded['tiny']!r}"
        )
    from mipadapter.cli.options import split_named

    tiny = args.tiny or recorded.get("tiny")
    bare_encoder = any(split_named(value)[0] in (None, DEFAULT_ADAPTER) for value in args.image_encoder or [])
    given_real = [
        flag for flag, given in (("--base-model", args.base_model), ("--image-encoder", bare_encoder)) if given
    ]
    if args.preset:
        given_real.append("--preset")
    if args.tiny and given_real:
        raise ValueError(
            f"{given_real[0]} cannot be used with --tiny (it picks the tiny base model and image encoder)"
        )
    if tiny and given_real:  # the recording was tiny; the flags ask for real models: those win
        tiny = None
    keep = recipe is not None and bool(recorded.get("tiny")) == bool(tiny)  # the recorded models apply
    source = str(Path(args.from_png).expanduser()) if recipe is not None else None
    flags = options.parse_adapter_flags(
        args.adapter, args.image_encoder, tiny=bool(tiny), recorded=_recorded_adapters(recorded, source) if keep else ()
    )
    adapter = flags.adapter
    if adapter is None and keep and recorded.get("adapter") != options.TINY_ADAPTER:
        adapter = recorded.get("adapter")
    common = {
        "adapters": flags.added,
        # a recorded default adapter file must be the recorded one
        "adapter_sha256": recorded.get("adapter_sha256") if flags.adapter is None and keep else None,
        "recorded_in": source,
    }
    if tiny:
        return argparse.Namespace(
            tiny=tiny, adapter=adapter, base_model=None, image_encoder=None, preset=None, **common
        )
    return argparse.Namespace(
        tiny=None,
        preset=args.preset or (keep and recorded.get("preset")) or DEFAULTS["preset"],
        base_model=args.base_model or (keep and recorded.get("base_model")) or None,
        adapter=adapter,
        image_encoder=flags.image_encoder or (keep and recorded.get("image_encoder")) or None,
        **common,
    )


def _recorded_adapters(recorded: dict, source: str | None) -> list:
    """A recipe's added adapters as ``--adapter NAME=FILE`` would give them, with the SHA-256 each file
    must still have and the preset that named it (its default scale); a tiny built-in image encoder is
    built again (None)."""
    from mipadapter.cli.options import AddedAdapter, is_tiny_encoder

    return [
        AddedAdapter(
            added["name"],
            added["adapter"],
            None if is_tiny_encoder(added["image_encoder"]) else added["image_encoder"],
            preset=added.get("preset"),
            sha256=added["sha256"],
            recorded_in=source,
        )
        for added in recorded.get("adapters", [])
    ]


def _subjects(args, recipe, named_in: tuple[str, ...] | None = None) -> list[SubjectPlan]:
    """The subjects: ``--subject`` alone, or with ``--from-png`` the recorded ones, where a ``--subject``
    replaces the photos of the recorded subject with its label (``dog``, then ``dog#2`` …), which keeps
    its scale and region; the other recorded subjects stay as recorded (their files checked against their
    SHA-256), and a ``--subject`` under a new name is added after them. named_in: the new prompts when
    ``--prompt`` / ``--prompt-2`` replace the recorded ones: a recorded subject they no longer name (the
    K-th ``dog`` needs K mentions) is left out rather than kept."""
    from mipadapter.cli import options
    from mipadapter.recipe import verify_inputs

    given = [SubjectPlan(s.name, s.photos) for s in options.parse_subjects(args.subject or [])]
    if recipe is None:
        return given
    source = Path(args.from_png).expanduser()
    names = [subject["name"] for subject in recipe["subjects"]]
    replaced = dict(zip(subject_labels([p.name for p in given]), given, strict=True))
    recorded_labels = subject_labels(names)
    if named_in is not None:
        recorded_labels = [
            label if _mentions(subject["name"], named_in) >= _occurrence(label) else None
            for subject, label in zip(recipe["subjects"], recorded_labels, strict=True)
        ]
    kept = [
        s for s, label in zip(recipe["subjects"], recorded_labels, strict=True)
        if label is not None and label not in replaced
    ]
    verify_inputs({"subjects": kept}, source)  # the recorded photos used must be the same files
    _keep_recorded_settings(given, recipe, source)
    plans = []
    for subject, label in zip(recipe["subjects"], recorded_labels, strict=True):
        if label is None:  # the new prompt does not name it
            continue
        if label in replaced:
            plans.append(replaced.pop(label))
            continue
        photos = tuple(Path(photo["path"]) for photo in subject["photos"])
        plans.append(
            SubjectPlan(
                subject["name"],
                photos,
                subject["scale"],
                _recorded_region(subject, source),
                recorded_photos=True,
                recorded_scale=True,
                adapter=subject.get("adapter", DEFAULT_ADAPTER),
            )
        )
    return plans + list(replaced.values())


def _mentions(name: str, texts: tuple[str, ...]) -> int:
    """How often ``name`` occurs as whole words in the text that names the most of it (any case): the
    tokenizers match names on whole tokens, so "cat" is not in "cats"."""
    import re

    pattern = re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, name.split())) + r"(?!\w)", re.IGNORECASE)
    return max(len(pattern.findall(text)) for text in texts)


def _occurrence(label: str) -> int:
    """Which subject of its name a label is: ``dog`` 1, ``dog#2`` 2 (``subject_labels``)."""
    head, _, number = label.rpartition("#")
    return int(number) if head and number.isdigit() else 1


def _recorded_region(subject: dict, source):
    """A recorded subject's region as a plan holds it: a mask file as its path (recorded again by path and
    hash), a box or an embedded mask as the pipeline takes it (checked by its header first), or None."""
    from mipadapter.recipe import recorded_region

    region = subject["region"]
    if isinstance(region, dict) and "path" in region:
        return Path(region["path"])
    what = f"the embedded mask of {subject['name']!r} recorded in {str(source)!r}"
    return recorded_region(region, what) if region is not None else None


def _keep_recorded_settings(plans: list[SubjectPlan], recipe: dict, source) -> None:
    """Give each new subject the scale and region recorded for the subject of the same label; a kept
    mask file must still be the recorded one."""
    from mipadapter.recipe import check_recorded_file

    names = [subject["name"] for subject in recipe["subjects"]]
    recorded = dict(zip(subject_labels(names), recipe["subjects"], strict=True))
    for plan, label in zip(plans, subject_labels([p.name for p in plans]), strict=True):
        subject = recorded.get(label)
        if subject is None:
            continue
        region = subject["region"]
        if isinstance(region, dict) and "path" in region:
            check_recorded_file(region, f"{label}'s region mask", source)
        plan.scale, plan.region = subject["scale"], _recorded_region(subject, source)
        plan.recorded_scale = True
        plan.adapter = subject.get("adapter", DEFAULT_ADAPTER)


def _apply_overrides(
    args,
    subjects: list[SubjectPlan],
    size: tuple[int | None, int | None],
    caps=DEFAULT_LIMITS,
    allow: str | None = ALLOW_LARGE,
) -> None:
    """``--scale`` / ``--region`` onto the subjects (``NAME`` all of that name, ``NAME#K`` the K-th)."""
    from mipadapter.cli import options
    from mipadapter.photos import photo_size

    names = [s.name for s in subjects]
    labels = subject_labels(names)
    scaled = options.address(options.parse_keyed(args.scale, "--scale"), names, "--scale")
    for index, value in scaled.items():
        subjects[index].scale = options.parse_scale(value, labels[index], caps, allow)
        subjects[index].recorded_scale = False
    blocks = options.address(options.parse_keyed(args.scale_blocks, "--scale-blocks"), names, "--scale-blocks")
    for index, value in blocks.items():
        if index in scaled:
            raise ValueError(f"--scale and --scale-blocks both set {labels[index]}: give one of them")
        subjects[index].scale = _read_block_scales(value, labels[index])
        subjects[index].recorded_scale = False
    for index, value in options.address(
        options.parse_keyed(args.region, "--region"), names, "--region"
    ).items():
        box = options.parse_box(value, labels[index])
        if box is None:
            mask = Path(value).expanduser()
            if not mask.exists():
                raise FileNotFoundError(
                    f"--region {labels[index]}={value}: neither x0,y0,x1,y1 nor an existing mask image"
                )
            photo_size(mask, f"--region {labels[index]} mask")
            subjects[index].region = mask
        else:
            subjects[index].region = box
    for subject, label in zip(subjects, labels, strict=True):
        if isinstance(subject.region, tuple):
            options.check_box_fits(subject.region, label, *size)


def _apply_subject_adapters(args, subjects: list[SubjectPlan], names: list[str], source) -> None:
    """``--subject-adapter NAME[#K]=ADAPTER`` onto the subjects; every subject's adapter (given or
    recorded) must be one this run loads."""
    from mipadapter.cli import options

    labels = subject_labels([s.name for s in subjects])
    items = options.parse_keyed(args.subject_adapter, "--subject-adapter")
    given = options.address(items, [s.name for s in subjects], "--subject-adapter")
    for index, name in given.items():
        if name not in names:
            raise ValueError(
                f"--subject-adapter {labels[index]}={name}: no adapter is named {name!r} (adapters: {', '.join(names)})"
            )
        subjects[index].adapter = name
    for subject, label in zip(subjects, labels, strict=True):
        if subject.adapter not in names:
            raise ValueError(
                f"{label!r} was encoded by the adapter {subject.adapter!r} recorded in {str(source)!r}, which this run "
                f"does not load: give --adapter {subject.adapter}=FILE or --subject-adapter {label}=ADAPTER"
            )


def _check_block_scale_forms(args, subjects: list[SubjectPlan], flux: bool, models) -> None:
    """``--scale-blocks``' form fits the model, known before loading it: a list on FLUX, the dict on a
    UNet (their lengths are checked against the loaded model)."""
    if not args.scale_blocks:
        return
    for subject, label in zip(subjects, subject_labels([s.name for s in subjects]), strict=True):
        if isinstance(subject.scale, list) and not flux:
            raise ValueError(
                f"--scale-blocks {label}: a list gives one scale per FLUX double block, but {_not_flux(models)}; "
                'a UNet takes diffusers\' dict form {"down": ..., "mid": ..., "up": ...}'
            )
        if isinstance(subject.scale, dict) and flux:
            raise ValueError(
                f"--scale-blocks {label}: the dict form is diffusers' for UNets; on FLUX give a list, one scale "
                "per double block"
            )


def _read_block_scales(value: str, label: str):
    """``--scale-blocks LABEL=FILE.json``: the file's list (FLUX) or diffusers' dict form (UNet), checked;
    the lengths are checked against the model when it is loaded."""
    import json

    from mipadapter.scales import check_scale, is_layered

    where = f"--scale-blocks {label}={value}"
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        scale = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{where}: not a JSON file ({getattr(error, 'msg', error)})") from None
    if not is_layered(scale):
        raise ValueError(
            f"{where}: the file holds a list (FLUX: one scale per double block) or a dict "
            '{"down": ..., "mid": ..., "up": ...} (UNet); use --scale for one number'
        )
    check_scale(scale, where)
    return scale


def _refuse_overwriting_inputs(outputs, sheet, subjects, source) -> None:
    written = [(path, "-o") for path in outputs] + ([(sheet, "--contact-sheet")] if sheet else [])
    seen: dict[Path, str] = {}
    for path, flag in written:
        key = path.resolve()
        if key in seen:
            raise ValueError(
                f"{flag} {str(path)!r} is also written by {seen[key]}: give distinct output files"
            )
        seen[key] = flag
    inputs = {source.resolve(): "the --from-png image"} if source else {}
    for subject in subjects:
        for photo in subject.photos:
            owner = f"{subject.name!r} (recorded)" if subject.recorded_photos else f"--subject {subject.name}"
            inputs[photo.resolve()] = f"a photo of {owner}"
        if isinstance(subject.region, Path):
            inputs[subject.region.resolve()] = f"the --region mask of {subject.name}"
    for path, flag in written:
        if path.resolve() in inputs:
            raise ValueError(
                f"{flag} {str(path)!r} would overwrite {inputs[path.resolve()]}: write elsewhere"
            )


# ----------------------------------------------------------------------------------------------- running
def generate(plan: Plan):
    """Load the models (small first) and run the call; returns (output, pipeline, ModelRecord)."""
    import torch

    from mipadapter.cli import options
    from mipadapter.photos import open_photo
    from mipadapter.pipeline import Subject

    regions = [
        open_photo(s.region, f"--region {s.name} mask", mode="L") if isinstance(s.region, Path) else s.region
        for s in plan.subjects
    ]
    subjects = [
        Subject(
            s.name,
            photos,
            scale=s.scale,
            region=region,
            region_mode=plan.region_mode,
            adapter=None if s.adapter == DEFAULT_ADAPTER else s.adapter,
        )
        for s, photos, region in zip(plan.subjects, plan.photos, regions, strict=True)
    ]
    device, dtype = options.pick_device_dtype(plan.device, plan.dtype, tiny=plan.models.tiny)
    pipe, record = options.load_pipeline(
        plan.models, device, dtype, check_adapters=lambda configs: _check_rule_fits_adapters(plan, configs)
    )
    if plan.same_models_as is not None:
        import sys

        from mipadapter.recipe import tokenizer_mismatch

        warning = tokenizer_mismatch(plan.same_models_as, pipe.pipe, plan.source)
        if warning is not None:
            print(f"mipadapter generate: {warning}", file=sys.stderr)
    if plan.compile:
        pipe.compile()
    generator = torch.Generator(device="cpu").manual_seed(plan.seed)
    output = pipe(
        plan.prompt,
        subjects,
        **call_arguments(plan),
        generator=generator,
        return_relevance=plan.contact_sheet is not None,
    )
    return output, pipe, record


def _check_rule_fits_adapters(plan: Plan, configs) -> None:
    """A call that mixes adapters (configs: name → ``AdapterConfig``): ``official`` (and the text weight)
    need a text weight in every subject's adapter, and ``paper`` runs ungated there; refused in one line
    naming the flag (or the recorded value) and the subjects, before the base model loads. One adapter:
    the library checks as always."""
    if len({s.adapter for s in plan.subjects}) < 2:
        return
    from mipadapter.pipeline.adapters import MixedRuleError, mixed_rule

    labels = subject_labels([s.name for s in plan.subjects])
    adapter_of = {label: s.adapter for s, label in zip(plan.subjects, labels, strict=True)}
    try:
        mixed_rule(labels, [configs[s.adapter] for s in plan.subjects], plan.rule, plan.text_weight)
    except MixedRuleError as error:
        lacking = ", ".join(f"{label!r} ({adapter_of[label]})" for label in error.lacking)
        if error.setting == "rule":
            raise ValueError(
                f"{plan.rule_origin}: official weighs each subject by its own adapter's text weight, and the "
                f"adapter of {lacking} has none (use --rule paper or uniform)"
            ) from None
        if not error.lacking:
            raise ValueError(
                f"{plan.text_weight_origin}: under rule paper a call that mixes adapters runs ungated (paper "
                "gates the text with one adapter's weight): use --no-text-weight, or --rule official"
            ) from None
        raise ValueError(
            f"{plan.text_weight_origin}: the adapter of {lacking} has no text weight (use --no-text-weight)"
        ) from None


def call_arguments(plan: Plan) -> dict[str, Any]:
    """The pipeline call's keyword arguments from the plan; ``true_cfg_scale`` only on FLUX."""
    extra = {} if plan.true_cfg_scale is None else {"true_cfg_scale": plan.true_cfg_scale}
    for key in ("negative_image", "prompt_2", "max_sequence_length"):  # only when set (FLUX's only on FLUX)
        if getattr(plan, key) is not None:
            extra[key] = getattr(plan, key)
    return {
        **extra,
        "rule": plan.rule,
        "use_text_weight": plan.text_weight,
        "multi_image": plan.multi_image,
        "negative_prompt": plan.negative_prompt,
        "num_inference_steps": plan.steps,
        "guidance_scale": plan.guidance,
        "height": plan.height,
        "width": plan.width,
        "num_images_per_prompt": plan.num_images,
    }


def write_outputs(plan: Plan, output, pipe, record) -> None:
    """Every image with its recipe and the contact sheet, all or none (a full disk at the third image
    leaves none of them, and the error names that file)."""
    from mipadapter.fileio import atomic_write_all
    from mipadapter.recipe import RecipeSubject, build_recipe, image_writer

    recipe = build_recipe(
        pipe,
        output,
        seed=plan.seed,
        subjects=[RecipeSubject(s.name, s.photos, s.region) for s in plan.subjects],
        models=record,
    )
    indices = range(len(output.images)) if plan.keep_index is None else [plan.keep_index]
    images = [output.images[index] for index in indices]
    writes = [
        (path, image_writer(output.images[index], path, recipe, image_index=index))
        for index, path in zip(indices, plan.outputs, strict=True)
    ]
    if plan.contact_sheet is not None:
        from mipadapter.alignment import numbered_labels
        from mipadapter.figures import contact_sheet

        names = [s.name for s in plan.subjects]
        shown = dict(zip(subject_labels(names), numbered_labels(names), strict=True))
        relevance = output.relevance and [
            {shown[label]: grid for label, grid in output.relevance[index].items()} for index in indices
        ]
        sheet = contact_sheet(dict(zip(shown.values(), plan.photos, strict=True)), images, relevance)
        writes.append((plan.contact_sheet, lambda tmp: sheet.save(tmp)))
    for path in atomic_write_all(writes):
        print(path)
