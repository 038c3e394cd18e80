"""Routing-map figures drawn with PIL (no plotting library): overlays like the paper's Fig. 6 and a
contact sheet per prompt.

* `overlay`: a [H, W] map coloured (a viridis-like ramp, each map stretched to its own min..max) and
  blended over the image.
* `routing_figure`: one row per subject — the image, the averaged map, then one map per layer grid.
* `contact_sheet`: the references of each subject, the result, and each subject's averaged map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mipadapter.eval.cases import Case, SubjectSpec

# A viridis-like ramp: control points from dark purple to yellow, interpolated linearly.
_RAMP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32
)
LABEL_HEIGHT = 14

__all__ = ["colorize", "contact_sheet", "draw_run_figures", "overlay", "routing_figure"]


def colorize(values: np.ndarray) -> Image.Image:
    """A [H, W] map with values in [0, 1] (clipped) → RGB image."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"a map must be [H, W], got shape {values.shape}")
    position = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    frac = (position - low)[..., None]
    rgb = _RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def overlay(
    image: Image.Image, values: np.ndarray, alpha: float = 0.55, *, stretch: bool = True
) -> Image.Image:
    """The coloured map (stretched to the image's size) blended over ``image`` with weight ``alpha``.

    stretch: map the map's own min..max to 0..1 first (figures show where a map is high, not its scale).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    values = np.asarray(values, dtype=np.float32)
    if stretch:
        low, high = float(values.min()), float(values.max())
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    colour = colorize(values).resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image.convert("RGB"), colour, alpha)


def _tile(image: Image.Image, label: str, size: int) -> Image.Image:
    tile = Image.new("RGB", (size, size + LABEL_HEIGHT), (255, 255, 255))
    scale = size / max(image.size)
    fitted = image.convert("RGB").resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
    )
    tile.paste(fitted, ((size - fitted.width) // 2, LABEL_HEIGHT + (size - fitted.height) // 2))
    ImageDraw.Draw(tile).text((2, 1), label[: max(4, size // 6)], fill=(0, 0, 0))
    return tile


def _grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    width = max(sum(tile.width for tile in row) for row in rows)
    height = sum(max(tile.height for tile in row) for row in rows)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for row in rows:
        x = 0
        for tile in row:
            sheet.paste(tile, (x, y))
            x += tile.width
        y += max(tile.height for tile in row)
    return sheet


def routing_figure(
    image: Image.Image,
    names: Sequence[str],
    averages: Sequence[np.ndarray],
    by_grid: Sequence[dict[tuple[int, int], np.ndarray]],
    *,
    tile: int = 192,
) -> Image.Image:
    """Rows: subjects; columns: the image, the map averaged over layers, one map per layer grid (h×w)."""
    if not (len(names) == len(averages) == len(by_grid)):
        raise ValueError(f"{len(names)} names, {len(averages)} maps and {len(by_grid)} grid sets differ")
    rows = []
    for name, average, grids in zip(names, averages, by_grid, strict=True):
        row = [_tile(image, "image", tile), _tile(overlay(image, average), f"{name}: mean", tile)]
        for (h, w), values in sorted(grids.items(), key=lambda item: -item[0][0] * item[0][1]):
            row.append(_tile(overlay(image, values), f"{h}x{w}", tile))
        rows.append(row)
    return _grid(rows)


def contact_sheet(
    prompt: str,
    references: Sequence[Sequence[Image.Image]],
    names: Sequence[str],
    image: Image.Image,
    averages: Sequence[np.ndarray] | None = None,
    *,
    tile: int = 160,
) -> Image.Image:
    """Row per subject: its references, then the result and the subject's averaged map; prompt on top."""
    rows: list[list[Image.Image]] = []
    for number, (name, photos) in enumerate(zip(names, references, strict=True)):
        row = [_tile(photo, f"{name} ref {i + 1}", tile) for i, photo in enumerate(photos)]
        row.append(_tile(image, "result", tile))
        if averages is not None:
            row.append(_tile(overlay(image, averages[number]), f"{name} map", tile))
        rows.append(row)
    body = _grid(rows)
    banner = Image.new("RGB", (body.width, LABEL_HEIGHT + 4), (255, 255, 255))
    ImageDraw.Draw(banner).text((4, 2), prompt, fill=(0, 0, 0))
    return _grid([[banner], [body]])


def draw_run_figures(
    out_dir: str | Path,
    cases: Sequence[Case],
    variant_names: Sequence[str],
    seeds: Sequence[int],
    images_per_prompt: int,
    references: Callable[[SubjectSpec], list[Image.Image]],
) -> int:
    """``figures/<variant>/<stem>.png`` (routing) and ``sheets/<variant>/<stem>.png`` for every image that
    has saved maps and no figure yet. Returns the number of figures drawn."""
    from mipadapter.eval.generate import ImageKey, load_maps, save_image

    out_dir = Path(out_dir)
    drawn = 0
    for variant in variant_names:
        for case in cases:
            for seed in seeds:
                for k in range(images_per_prompt):
                    key = ImageKey(variant, case.index, seed, k)
                    maps_file, figure_file = key.path(out_dir, "maps", ".npz"), key.path(out_dir, "figures")
                    if not maps_file.exists() or figure_file.exists():
                        continue
                    names, averages, grids = load_maps(maps_file)
                    with Image.open(key.path(out_dir)) as opened:
                        image = opened.convert("RGB")
                    save_image(routing_figure(image, names, averages, grids), figure_file)
                    sheet = contact_sheet(
                        case.prompt, [references(s) for s in case.subjects], names, image, averages
                    )
                    save_image(sheet, key.path(out_dir, "sheets"))
                    drawn += 1
    return drawn
