"""Validation images: fixed prompts and references, the same seed every time, through the generation
pipeline (`mipadapter.pipeline.MIPAdapterPipeline`) with the adapter being trained."""

from __future__ import annotations

from pathlib import Path

import torch

from mipadapter.training.config import ValidationConfig


def _feature_extractor(image_encoder):
    """A CLIP image processor sized for ``image_encoder`` (resize, centre crop, CLIP mean/std)."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    size = int(image_encoder.config.image_size)
    return processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@torch.no_grad()
def render_validation(
    components, adapter, config: ValidationConfig, rule: str, resolution: int, folder: str | Path
) -> list[Path]:
    """Generate one image per prompt into ``folder`` (``00.png``, ``01.png``, ...); returns the paths.

    The adapter is detached from the UNet for the call and attached again afterwards.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from mipadapter.fileio import atomic_write
    from mipadapter.photos import open_photo
    from mipadapter.pipeline import MIPAdapterPipeline, Subject

    unet = components.unet
    common = dict(
        vae=components.vae,
        unet=unet,
        scheduler=components.inference_scheduler,
        text_encoder=components.text_encoders[0],
        tokenizer=components.tokenizers[0],
    )
    if components.arch == "sdxl":
        pipe = StableDiffusionXLPipeline(
            **common,
            text_encoder_2=components.text_encoders[1],
            tokenizer_2=components.tokenizers[1],
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    was_training = adapter.training
    adapter.eval()
    adapter.detach()
    runner = MIPAdapterPipeline(
        pipe, adapter, components.image_encoder, _feature_extractor(components.image_encoder)
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for number, item in enumerate(config.prompts):
            subjects = [
                Subject(
                    name=s.name,
                    images=(open_photo(s.image, f"validation.prompts[{number}] image of {s.name!r}"),),
                    scale=config.scale,
                )
                for s in item.subjects
            ]
            generator = torch.Generator().manual_seed(config.seed)
            image = runner(
                item.prompt,
                subjects,
                rule=rule,
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
                height=resolution,
                width=resolution,
                generator=generator,
                show_progress=False,
            ).images[0]
            path = folder / f"{number:02d}.png"
            atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            paths.append(path)
    finally:
        runner.unload()
        adapter.attach(unet)
        adapter.train(was_training)
    return paths
