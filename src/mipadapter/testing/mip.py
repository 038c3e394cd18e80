"""Ready-to-run tiny MIP-Adapter pipelines (for tests and ``mipadapter generate --tiny``)."""

from __future__ import annotations

from typing import Literal

from mipadapter.checkpoint.h94 import infer_h94_config
from mipadapter.checkpoint.io import AdapterFile, load_state
from mipadapter.modeling.adapter import MIPAdapter
from mipadapter.testing.checkpoints import fabricate_ip_adapter_state, flatten_state
from mipadapter.testing.tiny import TINY_SD15, TINY_SDXL, tiny_sd15_pipeline, tiny_sdxl_pipeline

ARCHS = {"sdxl": (TINY_SDXL, tiny_sdxl_pipeline), "sd15": (TINY_SD15, tiny_sd15_pipeline)}
FLUX_WEIGHT_STD = 0.5  # large enough random XLabs weights that the image term visibly moves the result


def tiny_adapter(unet, spec_encoder, projection: str, text_weight: bool, seed: int) -> MIPAdapter:
    """A fabricated h94/MIP checkpoint for ``unet`` loaded through the real key tables."""
    embed_dim = spec_encoder.projection_dim if projection == "basic" else spec_encoder.hidden_size
    state = flatten_state(
        fabricate_ip_adapter_state(unet, embed_dim, projection, text_weight=text_weight, seed=seed)
    )
    adapter = MIPAdapter.for_unet(unet, infer_h94_config(state))
    load_state(adapter, AdapterFile("h94", state, None), "fabricated tiny checkpoint")
    return adapter


def tiny_flux_adapter(transformer, image_embed_dim: int, seed: int, std: float = FLUX_WEIGHT_STD) -> MIPAdapter:
    """A fabricated XLabs FLUX IP-Adapter for ``transformer`` loaded through the real XLabs key tables."""
    from mipadapter.checkpoint.xlabs import XLabsConfig, infer_flux_config
    from mipadapter.testing.flux import fabricate_xlabs_state

    sizes = XLabsConfig.for_transformer(transformer.config, image_embed_dim, num_tokens=4)
    state = fabricate_xlabs_state(sizes, seed, std)
    adapter = MIPAdapter.for_model(transformer, infer_flux_config(state))
    load_state(adapter, AdapterFile("xlabs", state, None), "fabricated tiny XLabs checkpoint")
    return adapter


def tiny_parts(
    arch: Literal["sdxl", "sd15", "flux"] = "sdxl",
    projection: Literal["basic", "plus"] = "basic",
    seed: int = 0,
    base_pipe=None,
):
    """(diffusers pipeline, image encoder, its processor) of the tiny models: the base model of ``arch``
    (``base_pipe`` when given) and the image encoder a ``projection`` adapter reads."""
    if arch == "flux":
        from mipadapter.testing.flux import TINY_FLUX, tiny_flux_pipeline

        if projection != "basic":
            raise ValueError("the tiny FLUX takes XLabs' basic projection only")
        pipe = base_pipe if base_pipe is not None else tiny_flux_pipeline(seed)
        encoder, processor = TINY_FLUX.image_encoder.build(seed)
        return pipe, encoder, processor
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted([*ARCHS, 'flux'])}, got {arch!r}")
    if projection not in ("basic", "plus"):
        raise ValueError(f"projection must be 'basic' or 'plus', got {projection!r}")
    spec, build = ARCHS[arch]
    pipe = base_pipe if base_pipe is not None else build(seed)
    encoder_spec = spec.basic_image_encoder if projection == "basic" else spec.plus_image_encoder
    encoder, processor = encoder_spec.build(seed)
    return pipe, encoder, processor


def tiny_mip_pipeline(
    arch: Literal["sdxl", "sd15", "flux"] = "sdxl",
    projection: Literal["basic", "plus"] = "basic",
    text_weight: bool = True,
    seed: int = 0,
):
    """A ``MIPAdapterPipeline`` of tiny random models: runs offline in about a second on a CPU.

    ``flux``: the tiny FLUX with a fabricated XLabs IP-Adapter (basic projection; ``text_weight`` does not
    apply: XLabs' adapters have none).
    """
    from mipadapter.pipeline import MIPAdapterPipeline

    pipe, encoder, processor = tiny_parts(arch, projection, seed)
    if arch == "flux":
        adapter = tiny_flux_adapter(pipe.transformer, encoder.config.projection_dim, seed)
        return MIPAdapterPipeline(pipe, adapter, encoder, processor)
    spec = ARCHS[arch][0]
    encoder_spec = spec.basic_image_encoder if projection == "basic" else spec.plus_image_encoder
    adapter = tiny_adapter(pipe.unet, encoder_spec, projection, text_weight, seed)
    return MIPAdapterPipeline(pipe, adapter, encoder, processor)


def tiny_pipeline_with_adapter(arch: Literal["sdxl", "sd15", "flux"], path, where: str):
    """The adapter file ``path`` (trained or saved on the tiny models; for ``flux`` also an XLabs-layout
    file sized for the tiny FLUX) on the tiny base model of ``arch`` and the tiny image encoder its
    projection needs. Returns ``(MIPAdapterPipeline, projection)``. where: how refusals name the base
    model (e.g. ``"--tiny sdxl"``); a file that does not fit is refused in one line naming it."""
    from mipadapter.checkpoint import adapter_from_file, read_file
    from mipadapter.pipeline import MIPAdapterPipeline
    from mipadapter.pipeline.encoding import denoiser
    from mipadapter.pipeline.loading import check_adapter_fits, check_encoder_fits

    read = read_file(path)  # a corrupt file is named before anything is built
    pipe, _, _ = tiny_parts(arch, "basic")
    checked = check_adapter_fits(read, denoiser(pipe), path, where)
    projection = checked.config.projection
    _, encoder, processor = tiny_parts(arch, projection, base_pipe=pipe)
    check_encoder_fits(
        encoder.config.to_dict(), checked.config, f"tiny {arch} {projection}", "the --tiny image encoder"
    )
    loaded = adapter_from_file(checked, denoiser(pipe), str(path))
    return MIPAdapterPipeline(pipe, loaded, encoder, processor), projection
