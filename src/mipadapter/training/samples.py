"""One training sample from one indexed image: the square crop, the references, the micro-conditioning.

Everything random in a sample (crop position, flips, views, condition dropout) comes from the
``random.Random`` the caller passes, seeded from (seed, epoch, index): a sample is the same whichever
worker builds it and whether or not the run was resumed.

Following the authors (``data/subject_dataset.py``), by default: the square crop of side ``min(W, H)``
holds every detected box when one can (placed at random among such squares), else it is the centre
square; the subjects are the first two that pass the post-crop filter in that crop; SDXL's crop offset
is ``(top, left)`` in pixels of the stored image (their fallback's ``((H - R) // 2, (W - R) // 2)`` for the
centre crop, as their code computes it); the original size is the JSON's ``original_size``.
References: each subject's segment pasted on white, cut to its box, padded square, flipped with
probability ``flip_prob`` and resized to the image encoder's side (cut from the stored image; theirs
from the crop resized to the training size, a lower resolution). With ``views`` K > 1, view 0 is that
reference and views 1..K-1 random square crops of the padded segment covering ``view_min_scale``..1 of
its side, each flipped on its own: K views of one object (the paper does not say where its views come
from; see ``docs/training-data.md``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mipadapter.manifest import ImageRecord
from mipadapter.training.sources import (
    CHANGED_SINCE_INDEX,
    EMPTY_MASK,
    NO_VALID_OBJECT,
    UNEXPECTED_ERROR,
    UNREADABLE_IMAGE,
    DataError,
    LabelMaps,
    SubjectRules,
    authors_crop,
    crop_range,
    final_subjects,
    image_size,
    int_box,
    object_mask,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WHITE = 255


@dataclass(frozen=True)
class SampleSettings:
    """resolution: training side R; reference_size: the image encoder's input side S; drop_*: condition
    dropout probabilities (disjoint events, as the authors draw them); crop / crop_coords / views /
    view_min_scale: as `mipadapter.training.config.DataConfig`; rules: the subject rules applied to each
    crop (``crop="authors"``; None: every indexed subject is used)."""

    resolution: int
    reference_size: int
    flip_prob: float = 0.5
    random_crop: bool = True
    drop_text: float = 0.05
    drop_image: float = 0.05
    drop_both: float = 0.05
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crop: str = "authors"
    crop_coords: str = "authors"
    views: int = 1
    view_min_scale: float = 0.8
    rules: SubjectRules | None = None


@dataclass
class TrainSample:
    """pixel_values [3, R, R] in [-1, 1]; references [n·K, 3, S, S] normalised for the image encoder
    (subject-major: the K views of subject 0, then subject 1, ...); names: n subject names; caption (""
    when the text is dropped); time_ids: SDXL's (original h, w, crop top, left, target h, w)."""

    index: int
    pixel_values: torch.Tensor
    references: torch.Tensor
    names: list[str]
    caption: str
    drop_image: bool
    time_ids: tuple[int, int, int, int, int, int]
    views: int = 1


@dataclass
class SkippedSample:
    """A sample that could not be built; the batch drops it and counts ``reason``."""

    index: int
    reason: str
    message: str


def _load_rgb(record: ImageRecord) -> np.ndarray:
    """The record's image [H, W, 3] uint8, measured from its header first (`sources.image_size`: missing,
    over the pixel limit, unreadable) and refused when it is not the size it was indexed at."""
    from mipadapter.photos import PhotoError, open_photo

    path = record.image
    size = image_size(Path(path), record.id)
    if size != (record.width, record.height):
        raise DataError(
            CHANGED_SINCE_INDEX,
            f"{path} is {size[0]}×{size[1]} but was indexed as {record.width}×{record.height}",
        )
    try:
        return np.array(open_photo(path, "training image"))
    except (PhotoError, OSError) as error:  # pixel data that does not decode behind a good header
        raise DataError(UNREADABLE_IMAGE, f"{path}: not a readable image ({error})") from None


def _resize(array: np.ndarray, size: int, resample: str) -> np.ndarray:
    from PIL import Image

    method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[resample]
    return np.array(Image.fromarray(array).resize((size, size), method))


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 → [3, H, W] float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255.0


def segment_square(image: np.ndarray, mask: np.ndarray, box) -> np.ndarray:
    """The object's segment pasted on white, cut to its box and padded square (centred):
    image [H, W, 3] uint8, mask [H, W] bool → [side, side, 3] uint8."""
    x1, y1, x2, y2 = int_box(box, image.shape[1], image.shape[0])
    segment = np.where(mask[y1:y2, x1:x2, None], image[y1:y2, x1:x2], WHITE).astype(np.uint8)
    h, w = segment.shape[:2]
    side = max(h, w)
    square = np.full((side, side, 3), WHITE, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = segment
    return square


def finish_reference(square: np.ndarray, size: int, flip: bool, mean, std) -> torch.Tensor:
    """A square uint8 reference → optionally flipped, resized to ``size``, normalised [3, size, size]."""
    if flip:
        square = square[:, ::-1]
    tensor = _to_tensor(_resize(np.ascontiguousarray(square), size, "bicubic"))
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def reference_image(
    image: np.ndarray, mask: np.ndarray, box, size: int, flip: bool, mean, std
) -> torch.Tensor:
    """The object's segment pasted on white, cut to its box, padded square (centred), optionally flipped,
    resized to ``size`` and normalised: image [H, W, 3] uint8, mask [H, W] bool → [3, size, size]."""
    return finish_reference(segment_square(image, mask, box), size, flip, mean, std)


def reference_views(
    square: np.ndarray, views: int, min_scale: float, rng: random.Random, settings: SampleSettings
) -> list[torch.Tensor]:
    """K views of one padded segment: the whole square, then random square crops covering ``min_scale``
    to 1 of its side; each flipped with probability ``flip_prob`` on its own."""
    side = square.shape[0]
    out = []
    for view in range(views):
        crop = square
        if view > 0:
            cut = max(1, round(side * rng.uniform(min_scale, 1.0)))
            top, left = rng.randint(0, side - cut), rng.randint(0, side - cut)
            crop = square[top : top + cut, left : left + cut]
        flip = rng.random() < settings.flip_prob
        out.append(finish_reference(crop, settings.reference_size, flip, settings.mean, settings.std))
    return out


def choose_crop(
    record: ImageRecord, width: int, height: int, rng: random.Random, random_crop: bool
) -> tuple[int, int]:
    """(left, top) of the ``min(W, H)`` square crop holding every subject box."""
    ranges = crop_range([o.box for o in record.objects], width, height)
    if ranges is None:
        raise DataError(NO_VALID_OBJECT, f"{record.id}: the subjects do not fit one square crop")
    (left_lo, left_hi), (top_lo, top_hi) = ranges
    if random_crop:
        return rng.randint(left_lo, left_hi), rng.randint(top_lo, top_hi)
    return (left_lo + left_hi) // 2, (top_lo + top_hi) // 2


def _place(ranges, rng: random.Random, random_crop: bool) -> tuple[int, int]:
    (left_lo, left_hi), (top_lo, top_hi) = ranges
    if random_crop:
        return rng.randint(left_lo, left_hi), rng.randint(top_lo, top_hi)
    return (left_lo + left_hi) // 2, (top_lo + top_hi) // 2


def crop_and_subjects(
    record: ImageRecord, width: int, height: int, rng: random.Random, settings: SampleSettings
) -> tuple[int, int, tuple[int, int], list]:
    """(left, top) of the square crop, SDXL's crop offset (top, left) and the sample's subjects."""
    side, size = min(width, height), settings.resolution
    if settings.crop == "authors" and record.crop_region is not None:
        ranges = authors_crop(record.crop_region, width, height)
        if ranges is not None:
            left, top = _place(ranges, rng, settings.random_crop)
            offset = (top, left)
        else:  # the centre square; the authors record ((H - R) // 2, (W - R) // 2) for it
            left, top = (width - side) // 2, (height - side) // 2
            offset = ((height - size) // 2, (width - size) // 2)
        subjects = list(record.objects)
        if settings.rules is not None:
            subjects = final_subjects(subjects, (left, top, side), settings.rules)
    else:
        left, top = choose_crop(record, width, height, rng, settings.random_crop)
        offset, subjects = (top, left), list(record.objects)
    if settings.crop_coords == "resized":  # the frame of the image resized to the training size
        offset = (round(top * size / side), round(left * size / side))
    return left, top, offset, subjects


def build_sample(
    record: ImageRecord, index: int, rng: random.Random, settings: SampleSettings
) -> TrainSample:
    """Build the sample of an indexed record (subject candidates chosen by `choose_subjects`)."""
    image = _load_rgb(record)
    height, width = image.shape[:2]
    left, top, offset, subjects = crop_and_subjects(record, width, height, rng, settings)
    label_maps = LabelMaps((width, height))  # each mask's header checked against the image first
    references = []
    for obj in subjects:  # 1-N subjects per image, in the data loader's worker
        mask = object_mask(label_maps(obj.mask), obj.mask_label)
        if not mask.any():
            raise DataError(EMPTY_MASK, f"{record.id}: the mask of {obj.name!r} is empty")
        square = segment_square(image, mask, obj.box)
        references += reference_views(square, settings.views, settings.view_min_scale, rng, settings)

    side = min(width, height)
    size = settings.resolution
    crop = _resize(np.ascontiguousarray(image[top : top + side, left : left + side]), size, "bilinear")
    pixel_values = _to_tensor(crop) * 2.0 - 1.0

    original_w, original_h = record.original_size or (width, height)
    time_ids = (original_h, original_w, offset[0], offset[1], size, size)

    caption, drop_image = record.caption, False
    draw = rng.random()
    if draw < settings.drop_image:
        drop_image = True
    elif draw < settings.drop_image + settings.drop_text:
        caption = ""
    elif draw < settings.drop_image + settings.drop_text + settings.drop_both:
        caption, drop_image = "", True
    return TrainSample(
        index=index,
        pixel_values=pixel_values,
        references=torch.stack(references),
        names=[o.name for o in subjects],
        caption=caption,
        drop_image=drop_image,
        time_ids=time_ids,
        views=settings.views,
    )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed from (run seed, epoch, record index)."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


def safe_build_sample(
    record: ImageRecord, index: int, seed: int, settings: SampleSettings
) -> TrainSample | SkippedSample:
    try:
        return build_sample(record, index, random.Random(seed), settings)
    except DataError as error:
        return SkippedSample(index, error.reason, str(error))
    except Exception as error:  # one sample never stops a run: the batch drops it and counts it
        return SkippedSample(index, UNEXPECTED_ERROR, f"{record.id}: {type(error).__name__}: {error}")
