"""Pictures a person can open: routing maps over images and contact sheets (PIL only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

PALETTE = ((230, 57, 70), (29, 120, 220), (46, 160, 67), (240, 160, 20), (150, 80, 200), (20, 170, 170))


def overlay_map(
    image: Image.Image, relevance: np.ndarray, color: tuple[int, int, int] = PALETTE[0], alpha: float = 0.6
) -> Image.Image:
    """Tint ``image`` by a [H, W] map (stretched to the image's size; contrast spread to [0, 1] so that
    where the map is higher shows, whatever its range)."""
    base = image.convert("RGB")
    low, high = float(np.min(relevance)), float(np.max(relevance))
    spread = (relevance - low) / (high - low) if high > low else np.zeros_like(relevance)
    heat = Image.fromarray(np.uint8(np.clip(spread, 0, 1) * 255), mode="L").resize(
        base.size, Image.BILINEAR
    )
    weight = np.asarray(heat, dtype=np.float32)[..., None] / 255.0 * alpha
    tinted = np.asarray(base, dtype=np.float32) * (1 - weight) + np.array(color, dtype=np.float32) * weight
    return Image.fromarray(np.uint8(np.clip(tinted, 0, 255)))


def _fit(image: Image.Image, side: int) -> Image.Image:
    """Letterbox into a white ``side``² square."""
    image = image.convert("RGB")
    scale = side / max(image.size)
    resized = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC
    )
    canvas = Image.new("RGB", (side, side), "white")
    canvas.paste(resized, ((side - resized.width) // 2, (side - resized.height) // 2))
    return canvas


def contact_sheet(
    references: Mapping[str, Sequence[Image.Image]],
    result: Image.Image,
    relevance: Mapping[str, np.ndarray] | None = None,
    side: int = 256,
) -> Image.Image:
    """One row per subject (its photos, then the result tinted by its routing map), result on top.

    references: subject name → its photos; relevance: subject name → [H, W] map (optional).
    """
    label_height = 18
    columns = max(2, 1 + max((len(photos) for photos in references.values()), default=0))
    rows = 1 + len(references)
    sheet = Image.new("RGB", (columns * side, rows * (side + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    sheet.paste(_fit(result, side), (0, label_height))
    draw.text((4, 2), "result", fill="black")
    for row, (name, photos) in enumerate(references.items(), start=1):
        top = row * (side + label_height)
        color = PALETTE[(row - 1) % len(PALETTE)]
        draw.text((4, top + 2), name, fill=color)
        for column, photo in enumerate(photos):
            sheet.paste(_fit(photo, side), (column * side, top + label_height))
        if relevance is not None and name in relevance:
            routed = overlay_map(result, relevance[name], color)
            sheet.paste(_fit(routed, side), ((columns - 1) * side, top + label_height))
    return sheet
