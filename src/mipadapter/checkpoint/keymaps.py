"""Key tables between checkpoint layouts and our modules (data, not code paths).

External layouts (docs/formats.md):
* h94 / authors: ``image_proj.*`` in the IP-Adapter repository's naming and
  ``ip_adapter.{k}.{param}`` with ``k`` the layer's index in ``unet.attn_processors``;
* ours: ``image_proj.*`` in diffusers' naming and ``layers.{layer name}.{param}``.
Module keys are those of ``MIPAdapter.state_dict()``.

A rule maps one external key to one module key, or to several that are the external tensor split
evenly along dim 0 (the resampler's stacked ``to_kv``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mipadapter.config import AdapterConfig
from mipadapter.modeling.adapter import CrossAttentionLayer

BASIC_IMAGE_PROJ = {
    "proj.weight": "image_embeds.weight",
    "proj.bias": "image_embeds.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
PLUS_IMAGE_PROJ = {
    name: name
    for name in (
        "latents",
        "proj_in.weight",
        "proj_in.bias",
        "proj_out.weight",
        "proj_out.bias",
        "norm_out.weight",
        "norm_out.bias",
    )
}
# Per resampler block L: h94 "layers.L.{key}" → diffusers "layers.L.{value}".
PLUS_BLOCK = {
    "0.norm1.weight": ("ln0.weight",),
    "0.norm1.bias": ("ln0.bias",),
    "0.norm2.weight": ("ln1.weight",),
    "0.norm2.bias": ("ln1.bias",),
    "0.to_q.weight": ("attn.to_q.weight",),
    "0.to_kv.weight": ("attn.to_k.weight", "attn.to_v.weight"),
    "0.to_out.weight": ("attn.to_out.0.weight",),
    "1.0.weight": ("ff.0.weight",),
    "1.0.bias": ("ff.0.bias",),
    "1.1.weight": ("ff.1.net.0.proj.weight",),
    "1.3.weight": ("ff.1.net.2.weight",),
}
LAYER_PARAMS = ("to_k_ip.weight", "to_v_ip.weight")
FLUX_LAYER_PARAMS = ("to_k_ip.weight", "to_k_ip.bias", "to_v_ip.weight", "to_v_ip.bias")  # XLabs' have biases
TEXT_WEIGHT_PARAM = "text_to_weight.weight"


@dataclass(frozen=True)
class KeyRule:
    """external key ↔ module keys (several: the external tensor split along dim 0)."""

    external: str
    modules: tuple[str, ...]


def module_layer_key(layer_name: str, param: str) -> str:
    return f"layers.{layer_name.replace('.', '__')}.{param}"


def layer_params(config: AdapterConfig) -> tuple[str, ...]:
    if config.architecture == "flux":
        return FLUX_LAYER_PARAMS
    return LAYER_PARAMS + ((TEXT_WEIGHT_PARAM,) if config.text_weight else ())


def image_proj_rules(config: AdapterConfig, prefix: str = "image_proj.") -> list[KeyRule]:
    """Rules for the projection in the h94 naming; ``prefix`` is prepended to both sides."""
    if config.projection == "basic":
        table = {key: (value,) for key, value in BASIC_IMAGE_PROJ.items()}
    else:
        table = {key: (value,) for key, value in PLUS_IMAGE_PROJ.items()}
        for block in range(config.resampler_depth):
            for key, values in PLUS_BLOCK.items():
                table[f"layers.{block}.{key}"] = tuple(f"layers.{block}.{value}" for value in values)
    return [KeyRule(prefix + key, tuple(prefix + value for value in values)) for key, values in table.items()]


def identity_image_proj_rules(module_keys: Iterable[str]) -> list[KeyRule]:
    """Our format stores the projection under diffusers' own names."""
    return [KeyRule(key, (key,)) for key in module_keys if key.startswith("image_proj.")]


def h94_layer_rules(layers: Sequence[CrossAttentionLayer], config: AdapterConfig) -> list[KeyRule]:
    """``ip_adapter.{k}.{param}`` ↔ our per-layer modules."""
    return [
        KeyRule(f"ip_adapter.{layer.index}.{param}", (module_layer_key(layer.name, param),))
        for layer in layers
        for param in layer_params(config)
    ]


def xlabs_rules(layers: Sequence[CrossAttentionLayer], layout: str) -> list[KeyRule]:
    """XLabs' FLUX layouts (``xlabs``: the published file; ``diffusers``: the keys diffusers' loader makes of
    it) ↔ our modules: ``checkpoint.xlabs``'s tables to its neutral keys, then neutral keys to ours."""
    from mipadapter.checkpoint import xlabs

    to_module = {f"image_proj.{key}": f"image_proj.{value}" for key, value in BASIC_IMAGE_PROJ.items()}
    for layer in layers:
        for param in FLUX_LAYER_PARAMS:
            to_module[f"blocks.{layer.index}.{param}"] = module_layer_key(layer.name, param)
    return [KeyRule(rule.external, (to_module[rule.modules[0]],)) for rule in xlabs.key_rules(layout, len(layers))]


def named_layer_rules(layers: Sequence[CrossAttentionLayer], config: AdapterConfig) -> list[KeyRule]:
    """``layers.{layer name}.{param}`` (our format) ↔ our per-layer modules."""
    return [
        KeyRule(f"layers.{layer.name}.{param}", (module_layer_key(layer.name, param),))
        for layer in layers
        for param in layer_params(config)
    ]
