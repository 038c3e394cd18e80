"""Frozen configuration objects and the enumerations that select behaviour per call."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mipadapter.limits import LARGE_LIMITS, check_number


class MergeRule(str, Enum):
    """How the subjects' image-attention outputs are merged with the text output (docs/method.md).

    * ``uniform``: ``Z_text + Σ s_i·R_i⊙Z_img_i`` — plain IP-Adapter (``R_i`` = 1 unless a region is given).
    * ``paper``: ``g⊙Z_text + Σ s_i·(A_i/mean A_i)⊙Z_img_i`` — the paper's formulas; ``g`` = 1 without a
      trained text weight (the training-free mode on stock IP-Adapter weights).
    * ``official``: ``Z_text + Σ s_i·(A_i/Σ_k A_k)⊙g⊙Z_img_i`` — what the released MIP checkpoints were
      trained with.
    """

    UNIFORM = "uniform"
    PAPER = "paper"
    OFFICIAL = "official"

    @classmethod
    def parse(cls, value: MergeRule | str) -> MergeRule:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(rule.value for rule in cls)
            raise ValueError(f"unknown merge rule {value!r}; choose one of {choices}") from None


class RegionMode(str, Enum):
    """How a user-given region (mask or box) acts on a subject's relevance map."""

    REPLACE = "replace"
    MULTIPLY = "multiply"


class MultiImageMode(str, Enum):
    """How several photos of one subject become one condition.

    * ``mean``: average the projected image tokens (what the authors do).
    * ``each``: each photo is its own condition routed by the subject's relevance map; their outputs are
      averaged (the paper's framing of one condition per reference).
    """

    MEAN = "mean"
    EACH = "each"


class NegativeImage(str, Enum):
    """What the unconditional (negative) side of classifier-free guidance sees in place of the photos.

    * ``black``: a black image through the image encoder and the projection — diffusers' FLUX pipeline
      (``pipeline_flux.py`` ``FluxPipeline.__call__``, ``negative_ip_adapter_image = np.zeros(...)``) and
      XLabs' x-flux (``neg_image_prompt``); the default on FLUX.
    * ``zeros``: IP-Adapter's own unconditional input — a zero embedding (basic projections) or the
      hidden states of all-zero pixels (plus projections), as diffusers' UNet pipelines
      (``prepare_ip_adapter_image_embeds``) and the authors do; the default on UNets.
    """

    BLACK = "black"
    ZEROS = "zeros"

    @classmethod
    def parse(cls, value: NegativeImage | str) -> NegativeImage:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"negative_image must be 'black' or 'zeros', got {value!r}") from None


PROJECTIONS = ("basic", "plus")
ARCHITECTURES = ("unet", "flux")  # where the processors go: a UNet's cross-attention layers, FLUX's double blocks
TEXT_WEIGHT_INITS = ("pytorch", "zeros")  # a fresh text_to_weight: nn.Linear's own (the authors'), or a flat gate


@dataclass(frozen=True)
class AdapterConfig:
    """Shape and defaults of an adapter checkpoint (everything needed to rebuild its modules).

    ``projection`` is ``basic`` (Linear → ``num_tokens`` tokens → LayerNorm, fed the image encoder's
    projected embedding of size ``image_embed_dim``) or ``plus`` (a Perceiver resampler fed the
    encoder's penultimate hidden states, ``image_embed_dim`` wide, with ``resampler_dim`` channels,
    ``resampler_depth`` blocks and ``resampler_heads`` heads of 64). ``architecture``: ``unet`` (SDXL,
    SD1.5: one processor per cross-attention layer, bias-free ``to_k_ip``/``to_v_ip``) or ``flux``
    (FLUX.1: one per double-stream block, ``to_k_ip``/``to_v_ip`` with biases, as XLabs' files have).
    """

    projection: str
    image_embed_dim: int
    cross_attention_dim: int
    num_tokens: int
    text_weight: bool = False
    resampler_dim: int | None = None
    resampler_depth: int | None = None
    resampler_heads: int | None = None
    default_scale: float = 1.0
    architecture: str = "unet"

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.architecture == "flux" and (self.projection != "basic" or self.text_weight):
            raise ValueError("a FLUX adapter has a basic projection and no text weight (XLabs' layout)")
        plus_fields = (self.resampler_dim, self.resampler_depth, self.resampler_heads)
        if self.projection == "plus" and None in plus_fields:
            raise ValueError(f"a plus projection needs resampler_dim/depth/heads, got {plus_fields}")
        if self.projection == "basic" and any(field is not None for field in plus_fields):
            raise ValueError(f"a basic projection takes no resampler fields, got {plus_fields}")
        for name in ("image_embed_dim", "cross_attention_dim", "num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("resampler_dim", "resampler_depth", "resampler_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.text_weight, bool):
            raise ValueError(f"text_weight must be true or false, got {self.text_weight!r}")
        check_number(self.default_scale, "default_scale", 0, LARGE_LIMITS.max_scale)

    @property
    def default_rule(self) -> MergeRule:
        """``official`` for checkpoints trained with a text weight (MIP), ``paper`` otherwise."""
        return MergeRule.OFFICIAL if self.text_weight else MergeRule.PAPER

    @property
    def uses_hidden_states(self) -> bool:
        """Plus adapters read the image encoder's penultimate hidden states, basic ones its embedding."""
        return self.projection == "plus"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        data: dict[str, Any] = json.loads(text)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig fields {unknown}")
        return cls(**data)


AUTHORS_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
"""The negative prompt the authors' inference always encodes (their ``generate`` default)."""


@dataclass(frozen=True)
class Preset:
    """A known combination of public weights (hub ids and files; docs/formats.md) and its call defaults.

    scale: the default image scale; negative_prompt: the default negative prompt (None: none);
    architecture: the base model's denoiser (``unet`` or ``flux``), known without downloading anything.
    """

    base_model: str
    adapter: str
    image_encoder: str
    scale: float
    negative_prompt: str | None = None
    architecture: str = "unet"


PRESETS: dict[str, Preset] = {
    "mip-sdxl": Preset(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "hqhQAQ/MIP-Adapter/model_sdxl.bin",
        "h94/IP-Adapter/sdxl_models/image_encoder",
        0.75,
        AUTHORS_NEGATIVE_PROMPT,
    ),
    "mip-sdxl-plus": Preset(
        "SG161222/RealVisXL_V1.0",
        "hqhQAQ/MIP-Adapter/model_sdxl_plus.bin",
        "h94/IP-Adapter/models/image_encoder",
        0.65,
        AUTHORS_NEGATIVE_PROMPT,
    ),
    "ip-sdxl": Preset(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors",
        "h94/IP-Adapter/sdxl_models/image_encoder",
        0.6,
    ),
    "ip-sdxl-plus": Preset(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.bin",
        "h94/IP-Adapter/models/image_encoder",
        0.6,
    ),
    "ip-sd15": Preset(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "h94/IP-Adapter/models/ip-adapter_sd15.bin",
        "h94/IP-Adapter/models/image_encoder",
        0.6,
    ),
    "ip-sd15-plus": Preset(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "h94/IP-Adapter/models/ip-adapter-plus_sd15.bin",
        "h94/IP-Adapter/models/image_encoder",
        0.6,
    ),
    "ip-sdxl-plus-face": Preset(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "h94/IP-Adapter/sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",
        "h94/IP-Adapter/models/image_encoder",
        0.6,
    ),
    "ip-sd15-plus-face": Preset(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "h94/IP-Adapter/models/ip-adapter-plus-face_sd15.safetensors",
        "h94/IP-Adapter/models/image_encoder",
        0.6,
    ),
    "ip-flux": Preset(
        "black-forest-labs/FLUX.1-dev",
        "XLabs-AI/flux-ip-adapter-v2/ip_adapter.safetensors",
        "openai/clip-vit-large-patch14",
        1.0,  # x-flux's ip_scale default and diffusers' FLUX example; XLabs' card says to tune it (docs/flux.md)
        architecture="flux",
    ),
}
DEFAULT_PRESET = "mip-sdxl"
