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


# --- images opened for training and data construction (issue 18, training and data-set parts) --------

MAX_TRAINING_SIDE = 4096  # data.resolution: a square sample of 16.7 MP, four times SDXL's native side
MAX_RECORDED_SIDE = 100_000  # a recorded original_size side (SDXL micro-conditioning): beyond any camera


class PixelLimitError(ValueError):
    """An image whose header declares more pixels than allowed; nothing of it was decoded."""


def header_size(source, what: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as stored in an image's header (a path or a binary file object), read without
    decoding a pixel; raises `PixelLimitError` above ``max_pixels`` (None: Pillow's own bomb limit only),
    ``FileNotFoundError`` for a missing file, and Pillow's ``OSError`` family for a file it cannot read."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            with Image.open(source) as image:
                width, height = image.size
    except Image.DecompressionBombError:  # Pillow refuses past twice its own limit before giving the size
        raise PixelLimitError(f"{what} has more pixels than Pillow will decode") from None
    if max_pixels is not None and width * height > max_pixels:
        raise PixelLimitError(
            f"{what} is {width}×{height} ({width * height / 1e6:.1f} MP), above the "
            f"{max_pixels / 1e6:g} MP limit"
        )
    return width, height
