"""Opening photos: one helper for every place a photo enters (CLI, Python API, web, training, data, eval).

A photo is refused by its header before it is decoded when it has more pixels than a limit (decoding a
10000×10000 photo takes 2 GB and seconds), a truncated or unreadable file is reported with its path, and
the EXIF orientation a phone writes is applied, so a portrait photo reaches the image encoder upright.
Every mode Pillow opens is converted with its full range (``to_mode``): a 16-bit greyscale PNG is not
clipped to white, a transparent background becomes white (black in a mask). A folder, a FIFO or a device
given as a photo is named as such and never opened (opening a FIFO would block).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mipadapter.limits import DEFAULT_MAX_PIXELS, PixelLimitError, check_pixels, header_size

EXIF_ORIENTATION = 0x0112


class PhotoError(ValueError):
    """A photo that cannot be used; the message names the file and what is wrong."""


def mask_labels(image: Image.Image) -> np.ndarray:
    """An opened mask or label-map image as integers [H, W], the one rule for every reader (the data
    build and training).

    Grey, palette and 16-bit images keep their raw values in their own integer type (labels stay
    labels, never widened to int64). A colour image whose colour channels agree is a grey label map
    saved in colour: its labels are kept; one whose channels differ is a colour mask: 1 where any
    channel is set. An alpha channel is not a label. Mode ``1`` gives 0/1. ValueError for float pixels.
    """
    array = np.asarray(image)
    if array.ndim == 3:
        colours = array[..., :-1] if image.mode in ("LA", "RGBA", "La", "RGBa", "PA") else array
        same = bool((colours == colours[..., :1]).all())
        array = colours[..., 0] if same else colours.any(axis=-1)
    if array.dtype == np.bool_:  # not a view: Pillow's mode "1" arrays hold 255 behind True
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{array.dtype} pixels are not integer labels")
    return array


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (a new image), or ``image`` itself when upright."""
    if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def special_kind(path: str | os.PathLike) -> str | None:
    """What a path that is not a regular file is ("a folder", "a named pipe (FIFO)" …), None for a regular
    file or a missing path. Read with ``stat``: nothing is opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_is_file(path: str | os.PathLike, what: str = "photo") -> Path:
    """``path`` if it is a regular file; ``PhotoError`` naming a folder, FIFO or device as such,
    ``FileNotFoundError`` when it does not exist."""
    path = Path(path)
    kind = special_kind(path)
    if kind is not None:
        raise PhotoError(f"{what} {str(path)!r} is {kind}, not a photo")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")
    return path


def _source(path_or_bytes) -> tuple[object, str]:
    """What ``Image.open`` reads and how messages name it: a checked file path, or bytes (named by
    ``what`` alone)."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        return io.BytesIO(path_or_bytes), ""
    return path_or_bytes, f" {str(path_or_bytes)!r}"


def image_size(
    source: str | os.PathLike | bytes, what: str = "photo", max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """(width, height) as stored in the header of a file or of encoded bytes (an embedded mask), without
    decoding the pixels; checks that it is an image within ``max_pixels`` (None: no limit)."""
    if not isinstance(source, (bytes, bytearray)):
        source = check_is_file(source, what)
    opened, named = _source(source)
    try:
        width, height = header_size(opened, f"{what}{named}", max_pixels=None)  # Pillow's bomb limit only
    except PixelLimitError as error:
        raise PhotoError(str(error)) from None
    except UnidentifiedImageError:
        raise PhotoError(f"{what}{named} is not an image file Pillow can read") from None
    except (OSError, ValueError) as error:  # ValueError: Pillow's "Truncated IHDR chunk" of a broken PNG
        raise PhotoError(f"{what}{named} cannot be read: {error}") from None
    try:
        check_pixels(width, height, f"{what}{named}", max_pixels)
    except ValueError as error:
        raise PhotoError(str(error)) from None
    return width, height


def photo_size(
    path: str | os.PathLike, what: str = "photo", max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """(width, height) as stored in the file's header, without decoding it; checks what can be checked
    from the header: that it is a file, an image, and within ``max_pixels`` (None: no limit)."""
    return image_size(Path(path), what, max_pixels)


def upright_size(
    path: str | os.PathLike, what: str = "photo", max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """(width, height) of the photo as ``open_photo`` will give it (a quarter-turn EXIF orientation swaps
    the sides), from its header alone; the same checks as ``photo_size``."""
    width, height = photo_size(path, what, max_pixels)
    try:
        with Image.open(path) as image:
            turned = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
    except OSError as error:
        raise PhotoError(f"{what} {str(path)!r} cannot be read: {error}") from None
    return (height, width) if turned else (width, height)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""Integer modes read as 0 … 65535 (a 16-bit PNG opens as ``I;16``, or ``I`` in older Pillow)."""


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """An ``I;16``/``I``/``F`` image → ``L`` with its full range: integers as 0 … 65535; floats as
    0 … 1 when none exceeds 1, else as 0 … 255."""
    values = np.asarray(image, dtype=np.float64)  # float32 products would round k + ½ the wrong way
    if image.mode == "F":
        values = values if (values > 1.0).any() else values * 255.0  # NaN exceeds nothing
    else:
        values = values / 257.0  # 65535 → 255
    values = np.nan_to_num(values)  # NaN → 0; ±inf → ±1.8e308, which the clip makes 255 and 0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # 2-D uint8: mode L


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in ``mode`` ("RGB" for photos, "L" for masks) with its full range.

    High-bit modes (``I;16``, ``I``, ``F``) are scaled to 8 bits, not clipped. Transparency (an alpha band,
    premultiplied or not, or a palette or colour key marked transparent, in ``mode`` itself too) is
    flattened: over white for an RGB photo (the background a viewer shows), over black for a mask
    (transparent = not the subject).
    """
    if image.mode == mode and "transparency" not in image.info:  # a colour key is flattened in any mode
        return image
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        return _to_8bit_grey(image).convert(mode)
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts it to its plain form only
        image = image.convert(image.mode.upper())
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, "white" if mode != "L" else "black")
        image = Image.alpha_composite(background, rgba)
    return image.convert(mode)


def open_photo(
    path: str | os.PathLike | bytes,
    what: str = "photo",
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    mode: str | None = "RGB",
    turn: bool = True,
) -> Image.Image:
    """Decode a photo fully, upright, in ``mode`` (None keeps the file's mode; see ``to_mode``).

    path: a file, or encoded bytes (an embedded mask; errors then name it by ``what`` alone). what: how
    errors name it (``--subject cat``, ``photo #2 of 'cat'``, a config key). turn: False keeps the stored
    pixel frame (the EXIF bytes stay in ``info``, for ``upright`` later: boxes recorded in the stored
    frame are cut there first). The size is checked from the header before decoding. Raises
    ``FileNotFoundError`` or ``PhotoError`` (a ``ValueError``) with the path in the message.
    """
    image_size(path, what, max_pixels)
    opened, named = _source(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(opened) as image:
                image.load()
                turned = upright(image) if turn else image
                converted = turned if mode is None else to_mode(turned, mode)
                return converted.copy() if converted is image else converted
    except OSError as error:  # "image file is truncated", broken data streams
        raise PhotoError(f"{what}{named} cannot be decoded: {error}") from None
