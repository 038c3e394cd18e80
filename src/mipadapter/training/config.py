"""The training configuration: one frozen dataclass tree, read from YAML or TOML, unknown keys are errors.

A file maps 1:1 onto `TrainConfig`: each top-level table is one section (`model`, `data`, `optim`,
`run`, `validation`, `export`), each key one field. Missing keys take the defaults below: the authors'
recipe (``train_sdxl.py``, ``data/subject_dataset.py`` of hqhQAQ/MIP-Adapter), with every deviation an
option listed in ``docs/fidelity.md``; an unknown key, a wrong type or a bad value stops with an error
that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mipadapter.config import TEXT_WEIGHT_INITS, MergeRule
from mipadapter.limits import MAX_TRAINING_SIDE, Limits
from mipadapter.object_filters import ObjectFilterConfig

ARCHS = ("auto", "sdxl", "sd15")
PROJECTIONS = ("basic", "plus")
DATA_FORMATS = ("authors", "manifest")
CROPS = ("authors", "subjects")
CROP_COORDS = ("authors", "resized")
DUPLICATE_NAMES = ("drop_sample", "keep_best")
UNET_PRECISIONS = ("fp32", "mixed")
PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "linear", "cosine")
EXPORT_FORMATS = ("mipadapter", "authors", "diffusers")
TRAIN_RULES = (MergeRule.OFFICIAL.value, MergeRule.PAPER.value)
# upper bounds of counts no machine needs more of: a typo (an extra 0, a seed pasted twice) is refused
# before any model loads instead of failing hours in
MAX_SEED = 2**32 - 1  # numpy's seed range; torch generators take the seed times a small factor
MAX_STEPS = 99_999_999  # checkpoint folders carry the step in 8 digits
MAX_BATCH_SIZE = 4096
MAX_WORKERS = 256
MAX_VIEWS = 64
MAX_SUBJECTS = 64
MAX_TOKENS = 1024


class ConfigError(ValueError):
    """A configuration file or value that does not fit `TrainConfig`; the message names the key (also in
    ``key`` when one key is at fault)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to start from.

    base_model: a diffusers pipeline folder or Hub id (SDXL or SD1.5). image_encoder: the CLIP image
    encoder folder or ``owner/repo/subfolder``. adapter_init: an IP-Adapter / MIP-Adapter checkpoint to
    start from (file or ``owner/repo/file``); None starts ``to_k_ip``/``to_v_ip`` from each layer's
    ``to_k``/``to_v`` with a fresh projection (which then has to be trained: set train_image_proj).
    projection/num_tokens: the projection built when adapter_init is None. text_weight: train MIP's
    ``text_to_weight`` gate. text_weight_init: how a gate the starting weights lack begins: ``pytorch``
    (nn.Linear's own initialisation, as the authors' training: their checkpoint load leaves it out) or
    ``zeros`` (a flat gate, ``g`` = 1, at the start).
    """

    base_model: str
    image_encoder: str
    adapter_init: str | None = None
    arch: str = "auto"
    projection: str = "basic"
    num_tokens: int = 4
    text_weight: bool = True
    train_image_proj: bool = False
    text_weight_init: str = "pytorch"


@dataclass(frozen=True)
class FilterConfig:
    """Which detected objects become subjects (defaults: the authors' ``subject_dataset.py``).

    The box rules are `mipadapter.object_filters.ObjectFilterConfig`'s (same names, same meaning;
    ``caption_match`` ``substring`` is the authors' ``str.find`` test, ``word`` a whole-word match).
    authors_box_check: the authors' ``is_valid_bbox`` on the mask inside the box: 2 to 5 distinct
    values there, the most frequent value (background included, as theirs) filling at least 60% of
    the box, and the dominant object's segment no larger than the box; checked before the nesting rule.
    min_mask_fill: ours, off by default: the object's own segment fills at least this share of its box.
    post_crop_filter: the authors' filter after the training crop: a subject's box in the resized crop
    must cover more than 200 px and have a height/width ratio in (0.3, 3).
    duplicate_names: ``drop_sample`` (the authors: a sample whose subjects share a name is skipped) or
    ``keep_best`` (the best-scored object of each name is kept and the next name taken).
    """

    min_area_frac: float | None = 0.08
    max_area_frac: float | None = 0.7
    min_aspect_ratio: float | None = 0.3
    max_aspect_ratio: float | None = 3.0
    min_score: float | None = 0.3
    name_in_caption: bool = True
    caption_match: str = "substring"
    single_word_names: bool = True
    nested_overlap: float | None = 0.8
    duplicate_names: str = "drop_sample"
    authors_box_check: bool = True
    min_mask_fill: float = 0.0
    post_crop_filter: bool = True

    def object_filter(self) -> ObjectFilterConfig:
        """The object filter without a count cap (subjects are capped after the mask and crop checks)."""
        names = {f.name for f in dataclasses.fields(ObjectFilterConfig)} - {"max_objects", "distinct_names"}
        return ObjectFilterConfig(
            **{name: getattr(self, name) for name in names},
            distinct_names=self.duplicate_names == "keep_best",
            max_objects=None,
        )


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how samples are made.

    format ``authors``: root holds ``images/<id>.png``, ``masks/<id>.png`` (instance label map) and
    ``jsons/<id>.json``; ids_file (optional) lists the ids to use (``.txt`` one a line, ``.json`` a list,
    or the authors' ``.pkl`` list of strings, read by a restricted unpickler). format ``manifest``: root is
    the JSONL manifest (`mipadapter.manifest`). See ``docs/training-data.md``.

    Subjects per sample: ``min_subjects`` to ``max_subjects`` (the authors: exactly 2; samples with fewer
    valid subjects are skipped). views: reference views per subject; above 1 each view is its own
    condition routed by the subject's name (single-object multi-view training, ``multi_image="each"``
    at inference): view 0 is the plain reference, the others random crops of the same padded segment
    covering ``view_min_scale`` to 1 of its side, each flipped on its own. resolution: the square
    training size; flip_prob: the references' horizontal flip; random_crop: place the square crop at
    random among the allowed positions (else in their middle). crop: ``authors`` (the square must hold
    every detected box when one can, else the centre square is taken and the post-crop filter decides
    which subjects remain) or ``subjects`` (the square holds the chosen subjects; the lowest-ranked are
    dropped until one does). crop_coords: SDXL's crop offset in the frame of the stored image (``authors``,
    as their time ids) or of the image resized to the training size (``resized``). warn_skipped_share:
    the end of indexing prints the skipped images by reason on stderr, with a warning when more than
    this share of the images was skipped (0.1: one in ten).
    """

    root: str
    format: str = "authors"
    ids_file: str | None = None
    resolution: int = 512
    min_subjects: int = 2
    max_subjects: int = 2
    views: int = 1
    view_min_scale: float = 0.8
    flip_prob: float = 0.5
    random_crop: bool = True
    crop: str = "authors"
    crop_coords: str = "authors"
    num_workers: int = 4
    scan_workers: int = 8
    limit: int | None = None
    warn_skipped_share: float = 0.1
    filters: FilterConfig = field(default_factory=FilterConfig)


@dataclass(frozen=True)
class OptimConfig:
    """The step and the optimiser (defaults: the authors' recipe).

    rule: the merge rule trained (``official`` for the authors' checkpoints, or ``paper``).
    drop_text / drop_image / drop_both: condition dropout probabilities (disjoint events).
    batch_size: per process. max_grad_norm: None (the authors: no clipping) or a norm to clip to.
    mixed_precision: ``fp16`` in the authors' launch command (set in the config files; ``no`` here so a
    CPU run works). unet_precision: ``fp32`` keeps the frozen UNet in float32 under autocast, as the
    authors' accelerate setup does; ``mixed`` casts it to the mixed-precision dtype (half the memory).
    Trainable parameters stay float32 either way.
    """

    rule: str = "official"
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_steps: int = 12000
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    unet_precision: str = "fp32"
    gradient_checkpointing: bool = False
    drop_text: float = 0.05
    drop_image: float = 0.05
    drop_both: float = 0.05
    noise_offset: float = 0.0
    seed: int = 42


@dataclass(frozen=True)
class RunConfig:
    """Outputs: checkpoints every ``checkpoint_every`` optimiser steps (the last ``keep_last`` kept),
    metrics every ``log_every`` steps to ``<output_dir>/logs/metrics.jsonl`` (and TensorBoard when
    installed). resume: ``auto`` continues from the newest checkpoint in output_dir if there is one,
    ``never`` refuses a non-empty checkpoint folder, or a checkpoint folder path."""

    output_dir: str
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    resume: str = "auto"
    progress_bar: bool = True
    tensorboard: bool = True


@dataclass(frozen=True)
class ValidationSubject:
    """One reference of a validation prompt: the subject's name in the prompt and its photo."""

    name: str
    image: str


@dataclass(frozen=True)
class ValidationPrompt:
    prompt: str
    subjects: tuple[ValidationSubject, ...]


@dataclass(frozen=True)
class ValidationConfig:
    """Images from fixed prompts and references every ``every`` steps (0: never), same seed each time
    (scale: the authors' ``--infer_scale``, 0.75 for SDXL, 0.65 in their Plus command)."""

    every: int = 0
    prompts: tuple[ValidationPrompt, ...] = ()
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    scale: float = 0.75
    seed: int = 420


@dataclass(frozen=True)
class ExportConfig:
    """Files written at the end of training (and by ``export_checkpoint``) under ``<output_dir>/export``.

    ``mipadapter``: ours (safetensors, loads with `mipadapter.load_adapter`); ``authors``: their nested
    ``.bin``; ``diffusers``: h94's IP-Adapter ``.bin`` without text_to_weight. dtype: ``fp16`` (as the
    published files) or ``fp32``.
    """

    formats: tuple[str, ...] = ("mipadapter", "authors", "diffusers")
    dtype: str = "fp16"


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    run: RunConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, *sections: str) -> str:
        """A short hash of the named sections (all when none): what a resumed run must share."""
        data = self.to_dict()
        picked = {name: data[name] for name in (sections or data)}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _check(condition: bool, key: str, value: Any, want: str) -> None:
    if not condition:
        raise ConfigError(f"{key} must be {want}, got {value!r}", key)


def _in_range(value: Any, low: float, high: float, key: str) -> None:
    _check(value is not None and low <= value <= high, key, value, f"in [{low}, {high}]")


def validate(config: TrainConfig) -> None:
    """Check values that types alone do not (ranges, choices, combinations)."""
    m, d, o, r = config.model, config.data, config.optim, config.run
    _check(m.arch in ARCHS, "model.arch", m.arch, f"one of {ARCHS}")
    _check(m.projection in PROJECTIONS, "model.projection", m.projection, f"one of {PROJECTIONS}")
    _in_range(m.num_tokens, 1, MAX_TOKENS, "model.num_tokens")
    _check(
        m.text_weight_init in TEXT_WEIGHT_INITS, "model.text_weight_init", m.text_weight_init, f"one of {TEXT_WEIGHT_INITS}"
    )
    if m.adapter_init is None and not m.train_image_proj:
        raise ConfigError(
            "model.adapter_init is empty, so the image projection starts random; it must then be trained: "
            "set model.train_image_proj: true (or give an IP-Adapter checkpoint as model.adapter_init)"
        )
    _check(d.format in DATA_FORMATS, "data.format", d.format, f"one of {DATA_FORMATS}")
    _check(
        8 <= d.resolution <= MAX_TRAINING_SIDE and d.resolution % 8 == 0,
        "data.resolution",
        d.resolution,
        f"a multiple of 8 in [8, {MAX_TRAINING_SIDE}]",
    )
    _in_range(d.max_subjects, 1, MAX_SUBJECTS, "data.max_subjects")
    _check(1 <= d.min_subjects <= d.max_subjects, "data.min_subjects", d.min_subjects, "in [1, max_subjects]")
    _in_range(d.views, 1, MAX_VIEWS, "data.views")
    _check(0.0 < d.view_min_scale <= 1.0, "data.view_min_scale", d.view_min_scale, "in (0, 1]")
    _check(d.crop in CROPS, "data.crop", d.crop, f"one of {CROPS}")
    _check(d.crop_coords in CROP_COORDS, "data.crop_coords", d.crop_coords, f"one of {CROP_COORDS}")
    _check(
        d.filters.duplicate_names in DUPLICATE_NAMES,
        "data.filters.duplicate_names",
        d.filters.duplicate_names,
        f"one of {DUPLICATE_NAMES}",
    )
    _check(0.0 <= d.flip_prob <= 1.0, "data.flip_prob", d.flip_prob, "in [0, 1]")
    _in_range(d.num_workers, 0, MAX_WORKERS, "data.num_workers")
    _in_range(d.scan_workers, 1, MAX_WORKERS, "data.scan_workers")
    _check(d.limit is None or d.limit >= 1, "data.limit", d.limit, "None or >= 1")
    _in_range(d.warn_skipped_share, 0.0, 1.0, "data.warn_skipped_share")
    _check(
        0.0 <= d.filters.min_mask_fill <= 1.0,
        "data.filters.min_mask_fill",
        d.filters.min_mask_fill,
        "in [0, 1]",
    )
    try:
        d.filters.object_filter()
    except ValueError as error:
        raise ConfigError(f"data.filters: {error}") from None
    _check(o.rule in TRAIN_RULES, "optim.rule", o.rule, f"one of {TRAIN_RULES}")
    _check(o.lr_schedule in LR_SCHEDULES, "optim.lr_schedule", o.lr_schedule, f"one of {LR_SCHEDULES}")
    _check(
        o.mixed_precision in PRECISIONS, "optim.mixed_precision", o.mixed_precision, f"one of {PRECISIONS}"
    )
    _check(
        o.unet_precision in UNET_PRECISIONS,
        "optim.unet_precision",
        o.unet_precision,
        f"one of {UNET_PRECISIONS}",
    )
    _check(0 < o.learning_rate <= 1, "optim.learning_rate", o.learning_rate, "in (0, 1]")
    _check(0 < o.adam_epsilon <= 1, "optim.adam_epsilon", o.adam_epsilon, "in (0, 1]")
    _in_range(o.weight_decay, 0.0, 1.0, "optim.weight_decay")
    for name in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(o, name) < 1, f"optim.{name}", getattr(o, name), "in [0, 1)")
    _in_range(o.max_steps, 1, MAX_STEPS, "optim.max_steps")
    _in_range(o.batch_size, 1, MAX_BATCH_SIZE, "optim.batch_size")
    _in_range(o.gradient_accumulation_steps, 1, MAX_BATCH_SIZE, "optim.gradient_accumulation_steps")
    _in_range(o.warmup_steps, 0, o.max_steps, "optim.warmup_steps")
    _check(
        o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm", o.max_grad_norm, "None or > 0"
    )
    for name in ("drop_text", "drop_image", "drop_both"):
        _in_range(getattr(o, name), 0.0, 1.0, f"optim.{name}")
    drops = (o.drop_text, o.drop_image, o.drop_both)
    _check(sum(drops) <= 1, "optim.drop_text/drop_image/drop_both", drops, "probabilities with a sum <= 1")
    _in_range(o.noise_offset, 0.0, 1.0, "optim.noise_offset")
    _in_range(o.seed, 0, MAX_SEED, "optim.seed")
    _check(r.checkpoint_every >= 1, "run.checkpoint_every", r.checkpoint_every, ">= 1")
    _check(r.keep_last >= 1, "run.keep_last", r.keep_last, ">= 1")
    _check(r.log_every >= 1, "run.log_every", r.log_every, ">= 1")
    v = config.validation
    _check(v.every >= 0, "validation.every", v.every, ">= 0")
    if v.every and not v.prompts:
        raise ConfigError("validation.every is set but validation.prompts is empty", "validation.prompts")
    caps = Limits()  # the generation caps every command shares
    _in_range(v.num_inference_steps, 1, caps.max_steps, "validation.num_inference_steps")
    _in_range(v.guidance_scale, 0.0, caps.max_guidance, "validation.guidance_scale")
    _in_range(v.scale, 0.0, 10.0, "validation.scale")
    _in_range(v.seed, 0, MAX_SEED, "validation.seed")
    for f in config.export.formats:
        _check(f in EXPORT_FORMATS, "export.formats", f, f"one of {EXPORT_FORMATS}")
    _check(config.export.dtype in ("fp16", "fp32"), "export.dtype", config.export.dtype, "fp16 or fp32")
    if "authors" in config.export.formats and not m.text_weight:
        raise ConfigError(
            "export.formats has 'authors', whose layout carries text_to_weight: set model.text_weight"
        )


# --- building the dataclass tree from plain data ------------------------------------------------------


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses; errors name ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {options}", key)
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table of {tp.__name__} fields, got {value!r}", key)
        return build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{key} must be a list, got {value!r}", key)
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}", key)
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            message = f"{key} must be a finite number, got an integer beyond any float"
            raise ConfigError(message, key) from None
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}", key)
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}", key)
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{key} must be a {tp.__name__}, got {value!r}", key)
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys and missing required keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"{prefix}." if prefix else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[where + k for k in unknown]}; {cls.__name__} takes {sorted(fields)}"
        )
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key(s) {[where + k for k in missing]}")
    kwargs = {name: _convert(value, hints[name], where + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"{prefix or cls.__name__}: {error}") from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a table", dotted)
    node[keys[-1]] = value


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """``["optim.max_steps=10", "run.output_dir=out"]`` → [(key, YAML-parsed value)]."""
    import yaml

    pairs = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"an override is KEY=VALUE (e.g. optim.max_steps=100), got {item!r}")
        pairs.append((key.strip(), yaml.safe_load(text)))
    return pairs


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or TOML (``.toml``) file as plain data."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"config file {path.name!r}: use .yaml, .yml or .toml")
    import tomllib
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as error:  # TOML errors and int digit limits too
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConfigError(f"config file {str(path)!r} cannot be read: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table at the top level")
    return data


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[tuple[str, Any]] = ()) -> TrainConfig:
    data = json.loads(json.dumps(data))  # a deep copy of plain data
    for key, value in overrides:
        _set_dotted(data, key, value)
    return build(TrainConfig, data)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML/TOML training config, apply ``KEY=VALUE`` overrides, and check it. An error names
    where the bad value came from: the file, or ``--set KEY`` when an override set that key."""
    pairs = parse_overrides(overrides)
    try:
        return config_from_dict(read_config_file(path), pairs)
    except ConfigError as error:
        if str(error).startswith("config file "):
            raise
        overridden = error.key in {key for key, _ in pairs}
        source = f"--set {error.key}" if overridden else f"config file {str(path)!r}"
        raise ConfigError(f"{source}: {error}", error.key) from None
