"""Image scales per subject or per layer, as diffusers' ``set_ip_adapter_scale`` takes them.

A subject's scale is one number, or one value per adapter layer: on FLUX a list with one value per
double-stream block (diffusers' ``FluxIPAdapterMixin.set_ip_adapter_scale``), on a UNet diffusers' dict
form over the down, mid and up blocks (``IPAdapterMixin.set_ip_adapter_scale``, expanded as
``loaders/unet_loader_utils.py`` ``_maybe_expand_lora_scales(..., default_scale=0.0)`` does). Pure Python
(layer 0): the CLI and the recipe check scales with it before torch loads; the pipeline expands them
against its model (``layer_scales``) once per call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mipadapter.limits import LARGE_LIMITS

MAX_SCALE = LARGE_LIMITS.max_scale  # the ceiling of any one scale, wherever it comes from


def _is_scale(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= MAX_SCALE
    )


def _is_scale_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_scale(v) for v in value)


UNET_PARTS = ("down", "mid", "up")


def check_scale(scale, where: str) -> None:
    """A subject's scale: None, a finite number ≥ 0, a list of them (FLUX: one per double block) or
    diffusers' UNet dict form (``UNET_PARTS`` → a number, a list, or ``{"block_i": number | list}``).
    Lengths are checked against the model at the call (``layer_scales``). A ``ValueError`` naming
    ``where`` otherwise."""
    if scale is None or _is_scale(scale) or _is_scale_list(scale):
        return
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if math.isfinite(scale) and scale > MAX_SCALE:
            raise ValueError(f"{where}: scale must be at most {MAX_SCALE:g}, got {scale!r}")
        raise ValueError(f"{where}: scale must be a finite number ≥ 0, got {scale!r}")
    if isinstance(scale, list):
        raise ValueError(f"{where}: a scale list holds one finite number ≥ 0 per layer, got {scale!r}")
    form = (
        "a finite number ≥ 0, a list of them (one per FLUX double block) or diffusers' dict "
        '{"down": ..., "mid": ..., "up": ...}'
    )
    if not isinstance(scale, dict):
        raise ValueError(f"{where}: scale must be {form}, got {scale!r}")
    for part, value in scale.items():
        if part not in UNET_PARTS:
            raise ValueError(f"{where}: scale part {part!r} is not one of down, mid, up")
        if _is_scale(value) or _is_scale_list(value):
            continue
        if part != "mid" and isinstance(value, dict):
            for block, inner in value.items():
                if not (isinstance(block, str) and block.startswith("block_") and block[6:].isdigit()):
                    raise ValueError(f"{where}: scale block {part}.{block} is not named block_<number>")
                if not (_is_scale(inner) or _is_scale_list(inner)):
                    raise ValueError(f"{where}: scale {part}.{block} must be a number ≥ 0 or a list of them")
            continue
        raise ValueError(f"{where}: scale part {part!r} must be a number ≥ 0, a list of them or blocks")


def is_layered(scale) -> bool:
    """Whether a (checked) scale gives one value per layer rather than one for the subject."""
    return isinstance(scale, (list, dict))


def layer_scales(scale, layer_names: Sequence[str], model, where: str) -> list[float]:
    """One scale per adapter layer (``layer_names``, the adapter's order) from a list (FLUX: one per double
    block, as diffusers' ``FluxIPAdapterMixin.set_ip_adapter_scale``) or diffusers' UNet dict form (as
    ``IPAdapterMixin.set_ip_adapter_scale`` expands it with ``_maybe_expand_lora_scales(...,
    default_scale=0.0)``: a part or block left out gets 0; a number covers a whole part or block; a list of
    one value is repeated; a layer takes the value of the attention module ``{down,up}_blocks.{i}.
    attentions.{k}`` or ``mid_block.attentions.0`` it belongs to)."""
    flux = type(model).__name__.startswith("Flux")
    if isinstance(scale, list):
        if not flux:
            raise ValueError(
                f"{where}: per-layer scales on a UNet take diffusers' dict form "
                '{"down": {"block_2": [0.0, 1.0]}, "mid": ..., "up": ...}, not a list'
            )
        if len(scale) != len(layer_names):
            raise ValueError(
                f"{where}: give one scale per FLUX double block, {len(layer_names)}, got {len(scale)}"
            )
        return [float(v) for v in scale]
    if flux:
        raise ValueError(f"{where}: per-block scales on FLUX are a list, one per double block ({len(layer_names)})")
    prefixes = _unet_scale_prefixes(scale, model, where)
    values = []
    for name in layer_names:
        matches = [value for prefix, value in prefixes.items() if name.startswith(prefix + ".")]
        if len(matches) != 1:
            raise ValueError(f"{where}: no scale for the layer {name}")
        values.append(float(matches[0]))
    return values


def _unet_scale_prefixes(scale: dict, unet, where: str) -> dict[str, float]:
    """diffusers' UNet dict form → {attention module name: scale}."""
    per_block = unet.config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError(f"{where}: per-layer scales need a UNet with one layers_per_block, got {per_block!r}")
    blocks = {
        "down": [i for i, block in enumerate(unet.down_blocks) if hasattr(block, "attentions")],
        "up": [i for i, block in enumerate(unet.up_blocks) if hasattr(block, "attentions")],
    }
    layers = {"down": per_block, "up": per_block + 1}
    mid = scale.get("mid", 0.0)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise ValueError(f"{where}: scale mid takes one value, got {len(mid)}")
        mid = mid[0]
    prefixes = {"mid_block.attentions.0": mid}
    for part in ("down", "up"):
        value = scale.get(part, 0.0)
        if not isinstance(value, dict):
            value = {f"block_{i}": value for i in blocks[part]}
        unknown = sorted(set(value) - {f"block_{i}" for i in blocks[part]})
        if unknown:
            raise ValueError(
                f"{where}: scale {part}.{unknown[0]} names no block with attention layers "
                f"(this UNet's {part} blocks with attention: {', '.join(f'block_{i}' for i in blocks[part])})"
            )
        for i in blocks[part]:
            values = value.get(f"block_{i}", 0.0)
            values = values if isinstance(values, list) else [values]
            if len(values) == 1:
                values = values * layers[part]
            if len(values) != layers[part]:
                raise ValueError(
                    f"{where}: scale {part}.block_{i} takes {layers[part]} values (one per attention), "
                    f"got {len(values)}"
                )
            for k, v in enumerate(values):
                prefixes[f"{part}_blocks.{i}.attentions.{k}"] = v
    return prefixes
