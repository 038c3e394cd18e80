"""Ready-to-run tiny MIP-Adapter pipelines (for tests and ``mipadapter generate --tiny``)."""

from __future__ import annotations

from typing import Literal

from mipadapter.checkpoint.convert import infer_h94_config
from mipadapter.checkpoint.io import AdapterFile, load_state
from mipadapter.modeling.adapter import MIPAdapter
from mipadapter.testing.checkpoints import fabricate_ip_adapter_state, flatten_state
from mipadapter.testing.tiny import TINY_SD15, TINY_SDXL, tiny_sd15_pipeline, tiny_sdxl_pipeline


def tiny_adapter(unet, spec_encoder, projection: str, text_weight: bool, seed: int) -> MIPAdapter:
    """A fabricated h94/MIP checkpoint for ``unet`` loaded through the real key tables."""
    embed_dim = spec_encoder.projection_dim if projection == "basic" else spec_encoder.hidden_size
    state = flatten_state(fabricate_ip_adapter_state(unet, embed_dim, projection, text_weight=text_weight, seed=seed))
    adapter = MIPAdapter.for_unet(unet, infer_h94_config(state))
    load_state(adapter, AdapterFile("h94", state, None), "fabricated tiny checkpoint")
    return adapter


def tiny_mip_pipeline(
    arch: Literal["sdxl", "sd15"] = "sdxl",
    projection: Literal["basic", "plus"] = "basic",
    text_weight: bool = True,
    seed: int = 0,
):
    """A ``MIPAdapterPipeline`` of tiny random models: runs offline in about a second on a CPU."""
    from mipadapter.pipeline import MIPAdapterPipeline

    if arch not in ("sdxl", "sd15"):
        raise ValueError(f"arch must be 'sdxl' or 'sd15', got {arch!r}")
    spec = TINY_SDXL if arch == "sdxl" else TINY_SD15
    pipe = (tiny_sdxl_pipeline if arch == "sdxl" else tiny_sd15_pipeline)(seed)
    encoder_spec = spec.basic_image_encoder if projection == "basic" else spec.plus_image_encoder
    encoder, processor = encoder_spec.build(seed)
    adapter = tiny_adapter(pipe.unet, encoder_spec, projection, text_weight, seed)
    return MIPAdapterPipeline(pipe, adapter, encoder, processor)
