"""The h94 IP-Adapter family on UNets: h94's files, the authors' MIP-Adapter release (h94's keys plus
``{k}.text_to_weight.weight``) and the plain layout diffusers' ``load_ip_adapter`` reads (docs/formats.md).

Registers the ``h94`` layout (the one a file without any marker is read as), its key table for UNets, and
the ``authors`` and ``diffusers`` save formats. The config is read off the tensors' shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from mipadapter.checkpoint import keymaps, layouts
from mipadapter.checkpoint.convert import CheckpointError
from mipadapter.checkpoint.keymaps import TEXT_WEIGHT_PARAM
from mipadapter.config import AdapterConfig
from mipadapter.modeling.projection import RESAMPLER_HEAD_DIM

LAYOUT = "h94"


def infer_h94_config(state: Mapping[str, torch.Tensor]) -> AdapterConfig:
    """Read an ``AdapterConfig`` off the shapes of a flat h94/authors state dict."""
    proj = {
        key.removeprefix("image_proj."): value
        for key, value in state.items()
        if key.startswith("image_proj.")
    }
    text_weight = any(key.endswith(TEXT_WEIGHT_PARAM) for key in state)
    if "proj.weight" in proj and "norm.weight" in proj:
        cross_dim = proj["norm.weight"].shape[0]
        rows, embed_dim = proj["proj.weight"].shape
        if rows % cross_dim:
            raise CheckpointError(
                f"image_proj.proj.weight has {rows} rows, not a multiple of the token width {cross_dim}"
            )
        return AdapterConfig("basic", embed_dim, cross_dim, rows // cross_dim, text_weight=text_weight)
    if "latents" in proj:
        _, num_tokens, hidden = proj["latents"].shape
        depth = len({match.group(1) for key in proj if (match := re.match(r"layers\.(\d+)\.", key))})
        heads = proj["layers.0.0.to_q.weight"].shape[0] // RESAMPLER_HEAD_DIM
        return AdapterConfig(
            "plus",
            image_embed_dim=proj["proj_in.weight"].shape[1],
            cross_attention_dim=proj["proj_out.weight"].shape[0],
            num_tokens=num_tokens,
            text_weight=text_weight,
            resampler_dim=hidden,
            resampler_depth=depth,
            resampler_heads=heads,
        )
    raise CheckpointError(
        f"unrecognised image_proj layout (keys {sorted(proj)[:8]}): neither basic nor plus IP-Adapter"
    )


def _infer_config(state: Mapping[str, torch.Tensor], source: str) -> AdapterConfig:
    try:
        return infer_h94_config(state)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    except KeyError as error:  # a plus projection missing one of its blocks' tensors
        raise CheckpointError(f"{source}: image_proj lacks {error.args[0]}") from None


def _key_rules(adapter) -> list[keymaps.KeyRule]:
    return keymaps.image_proj_rules(adapter.config) + keymaps.h94_layer_rules(adapter.layer_specs, adapter.config)


def _check_authors(config: AdapterConfig, path: Path) -> None:
    layouts.check_container(path)
    if not config.text_weight:
        raise ValueError("the authors' layout carries text_to_weight, which this adapter does not have")


def _check_diffusers(config: AdapterConfig, path: Path) -> None:
    layouts.check_container(path)


layouts.register(
    layouts.Layout(LAYOUT, description="an h94 IP-Adapter"),
    layouts.KeyTable(LAYOUT, "unet", _key_rules, _infer_config),
    layouts.SaveFormat("authors", LAYOUT, _check_authors),
    layouts.SaveFormat(
        "diffusers", LAYOUT, _check_diffusers, keep=lambda key: not key.endswith(TEXT_WEIGHT_PARAM)
    ),
)
