"""Every limit the project enforces, in one place.

A request that asks for more than the machine can give (a 9000×9000 painted layer, 1e9 steps, an 8192²
image) is refused here, before anything is decoded or any model loads, with a message that names the
value and how to ask for more. The CLI, ``--from-png`` recipes, the web server, training configs and
checkpoints all read their bounds from this module.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP per opened image: above any phone photo, far below what exhausts memory


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server.

    Output sides lie in ``[min_side, max_side]`` and are multiples of ``side_multiple`` pixels.
    """

    max_subjects: int = 4
    max_photos: int = 4  # per subject
    max_upload_bytes: int = 10 * 2**20  # per photo file
    max_photo_pixels: int = 40_000_000  # per photo (width × height)
    min_side: int = 512
    max_side: int = 1536
    side_multiple: int = 32
    max_steps: int = 100
    max_images: int = 4
    max_guidance: float = 30.0
    # the web server's own bounds (per browser session: its cookie; uploads count for an hour, the time
    # Gradio keeps them)
    max_painted_pixels: int = 4_000_000  # per painted layer (the page's canvas is 256×256)
    max_session_uploads: int = 1000  # files one browser session may upload per hour (painting uploads
    # the canvas's layers as files, a few per stroke)
    max_session_upload_bytes: int = 256 * 2**20  # bytes one browser session may upload per hour
    max_server_upload_bytes: int = 2 * 2**30  # bytes all sessions together may upload per hour

    @classmethod
    def for_pipeline(cls, pipe, **overrides) -> Limits:
        """Output sizes around the model's native side (half to one and a half times it)."""
        side, multiple = native_side(pipe), side_multiple(pipe)
        sizes = {
            "min_side": max(multiple, side // 2 // multiple * multiple),
            "max_side": max(multiple, side * 3 // 2 // multiple * multiple),
            "side_multiple": multiple,
        }
        return cls(**{**sizes, **overrides})


def native_side(pipe) -> int:
    """The output side the base model was trained at (pixels): latent sample size × VAE scale factor
    (the UNet's sample size; a transformer pipeline's ``default_sample_size``)."""
    inner = pipe.pipe
    unet = getattr(inner, "unet", None)
    sample_size = unet.config.sample_size if unet is not None else inner.default_sample_size
    return int(sample_size * inner.vae_scale_factor)


def side_multiple(pipe) -> int:
    """Output sides must be multiples of this: the VAE factor times the UNet's total downsampling (a
    transformer pipeline such as FLUX packs latents in 2×2 patches: twice the VAE factor)."""
    inner = pipe.pipe
    unet = getattr(inner, "unet", None)
    if unet is None:
        return int(inner.vae_scale_factor * 2)
    levels = len(unet.config.block_out_channels)
    return int(inner.vae_scale_factor * 2 ** (levels - 1))
