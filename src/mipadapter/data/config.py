"""The data-construction config: one frozen dataclass, loaded from YAML or TOML with strict keys."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mipadapter.object_filters import ObjectFilterConfig

MODES = ("multi", "single")
PHRASE_SOURCES = ("nouns", "caption")
CROPS = ("segment", "box")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class DataConfig:
    """Everything `build` and `score` need besides paths and devices.

    Models (hub ids or local folders; loaded only when a stage runs):
      caption_model: BLIP-2 captioner.
      grounding_model: Grounding DINO detector.
      segment_model: SAM, prompted with the kept boxes.
      clip_model: CLIP for the quality score. The paper writes the score with an encoder function
        ``g`` (``g_text``, ``g_img``) and names no model, nor did the authors release this code: the
        choice is ours. We default to LAION's CLIP ViT-g/14 (laion2B, transformers' format), a large
        public CLIP, because the score compares an object's crop with its one-word name and a larger
        CLIP separates such pairs more reliably; any CLIP works (e.g. the evaluation's ViT-B/32, faster).
    Stages:
      phrases: "nouns" grounds the caption's nouns as separate phrases ("cat. jacket."), the authors'
        route; "caption" grounds the whole caption and takes the detector's own phrase spans.
      box_threshold, text_threshold: Grounding DINO post-processing thresholds.
      caption_prompt: optional text prompt for BLIP-2 (None = unconditional captioning).
      clip_text_template: how an object name becomes CLIP text ("{name}" = the bare name).
      crop: "segment" = the object's segment on white, padded square (what the trainer feeds the
        image encoder); "box" = the box crop, padded square with white.
    Selection:
      mode: "multi" scores S_single + S_pair and keeps images with >= 2 objects; "single" scores
        S_single only and keeps images with >= 1 object.
      top_k: images in the selection.
      filters: the object rules shared with the trainer.
    Throughput:
      batch_size: images decoded and pushed through the stages together.
      *_batch_size: per-stage model batch (at most `batch_size` are ever in flight).
      images_per_shard: shard size for folder / authors inputs (tar inputs: one shard per tar).
      dtype: model weights' dtype; "auto" = float16 on CUDA, float32 elsewhere.
    Output:
      copy_images: copy images that come out of tar shards to `images/` (needed by the trainer).
      histogram_bins: bins of the score histogram figure.
    """

    caption_model: str = "Salesforce/blip2-opt-2.7b"
    grounding_model: str = "IDEA-Research/grounding-dino-base"
    segment_model: str = "facebook/sam-vit-huge"
    clip_model: str = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
    phrases: str = "nouns"
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    caption_prompt: str | None = None
    caption_max_new_tokens: int = 30
    clip_text_template: str = "{name}"
    crop: str = "segment"
    mode: str = "multi"
    top_k: int = 100_000
    filters: ObjectFilterConfig = field(default_factory=ObjectFilterConfig)
    batch_size: int = 16
    caption_batch_size: int = 16
    grounding_batch_size: int = 8
    segment_batch_size: int = 8
    clip_batch_size: int = 64
    images_per_shard: int = 1000
    dtype: str = "auto"
    copy_images: bool = True
    histogram_bins: int = 40

    def __post_init__(self) -> None:
        for name, allowed in (
            ("mode", MODES),
            ("phrases", PHRASE_SOURCES),
            ("crop", CROPS),
            ("dtype", DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DataConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in (
            "top_k",
            "batch_size",
            "caption_batch_size",
            "grounding_batch_size",
            "segment_batch_size",
            "clip_batch_size",
            "images_per_shard",
            "caption_max_new_tokens",
            "histogram_bins",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if "{name}" not in self.clip_text_template:
            raise ValueError(
                f"DataConfig.clip_text_template must contain '{{name}}', got {self.clip_text_template!r}"
            )

    @property
    def min_objects(self) -> int:
        """Fewest objects an image needs to be scored: S_pair needs a pair in multi-subject mode."""
        return 2 if self.mode == "multi" else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _check_type(owner: str, spec: dataclasses.Field, value: Any) -> Any:
    """Check `value` against the field's annotation ("float | None", "int", ...); ints pass for floats."""
    names = [part.strip() for part in str(spec.type).split("|")]
    if value is None:
        if "None" in names:
            return None
        raise ValueError(f"{owner}.{spec.name} must not be null")
    allowed = tuple(t for name in names if name != "None" for t in _TYPES.get(name, (object,)))
    # bool is an int subclass: a YAML `true` must not pass for a number
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        raise ValueError(f"{owner}.{spec.name} must be {' or '.join(names)}, got {value!r}")
    return float(value) if "float" in names and "int" not in names else value


def _build(cls: type, data: dict[str, Any], owner: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{owner} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) in {owner}: {unknown}; known: {sorted(known)}")
    values = {}
    for name, value in data.items():
        spec = known[name]
        if spec.type in ("ObjectFilterConfig",):
            values[name] = _build(ObjectFilterConfig, value, f"{owner}.{name}")
        else:
            values[name] = _check_type(owner, spec, value)
    return cls(**values)


def data_config_from_dict(data: dict[str, Any]) -> DataConfig:
    """A DataConfig from a plain mapping (`filters` a nested mapping); unknown keys are errors."""
    return _build(DataConfig, data, "DataConfig")


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Read a `.yaml`/`.yml` or `.toml` file into a DataConfig (keys map 1:1 onto its fields)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml  # optional dependency (the `data` extra)

        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    elif suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser as a package
            import tomli as tomllib

        data = tomllib.loads(path.read_text(encoding="utf-8"))
    else:
        raise ValueError(f"config file {str(path)!r} must end in .yaml, .yml or .toml")
    try:
        return data_config_from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
