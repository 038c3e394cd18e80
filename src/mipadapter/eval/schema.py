"""The ``results.json`` of a run: what it holds and a validator.

Top level::

    schema              "mipadapter.eval.results/2"
    benchmark           "concept101" | "dreambench-single" | "dreambench-multi"
    clip_t_convention   "concept101" (2.5·max(cos, 0)) | "raw"; clip_t_formula spells it out
    scoring             "ours" | "authors" (``--authors-scoring``: their CLIP-T text, overwritten repeats
                        dropped, combinations weighted equally; absent in older files: "ours")
    models              {"mip": {...}, "ip": {...} | null, "clip": id, "dino": id, "detector": id | null}
    settings            generation settings, seeds, images_per_prompt, the image seed rule
    dataset             {"root", "cases", "quirks": [{"group", "quirk"}], "missing_subjects",
                         "not_named": [{"case", "prompt", "subjects"}] (prompts that never name a subject)}
    variants            {name: {"config": Variant, "aggregate": ..., "aggregate_without_quirks": ... | null}}
    images              one record per image (below)

Image record: variant, case, seed, k, file (relative to the run folder), prompt, group, names (routing
words), subjects (concept keys), clip_t_cos (raw cosine), clip_t (in the run's convention), clip_i and
dino ({subject key: score}), quirks (the case's flagged problems), not_named (subject names the prompt
does not contain: generated with ``require_names_in_prompt=False``, routed by the name's own embedding),
warnings (the pipeline's warnings for the image: subject, index, kind, message); clip_t_text (the text
CLIP-T compared the image with) and, with the authors' scoring, authors_kept (False: their file naming
overwrites this image, so it is not counted).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mipadapter.eval.aggregate import TABLE_METRICS

SCHEMA = "mipadapter.eval.results/2"
TOP_LEVEL = (
    "schema",
    "benchmark",
    "clip_t_convention",
    "clip_t_formula",
    "models",
    "settings",
    "dataset",
    "variants",
    "images",
)
IMAGE_FIELDS = (
    "variant",
    "case",
    "seed",
    "k",
    "file",
    "prompt",
    "group",
    "names",
    "subjects",
    "clip_t_cos",
    "clip_t",
    "clip_i",
    "dino",
    "quirks",
    "not_named",
    "warnings",
)

__all__ = ["IMAGE_FIELDS", "SCHEMA", "TOP_LEVEL", "validate_results"]


def validate_results(data: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first missing or malformed field of a results document."""
    missing = [key for key in TOP_LEVEL if key not in data]
    if missing:
        raise ValueError(f"results lack top-level fields {missing}")
    if data["schema"] != SCHEMA:
        raise ValueError(f"results schema is {data['schema']!r}, expected {SCHEMA!r}")
    if data["clip_t_convention"] not in ("raw", "concept101"):
        raise ValueError(f"unknown clip_t_convention {data['clip_t_convention']!r}")
    for name, variant in data["variants"].items():
        for key in ("config", "aggregate", "aggregate_without_quirks"):
            if key not in variant:
                raise ValueError(f"variant {name!r} lacks {key!r}")
        for metric in TABLE_METRICS:
            entry = variant["aggregate"].get(metric)
            if not isinstance(entry, Mapping) or not {"mean", "std", "per_seed"} <= set(entry):
                raise ValueError(f"variant {name!r}: aggregate[{metric!r}] must hold mean, std and per_seed")
    for number, record in enumerate(data["images"]):
        absent = [key for key in IMAGE_FIELDS if key not in record]
        if absent:
            raise ValueError(f"image record {number} ({record.get('file')!r}) lacks {absent}")
        if record["variant"] not in data["variants"]:
            raise ValueError(f"image record {number} names unknown variant {record['variant']!r}")
        for metric in ("clip_i", "dino"):
            if sorted(record[metric]) != sorted(record["subjects"]):
                raise ValueError(
                    f"image record {number}: {metric} keys {sorted(record[metric])} != subjects {record['subjects']}"
                )
