"""Loading the three models of a pipeline (base model, image encoder, adapter) from Hub ids or local paths.

The small things are read and checked before the big ones, so a wrong file is reported in seconds, not
after minutes of loading SDXL or FLUX:

1. the adapter file, checked key by key and shape by shape against the base model's denoiser built on the
   ``meta`` device from its config (no weights read): the UNet from ``unet/config.json``, or for FLUX.1
   (``model_index.json`` names a FLUX ``transformer``) the ``FluxTransformer2DModel`` from
   ``transformer/config.json``;
2. the image encoder's ``config.json`` against the adapter's input width, then the encoder itself;
3. the base model;
4. the adapter's weights, copied onto the base model's UNet or FLUX transformer.

Every location goes through ``mipadapter.hub`` (local path, Hub cache, fail at once offline).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from mipadapter.config import PRESETS, AdapterConfig
from mipadapter.hub import ModelNotFoundError, fetch_failed, resolve_folder, resolve_folder_file
from mipadapter.pipeline.encoding import denoiser

ARGUMENT_NAMES = {"base_model": "base_model", "adapter": "adapter", "image_encoder": "image_encoder"}
"""How errors name each model by default (the Python arguments); the CLI passes its flags instead."""


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


def unet_skeleton(
    base_model: str | Path, what: str = "base model", where: str = "base_model", cache_dir=None
):
    """The base model's UNet built from its ``unet/config.json`` on the ``meta`` device (no weights read).

    base_model: a diffusers model folder or ``owner/repo[/subfolder]``.
    """
    from diffusers import UNet2DConditionModel

    config_file = resolve_folder_file(base_model, "unet/config.json", what, where, cache_dir=cache_dir)
    try:
        config = UNet2DConditionModel.load_config(str(config_file.parent))
    except (OSError, ValueError) as error:
        raise ValueError(f"{what} {str(base_model)!r}: unreadable {config_file} ({error})") from None
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def denoiser_kind(
    base_model: str | Path, what: str = "base model", where: str = "base_model", cache_dir=None
) -> str:
    """``unet`` or ``flux``: which denoiser the base model has, from its ``model_index.json``. A local folder
    without one (a copy of just the denoiser's config, as ``convert`` needs) is FLUX when it holds
    ``transformer/config.json`` and no ``unet/config.json``, else a UNet model."""
    try:
        index_file = resolve_folder_file(base_model, "model_index.json", what, where, cache_dir=cache_dir)
    except ModelNotFoundError:
        folder = Path(base_model).expanduser()
        if not folder.is_dir():
            raise
        bare_flux = (folder / "transformer/config.json").is_file() and not (
            folder / "unet/config.json"
        ).is_file()
        return "flux" if bare_flux else "unet"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{what} {str(base_model)!r}: unreadable {index_file} ({error})") from None
    transformer = index.get("transformer") if isinstance(index, Mapping) else None
    if isinstance(transformer, list) and len(transformer) == 2 and str(transformer[1]).startswith("Flux"):
        return "flux"
    if isinstance(index, Mapping) and index.get("unet") is not None:
        return "unet"
    kind = index.get("_class_name", "unknown") if isinstance(index, Mapping) else "unknown"
    raise ValueError(
        f"{what} {str(base_model)!r} is a {kind} without a UNet or a FLUX transformer: MIP-Adapter runs on "
        "SDXL, SD1.5 and FLUX.1 base models"
    )


def denoiser_skeleton(
    base_model: str | Path, what: str = "base model", where: str = "base_model", cache_dir=None
):
    """The base model's denoiser built on the ``meta`` device from its config (no weights read): the UNet
    (``unet/config.json``) or FLUX's transformer (``transformer/config.json``), as ``denoiser_kind`` says."""
    if denoiser_kind(base_model, what, where, cache_dir) == "unet":
        return unet_skeleton(base_model, what, where, cache_dir)
    from diffusers import FluxTransformer2DModel

    config_file = resolve_folder_file(base_model, "transformer/config.json", what, where, cache_dir=cache_dir)
    try:
        config = FluxTransformer2DModel.load_config(str(config_file.parent))
    except (OSError, ValueError) as error:
        raise ValueError(f"{what} {str(base_model)!r}: unreadable {config_file} ({error})") from None
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(config)


def check_adapter_fits(loaded, model, path: str | Path, where: str, default_scale: float | None = None):
    """``check_adapter_file`` for an adapter file already read (``loaded``, from ``read_file``) against
    ``model`` (a UNet or FLUX transformer, on ``meta`` or not), with every refusal one line naming the
    file: a file in a layout with no key table for the model's architecture (an XLabs FLUX file given for
    a UNet) is said to be one (the key listing would not say), and a width mismatch found while the adapter
    is built gets the file's name. where: how to name the base model. Returns the checked file."""
    from mipadapter.checkpoint import CheckpointError, check_adapter_file
    from mipadapter.checkpoint.layouts import misfit
    from mipadapter.modeling.adapter import model_architecture

    misplaced = misfit(loaded.layout, model_architecture(model))
    if misplaced is not None:
        raise CheckpointError(
            f"{path} is {misplaced.description}, but {where} is a {type(model).__name__}: "
            f"load it onto a {misplaced.home or 'different'} base model"
        )
    try:
        return check_adapter_file(path, model, default_scale=default_scale, loaded=loaded)
    except CheckpointError:
        raise
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None


def encoder_input_width(encoder_config: Mapping, uses_hidden_states: bool) -> int | None:
    """The feature width an image encoder's config promises: its hidden size (plus adapters read hidden
    states) or its projection size (basic adapters read the projected embedding).

    encoder_config: a ``CLIPVisionModelWithProjection`` config (h94's image encoders), or a whole CLIP
    model's (``openai/clip-vit-large-patch14``, read by XLabs' FLUX adapters), whose vision part is nested
    in ``vision_config``: ``CLIPVisionModelWithProjection.from_pretrained`` builds from that part, so its
    sizes are the ones read (the top-level ``projection_dim`` only where the part lacks one).
    """
    vision = encoder_config.get("vision_config", encoder_config)
    if uses_hidden_states:
        width = vision.get("hidden_size")
    else:
        width = vision.get("projection_dim", encoder_config.get("projection_dim"))
    return int(width) if width is not None else None


def config_gives(encoder_config: Mapping, adapter: AdapterConfig) -> bool:
    """Whether an image encoder of this config gives the features ``adapter`` takes: the one test behind
    every check and choice of an encoder (a config that does not say its width is not refused)."""
    width = encoder_input_width(encoder_config, adapter.uses_hidden_states)
    return width is None or width == adapter.image_embed_dim


def check_encoder_fits(
    encoder_config: Mapping, adapter: AdapterConfig, encoder_name: str, where: str
) -> None:
    """Refuse an image encoder whose output width is not what the adapter's projection takes."""
    if not config_gives(encoder_config, adapter):
        width = encoder_input_width(encoder_config, adapter.uses_hidden_states)
        kind = "hidden size" if adapter.uses_hidden_states else "projection size"
        raise ValueError(
            f"{where} {encoder_name!r} has {kind} {width}, but the {adapter.projection} adapter takes "
            f"{adapter.image_embed_dim}-wide features: use the image encoder the adapter was trained with"
        )


def _encoder_config(image_encoder: str, where: str) -> dict:
    config_file = resolve_folder_file(image_encoder, "config.json", "image encoder", where)
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{where} {image_encoder!r}: unreadable {config_file} ({error})") from None


def default_preset(base_model: str | Path | None, where: str = "base_model", cache_dir=None) -> str:
    """The preset a call that names none takes: ``ip-flux`` for a FLUX base model, else ``mip-sdxl``."""
    from mipadapter.config import DEFAULT_PRESET

    if base_model is None:
        return DEFAULT_PRESET
    return "ip-flux" if denoiser_kind(base_model, "base model", where, cache_dir) == "flux" else DEFAULT_PRESET


def load_components(
    base_model: str | Path | None = None,
    adapter: str | Path | None = None,
    image_encoder: str | Path | None = None,
    *,
    preset: str = "mip-sdxl",
    torch_dtype: torch.dtype | None = None,
    argument_names: Mapping[str, str] | None = None,
    **pipeline_kwargs,
):
    """(diffusers pipeline, MIPAdapter, image encoder, feature extractor) as ``MIPAdapterPipeline.from_pretrained``
    describes them, smallest first (see the module docstring).

    argument_names: how errors name ``base_model`` / ``adapter`` / ``image_encoder`` (default: those
    argument names; the CLI passes its flags). Other keyword arguments go to the base model's
    ``from_pretrained``.
    """
    from mipadapter.checkpoint import adapter_from_file, read_file
    from mipadapter.hub import resolve_file

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    names = {**ARGUMENT_NAMES, **(argument_names or {})}
    defaults = PRESETS[preset]
    base_model = str(base_model or defaults.base_model)
    image_encoder = str(image_encoder or defaults.image_encoder)
    adapter_source = str(adapter or defaults.adapter)
    cache_dir = pipeline_kwargs.get("cache_dir")

    # 1. the adapter file, against the base model's UNet (or FLUX transformer) config
    adapter_path = resolve_file(adapter_source, "adapter", names["adapter"], cache_dir=cache_dir)
    read = read_file(adapter_path)  # a corrupt file is named before the base model is looked for
    skeleton = denoiser_skeleton(base_model, "base model", names["base_model"], cache_dir)
    checked = check_adapter_fits(
        read, skeleton, adapter_path, f"{names['base_model']} {base_model!r}", defaults.scale
    )
    # 2. the image encoder
    check_encoder_fits(
        _encoder_config(image_encoder, names["image_encoder"]),
        checked.config,
        image_encoder,
        names["image_encoder"],
    )
    encoder, feature_extractor = _load_image_encoder(
        image_encoder, names["image_encoder"], torch_dtype, cache_dir
    )
    # 3. the base model
    pipe = _load_base_model(base_model, names["base_model"], torch_dtype, pipeline_kwargs)
    # 4. the adapter's weights
    loaded = adapter_from_file(checked, denoiser(pipe), str(adapter_path))
    if torch_dtype is not None:
        loaded.to(torch_dtype)
    return pipe, loaded, encoder, feature_extractor


def load_checked_adapter(
    source: str | Path, model, where: str, default_scale: float | None = None, cache_dir=None
):
    """An adapter file (local, or ``owner/repo/file``) read, checked against ``model`` (the loaded UNet)
    and built: a ``MIPAdapter`` on the CPU in the file's dtype. where: how errors name it. Unlike
    ``checkpoint.load_adapter``, a file in another architecture's layout is named as one (``check_adapter_fits``)
    and Hub files go to ``cache_dir``."""
    from mipadapter.checkpoint import adapter_from_file, read_file
    from mipadapter.hub import resolve_file

    path = resolve_file(str(source), "adapter", where, cache_dir=cache_dir)
    checked = check_adapter_fits(read_file(path), model, path, "the base model", default_scale)
    return adapter_from_file(checked, model, str(path))


def load_image_encoder(source: str | Path, adapter: AdapterConfig, where: str, torch_dtype=None, cache_dir=None):
    """(image encoder, feature extractor) from a folder or ``owner/repo/subfolder``, after its config is
    checked to give the features ``adapter`` takes."""
    source = str(source)
    check_encoder_fits(_encoder_config(source, where), adapter, source, where)
    return _load_image_encoder(source, where, torch_dtype, cache_dir)


def check_image_encoder(source: str | Path, adapter: AdapterConfig, where: str) -> None:
    """Refuse, from its config alone (nothing loaded), an image encoder (folder or ``owner/repo/subfolder``)
    that does not give the features ``adapter`` takes; where: how errors name it (a flag)."""
    check_encoder_fits(_encoder_config(str(source), where), adapter, str(source), where)


def image_encoder_gives(source: str | Path, adapter: AdapterConfig, where: str) -> bool:
    """Whether the image encoder at ``source`` gives the features ``adapter`` takes, from its config alone."""
    return config_gives(_encoder_config(str(source), where), adapter)


def encoder_fits(image_encoder, adapter: AdapterConfig) -> bool:
    """Whether a loaded image encoder gives the features ``adapter`` takes (its config's width)."""
    config = image_encoder.config.to_dict() if hasattr(image_encoder.config, "to_dict") else dict(image_encoder.config)
    return config_gives(config, adapter)


def _load_image_encoder(source: str, where: str, torch_dtype, cache_dir):
    from transformers import CLIPVisionModelWithProjection

    location, subfolder = resolve_folder(source, "image encoder", where, cache_dir=cache_dir)
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            location, subfolder=subfolder or "", dtype=torch_dtype, cache_dir=cache_dir
        )
    except OSError as error:
        raise fetch_failed(source, "image encoder", where, error) from error
    return encoder, _load_feature_extractor(location, subfolder, encoder)


def _load_base_model(source: str, where: str, torch_dtype, pipeline_kwargs: dict):
    from diffusers import DiffusionPipeline

    location, subfolder = resolve_folder(
        source, "base model", where, marker="model_index.json", cache_dir=pipeline_kwargs.get("cache_dir")
    )
    if subfolder:
        pipeline_kwargs = {**pipeline_kwargs, "subfolder": subfolder}
    try:
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype; both spellings work
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return DiffusionPipeline.from_pretrained(location, torch_dtype=torch_dtype, **pipeline_kwargs)
    except OSError as error:
        raise fetch_failed(source, "base model", where, error) from error


def _load_feature_extractor(location: str, subfolder: str | None, image_encoder):
    """The image encoder's own preprocessing config where its folder has one, else CLIP's at its size."""
    folder = Path(location) / (subfolder or "")
    if (folder / "preprocessor_config.json").is_file():
        return _clip_processor_class().from_pretrained(str(folder))
    return default_feature_extractor(image_encoder)
