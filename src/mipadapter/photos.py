"""Opening photos: one helper for every place a photo enters (CLI, Python API, web, training, data, eval).

A photo is refused by its header before it is decoded when it has more pixels than a limit (decoding a
10000×10000 photo takes 2 GB and seconds), a truncated or unreadable file is reported with its path, and
the EXIF orientation a phone writes is applied, so a portrait photo reaches the image encoder upright.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from mipadapter.limits import DEFAULT_MAX_PIXELS

EXIF_ORIENTATION = 0x0112


class PhotoError(ValueError):
    """A photo that cannot be used; the message names the file and what is wrong."""


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (a new image), or ``image`` itself when upright."""
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def photo_size(path: str | os.PathLike, what: str = "photo", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as stored in the file's header, without decoding it; checks what can be checked
    from the header: that it is a file, an image, and within ``max_pixels`` (None: no limit)."""
    path = Path(path)
    if path.is_dir():
        raise PhotoError(f"{what} {str(path)!r} is a folder, not a photo")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        raise PhotoError(f"{what} {str(path)!r} has more pixels than Pillow will decode") from None
    except UnidentifiedImageError:
        raise PhotoError(f"{what} {str(path)!r} is not an image file Pillow can read") from None
    except OSError as error:
        raise PhotoError(f"{what} {str(path)!r} cannot be read: {error}") from None
    if max_pixels is not None and width * height > max_pixels:
        raise PhotoError(
            f"{what} {str(path)!r} is {width}×{height} ({width * height / 1e6:.1f} MP), above the "
            f"{max_pixels / 1e6:g} MP limit: downscale it, or raise the limit"
        )
    return width, height


def upright_size(path: str | os.PathLike, what: str = "photo", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of the photo as ``open_photo`` will give it (a quarter-turn EXIF orientation swaps
    the sides), from its header alone; the same checks as ``photo_size``."""
    width, height = photo_size(path, what, max_pixels)
    try:
        with Image.open(path) as image:
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except OSError as error:
        raise PhotoError(f"{what} {str(path)!r} cannot be read: {error}") from None
    return (height, width) if turned else (width, height)


def open_photo(
    path: str | os.PathLike,
    what: str = "photo",
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    mode: str | None = "RGB",
    turn: bool = True,
) -> Image.Image:
    """Decode a photo fully, upright, in ``mode`` (None keeps the file's mode).

    what: how errors name it (``--subject cat``, ``photo #2 of 'cat'``, a config key). turn: False keeps
    the stored pixel frame (the EXIF bytes stay in ``info``, for ``upright`` later: boxes recorded in the
    stored frame are cut there first). Raises ``FileNotFoundError`` or ``PhotoError`` (a ``ValueError``)
    with the path in the message.
    """
    photo_size(path, what, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                turned = upright(image) if turn else image
                converted = turned if mode is None or turned.mode == mode else turned.convert(mode)
                return converted.copy() if converted is image else converted
    except OSError as error:  # "image file is truncated", broken data streams
        raise PhotoError(f"{what} {str(path)!r} cannot be decoded: {error}") from None
