"""Fabricated IP-Adapter / MIP-Adapter checkpoints, in the exact key layouts of the published files.

Layouts (docs/formats.md), for a UNet whose ``attn_processors`` are listed as ``k = 0, 1, 2, ...`` (self- and
cross-attention alternating, so cross-attention is odd ``k``):

``ip_adapter`` (one entry per cross-attention processor, i.e. names ending in ``attn2.processor``)::

    "{k}.to_k_ip.weight"        [C, cross_attention_dim]   C = that attention's to_k.out_features
    "{k}.to_v_ip.weight"        [C, cross_attention_dim]
    "{k}.text_to_weight.weight" [1, C]                     MIP checkpoints only

``image_proj``, basic (h94 ``ImageProjModel``: Linear, reshape to `num_tokens` tokens, LayerNorm)::

    proj.weight [num_tokens·cross_dim, image_embed_dim]   proj.bias [num_tokens·cross_dim]
    norm.weight [cross_dim]                               norm.bias [cross_dim]

``image_proj``, plus (h94 ``Resampler``: a Perceiver over the image encoder's penultimate hidden states,
``inner = heads·64``)::

    latents [1, num_tokens, hidden]
    proj_in.weight [hidden, image_embed_dim]   proj_in.bias [hidden]
    proj_out.weight [cross_dim, hidden]        proj_out.bias [cross_dim]
    norm_out.weight, norm_out.bias [cross_dim]
    layers.L.0.norm1.{weight,bias} [hidden]    layers.L.0.norm2.{weight,bias} [hidden]
    layers.L.0.to_q.weight [inner, hidden]     layers.L.0.to_kv.weight [2·inner, hidden]  (K rows, then V)
    layers.L.0.to_out.weight [hidden, inner]
    layers.L.1.0.{weight,bias} [hidden]        (LayerNorm)
    layers.L.1.1.weight [4·hidden, hidden]     layers.L.1.3.weight [hidden, 4·hidden]  (GELU between)

Files: ``.bin`` holds the nested dict ``{"image_proj": {...}, "ip_adapter": {...}}`` (``torch.save``; loads
with ``torch.load(..., weights_only=True)``), ``.safetensors`` the same tensors under flat keys
``image_proj.<key>`` / ``ip_adapter.<key>``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers import UNet2DConditionModel

__all__ = [
    "IPAdapterState",
    "TinyCheckpointFiles",
    "cross_attention_layers",
    "fabricate_ip_adapter_state",
    "flatten_state",
    "save_checkpoint",
    "tiny_checkpoint_files",
]

IPAdapterState = dict[str, dict[str, torch.Tensor]]
"""``{"image_proj": {key: tensor}, "ip_adapter": {key: tensor}}``."""

RESAMPLER_HEAD_DIM = 64
"""Head dim of the h94 Resampler (diffusers infers ``heads = to_q.weight.shape[0] // 64``)."""


def cross_attention_layers(unet: UNet2DConditionModel) -> list[tuple[int, str, int, int]]:
    """The cross-attention processors of `unet` as ``(k, name, C, cross_attention_dim)``.

    ``k`` is the position of the processor in ``unet.attn_processors`` (self-attention included), ``name``
    its key (``...attn2.processor``), ``C`` the attention's ``to_k.out_features`` and ``cross_attention_dim``
    its ``to_k.in_features``.
    """
    layers = []
    for k, name in enumerate(unet.attn_processors):
        if not name.endswith("attn2.processor"):
            continue
        attention = unet.get_submodule(name.removesuffix(".processor"))
        layers.append((k, name, attention.to_k.out_features, attention.to_k.in_features))
    return layers


def _normal(
    shape: tuple[int, ...], std: float, generator: torch.Generator, mean: float = 0.0
) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std + mean


def fabricate_ip_adapter_state(
    unet: UNet2DConditionModel,
    image_embed_dim: int,
    kind: Literal["basic", "plus"] = "basic",
    text_weight: bool = False,
    num_tokens: int | None = None,
    plus_hidden_dim: int = 64,
    plus_depth: int = 4,
    plus_heads: int = 2,
    seed: int = 0,
    std: float = 0.02,
) -> IPAdapterState:
    """Random IP-Adapter (or, with ``text_weight=True``, MIP-Adapter) weights for `unet`, in h94's layout.

    Args:
        unet: decides the ``ip_adapter`` keys (``k`` of every cross-attention processor) and shapes
            ([C, cross_attention_dim]) and the projection's output width (``cross_attention_dim``).
        image_embed_dim: the image encoder feature the projection reads: ``projection_dim`` of the
            encoder for ``basic`` ([b, image_embed_dim]), its ``hidden_size`` for ``plus`` (penultimate
            hidden states, [b, tokens, image_embed_dim]).
        kind: ``"basic"`` (``ImageProjModel``) or ``"plus"`` (``Resampler``).
        text_weight: add MIP's ``"{k}.text_to_weight.weight" [1, C]``.
        num_tokens: image tokens per image: 4 (basic) / 16 (plus) by default. diffusers' loader only reads
            basic checkpoints with 4.
        plus_hidden_dim, plus_depth, plus_heads: Resampler width, layers and heads (heads of 64). h94 uses
            depth 4; diffusers' loader only reads depth 4.
        seed: all tensors are drawn from a CPU ``torch.Generator`` seeded with it, in key order.
        std: std of weights and biases; LayerNorm weights are ``1 + std·N(0, 1)``; ``latents`` are
            ``N(0, 1) / sqrt(hidden)`` as in h94's initialisation.

    Returns:
        ``{"image_proj": {...}, "ip_adapter": {...}}``, float32 CPU tensors.
    """
    if kind not in ("basic", "plus"):
        raise ValueError(f"kind must be 'basic' or 'plus', got {kind!r}")
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError("the UNet has no cross-attention processors (names ending in 'attn2.processor')")
    cross_dims = {cross for _, _, _, cross in layers}
    if len(cross_dims) != 1:
        raise ValueError(f"cross-attention layers disagree on cross_attention_dim: {sorted(cross_dims)}")
    (cross_dim,) = cross_dims
    tokens = num_tokens if num_tokens is not None else (4 if kind == "basic" else 16)
    if tokens < 1 or image_embed_dim < 1:
        raise ValueError(f"num_tokens ({tokens}) and image_embed_dim ({image_embed_dim}) must be positive")

    generator = torch.Generator().manual_seed(seed)

    def weight(*shape: int) -> torch.Tensor:
        return _normal(shape, std, generator)

    def norm_weight(dim: int) -> torch.Tensor:
        return _normal((dim,), std, generator, mean=1.0)

    image_proj: dict[str, torch.Tensor] = {}
    if kind == "basic":
        image_proj["proj.weight"] = weight(tokens * cross_dim, image_embed_dim)
        image_proj["proj.bias"] = weight(tokens * cross_dim)
        image_proj["norm.weight"] = norm_weight(cross_dim)
        image_proj["norm.bias"] = weight(cross_dim)
    else:
        if plus_depth < 1 or plus_heads < 1 or plus_hidden_dim < 1:
            raise ValueError(
                f"plus_depth ({plus_depth}), plus_heads ({plus_heads}), plus_hidden_dim ({plus_hidden_dim}) "
                "must be positive"
            )
        hidden, inner = plus_hidden_dim, plus_heads * RESAMPLER_HEAD_DIM
        image_proj["latents"] = torch.randn((1, tokens, hidden), generator=generator) / hidden**0.5
        image_proj["proj_in.weight"] = weight(hidden, image_embed_dim)
        image_proj["proj_in.bias"] = weight(hidden)
        image_proj["proj_out.weight"] = weight(cross_dim, hidden)
        image_proj["proj_out.bias"] = weight(cross_dim)
        image_proj["norm_out.weight"] = norm_weight(cross_dim)
        image_proj["norm_out.bias"] = weight(cross_dim)
        for layer in range(plus_depth):
            attn, ff = f"layers.{layer}.0", f"layers.{layer}.1"
            image_proj[f"{attn}.norm1.weight"] = norm_weight(hidden)
            image_proj[f"{attn}.norm1.bias"] = weight(hidden)
            image_proj[f"{attn}.norm2.weight"] = norm_weight(hidden)
            image_proj[f"{attn}.norm2.bias"] = weight(hidden)
            image_proj[f"{attn}.to_q.weight"] = weight(inner, hidden)
            image_proj[f"{attn}.to_kv.weight"] = weight(2 * inner, hidden)  # [K; V] stacked on dim 0
            image_proj[f"{attn}.to_out.weight"] = weight(hidden, inner)
            image_proj[f"{ff}.0.weight"] = norm_weight(hidden)
            image_proj[f"{ff}.0.bias"] = weight(hidden)
            image_proj[f"{ff}.1.weight"] = weight(4 * hidden, hidden)
            image_proj[f"{ff}.3.weight"] = weight(hidden, 4 * hidden)

    ip_adapter: dict[str, torch.Tensor] = {}
    for k, _name, channels, _cross in layers:
        ip_adapter[f"{k}.to_k_ip.weight"] = weight(channels, cross_dim)
        ip_adapter[f"{k}.to_v_ip.weight"] = weight(channels, cross_dim)
        if text_weight:
            ip_adapter[f"{k}.text_to_weight.weight"] = weight(1, channels)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _check_state(state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    if set(state) != {"image_proj", "ip_adapter"}:
        raise ValueError(
            f"a checkpoint state has exactly the groups 'image_proj' and 'ip_adapter', got {sorted(state)}"
        )


def flatten_state(state: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{"image_proj": {k: t}, "ip_adapter": {k: t}}`` -> ``{"image_proj.k": t, "ip_adapter.k": t}``."""
    _check_state(state)
    return {
        f"{group}.{key}": tensor
        for group in ("image_proj", "ip_adapter")
        for key, tensor in state[group].items()
    }


def _cast(state: Mapping[str, Mapping[str, torch.Tensor]], dtype: torch.dtype | None) -> IPAdapterState:
    return {
        group: {
            key: (t if dtype is None else t.to(dtype)).detach().contiguous() for key, t in tensors.items()
        }
        for group, tensors in state.items()
    }


def save_checkpoint(
    state: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `state` as h94 does: ``.bin`` = ``torch.save`` of the nested dict, ``.safetensors`` = flat keys.

    Args:
        state: ``{"image_proj": {...}, "ip_adapter": {...}}``.
        path: file name ending in ``.bin`` or ``.safetensors``; the folder must exist.
        dtype: cast every tensor first (the published files are ``torch.float16``); None keeps them.

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    _check_state(state)
    tensors = _cast(state, dtype)
    if path.suffix == ".bin":
        torch.save(tensors, path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(flatten_state(tensors), path)
    else:
        raise ValueError(f"checkpoint file must end in .bin or .safetensors, got {path.name!r}")
    return path


@dataclass(frozen=True)
class TinyCheckpointFiles:
    """Paths written by `tiny_checkpoint_files`, laid out like h94/IP-Adapter plus the MIP files.

    ``states`` holds what each file contains (after the dtype cast), keyed ``"basic"``, ``"plus"``,
    ``"mip_basic"``, ``"mip_plus"`` (``basic_safetensors`` holds ``states["basic"]``).
    """

    root: Path
    arch: str  # "sdxl" | "sd15"
    basic_bin: Path
    basic_safetensors: Path
    plus_bin: Path
    mip_basic_bin: Path
    mip_plus_bin: Path
    basic_image_encoder: Path  # folder written by save_pretrained
    plus_image_encoder: Path
    states: Mapping[str, IPAdapterState] = field(repr=False)

    def load_ip_adapter_kwargs(self, name: str) -> dict[str, str]:
        """Arguments of diffusers' ``pipe.load_ip_adapter(**kwargs)`` for one file of this set.

        `name` is one of ``basic_bin``, ``basic_safetensors``, ``plus_bin``, ``mip_basic_bin``,
        ``mip_plus_bin``. The image encoder paired with the file is loaded from ``root`` too.
        """
        files = ("basic_bin", "basic_safetensors", "plus_bin", "mip_basic_bin", "mip_plus_bin")
        if name not in files:
            raise ValueError(f"name must be one of {files}, got {name!r}")
        path: Path = getattr(self, name)
        encoder = self.plus_image_encoder if "plus" in name else self.basic_image_encoder
        return {
            "pretrained_model_name_or_path_or_dict": str(self.root),
            "subfolder": "" if path.parent == self.root else path.parent.relative_to(self.root).as_posix(),
            "weight_name": path.name,
            # a value with a "/" is taken by diffusers relative to the root, not to the subfolder
            "image_encoder_folder": encoder.relative_to(self.root).as_posix(),
        }


def tiny_checkpoint_files(
    tmpdir: str | os.PathLike[str],
    pipe,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float16,
) -> TinyCheckpointFiles:
    """Write the usual checkpoint set for a tiny pipeline (`tiny_sdxl_pipeline` / `tiny_sd15_pipeline`).

    Layout under `tmpdir` (SDXL; SD1.5 in brackets), mirroring h94/IP-Adapter and hqhQAQ/MIP-Adapter::

        sdxl_models/ip-adapter_sdxl.bin               [models/ip-adapter_sd15.bin]          basic
        sdxl_models/ip-adapter_sdxl.safetensors       [models/ip-adapter_sd15.safetensors]  basic, flat keys
        sdxl_models/ip-adapter-plus_sdxl_vit-h.bin    [models/ip-adapter-plus_sd15.bin]     plus
        sdxl_models/image_encoder/                    [-]  tiny ViT-bigG stand-in (basic SDXL)
        models/image_encoder/                         tiny ViT-H stand-in (plus; basic SD1.5)
        model_sdxl.bin                                [model_sd15.bin]       MIP basic (+ text_to_weight)
        model_sdxl_plus.bin                           [model_sd15_plus.bin]  MIP plus (+ text_to_weight)

    (No SD1.5 MIP checkpoint is published; the SD1.5 MIP files exist for tests.) MIP files share
    ``image_proj`` with the h94 file of the same kind (the authors froze it) and have their own
    ``to_k_ip`` / ``to_v_ip`` / ``text_to_weight``. Image encoder sizes: `TinySpec.basic_image_encoder` and
    ``plus_image_encoder`` of the pipeline's arch. Plus checkpoints use `fabricate_ip_adapter_state`'s
    default Resampler (hidden 64, depth 4, 2 heads of 64, 16 tokens).

    Args:
        tmpdir: an existing folder.
        pipe: a tiny pipeline; SDXL when it has ``text_encoder_2``.
        seed: base seed of every fabricated tensor and of the image encoders.
        dtype: dtype of the tensors in the checkpoint files (published files are float16); None keeps float32.
    """
    from mipadapter.testing.tiny import TINY_SD15, TINY_SDXL

    root = Path(tmpdir)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    spec = TINY_SDXL if sdxl else TINY_SD15
    unet = pipe.unet
    if unet.config.cross_attention_dim != spec.cross_attention_dim:
        raise ValueError(
            f"pipe.unet has cross_attention_dim {unet.config.cross_attention_dim}, the tiny {spec.arch} spec "
            f"{spec.cross_attention_dim}: pass a pipeline from tiny_{spec.arch}_pipeline()"
        )

    plus_encoder_dir = root / "models" / "image_encoder"
    if sdxl:
        sub = root / "sdxl_models"
        basic_encoder_dir = sub / "image_encoder"
        names = ("ip-adapter_sdxl", "ip-adapter-plus_sdxl_vit-h", "model_sdxl", "model_sdxl_plus")
    else:
        sub = root / "models"
        basic_encoder_dir = plus_encoder_dir
        names = ("ip-adapter_sd15", "ip-adapter-plus_sd15", "model_sd15", "model_sd15_plus")
    sub.mkdir(parents=True, exist_ok=True)

    basic_embed = spec.basic_image_encoder.projection_dim
    plus_embed = spec.plus_image_encoder.hidden_size
    basic = fabricate_ip_adapter_state(unet, basic_embed, "basic", seed=seed)
    plus = fabricate_ip_adapter_state(unet, plus_embed, "plus", seed=seed + 1)
    mip_basic = fabricate_ip_adapter_state(unet, basic_embed, "basic", text_weight=True, seed=seed + 2)
    mip_plus = fabricate_ip_adapter_state(unet, plus_embed, "plus", text_weight=True, seed=seed + 3)
    mip_basic["image_proj"] = dict(basic["image_proj"])
    mip_plus["image_proj"] = dict(plus["image_proj"])
    states = {
        name: _cast(state, dtype)
        for name, state in (
            ("basic", basic),
            ("plus", plus),
            ("mip_basic", mip_basic),
            ("mip_plus", mip_plus),
        )
    }

    basic_bin = save_checkpoint(states["basic"], sub / f"{names[0]}.bin")
    basic_safetensors = save_checkpoint(states["basic"], sub / f"{names[0]}.safetensors")
    plus_bin = save_checkpoint(states["plus"], sub / f"{names[1]}.bin")
    mip_basic_bin = save_checkpoint(states["mip_basic"], root / f"{names[2]}.bin")
    mip_plus_bin = save_checkpoint(states["mip_plus"], root / f"{names[3]}.bin")

    encoders = {basic_encoder_dir: spec.basic_image_encoder, plus_encoder_dir: spec.plus_image_encoder}
    for offset, (folder, encoder_spec) in enumerate(encoders.items()):
        model, _processor = encoder_spec.build(seed=seed + 10 + offset)
        model.save_pretrained(folder)

    return TinyCheckpointFiles(
        root=root,
        arch=spec.arch,
        basic_bin=basic_bin,
        basic_safetensors=basic_safetensors,
        plus_bin=plus_bin,
        mip_basic_bin=mip_basic_bin,
        mip_plus_bin=mip_plus_bin,
        basic_image_encoder=basic_encoder_dir,
        plus_image_encoder=plus_encoder_dir,
        states=states,
    )
