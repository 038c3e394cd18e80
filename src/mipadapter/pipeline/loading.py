"""Loading the three models of a pipeline (base model, image encoder, adapter) from Hub ids or local paths."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from mipadapter.config import PRESETS


def _clip_processor_class():
    try:
        from transformers import (
            CLIPImageProcessorPil as processor_class,  # transformers ≥ 5 without torchvision
        )
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    return processor_class


def default_feature_extractor(image_encoder):
    """CLIP preprocessing at the encoder's input size (h94's encoder folders ship no processor config)."""
    side = image_encoder.config.image_size
    return _clip_processor_class()(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def load_components(
    base_model: str | Path | None = None,
    adapter: str | Path | None = None,
    image_encoder: str | Path | None = None,
    *,
    preset: str = "mip-sdxl",
    torch_dtype: torch.dtype | None = None,
    **pipeline_kwargs,
):
    """(diffusers pipeline, MIPAdapter, image encoder, feature extractor) as ``MIPAdapterPipeline.from_pretrained``
    describes them."""
    from diffusers import DiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    from mipadapter.checkpoint import load_adapter
    from mipadapter.checkpoint.hub import fetch_failed, resolve_folder

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    defaults = PRESETS[preset]
    base_model = str(base_model or defaults.base_model)
    image_encoder = str(image_encoder or defaults.image_encoder)
    adapter_source = adapter or defaults.adapter

    location, subfolder = resolve_folder(base_model, "base model", "--base-model")
    try:
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype; both spellings work
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            if subfolder:
                pipeline_kwargs["subfolder"] = subfolder
            pipe = DiffusionPipeline.from_pretrained(location, torch_dtype=torch_dtype, **pipeline_kwargs)
    except OSError as error:
        raise fetch_failed(base_model, "base model", "--base-model", error) from error
    location, subfolder = resolve_folder(image_encoder, "image encoder", "--image-encoder")
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            location, subfolder=subfolder or "", dtype=torch_dtype
        )
    except OSError as error:
        raise fetch_failed(image_encoder, "image encoder", "--image-encoder", error) from error
    loaded = load_adapter(adapter_source, pipe.unet, default_scale=defaults.scale)
    if torch_dtype is not None:
        loaded.to(torch_dtype)
    return pipe, loaded, encoder, _load_feature_extractor(location, subfolder, encoder)


def _load_feature_extractor(location: str, subfolder: str | None, image_encoder):
    """The image encoder's own preprocessing config where its folder has one, else CLIP's at its size."""
    folder = Path(location) / (subfolder or "")
    if (folder / "preprocessor_config.json").is_file():
        return _clip_processor_class().from_pretrained(str(folder))
    return default_feature_extractor(image_encoder)
