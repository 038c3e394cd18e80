"""XLabs FLUX IP-Adapter checkpoints: key tables and strict, pure converters (docs/flux.md, "Checkpoints").

Two external layouts hold the same tensors (``i`` = index of the double-stream block, 0 … 18 on FLUX.1;
``C`` = the transformer's inner width, 3072; ``J`` = ``joint_attention_dim``, 4096, the width of the image
tokens; ``E`` = the image encoder's ``image_embeds`` width, 768 for CLIP ViT-L/14; ``T`` = image tokens per
image, 4 in XLabs' v1 file, 16 in v2):

``xlabs`` (the published ``ip_adapter.safetensors``, flat)::

    ip_adapter_proj_model.proj.weight [T·J, E]   ip_adapter_proj_model.proj.bias [T·J]
    ip_adapter_proj_model.norm.weight [J]        ip_adapter_proj_model.norm.bias [J]
    double_blocks.{i}.processor.ip_adapter_double_stream_k_proj.weight [C, J]   (.bias [C])
    double_blocks.{i}.processor.ip_adapter_double_stream_v_proj.weight [C, J]   (.bias [C])

``diffusers`` (what diffusers' ``FluxIPAdapterMixin.load_ip_adapter`` turns the file into; flat here, the
nested ``{"image_proj": …, "ip_adapter": …}`` form is ``convert.nest_flat`` of it)::

    image_proj.proj.weight, image_proj.proj.bias, image_proj.norm.weight, image_proj.norm.bias
    ip_adapter.{i}.to_k_ip.weight, ip_adapter.{i}.to_k_ip.bias, ip_adapter.{i}.to_v_ip.{weight,bias}

Both convert to and from a neutral per-block state: ``image_proj.{proj,norm}.{weight,bias}`` and
``blocks.{i}.{to_k_ip,to_v_ip}.{weight,bias}``. Every conversion checks the keys and shapes first and lists
every missing, unexpected and mis-shaped key at once (``CheckpointError``); tensors are only renamed, never
cast or computed on, so dtype and values are kept bit-exactly. Nothing here reads files or imports diffusers.

Registers the ``xlabs`` layout (recognised by its key prefixes), the key tables of ``xlabs`` and of ``h94``
on FLUX (diffusers' keys share h94's prefixes and carry no marker, so such a file reads as ``h94`` and the
model it is loaded onto picks this table) and the ``xlabs`` save format.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mipadapter.checkpoint import layouts
from mipadapter.checkpoint.convert import CheckpointError, check_keys, from_modules, to_modules
from mipadapter.checkpoint.h94 import LAYOUT as H94
from mipadapter.checkpoint.keymaps import BASIC_IMAGE_PROJ, KeyRule, module_layer_key
from mipadapter.config import AdapterConfig

__all__ = [
    "BLOCK_PARAMS",
    "DIFFUSERS",
    "IMAGE_PROJ_PARAMS",
    "LAYOUTS",
    "XLABS",
    "XLabsConfig",
    "convert_state",
    "detect_layout",
    "expected_shapes",
    "from_neutral",
    "infer_config",
    "infer_flux_config",
    "key_rules",
    "module_rules",
    "neutral_blocks",
    "neutral_shapes",
    "to_neutral",
]

XLABS = "xlabs"
DIFFUSERS = "diffusers"
LAYOUTS = (XLABS, DIFFUSERS)

IMAGE_PROJ_PARAMS = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
BLOCK_PARAMS = ("to_k_ip.weight", "to_k_ip.bias", "to_v_ip.weight", "to_v_ip.bias")

_XLABS_PROJ_PREFIX = "ip_adapter_proj_model."
_XLABS_BLOCK_PREFIX = "double_blocks."
_XLABS_PROJECTION_NAMES = {"to_k_ip": "ip_adapter_double_stream_k_proj", "to_v_ip": "ip_adapter_double_stream_v_proj"}
_DIFFUSERS_PROJ_PREFIX = "image_proj."
_DIFFUSERS_BLOCK_PREFIX = "ip_adapter."
_BLOCK_INDEX = {
    XLABS: re.compile(r"double_blocks\.(\d+)\."),
    DIFFUSERS: re.compile(r"ip_adapter\.(\d+)\."),
}


@dataclass(frozen=True)
class XLabsConfig:
    """What an XLabs FLUX IP-Adapter file holds, read off its shapes (values in parentheses: FLUX.1 + v2).

    num_blocks: double-stream blocks with an IP projection (19); hidden_size: the transformer's inner width,
    rows of ``to_k_ip``/``to_v_ip`` (3072); cross_attention_dim: width of the projected image tokens, =
    ``joint_attention_dim`` (4096); image_embed_dim: the image encoder's ``image_embeds`` width (768);
    num_tokens: image tokens per image (16; 4 in the v1 file).
    """

    num_blocks: int
    hidden_size: int
    cross_attention_dim: int
    image_embed_dim: int
    num_tokens: int

    @classmethod
    def for_transformer(
        cls, transformer_config: Mapping, image_embed_dim: int, num_tokens: int = 16
    ) -> XLabsConfig:
        """The config an XLabs file must have to fit a ``FluxTransformer2DModel`` with this ``config``."""
        heads, head_dim = transformer_config["num_attention_heads"], transformer_config["attention_head_dim"]
        return cls(
            num_blocks=int(transformer_config["num_layers"]),
            hidden_size=int(heads * head_dim),
            cross_attention_dim=int(transformer_config["joint_attention_dim"]),
            image_embed_dim=int(image_embed_dim),
            num_tokens=int(num_tokens),
        )


def neutral_shapes(config: XLabsConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every neutral key: ``image_proj.*`` and ``blocks.{i}.*``."""
    tokens_width = config.num_tokens * config.cross_attention_dim
    shapes: dict[str, tuple[int, ...]] = {
        "image_proj.proj.weight": (tokens_width, config.image_embed_dim),
        "image_proj.proj.bias": (tokens_width,),
        "image_proj.norm.weight": (config.cross_attention_dim,),
        "image_proj.norm.bias": (config.cross_attention_dim,),
    }
    for block in range(config.num_blocks):
        for projection in ("to_k_ip", "to_v_ip"):
            shapes[f"blocks.{block}.{projection}.weight"] = (config.hidden_size, config.cross_attention_dim)
            shapes[f"blocks.{block}.{projection}.bias"] = (config.hidden_size,)
    return shapes


def _external_block_key(layout: str, block: int, param: str) -> str:
    projection, _, kind = param.partition(".")
    if layout == XLABS:
        return f"{_XLABS_BLOCK_PREFIX}{block}.processor.{_XLABS_PROJECTION_NAMES[projection]}.{kind}"
    return f"{_DIFFUSERS_BLOCK_PREFIX}{block}.{param}"


def key_rules(layout: str, num_blocks: int) -> list[KeyRule]:
    """external key ↔ neutral key for every tensor of ``layout`` (one module key per rule)."""
    _check_layout(layout)
    proj_prefix = _XLABS_PROJ_PREFIX if layout == XLABS else _DIFFUSERS_PROJ_PREFIX
    rules = [KeyRule(proj_prefix + param, (f"image_proj.{param}",)) for param in IMAGE_PROJ_PARAMS]
    rules += [
        KeyRule(_external_block_key(layout, block, param), (f"blocks.{block}.{param}",))
        for block in range(num_blocks)
        for param in BLOCK_PARAMS
    ]
    return rules


def expected_shapes(config: XLabsConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Shape of every key a ``layout`` file with this ``config`` holds."""
    neutral = neutral_shapes(config)
    return {rule.external: neutral[rule.modules[0]] for rule in key_rules(layout, config.num_blocks)}


def detect_layout(keys: Sequence[str] | Mapping[str, object], source: str = "checkpoint") -> str:
    """``xlabs`` or ``diffusers`` from the key prefixes; a ``CheckpointError`` when neither or both."""
    keys = list(keys)
    xlabs = [key for key in keys if key.startswith((_XLABS_PROJ_PREFIX, _XLABS_BLOCK_PREFIX))]
    diffusers = [key for key in keys if key.startswith((_DIFFUSERS_PROJ_PREFIX, _DIFFUSERS_BLOCK_PREFIX))]
    if xlabs and diffusers:
        raise CheckpointError(
            f"{source} mixes XLabs keys ({xlabs[0]}, …) and diffusers keys ({diffusers[0]}, …); "
            "an XLabs FLUX IP-Adapter file holds one layout"
        )
    if xlabs:
        return XLABS
    if diffusers:
        return DIFFUSERS
    shown = ", ".join(sorted(keys)[:6]) or "no keys"
    raise CheckpointError(
        f"{source} is not an XLabs FLUX IP-Adapter checkpoint: no ip_adapter_proj_model./double_blocks. "
        f"or image_proj./ip_adapter. keys (found {shown})"
    )


def infer_config(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> XLabsConfig:
    """Read an ``XLabsConfig`` off the shapes of a flat state dict in either layout.

    Reads the projection's ``proj.weight`` and ``norm.weight`` and block 0's ``to_k_ip.weight``; the number
    of blocks is the count of distinct block indices. It checks nothing else: ``to_neutral`` does.
    """
    layout = detect_layout(state, source)
    proj_prefix = _XLABS_PROJ_PREFIX if layout == XLABS else _DIFFUSERS_PROJ_PREFIX
    needed = {
        "proj": proj_prefix + "proj.weight",
        "norm": proj_prefix + "norm.weight",
        "key": _external_block_key(layout, 0, "to_k_ip.weight"),
    }
    absent = [key for key in needed.values() if key not in state]
    if absent:
        raise CheckpointError(f"{source} lacks {', '.join(absent)}: cannot tell the adapter's sizes")
    proj, norm, key = (state[needed[name]] for name in ("proj", "norm", "key"))
    if proj.ndim != 2 or norm.ndim != 1 or key.ndim != 2:
        raise CheckpointError(
            f"{source}: {needed['proj']} {tuple(proj.shape)}, {needed['norm']} {tuple(norm.shape)} and "
            f"{needed['key']} {tuple(key.shape)} must be 2-D, 1-D and 2-D"
        )
    rows, embed_dim = proj.shape
    cross_dim = norm.shape[0]
    if cross_dim == 0 or rows % cross_dim:
        raise CheckpointError(
            f"{source}: {needed['proj']} has {rows} rows, not a multiple of the token width {cross_dim}"
        )
    blocks = {int(match.group(1)) for name in state if (match := _BLOCK_INDEX[layout].match(name))}
    return XLabsConfig(
        num_blocks=max(blocks) + 1,  # a gap in the indices shows up as missing keys in to_neutral
        hidden_size=int(key.shape[0]),
        cross_attention_dim=int(cross_dim),
        image_embed_dim=int(embed_dim),
        num_tokens=int(rows // cross_dim),
    )


def to_neutral(
    state: Mapping[str, torch.Tensor],
    config: XLabsConfig | None = None,
    source: str = "checkpoint",
) -> tuple[dict[str, torch.Tensor], XLabsConfig]:
    """A flat state dict in either layout → (neutral state, its config), after a strict check.

    config: the sizes the file must have (e.g. ``XLabsConfig.for_transformer(...)``, so a file made for
    another transformer is refused with its mis-shaped keys listed); None reads them off the file.
    """
    layout = detect_layout(state, source)
    if config is None:
        config = infer_config(state, source)
    check_keys(source, state, expected_shapes(config, layout))
    return to_modules(state, key_rules(layout, config.num_blocks)), config


def from_neutral(neutral: Mapping[str, torch.Tensor], config: XLabsConfig, layout: str) -> dict[str, torch.Tensor]:
    """Neutral state → flat ``layout`` state (inverse of ``to_neutral``), after a strict check."""
    _check_layout(layout)
    check_keys("neutral XLabs state", neutral, neutral_shapes(config))
    return from_modules(neutral, key_rules(layout, config.num_blocks))


def convert_state(
    state: Mapping[str, torch.Tensor], layout: str, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rewrite a flat state dict in either layout into ``layout`` (tensors renamed, bits kept)."""
    _check_layout(layout)
    neutral, config = to_neutral(state, source=source)
    return from_neutral(neutral, config, layout)


def neutral_blocks(neutral: Mapping[str, torch.Tensor], config: XLabsConfig) -> list[dict[str, torch.Tensor]]:
    """The per-block tensors of a neutral state: ``[{"to_k_ip.weight": …, …}, …]`` in block order."""
    return [{param: neutral[f"blocks.{block}.{param}"] for param in BLOCK_PARAMS} for block in range(config.num_blocks)]


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def infer_flux_config(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> AdapterConfig:
    """Read the ``AdapterConfig`` of an XLabs FLUX IP-Adapter file (either of its layouts) off its shapes."""
    sizes = infer_config(state, source)
    return AdapterConfig(
        "basic", sizes.image_embed_dim, sizes.cross_attention_dim, sizes.num_tokens, architecture="flux"
    )


def module_rules(layers: Sequence, layout: str) -> list[KeyRule]:
    """``layout``'s keys (``xlabs`` or ``diffusers``) ↔ the modules of an adapter on these FLUX ``layers``
    (``modeling.adapter.CrossAttentionLayer``): ``key_rules`` to the neutral keys, then neutral keys to ours."""
    to_module = {f"image_proj.{key}": f"image_proj.{value}" for key, value in BASIC_IMAGE_PROJ.items()}
    for layer in layers:
        for param in BLOCK_PARAMS:
            to_module[f"blocks.{layer.index}.{param}"] = module_layer_key(layer.name, param)
    return [KeyRule(rule.external, (to_module[rule.modules[0]],)) for rule in key_rules(layout, len(layers))]


def _recognise(metadata: Mapping[str, str], keys: Sequence[str]) -> bool:
    return any(key.startswith((_XLABS_PROJ_PREFIX, _XLABS_BLOCK_PREFIX)) for key in keys)


def _check_format(config: AdapterConfig, path: Path) -> None:
    layouts.check_container(path)
    if config.architecture != "flux" or path.suffix.lower() != ".safetensors":
        raise ValueError("the xlabs layout is for FLUX adapters, as a .safetensors file")


layouts.register(
    layouts.Layout(XLABS, description="an XLabs FLUX IP-Adapter", home="FLUX.1", recognise=_recognise),
    layouts.KeyTable(XLABS, "flux", lambda adapter: module_rules(adapter.layer_specs, XLABS), infer_flux_config),
    layouts.KeyTable(H94, "flux", lambda adapter: module_rules(adapter.layer_specs, DIFFUSERS), infer_flux_config),
    layouts.SaveFormat(XLABS, XLABS, _check_format),
)
