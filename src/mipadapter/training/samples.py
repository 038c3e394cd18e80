"""One training sample from one indexed image: the square crop, the references, the micro-conditioning.

Everything random in a sample (crop position, flips, condition dropout) comes from the ``random.Random``
the caller passes, seeded from (seed, epoch, index): a sample is the same whichever worker builds it and
whether or not the run was resumed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from mipadapter.manifest import ImageRecord
from mipadapter.training.sources import (
    EMPTY_MASK,
    NO_VALID_OBJECT,
    UNREADABLE_IMAGE,
    DataError,
    crop_range,
    int_box,
    load_label_map,
    object_mask,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WHITE = 255


@dataclass(frozen=True)
class SampleSettings:
    """resolution: training side R; reference_size: the image encoder's input side S; drop_*: condition
    dropout probabilities (disjoint events, as the authors draw them)."""

    resolution: int
    reference_size: int
    flip_prob: float = 0.5
    random_crop: bool = True
    drop_text: float = 0.05
    drop_image: float = 0.05
    drop_both: float = 0.05
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


@dataclass
class TrainSample:
    """pixel_values [3, R, R] in [-1, 1]; references [n, 3, S, S] normalised for the image encoder;
    names: n subject names; caption ("" when the text is dropped); time_ids: SDXL's (original h, w,
    crop top, left, target h, w)."""

    index: int
    pixel_values: torch.Tensor
    references: torch.Tensor
    names: list[str]
    caption: str
    drop_image: bool
    time_ids: tuple[int, int, int, int, int, int]


@dataclass
class SkippedSample:
    """A sample that could not be built; the batch drops it and counts ``reason``."""

    index: int
    reason: str
    message: str


def _load_rgb(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except OSError as error:
        raise DataError(UNREADABLE_IMAGE, f"{path}: not a readable image ({error})") from None


def _resize(array: np.ndarray, size: int, resample: str) -> np.ndarray:
    from PIL import Image

    method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[resample]
    return np.array(Image.fromarray(array).resize((size, size), method))


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 → [3, H, W] float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255.0


def reference_image(
    image: np.ndarray, mask: np.ndarray, box, size: int, flip: bool, mean, std
) -> torch.Tensor:
    """The object's segment pasted on white, cut to its box, padded square (centred), optionally flipped,
    resized to ``size`` and normalised: image [H, W, 3] uint8, mask [H, W] bool → [3, size, size]."""
    x1, y1, x2, y2 = int_box(box, image.shape[1], image.shape[0])
    segment = np.where(mask[y1:y2, x1:x2, None], image[y1:y2, x1:x2], WHITE).astype(np.uint8)
    h, w = segment.shape[:2]
    side = max(h, w)
    square = np.full((side, side, 3), WHITE, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = segment
    if flip:
        square = square[:, ::-1]
    tensor = _to_tensor(_resize(np.ascontiguousarray(square), size, "bicubic"))
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


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


def build_sample(
    record: ImageRecord, index: int, rng: random.Random, settings: SampleSettings
) -> TrainSample:
    """Build the sample of an indexed record (subjects already chosen by `choose_subjects`)."""
    image = _load_rgb(record.image)
    height, width = image.shape[:2]
    if (width, height) != (record.width, record.height):
        raise DataError(
            UNREADABLE_IMAGE,
            f"{record.image} is {width}x{height} but was indexed as {record.width}x{record.height}",
        )
    label_maps: dict[str, np.ndarray] = {}
    references = []
    for obj in record.objects:  # 1-N subjects per image, in the data loader's worker
        if obj.mask not in label_maps:
            label_maps[obj.mask] = load_label_map(obj.mask)
        labels = label_maps[obj.mask]
        if labels.shape != (height, width):
            raise DataError(
                UNREADABLE_IMAGE, f"{obj.mask} is {labels.shape[::-1]}, its image {width}x{height}"
            )
        mask = object_mask(labels, obj.mask_label)
        if not mask.any():
            raise DataError(EMPTY_MASK, f"{record.id}: the mask of {obj.name!r} is empty")
        flip = rng.random() < settings.flip_prob
        references.append(
            reference_image(image, mask, obj.box, settings.reference_size, flip, settings.mean, settings.std)
        )

    left, top = choose_crop(record, width, height, rng, settings.random_crop)
    side = min(width, height)
    size = settings.resolution
    crop = _resize(np.ascontiguousarray(image[top : top + side, left : left + side]), size, "bilinear")
    pixel_values = _to_tensor(crop) * 2.0 - 1.0

    original_w, original_h = record.original_size or (width, height)
    scale = size / side  # crop offset in the frame of the image resized to the training size (SDXL's)
    time_ids = (original_h, original_w, round(top * scale), round(left * scale), size, size)

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
        names=[o.name for o in record.objects],
        caption=caption,
        drop_image=drop_image,
        time_ids=time_ids,
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
