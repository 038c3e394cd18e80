"""Score generated images with CLIP-T, CLIP-I and DINO: one record per image (see `schema`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mipadapter.eval import metrics
from mipadapter.eval.cases import Case, SubjectSpec
from mipadapter.eval.generate import ImageKey, read_meta

__all__ = ["authors_clip_t_text", "authors_kept", "score_images"]


def authors_clip_t_text(prompt: str) -> str:
    """The text the authors' evaluation scores an image against: they save it as ``{prompt}_gen.png``
    and read the prompt back as ``name.split('.')[0] + '.'``, so a prompt without a final period is
    scored with ``_gen.`` appended, and one with an inner period is cut there."""
    return f"{prompt}_gen.png".split(".")[0] + "."


def authors_kept(cases: Sequence[Case]) -> set[int]:
    """Indices of the cases whose image survives the authors' file naming: an image is named after its
    prompt within its combination, so of several cases with one prompt in one group the last one
    generated (the highest index) overwrites the others."""
    last: dict[tuple[str, str], int] = {}
    for case in cases:
        key = (case.group, case.prompt)
        last[key] = max(case.index, last.get(key, case.index))
    return set(last.values())


def _open(path: Path) -> Image.Image:
    from mipadapter.photos import open_photo

    return open_photo(path, "generated image")


def score_images(
    out_dir: str | Path,
    cases: Sequence[Case],
    variant_names: Sequence[str],
    *,
    seeds: Sequence[int],
    images_per_prompt: int,
    encoders: Any,
    references: Callable[[SubjectSpec], list[Image.Image]],
    convention: str,
    batch_size: int = 16,
    authors: bool = False,
) -> list[dict[str, Any]]:
    """Per-image records for every image of ``variant_names`` × ``cases`` × ``seeds`` × k.

    encoders: a `mipadapter.encoders.FeatureEncoders` (``.clip``, ``.dino``); references(subject): the
    photos the metrics compare with (whole photos). Raises if an image is missing. Each record also
    carries the pipeline's warnings for the image (from its meta file) and the subjects it did not find
    named in the prompt (``not_named``), and ``clip_t_text``, the text CLIP-T compared it with: the prompt,
    or with ``authors`` the authors' reading of it (`authors_clip_t_text`); ``authors_kept`` then says
    whether their file naming keeps the image (`authors_kept`).
    """
    out_dir = Path(out_dir)
    metrics.clip_t_convention(0.0, convention)  # fail early on a bad convention name
    clip, dino = encoders.clip, encoders.dino
    ref_clip: dict[str, np.ndarray] = {}
    ref_dino: dict[str, np.ndarray] = {}
    for case in cases:
        if len(set(case.subject_keys)) != len(case.subject_keys):
            raise ValueError(f"case {case.index} repeats a subject key: {case.subject_keys}")
        for subject in case.subjects:
            if subject.key not in ref_clip:
                photos = references(subject)
                ref_clip[subject.key] = clip.image_features(photos).cpu().numpy()
                ref_dino[subject.key] = dino.image_features(photos).cpu().numpy()
    text_of = authors_clip_t_text if authors else str
    texts = sorted({text_of(case.prompt) for case in cases})
    text_features = dict(zip(texts, clip.text_features(texts).cpu().numpy(), strict=True))
    kept = authors_kept(cases) if authors else None

    items = [
        (ImageKey(variant, case.index, seed, k), case)
        for variant in variant_names
        for case in cases
        for seed in seeds
        for k in range(images_per_prompt)
    ]
    missing = [str(key.path(out_dir)) for key, _ in items if not key.path(out_dir).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images to score do not exist, e.g. {missing[:3]}")
    records = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = [_open(key.path(out_dir)) for key, _ in chunk]
        image_clip = clip.image_features(images).cpu().numpy()  # [b, e]
        image_dino = dino.image_features(images).cpu().numpy()  # [b, e']
        prompt_feats = np.stack([text_features[text_of(case.prompt)] for _, case in chunk])
        cosines = metrics.paired_cosine(image_clip, prompt_feats)
        for row, (key, case) in enumerate(chunk):
            warnings = read_meta(out_dir, key).get("warnings", [])
            records.append(
                {
                    "variant": key.variant,
                    "case": key.case,
                    "seed": key.seed,
                    "k": key.k,
                    "file": str(key.path(out_dir).relative_to(out_dir)),
                    "prompt": case.prompt,
                    "group": case.group,
                    "names": [s.name for s in case.subjects],
                    "subjects": case.subject_keys,
                    "clip_t_text": text_of(case.prompt),
                    "clip_t_cos": float(cosines[row]),
                    "clip_t": float(metrics.clip_t_convention(cosines[row], convention)),
                    "clip_i": {
                        s.key: float(metrics.image_alignment(image_clip[row : row + 1], ref_clip[s.key])[0])
                        for s in case.subjects
                    },
                    "dino": {
                        s.key: float(metrics.image_alignment(image_dino[row : row + 1], ref_dino[s.key])[0])
                        for s in case.subjects
                    },
                    "quirks": list(case.quirks),
                    "not_named": [w["subject"] for w in warnings if w["kind"] == "not_named"],
                    "warnings": warnings,
                    **({"authors_kept": case.index in kept} if kept is not None else {}),
                }
            )
    return records
