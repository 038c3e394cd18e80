"""A tiny FLUX.1 pipeline and XLabs FLUX IP-Adapter files with random weights, built offline from configs.

They keep the structure that FLUX's IP-Adapter and the routing depend on (docs/flux.md), at toy widths:

* a ``FluxTransformer2DModel`` with double-stream blocks (joint attention, where the IP-Adapter sits) and
  single-stream blocks, guidance-distilled like FLUX.1-dev (``guidance_embeds=True``), RoPE axes summing to
  the head dim; its three widths differ as FLUX.1's do (inner 32 ≠ ``joint_attention_dim`` 48 ≠
  ``pooled_projection_dim`` 24; FLUX.1: 3072, 4096, 768), so a transposed or misplaced weight cannot load;
* a T5 encoder (``T5EncoderModel``, the sequence encoder) with a T5 tokenizer built here with the
  ``tokenizers`` library (see `build_t5_tokenizer`), and a CLIP text encoder (pooled prompt) with the CLIP
  tokenizer of `mipadapter.testing.tokenizer`;
* a FLUX-style VAE (16 latent channels, FLUX's scaling and shift factors, no quant convs, scale factor 8) and
  FLUX.1-dev's flow-matching scheduler settings.

Weights are random but a pure function of ``seed``, drawn under ``torch.random.fork_rng`` (the caller's RNG
is left untouched); everything is float32, on the CPU, in eval mode. Sizes are in `TINY_FLUX`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from mipadapter.checkpoint.xlabs import XLABS, XLabsConfig, expected_shapes
from mipadapter.fileio import atomic_write
from mipadapter.testing.tiny import TinyImageEncoderSpec, clip_text_config, seeded, set_eval, tiny_vae
from mipadapter.testing.tokenizer import FALLBACK_WORDS, VocabChoice, build_clip_tokenizer

__all__ = [
    "T5_MAX_LENGTH",
    "TINY_FLUX",
    "TINY_VIT_L",
    "TinyFluxIPFiles",
    "TinyFluxSpec",
    "build_t5_tokenizer",
    "fabricate_xlabs_state",
    "save_xlabs_file",
    "tiny_flux_ip_files",
    "tiny_flux_pipeline",
]

T5_MAX_LENGTH = 512
"""The T5 tokenizer's context length in FLUX.1 (``max_sequence_length`` is at most 512)."""

TINY_VIT_L = TinyImageEncoderSpec(
    "OpenAI CLIP ViT-L/14 (projection 768, hidden 1024)", projection_dim=20, hidden_size=40
)
"""The image encoder of XLabs' FLUX IP-Adapter (``openai/clip-vit-large-patch14``), at toy size."""


@dataclass(frozen=True)
class TinyFluxSpec:
    """Sizes of the tiny FLUX. Comments give FLUX.1-dev's values in parentheses."""

    num_layers: int  # double-stream blocks (19)
    num_single_layers: int  # single-stream blocks (38)
    num_attention_heads: int  # (24)
    attention_head_dim: int  # (128)
    axes_dims_rope: tuple[int, int, int]  # RoPE dims per id axis, sum = head dim ((16, 56, 56))
    joint_attention_dim: int  # = T5 d_model: width of the text tokens entering the transformer (4096)
    pooled_projection_dim: int  # = CLIP text hidden size: the pooled prompt (768)
    latent_channels: int  # VAE latent channels (16); the transformer reads 2x2 patches: 4x as many
    vae_block_out_channels: tuple[int, ...]  # 4 levels -> VAE scale factor 8 ((128, 256, 512, 512))
    t5_layers: int  # (24)
    t5_heads: int  # (64)
    t5_d_kv: int  # (64)
    t5_d_ff: int  # (10240)
    default_image_side: int  # pixel side of the default output (FLUX.1: 1024)
    image_encoder: TinyImageEncoderSpec  # CLIP ViT-L/14 for XLabs' IP-Adapter

    @property
    def inner_dim(self) -> int:
        """The transformer's width ``C`` = heads · head dim (3072)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def in_channels(self) -> int:
        """Channels of a packed latent token: 2x2 patches of ``latent_channels`` (64)."""
        return 4 * self.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)


TINY_FLUX = TinyFluxSpec(
    num_layers=3,
    num_single_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    axes_dims_rope=(4, 6, 6),
    joint_attention_dim=48,
    pooled_projection_dim=24,
    latent_channels=16,
    vae_block_out_channels=(8, 16, 32, 32),
    t5_layers=2,
    t5_heads=4,
    t5_d_kv=8,
    t5_d_ff=64,
    default_image_side=64,
    image_encoder=TINY_VIT_L,
)
"""Tiny FLUX: inner width 32 (2 heads of 16), text width 48, pooled 24, 3 double- and 2 single-stream blocks;
a 64x64 image is an 8x8 latent, packed to 4x4 = 16 image tokens."""

FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159

_UNK_CHARACTER_SCORE = -10.0  # a single character: far below any whole word, so words win
_WORD_SCORE = -3.0


def build_t5_tokenizer(
    words: Iterable[str] = FALLBACK_WORDS, *, model_max_length: int = T5_MAX_LENGTH
) -> T5Tokenizer:
    """A small T5 tokenizer (SentencePiece-style Unigram) built offline with the ``tokenizers`` library.

    Like FLUX.1's T5 tokenizer: ids ``<pad>`` = 0, ``</s>`` = 1 (appended to every sequence), ``<unk>`` = 2;
    words are split on whitespace and marked with ``▁`` (Metaspace); case-sensitive, no normalisation. Its
    vocabulary: each of ``words`` is one token (``▁word``), and every printable ASCII character, alone and
    word-initial, is a token too, so any ASCII text tokenises into pieces and never maps to ``<unk>``. No
    sentinel (``<extra_id_*>``) tokens. Its ids mean nothing outside this package.
    """
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for word in sorted(set(words)):
        pieces.setdefault("▁" + word, _WORD_SCORE)
    characters = [chr(code) for code in range(33, 127)]  # printable ASCII without the space
    for character in characters:
        pieces.setdefault(character, _UNK_CHARACTER_SCORE)
        pieces.setdefault("▁" + character, _UNK_CHARACTER_SCORE - 0.5)
    return T5Tokenizer(vocab=list(pieces.items()), extra_ids=0, model_max_length=model_max_length)


def _transformer(spec: TinyFluxSpec) -> FluxTransformer2DModel:
    if sum(spec.axes_dims_rope) != spec.attention_head_dim or any(dim % 2 for dim in spec.axes_dims_rope):
        raise ValueError(f"RoPE axes {spec.axes_dims_rope} must be even and sum to the head dim {spec.attention_head_dim}")
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=spec.in_channels,
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.joint_attention_dim,
        pooled_projection_dim=spec.pooled_projection_dim,
        guidance_embeds=True,
        axes_dims_rope=spec.axes_dims_rope,
    )


def _vae(spec: TinyFluxSpec) -> AutoencoderKL:
    return tiny_vae(
        spec.vae_block_out_channels,
        spec.latent_channels,
        spec.default_image_side,
        FLUX_VAE_SCALING_FACTOR,
        FLUX_VAE_SHIFT_FACTOR,
        quant_conv=False,
    )


def _t5(spec: TinyFluxSpec, tokenizer: T5Tokenizer) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=spec.joint_attention_dim,
        d_kv=spec.t5_d_kv,
        d_ff=spec.t5_d_ff,
        num_layers=spec.t5_layers,
        num_heads=spec.t5_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX.1's t5-v1_1-xxl
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return T5EncoderModel(config)


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler settings (resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def tiny_flux_pipeline(seed: int = 0, *, vocab: VocabChoice = "auto") -> FluxPipeline:
    """A ``FluxPipeline`` of `TINY_FLUX` size with random weights fixed by `seed`.

    Components: ``transformer`` (3 double- + 2 single-stream blocks, inner 32, text width 48, pooled 24,
    guidance embedding), ``text_encoder`` (``CLIPTextModel``, hidden 24: the pooled prompt) with ``tokenizer``
    (CLIP, 77 tokens, pad ``<|endoftext|>``), ``text_encoder_2`` (``T5EncoderModel``, d_model 48) with
    ``tokenizer_2`` (`build_t5_tokenizer`, 512 tokens), ``vae`` (16 latent channels, scale factor 8),
    ``scheduler`` (flow matching, FLUX.1-dev's shift settings), ``image_encoder=None``,
    ``feature_extractor=None``. The default output is 64x64 (``default_sample_size`` 8); ``pipe(prompt,
    num_inference_steps=2, output_type="np")`` takes about a second on a CPU. `vocab` picks the CLIP
    tokenizer's vocabulary (see `build_clip_tokenizer`).
    """
    spec = TINY_FLUX
    tokenizer = build_clip_tokenizer(vocab=vocab)
    tokenizer_2 = build_t5_tokenizer()
    with seeded(seed):
        transformer = _transformer(spec)
    with seeded(seed + 1):
        vae = _vae(spec)
    with seeded(seed + 2):
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, spec.pooled_projection_dim, None, "quick_gelu"))
    with seeded(seed + 3):
        text_encoder_2 = _t5(spec, tokenizer_2)
    set_eval(transformer, vae, text_encoder, text_encoder_2)
    pipe = FluxPipeline(
        scheduler=_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.default_sample_size = spec.default_image_side // spec.vae_scale_factor
    return pipe


# --------------------------------------------------------------------------------------------------------
# XLabs FLUX IP-Adapter files


def fabricate_xlabs_state(config: XLabsConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random XLabs FLUX IP-Adapter weights in XLabs' own flat layout (``checkpoint.xlabs``).

    Every tensor is drawn from a CPU ``torch.Generator`` seeded with `seed`, in key order: weights and biases
    ``N(0, std²)``, the LayerNorm weight ``1 + std·N(0, 1)``. Float32. Use
    ``XLabsConfig.for_transformer(transformer.config, image_embed_dim, num_tokens)`` for a given transformer.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_shapes(config, XLABS).items():
        values = torch.randn(shape, generator=generator, dtype=torch.float32) * std
        state[key] = values + 1.0 if key.endswith("norm.weight") else values
    return state


def save_xlabs_file(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a flat state dict as ``.safetensors`` (atomically), as XLabs publish theirs."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {key: value.contiguous() for key, value in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return path


@dataclass(frozen=True)
class TinyFluxIPFiles:
    """An XLabs-layout IP-Adapter file and a saved image encoder for the tiny FLUX.

    Load them as one loads XLabs' release::

        pipe.load_ip_adapter(files.folder, weight_name=files.weight_name,
                             image_encoder_pretrained_model_name_or_path=files.image_encoder,
                             image_encoder_dtype=torch.float32)
    """

    folder: Path
    weight_name: str
    image_encoder: Path
    config: XLabsConfig

    @property
    def weight_path(self) -> Path:
        return self.folder / self.weight_name


def tiny_flux_ip_files(
    folder: str | Path, seed: int = 0, *, num_tokens: int = 4, std: float = 0.02
) -> TinyFluxIPFiles:
    """Write ``ip_adapter.safetensors`` (XLabs layout, sized for `tiny_flux_pipeline`) and ``image_encoder/``
    (the tiny CLIP ViT-L, `TINY_VIT_L`, saved with ``save_pretrained``) under `folder`.

    num_tokens: image tokens per image; diffusers' loader reads 4 for any file whose ``proj.weight`` does
    not have 65,536 rows (real v2 files have 16·4096 = 65,536), so tiny files must use 4.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = TINY_FLUX
    config = XLabsConfig(
        num_blocks=spec.num_layers,
        hidden_size=spec.inner_dim,
        cross_attention_dim=spec.joint_attention_dim,
        image_embed_dim=spec.image_encoder.projection_dim,
        num_tokens=num_tokens,
    )
    weight_name = "ip_adapter.safetensors"
    save_xlabs_file(fabricate_xlabs_state(config, seed=seed, std=std), folder / weight_name)
    encoder, _ = spec.image_encoder.build(seed)
    encoder_dir = folder / "image_encoder"
    encoder.save_pretrained(encoder_dir)
    return TinyFluxIPFiles(folder=folder, weight_name=weight_name, image_encoder=encoder_dir, config=config)
