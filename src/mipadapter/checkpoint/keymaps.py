"""Key rules and the key tables of the UNet layouts and ours (data, not code paths).

External layouts (docs/formats.md):
* h94 / authors: ``image_proj.*`` in the IP-Adapter repository's naming and
  ``ip_adapter.{k}.{param}`` with ``k`` the layer's index in ``unet.attn_processors``;
* ours: ``image_proj.*`` in diffusers' naming and ``layers.{layer name}.{param}``.
Module keys are those of ``MIPAdapter.state_dict()``. Which table serves which file is the business of the
layout modules (``h94.py``, ``ours.py``, ``xlabs.py``) and their records in ``layouts.py``.

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
TEXT_WEIGHT_PARAM = "text_to_weight.weight"


@dataclass(frozen=True)
class KeyRule:
    """external key ↔ module keys (several: the external tensor split along dim 0)."""

    external: str
    modules: tuple[str, ...]


def module_layer_key(layer_name: str, param: str) -> str:
    return f"layers.{layer_name.replace('.', '__')}.{param}"


def layer_params(config: AdapterConfig) -> tuple[str, ...]:
    """A UNet layer's parameters in h94's file."""
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


def named_layer_rules(layers: Sequence[CrossAttentionLayer], module_keys: Iterable[str]) -> list[KeyRule]:
    """``layers.{layer name}.{param}`` (our format) ↔ our per-layer modules: every parameter the modules
    hold, whatever the architecture (a FLUX layer's biases included)."""
    module_keys = list(module_keys)
    rules = []
    for layer in layers:
        prefix = module_layer_key(layer.name, "")
        rules += [
            KeyRule(f"layers.{layer.name}.{key.removeprefix(prefix)}", (key,))
            for key in module_keys
            if key.startswith(prefix)
        ]
    return rules
