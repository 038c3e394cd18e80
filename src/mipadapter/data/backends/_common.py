"""Helpers shared by the transformers backends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def to_model(inputs: Mapping[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Move processor outputs onto the model's device; floating tensors take the model's dtype."""
    parameter = next(model.parameters())
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            dtype = parameter.dtype if value.is_floating_point() else value.dtype
            value = value.to(device=parameter.device, dtype=dtype)
        moved[key] = value
    return moved


def config_key(key: str) -> str:
    """How errors name a model's config key (``DataConfig`` field names are the YAML/TOML keys)."""
    return f"{key} in the data config (--config)"


def _pretrained(cls: Any, model_id: str, what: str, key: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` on `model_id` located through ``mipadapter.hub``: the cache first; offline
    and not cached, one line at once naming `model_id`, `what` it is for and the config `key`."""
    from mipadapter.hub import fetch_failed, resolve_folder

    where = config_key(key)
    location, subfolder = resolve_folder(model_id, what, where)
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        return cls.from_pretrained(location, **kwargs)
    except OSError as error:
        raise fetch_failed(model_id, what, where, error) from error


def from_pretrained(
    model_cls: Any, model_id: str, device: torch.device | str, dtype: torch.dtype, *, what: str, key: str
) -> Any:
    """Load `model_cls` weights (eval mode) onto `device` in `dtype`: the one place backends load weights.

    what: what the model is for ("captioner (BLIP-2)"); key: the ``DataConfig`` field naming it.
    """
    return _pretrained(model_cls, model_id, what, key, dtype=dtype).to(device).eval()


def processor_from_pretrained(model_id: str, *, what: str, key: str) -> Any:
    """The model's ``AutoProcessor``, located like its weights."""
    from transformers import AutoProcessor

    return _pretrained(AutoProcessor, model_id, what, key)
