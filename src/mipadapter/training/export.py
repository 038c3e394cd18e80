"""Exports of a trained adapter: ours, the authors' ``.bin`` layout, and diffusers' IP-Adapter layout."""

from __future__ import annotations

from pathlib import Path

import torch

from mipadapter.modeling import MIPAdapter

EXPORT_FILES = {
    "mipadapter": "mip_adapter.safetensors",  # mipadapter generate --adapter <this>
    "authors": "model.bin",  # the authors' inference code (their model_sdxl.bin layout)
    "diffusers": "ip_adapter.bin",  # pipe.load_ip_adapter(folder, subfolder="", weight_name=<this>)
}


def export_adapter(
    adapter: MIPAdapter, folder: str | Path, formats=tuple(EXPORT_FILES), dtype: str = "fp16"
) -> dict[str, Path]:
    """Write ``adapter`` in each format under ``folder``; returns format → path."""
    from mipadapter.checkpoint import save_adapter

    unknown = sorted(set(formats) - set(EXPORT_FILES))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {sorted(EXPORT_FILES)}")
    target = MIPAdapter(adapter.config, adapter.layer_specs)  # detached, on the CPU
    target.load_state_dict({k: v.detach().cpu() for k, v in adapter.state_dict().items()})
    target.to(torch.float16 if dtype == "fp16" else torch.float32)
    folder = Path(folder)
    return {name: save_adapter(target, folder / EXPORT_FILES[name], format=name) for name in formats}
