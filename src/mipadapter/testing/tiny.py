"""Tiny SD1.5 / SDXL pipelines and CLIP image encoders with random weights, built offline from configs.

They keep the *structure* of the real models that IP-Adapter and MIP-Adapter depend on, at toy widths:

* a UNet whose cross-attention layers sit in the down blocks, the up blocks *and* the mid block, at two
  widths (so ``C`` differs between layers, as 640/1280 do in SDXL), with ``cross_attention_dim`` different
  from every ``C`` (a transposed ``to_k_ip`` cannot load by accident);
* SDXL: two text encoders (``CLIPTextModel`` + ``CLIPTextModelWithProjection``) whose hidden sizes add up to
  the UNet's ``cross_attention_dim``, and ``text_time`` added conditioning sized from the second encoder's
  projection; SD1.5: one text encoder;
* a VAE with 4 levels (scale factor 8, like the real ones), so a 64x64 image is an 8x8 latent;
* real CLIP tokenizers (see `mipadapter.testing.tokenizer`) with 77-token context.

Weights are random but a pure function of ``seed`` (drawn under ``torch.random.fork_rng``, so the caller's
global RNG is left untouched). Everything is float32, on the CPU, in eval mode. Sizes are in `TINY_SDXL`
and `TINY_SD15` (`TinySpec`).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from transformers.image_processing_utils import BaseImageProcessor

from mipadapter.testing.tokenizer import CLIP_MAX_LENGTH, VocabChoice, build_clip_tokenizer

__all__ = [
    "TINY_SD15",
    "TINY_SDXL",
    "TINY_VIT_BIGG",
    "TINY_VIT_H",
    "TinyImageEncoderSpec",
    "TinySpec",
    "tiny_image_encoder",
    "tiny_sd15_pipeline",
    "tiny_sdxl_pipeline",
]

# OpenAI CLIP pixel statistics (what every SD image encoder's processor uses).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TinyImageEncoderSpec:
    """Sizes of a tiny CLIP image encoder standing in for a real one (see `tiny_image_encoder`).

    A basic IP-Adapter reads ``image_embeds`` [b, projection_dim]; IP-Adapter-Plus reads the penultimate
    hidden states [b, tokens, hidden_size].
    """

    stands_for: str
    projection_dim: int
    hidden_size: int
    image_size: int = 32
    patch_size: int = 8

    @property
    def tokens(self) -> int:
        """Tokens of the hidden states: patches + CLS (ViT-H/14 at 224 px: 257)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def build(self, seed: int = 0) -> tuple[CLIPVisionModelWithProjection, BaseImageProcessor]:
        """`tiny_image_encoder` with these sizes."""
        return tiny_image_encoder(
            self.projection_dim,
            self.hidden_size,
            seed,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )


TINY_VIT_H = TinyImageEncoderSpec(
    "OpenCLIP ViT-H/14 (projection 1024, hidden 1280)", projection_dim=24, hidden_size=48
)
TINY_VIT_BIGG = TinyImageEncoderSpec(
    "OpenCLIP ViT-bigG/14 (projection 1280, hidden 1664)", projection_dim=40, hidden_size=56
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of one tiny architecture. Comments give the real models' values in parentheses.

    ``num_cross_attention_layers`` counts the UNet's ``attn2`` modules (SDXL 70, SD1.5 16); the processors
    of ``unet.attn_processors`` are twice as many (``attn1`` and ``attn2`` alternate), so the IP-Adapter
    keys are ``k = 1, 3, ..., 2·num_cross_attention_layers - 1``.
    """

    arch: str  # "sdxl" | "sd15"
    block_out_channels: tuple[int, ...]  # UNet widths = C of each level's attention (SDXL 320/640/1280)
    attention_heads: tuple[int, ...]  # heads per level (diffusers' `attention_head_dim`); head dim 16 here
    layers_per_block: int  # resnet+attention pairs per down block; up blocks have one more (real: 2)
    transformer_layers_per_block: tuple[int, ...]  # transformer depth per level (SDXL 1/2/10, SD1.5 1)
    text_hidden_sizes: tuple[int, ...]  # hidden size of each text encoder (SDXL 768 + 1280, SD1.5 768)
    text_projection_dim: int | None  # pooled projection of the last text encoder (SDXL 1280), else None
    addition_time_embed_dim: int | None  # SDXL micro-conditioning embedding (256), else None
    cross_attention_dim: int  # = sum(text_hidden_sizes) (SDXL 2048, SD1.5 768)
    num_cross_attention_layers: int  # attn2 modules in the UNet (SDXL 70, SD1.5 16)
    vae_block_out_channels: tuple[int, ...]  # 4 levels -> VAE scale factor 8 (128/256/512/512)
    latent_size: int  # UNet sample_size: default image side = 8 * latent_size (SDXL 128, SD1.5 64)
    basic_image_encoder: TinyImageEncoderSpec  # encoder of the basic IP-Adapter (SDXL bigG, SD1.5 ViT-H)
    plus_image_encoder: TinyImageEncoderSpec  # encoder of IP-Adapter-Plus (ViT-H for both)

    @property
    def default_image_side(self) -> int:
        """Pixel side of the pipeline's default output (``latent_size`` times the VAE scale factor)."""
        return self.latent_size * 2 ** (len(self.vae_block_out_channels) - 1)


TINY_SDXL = TinySpec(
    arch="sdxl",
    block_out_channels=(32, 64),
    attention_heads=(2, 4),
    layers_per_block=1,
    transformer_layers_per_block=(1, 2),
    text_hidden_sizes=(32, 64),
    text_projection_dim=32,
    addition_time_embed_dim=8,
    cross_attention_dim=96,
    # down 1·1 + 1·2, up 2·2 + 2·1 (depths reversed), mid 2 -> 11
    num_cross_attention_layers=11,
    vae_block_out_channels=(8, 16, 32, 32),
    latent_size=8,
    basic_image_encoder=TINY_VIT_BIGG,
    plus_image_encoder=TINY_VIT_H,
)
"""Tiny SDXL: C in {32, 64}, cross_attention_dim 96 = 32 + 64, 11 cross-attention layers (k = 1..21)."""

TINY_SD15 = TinySpec(
    arch="sd15",
    block_out_channels=(32, 64),
    attention_heads=(2, 4),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1),
    text_hidden_sizes=(48,),
    text_projection_dim=None,
    addition_time_embed_dim=None,
    cross_attention_dim=48,
    # down 1 + 1, up 2 + 2, mid 1 -> 7
    num_cross_attention_layers=7,
    vae_block_out_channels=(8, 16, 32, 32),
    latent_size=8,
    basic_image_encoder=TINY_VIT_H,
    plus_image_encoder=TINY_VIT_H,
)
"""Tiny SD1.5: C in {32, 64}, cross_attention_dim 48, 7 cross-attention layers (k = 1..13)."""


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from a CPU RNG seeded with `seed`, restoring the caller's global RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _unet(spec: TinySpec) -> UNet2DConditionModel:
    levels = len(spec.block_out_channels)
    kwargs: dict = {}
    if spec.arch == "sdxl":
        assert spec.addition_time_embed_dim is not None and spec.text_projection_dim is not None
        kwargs = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=spec.addition_time_embed_dim,
            # 6 micro-conditioning numbers (original size, crop offset, target size) + pooled text
            projection_class_embeddings_input_dim=6 * spec.addition_time_embed_dim + spec.text_projection_dim,
            use_linear_projection=True,
        )
    return UNet2DConditionModel(
        sample_size=spec.latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        transformer_layers_per_block=spec.transformer_layers_per_block,
        attention_head_dim=spec.attention_heads,
        cross_attention_dim=spec.cross_attention_dim,
        norm_num_groups=8,
        **kwargs,
    )


def tiny_vae(
    block_out_channels: tuple[int, ...],
    latent_channels: int,
    sample_size: int,
    scaling_factor: float,
    shift_factor: float | None = None,
    quant_conv: bool = True,
) -> AutoencoderKL:
    """A small ``AutoencoderKL`` with one level per entry of ``block_out_channels`` (scale factor
    ``2**(levels - 1)``); SD/SDXL VAEs have 4 latent channels and quant convs, FLUX's 16 and none."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def _vae(spec: TinySpec) -> AutoencoderKL:
    scaling = 0.13025 if spec.arch == "sdxl" else 0.18215
    return tiny_vae(spec.vae_block_out_channels, 4, spec.default_image_side, scaling)


def clip_text_config(
    tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int | None, act: str
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,  # SDXL reads the penultimate hidden states: keep at least 2
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=act,
        projection_dim=projection_dim if projection_dim is not None else hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _check_spec(spec: TinySpec) -> None:
    if sum(spec.text_hidden_sizes) != spec.cross_attention_dim:
        raise ValueError(
            f"text hidden sizes {spec.text_hidden_sizes} must sum to cross_attention_dim {spec.cross_attention_dim}"
        )


def _count_cross_attention(unet: UNet2DConditionModel, spec: TinySpec) -> None:
    found = sum(name.endswith("attn2.processor") for name in unet.attn_processors)
    if found != spec.num_cross_attention_layers:
        raise AssertionError(
            f"{spec.arch}: built {found} cross-attention layers, spec says {spec.num_cross_attention_layers}"
        )


def set_eval(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.float().eval().requires_grad_(False)


def tiny_sdxl_pipeline(seed: int = 0, *, vocab: VocabChoice = "auto") -> StableDiffusionXLPipeline:
    """A `StableDiffusionXLPipeline` of `TINY_SDXL` size with random weights fixed by `seed`.

    Components: ``unet`` (C 32/64, ``cross_attention_dim`` 96, 11 cross-attention layers, ``text_time``
    conditioning), ``text_encoder`` (``CLIPTextModel``, hidden 32 -> prompt embeds [b, 77, 32]),
    ``text_encoder_2`` (``CLIPTextModelWithProjection``, hidden 64, projection 32 -> [b, 77, 64] and pooled
    [b, 32]), ``tokenizer`` / ``tokenizer_2`` (CLIP, pad ``<|endoftext|>`` / ``"!"``), ``vae`` (scale factor 8),
    ``scheduler`` (Euler, SDXL's betas), ``image_encoder=None``, ``feature_extractor=None``, no watermarker.
    Default output is 64x64; ``pipe(prompt, num_inference_steps=2, output_type="np")`` takes well under a
    second on a CPU. `vocab` picks the tokenizer vocabulary (see `build_clip_tokenizer`).
    """
    spec = TINY_SDXL
    _check_spec(spec)
    tokenizer = build_clip_tokenizer(vocab=vocab)
    tokenizer_2 = build_clip_tokenizer("!", vocab=vocab)
    with seeded(seed):
        unet = _unet(spec)
    with seeded(seed + 1):
        vae = _vae(spec)
    with seeded(seed + 2):
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, spec.text_hidden_sizes[0], None, "quick_gelu"))
    with seeded(seed + 3):
        text_encoder_2 = CLIPTextModelWithProjection(
            clip_text_config(tokenizer_2, spec.text_hidden_sizes[1], spec.text_projection_dim, "gelu")
        )
    set_eval(unet, vae, text_encoder, text_encoder_2)
    _count_cross_attention(unet, spec)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def tiny_sd15_pipeline(seed: int = 0, *, vocab: VocabChoice = "auto") -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` of `TINY_SD15` size with random weights fixed by `seed`.

    Components: ``unet`` (C 32/64, ``cross_attention_dim`` 48, 7 cross-attention layers), ``text_encoder``
    (``CLIPTextModel``, hidden 48 -> prompt embeds [b, 77, 48]), ``tokenizer`` (CLIP), ``vae`` (scale
    factor 8), ``scheduler`` (DDIM, SD1.5's betas), ``safety_checker=None``, ``feature_extractor=None``,
    ``image_encoder=None``, ``requires_safety_checker=False``. Default output is 64x64.
    """
    spec = TINY_SD15
    _check_spec(spec)
    tokenizer = build_clip_tokenizer(vocab=vocab)
    with seeded(seed):
        unet = _unet(spec)
    with seeded(seed + 1):
        vae = _vae(spec)
    with seeded(seed + 2):
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, spec.text_hidden_sizes[0], None, "quick_gelu"))
    set_eval(unet, vae, text_encoder)
    _count_cross_attention(unet, spec)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _clip_image_processor_class() -> type:
    """`CLIPImageProcessor`, or in transformers 5 without torchvision its PIL twin (what the former
    falls back to anyway, with a warning on every construction)."""
    import transformers

    pil_class = getattr(transformers, "CLIPImageProcessorPil", None)
    if pil_class is not None and importlib.util.find_spec("torchvision") is None:
        return pil_class
    return transformers.CLIPImageProcessor


def tiny_image_encoder(
    projection_dim: int,
    hidden_size: int = 48,
    seed: int = 0,
    *,
    image_size: int = 32,
    patch_size: int = 8,
) -> tuple[CLIPVisionModelWithProjection, BaseImageProcessor]:
    """A tiny CLIP image encoder and its image processor (random weights fixed by `seed`).

    Args:
        projection_dim: size of ``image_embeds`` [b, projection_dim] — the input of the basic IP-Adapter
            projection (``image_embed_dim`` of a basic checkpoint; 1280 for ViT-bigG, 1024 for ViT-H).
        hidden_size: size of the hidden states [b, tokens, hidden_size]; IP-Adapter-Plus feeds the
            *penultimate* hidden states (``hidden_states[-2]``) to its resampler, so this is a Plus
            checkpoint's ``image_embed_dim`` (1280 for ViT-H). Must be divisible by 4 (the heads).
        image_size, patch_size: input side and patch; ``tokens = (image_size // patch_size)**2 + 1``
            (17 by default).

    Returns:
        ``(CLIPVisionModelWithProjection, CLIPImageProcessor)``: float32, eval mode, 2 layers, 4 heads; the
        processor resizes the short side to `image_size` and center-crops to ``image_size``², with CLIP's
        mean/std. (In transformers 5 without torchvision the processor is ``CLIPImageProcessorPil``.)
    """
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be divisible by the 4 attention heads, got {hidden_size}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_channels=3,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="gelu",
    )
    with seeded(seed):
        model = CLIPVisionModelWithProjection(config)
    set_eval(model)
    processor = _clip_image_processor_class()(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_normalize=True,
        image_mean=list(_CLIP_MEAN),
        image_std=list(_CLIP_STD),
        do_convert_rgb=True,
    )
    return model, processor
