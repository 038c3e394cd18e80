"""Instance label maps and object crops.

An image's masks are stored as one PNG label map (0 = background, label i = object i), like the
authors' `masks/<id>.png`. Objects are painted largest first, so a small object lying on a large one
keeps its pixels; the visible region of each object is then read back from the map, and that region
(not SAM's raw mask) is what the quality score crops, so the stored data and the scores agree.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from mipadapter.limits import DEFAULT_MAX_PIXELS, header_size
from mipadapter.photos import mask_labels


def paint_label_map(masks: torch.Tensor) -> torch.Tensor:
    """Overlapping masks -> one label map: bool [k, H, W] -> uint8 [H, W], object i has label i + 1."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be [k, H, W], got {tuple(masks.shape)}")
    if masks.shape[0] > 255:
        raise ValueError(f"a uint8 label map holds at most 255 objects, got {masks.shape[0]}")
    label_map = torch.zeros(masks.shape[1:], dtype=torch.uint8)
    areas = masks.flatten(1).sum(1)
    for index in sorted(range(masks.shape[0]), key=lambda i: (-int(areas[i]), i)):
        label_map[masks[index]] = index + 1
    return label_map


def visible_masks(label_map: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """The region of each label: uint8 [H, W] -> bool [len(labels), H, W]."""
    if not labels:
        return torch.zeros((0, *label_map.shape), dtype=torch.bool)
    return label_map[None] == torch.tensor(labels, dtype=label_map.dtype)[:, None, None]


def dominant_label(label_map: np.ndarray, box: tuple[float, float, float, float]) -> int | None:
    """The most frequent non-zero label inside `box` (how the authors tie a box to its segment), or None."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    window = label_map[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)]
    values, counts = np.unique(window[window > 0], return_counts=True)
    return int(values[counts.argmax()]) if len(values) else None


def encode_png(label_map: torch.Tensor | np.ndarray) -> bytes:
    """A uint8 [H, W] map as PNG bytes (mode "L", lossless)."""
    array = label_map.numpy() if isinstance(label_map, torch.Tensor) else label_map
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def read_label_map(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A label-map PNG as integers [H, W] by ``photos.mask_labels``' rule (the one training reads masks
    by). The header is read first: ``PixelLimitError`` above ``max_pixels``, before a pixel is decoded;
    a mask decoded in full takes one or two bytes a pixel, never eight."""
    header_size(path, f"mask {path}", max_pixels)
    with Image.open(path) as image:
        try:
            return mask_labels(image)
        except ValueError as error:
            raise ValueError(f"mask {path}: {error}") from None


def _pad_square(image: Image.Image, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def object_crop(
    image: Image.Image, box: tuple[float, float, float, float], mask: torch.Tensor | None
) -> Image.Image:
    """The object as the image encoder should see it: its box, padded square with white.

    With `mask` (bool [H, W] on the image's grid) pixels outside the segment turn white too: the
    segment pasted on white, the reference the trainer builds.
    """
    x1, y1 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    x2, y2 = min(int(np.ceil(box[2])), image.width), min(int(np.ceil(box[3])), image.height)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {box} is empty inside an image of size {image.size}")
    pixels = np.asarray(image.convert("RGB"))[y1:y2, x1:x2].copy()  # [h, w, 3]
    if mask is not None:
        if tuple(mask.shape) != (image.height, image.width):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match image size {image.height}x{image.width}"
            )
        pixels[~mask[y1:y2, x1:x2].numpy()] = 255
    return _pad_square(Image.fromarray(pixels))
