"""The authors' object selection rules, one implementation for data construction and training.

Given the detected objects of one image (name, box, detector score), keep those that make good
subjects. The thresholds are the authors' constants (``data/subject_dataset.py``):

* box area between 8% and 70% of the image, box width/height between 0.3 and 3, all strict;
* detector score above 0.3;
* the name is one word and occurs in the caption: ``caption_match="substring"`` is the authors' test
  (``caption.find(name) != -1``, case-sensitive, so "cat" also matches "category");
  ``"word"`` (the default here) asks for the name as a whole word, any case;
* candidates are taken by descending score; an optional ``accept`` test (training passes the authors'
  mask check, ``is_valid_bbox``) runs next; then one whose box and an already kept box overlap by more
  than 80% of the smaller box (one nested in the other) is dropped;
* ``distinct_names``: the best-scored object of each name is kept and the others dropped, so an image
  with two cats and a dog still gives (cat, dog). This is NOT the authors' rule: they keep the first two
  objects that survive the crop and drop the whole sample when those two share a name (training does
  that by default: ``data.filters.duplicate_names`` in `mipadapter.training.config`);
* at most ``max_objects`` objects (2 by default).

Not here: checks that need the mask or the training crop (the authors' ``is_valid_bbox`` and their
post-crop box filter); training applies them (`mipadapter.training.sources`, `.samples`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

# Rejection reasons, as reported next to each dropped object.
EMPTY_NAME = "empty_name"
MULTI_WORD_NAME = "multi_word_name"
DEGENERATE_BOX = "degenerate_box"
LOW_SCORE = "low_score"
AREA_TOO_SMALL = "area_too_small"
AREA_TOO_LARGE = "area_too_large"
ASPECT_RATIO = "aspect_ratio"
NAME_NOT_IN_CAPTION = "name_not_in_caption"
NESTED = "nested"
INVALID_BOX = "invalid_box"  # refused by the caller's ``accept`` test
DUPLICATE_NAME = "duplicate_name"
TOO_MANY = "too_many"


class DetectedObject(Protocol):
    """Anything with a name, an [x1, y1, x2, y2] pixel box and a detector score."""

    @property
    def name(self) -> str: ...

    @property
    def box(self) -> Sequence[float]: ...

    @property
    def score(self) -> float: ...


T = TypeVar("T", bound=DetectedObject)
CAPTION_MATCHES = ("word", "substring")


@dataclass(frozen=True)
class ObjectFilterConfig:
    """Thresholds of `select_objects`; a bound of None switches its rule off."""

    min_area_frac: float | None = 0.08
    max_area_frac: float | None = 0.7
    min_aspect_ratio: float | None = 0.3  # box width / height
    max_aspect_ratio: float | None = 3.0
    min_score: float | None = 0.3
    name_in_caption: bool = True
    caption_match: str = "word"  # "word" (whole word, any case) or "substring" (the authors' str.find)
    single_word_names: bool = True
    nested_overlap: float | None = (
        0.8  # intersection / smaller box area above which one box is nested in the other
    )
    distinct_names: bool = True
    max_objects: int | None = 2

    def __post_init__(self) -> None:
        for name in ("min_area_frac", "max_area_frac", "nested_overlap"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"ObjectFilterConfig.{name} must be in [0, 1], got {value!r}")
        for name in ("min_aspect_ratio", "max_aspect_ratio"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"ObjectFilterConfig.{name} must be > 0, got {value!r}")
        if self.caption_match not in CAPTION_MATCHES:
            raise ValueError(
                f"ObjectFilterConfig.caption_match must be one of {CAPTION_MATCHES}, got {self.caption_match!r}"
            )
        if self.max_objects is not None and self.max_objects < 1:
            raise ValueError(f"ObjectFilterConfig.max_objects must be >= 1 or None, got {self.max_objects!r}")


BOX_SLACK = 0.05  # share of the image's side a detector's box may overshoot an edge by (rounding)


def box_inside_image(box: Sequence[float], width: int, height: int, slack: float = BOX_SLACK) -> bool:
    """Whether the [x1, y1, x2, y2] box lies in the image, each edge allowed to overshoot by ``slack`` of
    the image's side (detector boxes are not clamped). A box far outside belongs to another image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = slack * width, slack * height
    return -dx <= x1 and -dy <= y1 and x2 <= width + dx and y2 <= height + dy


def name_in_caption(name: str, caption: str) -> bool:
    """Whether `name` occurs in `caption` as whole word(s), ignoring case ("cat" is not in "category")."""
    words = name.strip().split()
    if not words:
        return False
    # any run of whitespace in the name matches any run in the caption
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    return re.search(pattern, caption, flags=re.IGNORECASE) is not None


def box_overlap_of_smaller(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection area of boxes `a` and `b` divided by the smaller box's area (1.0 = one inside the other)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return width * height / smaller


def _own_rejection(
    obj: DetectedObject, image_area: float, caption: str, config: ObjectFilterConfig
) -> str | None:
    """The first per-object rule `obj` fails, or None."""
    name = obj.name.strip()
    if not name:
        return EMPTY_NAME
    if config.single_word_names and len(name.split()) > 1:
        return MULTI_WORD_NAME
    x1, y1, x2, y2 = (float(v) for v in obj.box)
    width, height = x2 - x1, y2 - y1
    if width <= 0 or height <= 0:
        return DEGENERATE_BOX
    if config.min_score is not None and not obj.score > config.min_score:
        return LOW_SCORE
    area = width * height / image_area
    if config.min_area_frac is not None and not area > config.min_area_frac:
        return AREA_TOO_SMALL
    if config.max_area_frac is not None and not area < config.max_area_frac:
        return AREA_TOO_LARGE
    aspect = width / height
    if config.min_aspect_ratio is not None and not aspect > config.min_aspect_ratio:
        return ASPECT_RATIO
    if config.max_aspect_ratio is not None and not aspect < config.max_aspect_ratio:
        return ASPECT_RATIO
    if config.name_in_caption:
        found = (
            name_in_caption(name, caption) if config.caption_match == "word" else caption.find(obj.name) != -1
        )
        if not found:
            return NAME_NOT_IN_CAPTION
    return None


def select_objects(
    objects: Sequence[T],
    image_size: tuple[int, int],
    caption: str,
    config: ObjectFilterConfig = ObjectFilterConfig(),
    accept: Callable[[T], str | None] | None = None,
) -> tuple[list[T], list[tuple[T, str]]]:
    """Choose the subjects of one image.

    objects: detections, each with `.name`, `.box` ([x1, y1, x2, y2] pixels) and `.score`.
    image_size: (width, height) of the image the boxes refer to.
    accept: an extra test of one object that passed its own rules, run before the nesting check (as
    the authors run ``is_valid_bbox``): None to keep it, or the rejection reason.
    Returns (kept, rejected): kept in descending score order (ties keep input order); rejected as
    (object, reason) pairs, reasons from this module's constants, in the order they were decided.
    """
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive (width, height), got {image_size!r}")
    kept: list[T] = []
    rejected: list[tuple[T, str]] = []
    order = sorted(
        range(len(objects)), key=lambda i: -float(objects[i].score)
    )  # stable: ties keep input order
    for index in order:
        obj = objects[index]
        reason = _own_rejection(obj, float(width * height), caption, config)
        if reason is None and accept is not None:
            reason = accept(obj)
        if reason is None and config.nested_overlap is not None:
            if any(box_overlap_of_smaller(k.box, obj.box) > config.nested_overlap for k in kept):
                reason = NESTED
        if reason is None and config.distinct_names:
            if any(k.name.strip().lower() == obj.name.strip().lower() for k in kept):
                reason = DUPLICATE_NAME
        if reason is None and config.max_objects is not None and len(kept) >= config.max_objects:
            reason = TOO_MANY
        if reason is None:
            kept.append(obj)
        else:
            rejected.append((obj, reason))
    return kept, rejected
