"""Per-chunk processing: items in, manifest records out (with their mask and image files written).

`build_chunk` runs caption -> ground -> filter -> segment -> crop -> CLIP -> score on images that come
with no annotations; `score_chunk` takes the objects and masks an existing set already has (the
authors' layout) and runs filter -> crop -> CLIP -> score. Both batch every model call over the chunk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from mipadapter.data import sources
from mipadapter.data.config import DataConfig
from mipadapter.data.masks import (
    dominant_label,
    encode_png,
    object_crop,
    paint_label_map,
    read_label_map,
    visible_masks,
)
from mipadapter.data.phrases import caption_nouns
from mipadapter.data.stages import Backends, Detection
from mipadapter.fileio import atomic_write_bytes
from mipadapter.limits import PixelLimitError, header_size
from mipadapter.manifest import ImageRecord, ObjectRecord
from mipadapter.object_filters import box_inside_image, select_objects
from mipadapter.ops.quality import object_similarity, s_pair, s_single

A = TypeVar("A")
B = TypeVar("B")

# Objects dropped after selection because their visible segment is empty (covered or missing).
EMPTY_SEGMENT = "empty_segment"

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _unreadable(error: Exception, corrupt: str) -> str:
    """The skip reason of an image or mask that could not be opened (``corrupt``: the default reason)."""
    if isinstance(error, PixelLimitError):
        return sources.TOO_MANY_PIXELS
    if isinstance(error, FileNotFoundError):
        return sources.MISSING_IMAGE if corrupt == sources.CORRUPT_IMAGE else sources.MISSING_FILE
    return corrupt


@dataclass
class Candidate:
    """An image on its way through the stages."""

    item: sources.Item
    image: Image.Image
    caption: str = ""
    objects: list[Detection] | None = None
    labels: list[int] | None = None  # label of each object in `label_map`
    label_map: Any = None  # torch uint8 [H, W] (built) or numpy int [H, W] (read)


def batched(fn: Callable[[list[A]], list[B]], values: Sequence[A], size: int) -> list[B]:
    """fn over `values` in slices of `size`, results concatenated (one result per value)."""
    out: list[B] = []
    for start in range(0, len(values), size):
        part = list(values[start : start + size])
        result = fn(part)
        if len(result) != len(part):
            raise ValueError(f"a stage returned {len(result)} results for {len(part)} inputs")
        out.extend(result)
    return out


def _clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    )


def decode(items: Sequence[sources.Item], skips: sources.SkipLog) -> list[Candidate]:
    """Open every item's image; corrupt ones are counted and dropped."""
    out = []
    for item in items:
        try:
            image = sources.open_image(item)
        except _DECODE_ERRORS as error:
            skips.add(_unreadable(error, sources.CORRUPT_IMAGE), f"{item.shard}/{item.id}{item.suffix}")
            continue
        out.append(Candidate(item=item, image=image))
    return out


# --- scoring (shared) -------------------------------------------------------------------------------


def score_candidates(
    candidates: list[Candidate], masks: list[torch.Tensor], backends: Backends, config: DataConfig
) -> list[tuple[list[float], dict[str, float]]]:
    """Per image: the CLIP score of each object, and the image's scores (S_pair left out when undefined).

    masks[i]: bool [k_i, H_i, W_i], the visible segment of each object of candidates[i].
    """
    crops, texts = [], []
    for candidate, image_masks in zip(candidates, masks, strict=True):
        for obj, mask in zip(candidate.objects, image_masks, strict=True):
            crops.append(object_crop(candidate.image, obj.box, mask if config.crop == "segment" else None))
            texts.append(config.clip_text_template.format(name=obj.name))
    if not crops:
        return []
    image_emb = backends.embedder.embed_images(crops).float().cpu()  # [N, e]
    unique = sorted(set(texts))
    text_rows = backends.embedder.embed_texts(unique).float().cpu()  # [U, e]
    text_emb = text_rows[[unique.index(t) for t in texts]]  # [N, e]
    # pad to [b, n, e] with a mask so the scores run once for the whole chunk
    counts = [len(c.objects) for c in candidates]
    b, n, e = len(candidates), max(counts), image_emb.shape[-1]
    padded_img, padded_txt = torch.zeros(b, n, e), torch.zeros(b, n, e)
    valid = torch.zeros(b, n, dtype=torch.bool)
    offset = 0
    for row, count in enumerate(counts):
        padded_img[row, :count] = image_emb[offset : offset + count]
        padded_txt[row, :count] = text_emb[offset : offset + count]
        valid[row, :count] = True
        offset += count
    per_object = object_similarity(padded_txt, padded_img)  # [b, n]
    single = s_single(padded_txt, padded_img, valid)  # [b]
    pair = s_pair(padded_img, valid)  # [b], NaN with one object
    results = []
    for row, count in enumerate(counts):
        scores = {"s_single": float(single[row])}
        if config.mode == "multi":
            scores["s_pair"] = float(pair[row])
            scores["s_quality"] = scores["s_single"] + scores["s_pair"]
        else:
            scores["s_quality"] = scores["s_single"]
        results.append(([float(v) for v in per_object[row, :count]], scores))
    return results


def _record(
    candidate: Candidate,
    image_rel: str,
    mask_rel: str,
    clip_scores: list[float],
    scores: dict[str, float],
    original_size: tuple[int, int] | None = None,
) -> ImageRecord:
    objects = tuple(
        ObjectRecord(name=o.name, box=o.box, score=o.score, mask=mask_rel, mask_label=label, clip_score=c)
        for o, label, c in zip(candidate.objects, candidate.labels, clip_scores, strict=True)
    )
    return ImageRecord(
        id=candidate.item.id,
        image=image_rel,
        width=candidate.image.width,
        height=candidate.image.height,
        caption=candidate.caption,
        objects=objects,
        scores=scores,
        original_size=original_size,
    )


def _rel(path: str | os.PathLike, output: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), output.resolve())).as_posix()


# --- build ------------------------------------------------------------------------------------------


def _has_annotations(item: sources.Item) -> bool:
    """SA-1B JSONs list the image's SAM annotations; a JSON with none is a broken record."""
    return item.meta is None or bool(item.meta.get("annotations"))


def _select(candidates: list[Candidate], config: DataConfig, skips: sources.SkipLog) -> list[Candidate]:
    kept_candidates = []
    for candidate in candidates:
        width, height = candidate.image.size
        clipped = [Detection(d.name, _clip_box(d.box, width, height), d.score) for d in candidate.objects]
        kept, _ = select_objects(clipped, (width, height), candidate.caption, config.filters)
        if len(kept) < config.min_objects:
            skips.add(sources.NO_VALID_OBJECTS, f"{candidate.item.shard}/{candidate.item.id}")
            continue
        candidate.objects = kept
        kept_candidates.append(candidate)
    return kept_candidates


def _attach_masks(
    candidates: list[Candidate], raw: list[torch.Tensor], config: DataConfig, skips: sources.SkipLog
) -> tuple[list[Candidate], list[torch.Tensor]]:
    """Paint label maps, keep objects whose visible segment is non-empty, drop images left with too few."""
    out, out_masks = [], []
    for candidate, masks in zip(candidates, raw, strict=True):
        if tuple(masks.shape) != (len(candidate.objects), candidate.image.height, candidate.image.width):
            raise ValueError(
                f"segmenter returned masks {tuple(masks.shape)} for {len(candidate.objects)} boxes "
                f"on a {candidate.image.height}x{candidate.image.width} image ({candidate.item.id})"
            )
        label_map = paint_label_map(masks.bool().cpu())
        labels = [i + 1 for i in range(len(candidate.objects))]
        regions = visible_masks(label_map, labels)
        keep = [i for i in range(len(labels)) if regions[i].any()]
        for _ in range(len(labels) - len(keep)):
            skips.add(EMPTY_SEGMENT, f"{candidate.item.shard}/{candidate.item.id}")
        if len(keep) < config.min_objects:
            skips.add(sources.NO_VALID_OBJECTS, f"{candidate.item.shard}/{candidate.item.id}")
            continue
        candidate.objects = [candidate.objects[i] for i in keep]
        candidate.labels = [labels[i] for i in keep]
        candidate.label_map = label_map
        out.append(candidate)
        out_masks.append(regions[keep])
    return out, out_masks


def build_chunk(
    items: Sequence[sources.Item],
    backends: Backends,
    config: DataConfig,
    output: Path,
    skips: sources.SkipLog,
) -> list[ImageRecord]:
    """Caption, ground, select, segment and score a chunk of raw images; write their masks (and tar images)."""
    backends.require_build_stages()
    usable = []
    for item in items:
        if _has_annotations(item):
            usable.append(item)
        else:
            skips.add(sources.JSON_WITHOUT_OBJECTS, f"{item.shard}/{item.id}.json")
    candidates = decode(usable, skips)
    if not candidates:
        return []
    images = [c.image for c in candidates]
    captions = batched(backends.captioner.caption, images, config.caption_batch_size)
    phrases = [[c] if config.phrases == "caption" else caption_nouns(c) for c in captions]
    detections = batched(
        lambda pairs: backends.grounder.ground([p[0] for p in pairs], [p[1] for p in pairs]),
        list(zip(images, phrases, strict=True)),
        config.grounding_batch_size,
    )
    for candidate, caption, found in zip(candidates, captions, detections, strict=True):
        candidate.caption, candidate.objects = caption, list(found)
    candidates = _select(candidates, config, skips)
    if not candidates:
        return []
    boxes = [torch.tensor([o.box for o in c.objects], dtype=torch.float32) for c in candidates]
    raw = batched(
        lambda pairs: backends.segmenter.segment([p[0] for p in pairs], [p[1] for p in pairs]),
        [(c.image, b) for c, b in zip(candidates, boxes, strict=True)],
        config.segment_batch_size,
    )
    candidates, masks = _attach_masks(candidates, raw, config, skips)
    records = []
    for candidate, (clip_scores, scores) in zip(
        candidates, score_candidates(candidates, masks, backends, config), strict=True
    ):
        item = candidate.item
        mask_rel = f"masks/{item.shard}/{item.id}.png"
        atomic_write_bytes(output / mask_rel, encode_png(candidate.label_map))
        if item.data is not None:
            image_rel = f"images/{item.shard}/{item.id}{item.suffix}"
            if config.copy_images:
                atomic_write_bytes(output / image_rel, item.data)  # the original bytes: no re-encoding
        else:
            image_rel = _rel(item.path, output)
        records.append(_record(candidate, image_rel, mask_rel, clip_scores, scores))
    return records


# --- score an existing set (authors' layout) --------------------------------------------------------


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


def _authors_objects(meta: dict[str, Any]) -> tuple[str | None, list[tuple[Detection, int | None]]]:
    """The caption and the boxed entries (with their label value, if given) of an authors' JSON.

    Their training set uses `text` / `final_masks`; their Concept101 files use `caption` / `mask`.
    Raises ValueError or TypeError for an entry whose box is not four finite numbers, whose score is
    not a finite number or whose label is not a string.
    """
    caption = meta.get("text", meta.get("caption"))
    entries = meta.get("final_masks", meta.get("mask")) or []
    objects = []
    for entry in entries:
        if not isinstance(entry, dict) or "box" not in entry:
            continue  # the background entry has no box
        box, label, value = entry["box"], entry["label"], entry.get("value")
        if not isinstance(box, list) or len(box) != 4 or not isinstance(label, str):
            raise ValueError(f"an entry needs a label string and a box [x1, y1, x2, y2], got {entry!r}")
        objects.append(
            (
                Detection(label, tuple(_finite(v) for v in box), _finite(entry["logit"])),
                value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None,
            )
        )
    return (caption if isinstance(caption, str) else None), objects


def _original_size(meta: dict[str, Any]) -> tuple[int, int] | None:
    """The JSON's ``original_size`` [W, H] (None when absent); ValueError when it is not two whole
    positive numbers."""
    original = meta.get("original_size")
    if original is None:
        return None
    if not isinstance(original, list) or len(original) != 2:
        raise ValueError(f"original_size must be [width, height], got {original!r}")
    sides = [_finite(v) for v in original]
    if not all(side == int(side) and side >= 1 for side in sides):
        raise ValueError(f"original_size must hold whole positive numbers, got {original!r}")
    return int(sides[0]), int(sides[1])


def score_chunk(
    items: Sequence[sources.Item],
    backends: Backends,
    config: DataConfig,
    output: Path,
    skips: sources.SkipLog,
) -> list[ImageRecord]:
    """Score images that already have objects and a label map (authors' layout); writes no new files."""
    prepared, original_sizes = [], {}
    for item in items:
        try:
            caption, objects = _authors_objects(item.meta)
            original_sizes[item.id] = _original_size(item.meta)
        except (KeyError, TypeError, ValueError):
            skips.add(sources.BAD_FIELD, f"{item.shard}/{item.id}.json")
            continue
        if caption is None:
            skips.add(sources.CORRUPT_JSON, f"{item.shard}/{item.id}.json")
        elif not objects:
            skips.add(sources.JSON_WITHOUT_OBJECTS, f"{item.shard}/{item.id}.json")
        else:
            prepared.append((item, caption, objects))
    candidates = decode([p[0] for p in prepared], skips)
    by_id = {p[0].id: p for p in prepared}
    scored, masks = [], []
    for candidate in candidates:
        _, caption, objects = by_id[candidate.item.id]
        name = f"{candidate.item.shard}/{candidate.item.id}"
        candidate.caption = caption
        if not all(box_inside_image(d.box, *candidate.image.size) for d, _ in objects):
            skips.add(sources.BOX_OUTSIDE_IMAGE, name)
            continue
        values = {id(d): v for d, v in objects}
        kept, _ = select_objects([d for d, _ in objects], candidate.image.size, caption, config.filters)
        try:  # the mask's header first: the pixel limit, then its size, before decoding it
            if header_size(candidate.item.mask_path, f"mask {name}") != candidate.image.size:
                skips.add(sources.MASK_SIZE_MISMATCH, f"{name} (mask)")
                continue
            label_map = read_label_map(candidate.item.mask_path)
        except _DECODE_ERRORS as error:
            skips.add(_unreadable(error, sources.CORRUPT_MASK), f"{name} (mask)")
            continue
        chosen, labels = [], []
        for detection in kept:
            label = values[id(detection)] or dominant_label(label_map, detection.box)
            if label is None or not (label_map == label).any():
                skips.add(EMPTY_SEGMENT, f"{candidate.item.shard}/{candidate.item.id}")
                continue
            chosen.append(detection)
            labels.append(label)
        if len(chosen) < config.min_objects:
            skips.add(sources.NO_VALID_OBJECTS, f"{candidate.item.shard}/{candidate.item.id}")
            continue
        candidate.objects, candidate.labels, candidate.label_map = chosen, labels, label_map
        scored.append(candidate)
        masks.append(torch.from_numpy(label_map[None] == torch.tensor(labels).numpy()[:, None, None]))
    records = []
    for candidate, (clip_scores, scores) in zip(
        scored, score_candidates(scored, masks, backends, config), strict=True
    ):
        original_size = original_sizes[candidate.item.id]
        records.append(
            _record(
                candidate,
                _rel(candidate.item.path, output),
                _rel(candidate.item.mask_path, output),
                clip_scores,
                scores,
                original_size,
            )
        )
    return records
