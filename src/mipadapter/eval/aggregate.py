"""Aggregation of per-image scores: mean ± std over seeds, and the per-subject minimum.

A per-image record (see `mipadapter.eval.schema`) carries ``seed``, ``subjects`` (the concept keys it
shows), ``clip_t`` (one number, in the run's CLIP-T convention) and ``clip_i`` / ``dino``
(``{subject key: score}``).

Definitions (the same for CLIP-I and DINO):

* ``clip_i``: per image the mean over its subjects; averaged over the images of one seed; then mean and
  sample standard deviation (ddof=1; ``None`` with one seed) over seeds.
* ``clip_i_min`` (the per-subject minimum): per image the *minimum* over its subjects, then as above.
  An image that loses one subject scores low here even when the mean over subjects stays high.
* ``by_subject``: each subject key's mean over every image that shows it (all seeds), and
  ``worst_subject``: the subject with the lowest such mean.

With ``by_group`` (the authors' evaluation) a seed's value is the mean over groups (Concept101's
combinations) of each group's mean over its images, instead of the mean over all images.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

SUBJECT_METRICS = ("clip_i", "dino")
TABLE_METRICS = ("clip_t", "clip_i", "clip_i_min", "dino", "dino_min")

__all__ = ["SUBJECT_METRICS", "TABLE_METRICS", "aggregate", "mean_std", "per_image_values"]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1) of per-seed values; std is None for one value."""
    if len(values) == 0:
        raise ValueError("mean_std needs at least one value")
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else None
    return float(array.mean()), std


def per_image_values(record: Mapping[str, Any], metric: str) -> float:
    """The table value of one image record for ``metric`` (one of `TABLE_METRICS`)."""
    if metric == "clip_t":
        return float(record["clip_t"])
    base = metric.removesuffix("_min")
    if metric not in TABLE_METRICS or base not in SUBJECT_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {TABLE_METRICS}")
    scores = record[base]
    missing = [key for key in record["subjects"] if key not in scores]
    if missing:
        raise ValueError(f"image {record.get('file')!r} has no {base} score for subjects {missing}")
    values = [float(scores[key]) for key in record["subjects"]]
    return min(values) if metric.endswith("_min") else float(np.mean(values))


def _mean_of(records: Sequence[Mapping[str, Any]], metric: str, by_group: bool) -> float:
    if not by_group:
        return float(np.mean([per_image_values(r, metric) for r in records]))
    groups: dict[str, list[float]] = {}
    for record in records:
        groups.setdefault(str(record["group"]), []).append(per_image_values(record, metric))
    return float(np.mean([np.mean(values) for values in groups.values()]))


def aggregate(records: Iterable[Mapping[str, Any]], *, by_group: bool = False) -> dict[str, Any]:
    """Aggregate the image records of one configuration (see the module docstring for definitions).

    Returns ``{metric: {"mean", "std", "per_seed": {seed: value}}}`` for every metric of
    `TABLE_METRICS`, plus ``by_subject``, ``worst_subject``, ``n_images`` and ``seeds``.
    """
    records = list(records)
    if not records:
        raise ValueError("aggregate got no image records")
    seeds = sorted({int(record["seed"]) for record in records})
    result: dict[str, Any] = {"n_images": len(records), "seeds": seeds}
    for metric in TABLE_METRICS:
        per_seed = {}
        for seed in seeds:
            of_seed = [r for r in records if int(r["seed"]) == seed]
            per_seed[str(seed)] = _mean_of(of_seed, metric, by_group)
        mean, std = mean_std(list(per_seed.values()))
        result[metric] = {"mean": mean, "std": std, "per_seed": per_seed}
    by_subject: dict[str, dict[str, float]] = {}
    worst: dict[str, dict[str, Any]] = {}
    for metric in SUBJECT_METRICS:
        sums: dict[str, list[float]] = {}
        for record in records:
            for key in record["subjects"]:
                sums.setdefault(key, []).append(float(record[metric][key]))
        by_subject[metric] = {key: float(np.mean(values)) for key, values in sorted(sums.items())}
        key = min(by_subject[metric], key=by_subject[metric].__getitem__)
        worst[metric] = {"subject": key, "value": by_subject[metric][key]}
    result["by_subject"] = by_subject
    result["worst_subject"] = worst
    return result
