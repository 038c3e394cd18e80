"""The page's canvas preview: every subject's box or painted region drawn over the output canvas in the
subject's colour, and a one-line summary of each. PIL only (no gradio): tests call it directly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mipadapter.web.handler import Limits, SubjectForm, painted_mask, parse_box, slot_color

PREVIEW_SIDE = 256
"""The preview's longer side in pixels; the canvas keeps the output's aspect ratio."""
BACKGROUND = (222, 222, 222)  # a grey that stands out from the page around it
FILL_ALPHA = 0.3  # boxes: a light tint, the outline carries the colour
PAINT_ALPHA = 0.55
OUTLINE = 3
NO_REGIONS = "No regions: each subject goes wherever its name is relevant."


@dataclass
class RegionPreview:
    """image: the canvas (output aspect ratio, ``PREVIEW_SIDE`` on its longer side) with every region;
    summary: one Markdown line per non-blank slot, saying where that subject goes."""

    image: Image.Image
    summary: str


def canvas_size(width: int, height: int, side: int = PREVIEW_SIDE) -> tuple[int, int]:
    """(width, height) of the preview of a ``width``×``height`` output: longer side ``side`` pixels."""
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def paint_canvas(
    width: int,
    height: int,
    mask: np.ndarray | None = None,
    color: tuple[int, int, int] = (0, 0, 0),
    side: int = PREVIEW_SIDE,
) -> dict:
    """The region editor's value for a ``width``×``height`` output: a blank canvas at the output's aspect
    ratio (``canvas_size``: ``side`` pixels on its longer side) and one layer of ``color``: transparent,
    or ``mask`` ([H, W] in [0, 1], painted on a canvas of any size) stretched onto it as its alpha.

    The editor takes its canvas size from the background (its ``fixed_canvas`` off), so setting this
    value is how the canvas follows the page's width and height, the painting rescaled with it. The
    handler stretches whatever mask it gets to the output (``pipeline.subjects.region_mask``): a region
    painted on this canvas lands on the same part of the image.

    The layer is there even when blank: loading it counts as the change Gradio's editor ignores after
    it is mounted (without it, a person's first stroke would be the one ignored).

    Returns ``{"background": RGB image, "layers": [RGBA image], "composite": None}``.
    """
    size = canvas_size(width, height, side)
    layer = Image.new("RGBA", size, (*color, 0))
    if mask is not None:
        alpha = Image.fromarray(np.uint8(np.rint(np.clip(mask, 0.0, 1.0) * 255)), mode="L")
        layer.putalpha(alpha.resize(size, Image.BILINEAR))
    return {"background": Image.new("RGB", size, BACKGROUND), "layers": [layer], "composite": None}


def preview_size(width, height, side: int, limits: Limits) -> tuple[tuple[int, int], str | None]:
    """The output size the preview draws for the page's width and height fields, and why not those
    (the handler's own message, the CLI's wording) when they would be refused: then ``side``×``side``."""
    from mipadapter.limits import LimitError, check_output_pixels, check_side

    try:
        size = check_side(width, "The width", limits), check_side(height, "The height", limits)
        check_output_pixels(*size, limits)
    except LimitError as error:
        return (side, side), f"{error}: nothing is generated at that size."
    return size, None


def _tint(canvas: Image.Image, coverage: np.ndarray, color: tuple[int, int, int]) -> Image.Image:
    """Blend ``color`` into ``canvas`` by ``coverage`` ([H, W] in [0, 1], the canvas's size)."""
    base = np.asarray(canvas, dtype=np.float32)
    weight = coverage[..., None]
    blended = base * (1 - weight) + np.asarray(color, dtype=np.float32) * weight
    return Image.fromarray(np.uint8(np.clip(np.rint(blended), 0, 255)))


def region_preview(
    forms: Sequence[SubjectForm],
    width: int,
    height: int,
    side: int = PREVIEW_SIDE,
    max_painted_pixels: int | None = Limits.max_painted_pixels,
) -> RegionPreview:
    """Draw each slot's box (outline and light fill) or painted region (tint) on a blank canvas.

    forms: the page's subject slots in order (slot ``i`` is drawn in ``slot_color(i)``); width, height:
    the output size in pixels, the unit of the boxes. A box not (yet) complete or not numeric is left
    out of the drawing and said so in the summary; boxes reaching past the canvas are clipped; a painted
    layer above ``max_painted_pixels`` is refused (said so) before it is decoded.
    """
    size = canvas_size(width, height, side)
    scale = size[0] / width
    canvas = Image.new("RGB", size, BACKGROUND)
    outlines: list[tuple[tuple[int, int, int, int], tuple[int, int, int]]] = []
    labels: list[tuple[tuple[float, float], tuple[int, int, int], str]] = []
    lines = []
    for slot, form in enumerate(forms):
        name = (form.name or "").strip()
        label = f"{slot + 1} {name}".strip()
        title = f"**{slot + 1}** {name!r}" if name else f"**{slot + 1}**"
        color = slot_color(slot)
        try:
            box = parse_box(form.box)
        except ValueError as error:
            lines.append(f"{title}: box not drawn ({error})")
            box = None
        try:
            mask = painted_mask(form.painted, max_painted_pixels)
        except ValueError as error:
            lines.append(f"{title}: painted region not drawn ({error})")
            mask = None
        if box is not None and not (box[0] < box[2] and box[1] < box[3]):
            lines.append(f"{title}: box not drawn (x0 < x1 and y0 < y1 are needed)")
            box = None
        if box is not None:
            numbers = ", ".join(f"{value:g}" for value in box)
            # canvas pixels [left, right) × [top, bottom), clipped to the canvas
            left, top = (max(0, round(value * scale)) for value in box[:2])
            right, bottom = (
                min(limit, round(value * scale)) for value, limit in zip(box[2:], size, strict=True)
            )
            if right <= left or bottom <= top:
                lines.append(f"{title}: box not drawn (({numbers}) lies outside the canvas)")
                box = None
        if box is not None:
            coverage = np.zeros((size[1], size[0]), dtype=np.float32)
            coverage[top:bottom, left:right] = FILL_ALPHA
            canvas = _tint(canvas, coverage, color)
            outlines.append(((left, top, right, bottom), color))
            labels.append(((left + OUTLINE + 2, top + OUTLINE + 1), color, label))
            lines.append(f"{title}: box ({numbers})")
        if mask is not None:
            stretched = Image.fromarray(np.uint8(np.rint(mask * 255)), mode="L").resize(size, Image.BILINEAR)
            coverage = np.asarray(stretched, dtype=np.float32) / 255.0 * PAINT_ALPHA
            canvas = _tint(canvas, coverage, color)
            rows, columns = np.nonzero(np.asarray(stretched) > 127)
            if rows.size:
                labels.append(((float(columns.min()) + 2, float(rows.min()) + 1), color, label))
            lines.append(f"{title}: painted region ({mask.mean():.0%} of the canvas)")
        if (
            box is None
            and mask is None
            and (name or form.photos)
            and not any(line.startswith(title) for line in lines)
        ):
            lines.append(f"{title}: anywhere its name is relevant (no region)")
    draw = ImageDraw.Draw(canvas)
    for (x0, y0, x1, y1), color in outlines:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=OUTLINE)
    for position, color, label in labels:
        draw.text(position, label, fill=color)
    return RegionPreview(canvas, "  \n".join(lines) or NO_REGIONS)
