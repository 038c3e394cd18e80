"""Every limit the project enforces, in one place.

A request that asks for more than the machine can give (a 9000×9000 painted layer, 1e9 steps, an 8192²
image) is refused here, before anything is decoded or any model loads, with a message that names the
value and how to ask for more. The CLI, ``--from-png`` recipes, the web server, training configs and
checkpoints all read their bounds from this module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

DEFAULT_MAX_PIXELS = (
    50_000_000  # 50 MP per opened image: above any phone photo, far below what exhausts memory
)


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
    max_scale: float = 1.5  # a subject's image scale (the page's strength slider ends there)
    max_output_pixels: int | None = None  # width × height; None: max_side²

    @property
    def output_pixels(self) -> int:
        """The largest width × height allowed."""
        return self.max_side**2 if self.max_output_pixels is None else self.max_output_pixels
    # the web server's own bounds (per browser session: its cookie; uploads count for an hour, the time
    # Gradio keeps them)
    max_painted_pixels: int = 4_000_000  # per painted layer (the page's canvas is 256 on its longer side)
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


LATENT_CELL = 8
"""Pixels per latent side of the SD1.5 and SDXL VAEs: the finest step an output side can take before a
model is loaded to say its own (``side_multiple``; FLUX's 16 is checked by its pipeline)."""


def latent_sides(limits: Limits) -> Limits:
    """``limits`` with sides allowed down to one latent cell, in steps of it (eval's sizes, checked before
    a model says its own multiple)."""
    return dataclasses.replace(limits, min_side=LATENT_CELL, side_multiple=LATENT_CELL)


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
# ----------------------------------------------------------------------------------------------- checks
SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes without wrapping; generate, eval, web
ALLOW_LARGE = "--allow-large"
# a recipe's JSON: Pillow reads no larger PNG text chunk, and a JPEG comment holds 64 KiB
MAX_RECIPE_BYTES = 1 << 20


class LimitError(ValueError):
    """A value outside its range; the message names the value, where it came from and, when a flag
    allows more, that flag."""


DEFAULT_LIMITS = Limits()
"""The caps of ``mipadapter generate`` and ``--from-png`` (the web's, for SDXL and FLUX)."""

LARGE_LIMITS = Limits(
    max_side=8192,
    max_output_pixels=4096 * 4096,
    max_steps=10_000,
    max_images=64,
    max_guidance=1000.0,
    max_scale=100.0,
)
"""The bounds ``--allow-large`` raises the caps to: what a big GPU can still run with finite numbers
(float16 overflows at 65504; a guidance or scale in the thousands only multiplies noise)."""

MAX_EMBEDDED_MASK_PIXELS = LARGE_LIMITS.output_pixels  # a mask stored in a recipe: the largest output allowed


def _hint(value, cap, ceiling, allow: str | None) -> str:
    """`` (--allow-large allows up to N)`` when ``value`` is above ``cap`` but within ``ceiling``."""
    if allow is None or ceiling is None or not cap < value <= ceiling:
        return ""
    return f" ({allow} allows up to {ceiling:g})"


def check_integer(
    value, what: str, low: int, high: int, *, ceiling: int | None = None, allow: str | None = None
) -> int:
    """``value`` as an int in ``low..high``; a ``LimitError`` naming ``what`` otherwise (with the flag
    ``allow`` that raises ``high`` up to ``ceiling`` when that would help). Booleans and floats (even
    whole ones: a recipe's ``1e9`` is not a step count) are refused."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or not low <= value <= high:
        hint = _hint(value, high, ceiling, allow) if whole else ""
        raise LimitError(f"{what} must be an integer between {low} and {high}, got {value}{hint}")
    return int(value)


def check_number(
    value, what: str, low: float, high: float, *, ceiling: float | None = None, allow: str | None = None
) -> float:
    """``value`` as a finite float in ``[low, high]``; a ``LimitError`` naming ``what`` otherwise (NaN,
    ±inf, a string, a bool and a number too large for a float all are)."""
    try:
        number = float(value) if not isinstance(value, (bool, str)) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not (math.isfinite(number) and low <= number <= high):
        hint = _hint(number, high, ceiling, allow) if math.isfinite(number) else ""
        raise LimitError(f"{what} must be a finite number between {low:g} and {high:g}, got {value}{hint}")
    return number


def check_seed(value, what: str = "--seed") -> int:
    """A seed in ``SEED_RANGE``: the one range of generate, eval and the web page."""
    return check_integer(value, what, *SEED_RANGE)


def check_side(value, what: str, limits: Limits = DEFAULT_LIMITS, *, allow: str | None = None) -> int:
    """An output side: a multiple of ``limits.side_multiple`` in ``[min_side, max_side]`` pixels."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or value % limits.side_multiple or not limits.min_side <= value <= limits.max_side:
        hint = _hint(value, limits.max_side, LARGE_LIMITS.max_side, allow) if whole else ""
        raise LimitError(
            f"{what} must be a multiple of {limits.side_multiple} between {limits.min_side} and "
            f"{limits.max_side} pixels, got {value}{hint}"
        )
    return int(value)


def check_output_pixels(
    width: int, height: int, limits: Limits = DEFAULT_LIMITS, *, allow: str | None = None
) -> None:
    """Width × height within ``limits.output_pixels`` (each side checked on its own by ``check_side``)."""
    pixels = width * height
    if pixels > limits.output_pixels:
        hint = _hint(pixels, limits.output_pixels, LARGE_LIMITS.output_pixels, allow)
        hint = hint and f" ({allow} allows up to {LARGE_LIMITS.output_pixels / 1e6:.1f} MP)"
        raise LimitError(
            f"the output size {width}×{height} is {pixels / 1e6:.1f} MP, above the limit of "
            f"{limits.output_pixels / 1e6:.1f} MP{hint}"
        )


def check_steps(
    value, what: str = "--steps", limits: Limits = DEFAULT_LIMITS, *, allow: str | None = None
) -> int:
    return check_integer(value, what, 1, limits.max_steps, ceiling=LARGE_LIMITS.max_steps, allow=allow)


def check_images(
    value, what: str = "--num-images", limits: Limits = DEFAULT_LIMITS, *, allow: str | None = None
) -> int:
    return check_integer(value, what, 1, limits.max_images, ceiling=LARGE_LIMITS.max_images, allow=allow)


def check_guidance(
    value, what: str = "--guidance", limits: Limits = DEFAULT_LIMITS, *, allow: str | None = None
) -> float:
    return check_number(value, what, 0, limits.max_guidance, ceiling=LARGE_LIMITS.max_guidance, allow=allow)


def check_scale(value, what: str, limits: Limits = DEFAULT_LIMITS, *, allow: str | None = None) -> float:
    """A subject's image scale (the web page's strength): finite, ≥ 0, at most ``limits.max_scale``."""
    return check_number(value, what, 0, limits.max_scale, ceiling=LARGE_LIMITS.max_scale, allow=allow)


def check_pixels(
    width: int, height: int, what: str, max_pixels: int | None, how: str = "raise the limit"
) -> None:
    """An image's width × height, read from its header, within ``max_pixels`` (None: no limit): checked
    before it is decoded (a 35 KB PNG can decode to gigabytes)."""
    if max_pixels is not None and width * height > max_pixels:
        raise LimitError(
            f"{what} is {width}×{height} ({width * height / 1e6:.1f} MP), above the "
            f"{max_pixels / 1e6:.3g} MP limit: downscale it, or {how}"
        )
