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


def from_pretrained(model_cls: Any, model_id: str, device: torch.device | str, dtype: torch.dtype) -> Any:
    """Load `model_cls` weights (eval mode) onto `device` in `dtype`: the one place backends do I/O."""
    model = model_cls.from_pretrained(model_id, dtype=dtype)
    return model.to(device).eval()
