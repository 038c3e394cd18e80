"""Figures drawn with PIL (no plotting library): routing maps, image-branch attention maps (the kind of
picture of the paper's Fig. 6) and a contact sheet per prompt.

Two different maps appear here. *Routing maps* are the name relevance ``A_i`` (where the UNet's text
attention puts subject i's name) that weights each reference's output. *Image attention maps* show
where each reference's own image tokens attend over the latent (the image branch's attention, softmax
over positions, averaged over its tokens, heads, layers and steps): the paper's Fig. 6 compares these
before and after training, which `attention_comparison` draws from two runs (two checkpoints).

* `overlay`: a [H, W] map coloured (a viridis-like ramp, each map stretched to its own min..max) and
  blended over the image.
* `routing_figure`: one row per subject — the image, the averaged routing map, then one per layer grid.
* `attention_figure`: one row per subject — the image and the subject's image-attention map.
* `attention_comparison`: per subject, the image-attention map of the same prompt and seed in two runs.
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

__all__ = [
    "attention_comparison",
    "attention_figure",
    "colorize",
    "compare_runs",
    "contact_sheet",
    "draw_run_figures",
    "overlay",
    "routing_figure",
]


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


def attention_figure(
    image: Image.Image, names: Sequence[str], maps: Sequence[np.ndarray], *, tile: int = 192
) -> Image.Image:
    """Rows: subjects; columns: the image and where the subject's image tokens attend."""
    if len(names) != len(maps):
        raise ValueError(f"{len(names)} names and {len(maps)} maps differ")
    return _grid(
        [
            [_tile(image, "image", tile), _tile(overlay(image, values), f"{name}: image attention", tile)]
            for name, values in zip(names, maps, strict=True)
        ]
    )


def attention_comparison(
    labels: tuple[str, str],
    images: tuple[Image.Image, Image.Image],
    names: Sequence[str],
    maps: tuple[Sequence[np.ndarray], Sequence[np.ndarray]],
    *,
    tile: int = 192,
) -> Image.Image:
    """The paper's Fig. 6 layout: per subject a row with each run's image and the subject's image
    attention map in that run (labels name the runs, e.g. ``("before", "after")``)."""
    if not (len(names) == len(maps[0]) == len(maps[1])):
        raise ValueError(f"{len(names)} names but {len(maps[0])} and {len(maps[1])} maps")
    rows = []
    for i, name in enumerate(names):
        row = []
        for label, image, run_maps in zip(labels, images, maps, strict=True):
            row += [_tile(image, label, tile), _tile(overlay(image, run_maps[i]), f"{name} ({label})", tile)]
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
    """``figures/<variant>/<stem>.png`` (routing), ``attention_figures/<variant>/<stem>.png`` (image attention)
    and ``sheets/<variant>/<stem>.png`` for every image that has saved maps and no figure yet. Returns
    the number of images whose figures were drawn."""
    from mipadapter.eval.generate import ImageKey, load_maps, save_image
    from mipadapter.photos import open_photo

    out_dir = Path(out_dir)
    drawn = 0
    for variant in variant_names:
        for case in cases:
            for seed in seeds:
                for k in range(images_per_prompt):
                    key = ImageKey(variant, case.index, seed, k)
                    maps_file, figure_file = key.path(out_dir, "maps", ".npz"), key.path(out_dir, "figures")
                    attention_file = key.path(out_dir, "attention", ".npz")
                    attention_figure_file = key.path(out_dir, "attention_figures")
                    todo_routing = maps_file.exists() and not figure_file.exists()
                    todo_attention = attention_file.exists() and not attention_figure_file.exists()
                    if not (todo_routing or todo_attention):
                        continue
                    image = open_photo(key.path(out_dir), "generated image")
                    if todo_routing:
                        names, averages, grids = load_maps(maps_file)
                        save_image(routing_figure(image, names, averages, grids), figure_file)
                        sheet = contact_sheet(
                            case.prompt, [references(s) for s in case.subjects], names, image, averages
                        )
                        save_image(sheet, key.path(out_dir, "sheets"))
                    if todo_attention:
                        names, maps, _ = load_maps(attention_file)
                        save_image(attention_figure(image, names, maps), attention_figure_file)
                    drawn += 1
    return drawn


def compare_runs(
    before: str | Path, after: str | Path, out_dir: str | Path, labels: tuple[str, str] = ("before", "after")
) -> int:
    """Fig. 6 from two runs of the same benchmark and settings with two checkpoints (e.g. before and
    after training, both run with ``--figures``): for every image both runs have image-attention maps
    of, ``<out_dir>/<variant>/<stem>.png`` = `attention_comparison`. Returns the number drawn."""
    from mipadapter.eval.generate import load_maps, save_image
    from mipadapter.photos import open_photo

    before, after, out_dir = Path(before), Path(after), Path(out_dir)
    pairs = []
    for first in sorted((before / "attention").glob("*/*.npz")):
        second = after / first.relative_to(before)
        if second.is_file():
            pairs.append((first, second))
    if not pairs:
        raise FileNotFoundError(
            f"{before} and {after} share no image-attention maps (attention/<variant>/*.npz): run both with "
            "--figures on the same benchmark, variants and seeds"
        )
    for first, second in pairs:
        variant, stem = first.parent.name, first.stem
        names, maps_before, _ = load_maps(first)
        names_after, maps_after, _ = load_maps(second)
        if names != names_after:
            raise ValueError(f"{first} and {second} show different subjects ({names} vs {names_after})")
        images = tuple(
            open_photo(run / "images" / variant / f"{stem}.png", "generated image") for run in (before, after)
        )
        figure = attention_comparison(labels, images, names, (maps_before, maps_after))
        save_image(figure, out_dir / variant / f"{stem}.png")
    return len(pairs)
