"""Rankings, top-K selections, summary statistics and the score histogram figure.

Rankings (the paper's Table 5 compares the three):
* "s_quality": highest S_quality first, the paper's selection;
* "s_pair_high": highest S_pair first (most dissimilar objects);
* "s_pair_low": lowest S_pair first (most similar objects, the ablation's worst case).
Ties are broken by id so that every run, sharded or not, ranks identically. Records lacking the score
(S_pair in single-subject mode) are not ranked by it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from mipadapter.manifest import SCORE_KEYS, ImageRecord

RANKINGS = {
    "s_quality": ("s_quality", True),
    "s_pair_high": ("s_pair", True),
    "s_pair_low": ("s_pair", False),
}


@dataclass(frozen=True)
class Ranked:
    id: str
    score: float


def rank(records: Sequence[ImageRecord], ranking: str = "s_quality", k: int | None = None) -> list[Ranked]:
    """The top `k` (all when None) records by `ranking` (a key of RANKINGS)."""
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {sorted(RANKINGS)}, got {ranking!r}")
    key, descending = RANKINGS[ranking]
    scored = [Ranked(r.id, r.scores[key]) for r in records if key in r.scores]
    scored.sort(key=lambda x: (-x.score if descending else x.score, x.id))
    return scored if k is None else scored[:k]


def summary(records: Sequence[ImageRecord]) -> dict[str, dict[str, float]]:
    """Count, mean, std and quantiles of each score over `records`."""
    out = {}
    for key in SCORE_KEYS:
        values = sorted(r.scores[key] for r in records if key in r.scores)
        if not values:
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        out[key] = {
            "count": len(values),
            "mean": mean,
            "std": std,
            "min": values[0],
            **{f"p{q}": _quantile(values, q / 100) for q in (5, 25, 50, 75, 95)},
            "max": values[-1],
        }
    objects = [len(r.objects) for r in records]
    if objects:
        out["objects_per_image"] = {
            "count": len(objects),
            "mean": sum(objects) / len(objects),
            "min": min(objects),
            "max": max(objects),
        }
    return out


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def histogram(values: Sequence[float], bins: int) -> tuple[list[int], float, float]:
    """Counts of `values` in `bins` equal-width bins over [min, max]; returns (counts, low, high)."""
    low, high = min(values), max(values)
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - low) / width), bins - 1)] += 1
    return counts, low, high


def draw_histograms(
    records: Sequence[ImageRecord], path: str, bins: int = 40, threshold: float | None = None
) -> bool:
    """A PNG with one histogram panel per score (drawn with PIL, no plotting library needed).

    threshold: the S_quality of the last selected image, drawn as a red line on the S_quality panel.
    Returns False (and writes nothing) when no record has a score.
    """
    panels = [(key, [r.scores[key] for r in records if key in r.scores]) for key in SCORE_KEYS]
    panels = [(key, values) for key, values in panels if values]
    if not panels:
        return False
    panel_w, panel_h, margin = 420, 260, 36
    canvas = Image.new("RGB", (panel_w * len(panels), panel_h), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (key, values) in enumerate(panels):
        counts, low, high = histogram(values, bins)
        left, top = index * panel_w + margin, margin
        plot_w, plot_h = panel_w - 2 * margin, panel_h - 2 * margin
        peak = max(counts)
        bar = plot_w / bins
        for b, count in enumerate(counts):
            height = plot_h * count / peak
            draw.rectangle(
                [left + b * bar, top + plot_h - height, left + (b + 1) * bar - 1, top + plot_h],
                fill=(70, 110, 180),
            )
        draw.line([left, top + plot_h, left + plot_w, top + plot_h], fill="black")
        draw.text((left, 8), f"{key}  n={len(values)}  peak={peak}", fill="black")
        draw.text((left, top + plot_h + 6), f"{low:.3f}", fill="black")
        draw.text((left + plot_w - 40, top + plot_h + 6), f"{high:.3f}", fill="black")
        if key == "s_quality" and threshold is not None and high > low:
            x = left + plot_w * (threshold - low) / (high - low)
            draw.line([x, top, x, top + plot_h], fill=(200, 30, 30), width=2)
    canvas.save(path, format="PNG")
    return True
