"""Loading the frozen models and building the trainable adapter (explicit I/O, no device choice).

The caller moves modules to its device; `build_adapter` starts from a checkpoint (h94 IP-Adapter,
the authors' MIP file, or ours) or from the UNet's own ``to_k``/``to_v``.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mipadapter.config import AdapterConfig
from mipadapter.modeling import MIPAdapter
from mipadapter.training.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """Everything a run loads from the base pipeline and image encoder (float32, CPU, eval mode)."""

    arch: str
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list
    image_encoder: nn.Module
    noise_scheduler: object
    inference_scheduler: object
    start_adapter: MIPAdapter | None = None  # model.adapter_init already loaded (the ``--tiny`` runs)

    @property
    def reference_size(self) -> int:
        return int(self.image_encoder.config.image_size)


def detect_arch(unet: nn.Module) -> str:
    """``sdxl`` for a UNet with SDXL's micro-conditioning (``text_time``), else ``sd15``."""
    return "sdxl" if getattr(unet.config, "addition_embed_type", None) == "text_time" else "sd15"


def freeze(*modules: nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()


def components_from_pipeline(pipe, image_encoder: nn.Module, arch: str = "auto") -> Components:
    """Components of an already built diffusers pipeline (what the tests and ``--tiny`` runs use)."""
    from diffusers import DDPMScheduler

    detected = detect_arch(pipe.unet)
    if arch not in ("auto", detected):
        raise ValueError(f"model.arch is {arch!r} but the base model's UNet is {detected}")
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if detected == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if detected == "sdxl" else [])
    freeze(pipe.unet, pipe.vae, image_encoder, *text_encoders)
    return Components(
        arch=detected,
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        image_encoder=image_encoder,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        inference_scheduler=pipe.scheduler,
    )


def check_model_files(config: ModelConfig) -> None:
    """What can be checked of the models before any is loaded (seconds, not minutes): the base model's
    ``unet/config.json``, the ``adapter_init`` file key by key and shape by shape against that UNet, and
    the image encoder's ``config.json`` against the adapter's input width. Errors name the config key."""
    import json

    from mipadapter.checkpoint import check_adapter_file
    from mipadapter.hub import looks_local, resolve_file, resolve_folder_file
    from mipadapter.pipeline.loading import check_encoder_fits, unet_skeleton

    skeleton = unet_skeleton(config.base_model, "base model", "model.base_model")
    encoder_file = resolve_folder_file(
        config.image_encoder, "config.json", "image encoder", "model.image_encoder"
    )
    try:
        encoder_config = json.loads(encoder_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"model.image_encoder {config.image_encoder!r}: unreadable {encoder_file} ({error})"
        ) from None
    if config.adapter_init is not None:
        if looks_local(config.adapter_init) and not Path(config.adapter_init).expanduser().exists():
            raise FileNotFoundError(f"model.adapter_init {config.adapter_init!r} does not exist")
        path = resolve_file(config.adapter_init, "adapter to start from", "model.adapter_init")
        checked = check_adapter_file(path, skeleton)
        check_encoder_fits(encoder_config, checked.config, config.image_encoder, "model.image_encoder")


def load_components(config: ModelConfig) -> Components:
    """Load the base pipeline (folder or Hub id) and the image encoder (folder or ``owner/repo/subfolder``);
    offline, a model that is not there fails at once, naming its config key (`mipadapter.hub`)."""
    from diffusers import DiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    from mipadapter.hub import fetch_failed, resolve_folder

    where, what = "model.base_model", "base model"
    base, base_sub = resolve_folder(config.base_model, what, where, marker="model_index.json")
    extra = {"subfolder": base_sub} if base_sub else {}
    try:
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype; both spellings work
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, **extra)
    except OSError as error:
        raise fetch_failed(config.base_model, what, where, error) from error
    where, what = "model.image_encoder", "image encoder"
    location, sub = resolve_folder(config.image_encoder, what, where)
    try:
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            location, subfolder=sub or "", dtype=torch.float32
        )
    except OSError as error:
        raise fetch_failed(config.image_encoder, what, where, error) from error
    return components_from_pipeline(pipe, image_encoder, config.arch)


def _image_embed_dim(image_encoder: nn.Module, projection: str) -> int:
    cfg = image_encoder.config
    return int(cfg.hidden_size if projection == "plus" else cfg.projection_dim)


def build_adapter(
    config: ModelConfig, unet: nn.Module, image_encoder: nn.Module, start: MIPAdapter | None = None
) -> MIPAdapter:
    """The adapter to train, before ``attach``.

    With ``adapter_init`` the checkpoint is loaded strictly (our format, h94's or the authors'); a file
    without ``text_to_weight`` gets fresh gates when ``text_weight`` is set (``text_weight_init``: PyTorch's
    own initialisation, as the authors' training, or zeros). Without it, ``to_k_ip``/``to_v_ip`` copy the
    layers' ``to_k``/``to_v``, the gates start as ``text_weight_init`` says and the projection is fresh.
    start: the ``adapter_init`` checkpoint already loaded (used instead of reading the file).
    """
    from mipadapter.checkpoint import load_adapter

    if config.adapter_init is None:
        cross = unet.config.cross_attention_dim
        adapter_config = AdapterConfig(
            projection=config.projection,
            image_embed_dim=_image_embed_dim(image_encoder, config.projection),
            cross_attention_dim=cross if isinstance(cross, int) else cross[0],
            num_tokens=config.num_tokens,
            text_weight=config.text_weight,
            **(
                dict(resampler_dim=cross, resampler_depth=4, resampler_heads=max(1, cross // 64))
                if config.projection == "plus"
                else {}
            ),
        )
        adapter = MIPAdapter.for_unet(unet, adapter_config)
        adapter.init_from_base(unet, config.text_weight_init)
        return adapter

    loaded = start if start is not None else load_adapter(config.adapter_init, unet)
    expected_dim = _image_embed_dim(image_encoder, loaded.config.projection)
    if loaded.config.image_embed_dim != expected_dim:
        raise ValueError(
            f"{config.adapter_init} reads {loaded.config.image_embed_dim}-d image features but the image "
            f"encoder {config.image_encoder} gives {expected_dim}: pair the checkpoint with its own encoder"
        )
    if loaded.config.text_weight == config.text_weight:
        return loaded
    adapter = MIPAdapter.for_unet(unet, dataclasses.replace(loaded.config, text_weight=config.text_weight))
    missing, unexpected = adapter.load_state_dict(loaded.state_dict(), strict=False)
    if config.text_weight:
        logger.info(
            "%s has no text_to_weight: the gates start from the %s initialisation",
            config.adapter_init,
            config.text_weight_init,
        )
        adapter.init_text_weights(config.text_weight_init)
    else:
        logger.warning(
            "model.text_weight is false: the text_to_weight of %s is not used", config.adapter_init
        )
    bad = [k for k in missing if "text_to_weight" not in k] + [
        k for k in unexpected if "text_to_weight" not in k
    ]
    if bad:
        raise RuntimeError(f"unexpected keys moving {config.adapter_init} into the training adapter: {bad}")
    return adapter


def set_trainable(adapter: MIPAdapter, train_image_proj: bool) -> list[nn.Parameter]:
    """Freeze everything but ``to_k_ip``, ``to_v_ip``, ``text_to_weight`` (and the projection when asked);
    returns the trainable parameters in a fixed order."""
    adapter.requires_grad_(False)
    adapter.layers.requires_grad_(True)
    adapter.image_proj.requires_grad_(train_image_proj)
    return [p for p in adapter.parameters() if p.requires_grad]
