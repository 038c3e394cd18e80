"""transformers backends of the data stages, and `load_backends`, the one function that loads weights.

Each backend module imports transformers lazily (inside its loader) so that importing the data
package stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mipadapter.data.stages import Backends

if TYPE_CHECKING:
    from mipadapter.data.config import DataConfig

STAGES = ("caption", "ground", "segment", "clip")


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The weights' dtype for config.dtype `name` on `device` ("auto": float16 on CUDA, else float32)."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def load_backends(
    config: DataConfig, device: torch.device | str, stages: tuple[str, ...] = STAGES
) -> Backends:
    """Load the transformers models of `stages` from config's model ids onto `device`."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    dtype = resolve_dtype(config.dtype, device)
    from mipadapter.data.backends.clip import load_clip

    captioner = grounder = segmenter = None
    if "caption" in stages:
        from mipadapter.data.backends.blip2 import load_blip2

        captioner = load_blip2(
            config.caption_model,
            device,
            dtype,
            max_new_tokens=config.caption_max_new_tokens,
            prompt=config.caption_prompt,
        )
    if "ground" in stages:
        from mipadapter.data.backends.grounding_dino import load_grounding_dino

        grounder = load_grounding_dino(
            config.grounding_model,
            device,
            dtype,
            box_threshold=config.box_threshold,
            text_threshold=config.text_threshold,
        )
    if "segment" in stages:
        from mipadapter.data.backends.sam import load_sam

        segmenter = load_sam(config.segment_model, device, dtype)
    embedder = load_clip(config.clip_model, device, dtype, batch_size=config.clip_batch_size)
    return Backends(embedder=embedder, captioner=captioner, grounder=grounder, segmenter=segmenter)
