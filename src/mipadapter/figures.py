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
    heat = Image.fromarray(np.uint8(np.clip(spread, 0, 1) * 255), mode="L").resize(base.size, Image.BILINEAR)
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
    results: Image.Image | Sequence[Image.Image],
    relevance: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    side: int = 256,
) -> Image.Image:
    """Every result on top; below, one row per subject: its photos, then each result tinted by the
    subject's routing map (under that result).

    references: subject label → its photos; results: the generated images (one or several);
    relevance: per result, subject label → [H, W] map (optional; one dict for a single result).
    Layout: ``max photos + results`` columns of ``side``² cells, each with a label line above.
    """
    if isinstance(results, Image.Image):
        results = [results]
    results = list(results)
    if isinstance(relevance, Mapping):
        relevance = [relevance]
    if relevance is not None and len(relevance) != len(results):
        raise ValueError(f"got {len(results)} results but routing maps for {len(relevance)}")
    label_height = 18
    photo_columns = max((len(photos) for photos in references.values()), default=0)
    columns = max(1, photo_columns) + len(results)
    rows = 1 + len(references)
    sheet = Image.new("RGB", (columns * side, rows * (side + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    first = columns - len(results)  # results and their routed copies share these columns
    for number, result in enumerate(results):
        left = (first + number) * side
        sheet.paste(_fit(result, side), (left, label_height))
        draw.text((left + 4, 2), f"result {number + 1}" if len(results) > 1 else "result", fill="black")
    for row, (name, photos) in enumerate(references.items(), start=1):
        top = row * (side + label_height)
        color = PALETTE[(row - 1) % len(PALETTE)]
        draw.text((4, top + 2), name, fill=color)
        for column, photo in enumerate(photos):
            sheet.paste(_fit(photo, side), (column * side, top + label_height))
        for number, result in enumerate(results):
            if relevance is not None and name in relevance[number]:
                routed = overlay_map(result, relevance[number][name], color)
                sheet.paste(_fit(routed, side), ((first + number) * side, top + label_height))
    return sheet
