"""Training data sources: the authors' released layout and our manifest, both read into `ImageRecord`s,
then filtered into a training index (the chosen subjects of each usable image).

Bad data never stops a run and is never retried: each image that cannot be used is skipped and counted
under one reason (`SKIP_REASONS`); only an index with no usable image at all is an error. Images and
masks are measured from their headers before anything is decoded (`mipadapter.limits.header_size`), and
label maps keep the PNG's own integer type, so a scan thread holds at most a bounded number of pixels.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mipadapter.limits import DEFAULT_MAX_PIXELS, MAX_RECORDED_SIDE, PixelLimitError, header_size
from mipadapter.manifest import Box, ImageRecord, ManifestError, ObjectRecord, record_from_dict
from mipadapter.object_filters import ObjectFilterConfig, box_inside_image, select_objects
from mipadapter.photos import mask_labels

MISSING_JSON = "missing_json"
MISSING_IMAGE = "missing_image"
MISSING_MASK = "missing_mask"
CORRUPT_JSON = "corrupt_json"  # not JSON at all
BAD_FIELD = "bad_field"  # JSON, but a field of the wrong type or out of range
UNREADABLE_IMAGE = "unreadable_image"
UNREADABLE_MASK = "unreadable_mask"
TOO_MANY_PIXELS = "too_many_pixels"  # the image or mask header declares more than the pixel limit
MASK_SIZE_MISMATCH = "mask_size_mismatch"
BOX_OUTSIDE_IMAGE = "box_outside_image"
CHANGED_SINCE_INDEX = "changed_since_index"  # training time: the image is not the one that was indexed
NO_VALID_OBJECT = "no_valid_object"
EMPTY_MASK = "empty_mask"
DUPLICATE_NAMES = "duplicate_names"
UNEXPECTED_ERROR = "unexpected_error"  # any other failure of one sample (its message is kept)
SKIP_REASONS = (
    MISSING_JSON,
    MISSING_IMAGE,
    MISSING_MASK,
    CORRUPT_JSON,
    BAD_FIELD,
    UNREADABLE_IMAGE,
    UNREADABLE_MASK,
    TOO_MANY_PIXELS,
    MASK_SIZE_MISMATCH,
    BOX_OUTSIDE_IMAGE,
    CHANGED_SINCE_INDEX,
    NO_VALID_OBJECT,
    EMPTY_MASK,
    DUPLICATE_NAMES,
    UNEXPECTED_ERROR,
)
LABEL_MAP_BUDGET = DEFAULT_MAX_PIXELS  # bytes of label maps one image's scan keeps decoded at once
EXAMPLE_CHARS = 160  # the example message of a reason printed at the end of indexing, cut to this

# object-level reasons added to those of `mipadapter.object_filters`
OBJECT_EMPTY_MASK = "empty_mask"
OBJECT_LOW_MASK_FILL = "low_mask_fill"
OBJECT_INVALID_BOX = "invalid_box"  # the authors' is_valid_bbox
OBJECT_CROP_DOES_NOT_FIT = "crop_does_not_fit"
OBJECT_POST_CROP = "post_crop_filter"  # the authors' post_bbox_filter
OBJECT_OVER_MAX_SUBJECTS = "over_max_subjects"

# the authors' constants (data/subject_dataset.py)
MAX_VALUES_IN_BOX = 5
MIN_BOX_FILL = 0.6
MIN_CROP_BOX_AREA = 200.0
CROP_BOX_RATIO = (0.3, 3.0)


class DataError(ValueError):
    """A sample that cannot be used; ``reason`` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoValidDataError(ValueError):
    """No usable image is left after filtering; the message gives the counts by reason."""


@dataclass(frozen=True)
class Candidate:
    """One image before filtering: a parsed record with every detected object, or why it failed."""

    source: str  # an id or "<manifest> line N", for messages
    record: ImageRecord | None
    error: DataError | None = None
    label_map: bool = False  # masks are instance label maps whose labels are found from each box


@dataclass
class ScanReport:
    """What the scan kept and skipped: images by reason, rejected objects by reason."""

    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    objects_rejected: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason → first message seen

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "objects_rejected": dict(sorted(self.objects_rejected.items())),
            "examples": self.examples,
        }

    def summary(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.kept} of {self.total} images usable; skipped: {skipped}"

    def lines(self, warn_share: float) -> list[str]:
        """What the end of indexing prints on stderr: the kept count, one short line per skip reason
        (count and the first message seen), and a warning when more than ``warn_share`` was skipped."""
        out = [f"training data: {self.kept} of {self.total} images usable"]
        for reason, count in sorted(self.skipped.items()):
            example = self.examples.get(reason, "")
            if len(example) > EXAMPLE_CHARS:
                example = example[: EXAMPLE_CHARS - 1] + "…"
            out.append(f"  skipped {count}: {reason} (e.g. {example})")
        skipped = self.total - self.kept
        if self.total and skipped / self.total > warn_share:
            out.append(
                f"warning: {skipped} of {self.total} training images ({skipped / self.total:.0%}) were "
                f"skipped, more than data.warn_skipped_share ({warn_share:g}): check the reasons above"
            )
        return out


# --- id lists ----------------------------------------------------------------------------------------


class _PlainDataUnpickler(pickle.Unpickler):
    """Loads only plain containers, strings and numbers: any class or function reference is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: an id list holds plain data only")


def read_ids(path: str | Path) -> list[str]:
    """Image ids from ``.txt`` (one a line), ``.json`` (a list) or the authors' ``.pkl`` (a list of strings,
    read by an unpickler that refuses every class and function, so a hostile file cannot run code)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        ids: object = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".json":
        ids = json.loads(path.read_text(encoding="utf-8"))
    elif suffix == ".pkl":
        ids = _PlainDataUnpickler(io.BytesIO(path.read_bytes())).load()
    else:
        raise ValueError(f"id list {path.name!r}: use .txt, .json or .pkl")
    if not isinstance(ids, list | tuple) or not all(isinstance(i, str | int) for i in ids):
        raise ValueError(f"id list {str(path)!r} must be a list of ids (strings), got {type(ids).__name__}")
    return [str(i) for i in ids]


# --- readers ------------------------------------------------------------------------------------------


def image_size(path: Path, source: str) -> tuple[int, int]:
    """(width, height) of the photo as `mipadapter.photos.open_photo` will give it (EXIF turn applied),
    from its header alone; raises `DataError` (missing, over the pixel limit, unreadable)."""
    from mipadapter.photos import PhotoError, upright_size

    try:
        header_size(path, f"image {path}")
        return upright_size(path, "training image")
    except FileNotFoundError:
        raise DataError(MISSING_IMAGE, f"{source}: image {path} does not exist") from None
    except PixelLimitError as error:
        raise DataError(TOO_MANY_PIXELS, f"{source}: {error}") from None
    except (PhotoError, OSError) as error:
        raise DataError(UNREADABLE_IMAGE, f"{source}: {path} is not a readable image ({error})") from None


def _bad_field(source: str, message: str) -> DataError:
    return DataError(BAD_FIELD, f"{source}: {message}")


def _finite_number(value, source: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad_field(source, f"{where} must be a finite number, got {value!r}")
    return float(value)


def check_original_size(value, source: str) -> tuple[int, int] | None:
    """A recorded ``original_size`` [W, H]: None, or two whole numbers in [1, MAX_RECORDED_SIDE]."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise _bad_field(source, f"'original_size' must be [width, height], got {value!r}")
    sides = [_finite_number(v, source, "'original_size'") for v in value]
    if not all(side == int(side) and 1 <= side <= MAX_RECORDED_SIDE for side in sides):
        raise _bad_field(
            source, f"'original_size' sides must be whole numbers in [1, {MAX_RECORDED_SIDE}], got {value!r}"
        )
    return int(sides[0]), int(sides[1])


def _authors_fields(data, source: str, mask: str) -> tuple[str, tuple[ObjectRecord, ...], tuple | None]:
    """(caption, boxed objects, original size) of one authors' JSON; `DataError` ``bad_field`` naming the
    field. Entries without a box (the background) are not objects."""
    if not isinstance(data, dict):
        raise _bad_field(source, f"the JSON must be an object, got {type(data).__name__}")
    caption = data.get("text")
    if not isinstance(caption, str):
        raise _bad_field(source, f"'text' must be a string, got {caption!r}")
    entries = data.get("final_masks", [])
    if not isinstance(entries, list):
        raise _bad_field(source, f"'final_masks' must be a list, got {type(entries).__name__}")
    objects = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or "box" not in entry:
            continue
        where = f"'final_masks[{number}]'"
        box = entry["box"]
        if not isinstance(box, list) or len(box) != 4:
            raise _bad_field(source, f"{where}.box must be [x1, y1, x2, y2], got {box!r}")
        label = entry.get("label")
        if not isinstance(label, str):
            raise _bad_field(source, f"{where}.label must be a string, got {label!r}")
        try:
            obj = ObjectRecord(
                name=label,
                box=tuple(_finite_number(v, source, f"{where}.box") for v in box),
                score=_finite_number(entry.get("logit"), source, f"{where}.logit"),
                mask=mask,
            )
        except DataError:
            raise
        except ValueError as error:
            raise _bad_field(source, f"{where}: {error}") from None
        objects.append(obj)
    return caption, tuple(objects), check_original_size(data.get("original_size"), source)


def _check_boxes(record: ImageRecord, source: str) -> None:
    for obj in record.objects:
        if not box_inside_image(obj.box, record.width, record.height):
            box = "[" + ", ".join(f"{v:g}" for v in obj.box) + "]"
            raise DataError(
                BOX_OUTSIDE_IMAGE,
                f"{source}: the box {box} of {obj.name!r} lies outside the "
                f"{record.width}×{record.height} image",
            )


def read_authors_candidate(root: Path, image_id: str) -> Candidate:
    """One image of the authors' layout: ``jsons/<id>.json`` (``original_size`` [W, H], ``text``,
    ``final_masks`` entries with ``label``, ``logit``, ``box``), ``images/<id>.png``, ``masks/<id>.png``.
    The objects' mask is the label map; each object's label is resolved later from its box."""
    json_path = root / "jsons" / f"{image_id}.json"
    image_path = root / "images" / f"{image_id}.png"
    mask_path = root / "masks" / f"{image_id}.png"
    try:
        files = ((json_path, MISSING_JSON), (image_path, MISSING_IMAGE), (mask_path, MISSING_MASK))
        for path, reason in files:
            if not path.is_file():
                raise DataError(reason, f"{image_id}: {path} does not exist")
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (ValueError, OSError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
            raise DataError(CORRUPT_JSON, f"{json_path}: {type(error).__name__}: {error}") from None
        caption, objects, original = _authors_fields(data, str(json_path), str(mask_path))
        width, height = image_size(image_path, image_id)
        record = ImageRecord(
            id=image_id,
            image=str(image_path),
            width=width,
            height=height,
            caption=caption,
            objects=objects,
            original_size=original,
        )
        _check_boxes(record, image_id)
        return Candidate(image_id, record, label_map=True)
    except DataError as error:
        return Candidate(image_id, None, error)


def authors_candidates(
    root: str | Path, ids_file: str | None
) -> tuple[list[str], Callable[[str], Candidate]]:
    """The ids to read (from ``ids_file``, else every ``jsons/*.json``) and the reader of one id."""
    root = Path(root)
    if not (root / "jsons").is_dir():
        raise FileNotFoundError(f"{root} has no jsons/ folder: not the authors' data layout")
    ids = read_ids(ids_file) if ids_file else sorted(p.stem for p in (root / "jsons").glob("*.json"))
    return ids, lambda image_id: read_authors_candidate(root, image_id)


def manifest_candidates(path: str | Path) -> tuple[list[str], Callable[[str], Candidate]]:
    """The lines of a JSONL manifest and the parser of one line (paths made absolute, image size checked)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    folder = path.resolve().parent
    # bytes: a line that is not UTF-8 is that line's failure (corrupt_json), not the whole manifest's
    lines = [(n, line) for n, line in enumerate(path.read_bytes().splitlines(), 1) if line.strip()]
    by_key = {f"{path.name} line {n}": line for n, line in lines}

    def read(key: str) -> Candidate:
        try:
            try:
                data = json.loads(by_key[key].decode("utf-8"))
            except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, or nested too deep
                raise DataError(CORRUPT_JSON, f"{key}: {type(error).__name__}: {error}") from None
            try:
                record = record_from_dict(data, key)
            except ManifestError as error:
                raise DataError(BAD_FIELD, str(error)) from None
            check_original_size(record.original_size, key)
            image = folder / record.image
            if not image.is_file():
                raise DataError(MISSING_IMAGE, f"{key}: image {image} does not exist")
            objects = []
            for obj in record.objects:
                mask = str(folder / obj.mask) if obj.mask is not None else None
                if mask is not None and not Path(mask).is_file():
                    raise DataError(MISSING_MASK, f"{key}: mask {mask} of {obj.name!r} does not exist")
                objects.append(replace(obj, mask=mask))
            # boxes are in the recorded frame: checked there, then scaled to the image as stored now
            _check_boxes(record, key)
            width, height = image_size(image, key)
            scale_x, scale_y = width / record.width, height / record.height
            if (width, height) != (record.width, record.height):  # boxes refer to the recorded size
                objects = [
                    replace(
                        o,
                        box=(o.box[0] * scale_x, o.box[1] * scale_y, o.box[2] * scale_x, o.box[3] * scale_y),
                    )
                    for o in objects
                ]
            record = replace(record, image=str(image), width=width, height=height, objects=tuple(objects))
            return Candidate(key, record)
        except DataError as error:
            return Candidate(key, None, error)

    return list(by_key), read


# --- masks and choosing subjects ----------------------------------------------------------------------


def load_label_map(
    path: str | Path, size: tuple[int, int] | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """A mask PNG as a 2-D integer array [H, W] by ``photos.mask_labels``' rule, the data build's too
    (binary masks: 0 / non-zero; label maps, in grey or colour: labels; a colour mask: 1 where any
    channel is set).

    The header is read first: a missing file, one above ``max_pixels`` or (with ``size``, the image's
    (width, height)) of another size than its image raises `DataError` before a pixel is decoded."""
    from PIL import Image

    what = f"mask {path}"
    try:
        stored = header_size(path, what, max_pixels)
    except FileNotFoundError:
        raise DataError(MISSING_MASK, f"{what} does not exist") from None
    except PixelLimitError as error:
        raise DataError(TOO_MANY_PIXELS, str(error)) from None
    except OSError as error:
        raise DataError(UNREADABLE_MASK, f"{what} is not a readable image ({error})") from None
    if size is not None and stored != tuple(size):
        raise DataError(
            MASK_SIZE_MISMATCH, f"{what} is {stored[0]}×{stored[1]}, its image {size[0]}×{size[1]}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the header check decided
            with Image.open(path) as image:
                return mask_labels(image)
    except OSError as error:  # truncated or corrupt pixel data
        raise DataError(UNREADABLE_MASK, f"{what} cannot be decoded ({error})") from None
    except ValueError as error:
        raise DataError(UNREADABLE_MASK, f"{what}: {error}") from None


class LabelMaps:
    """The label maps of one image's objects, each decoded once while it fits: at most ``budget`` bytes
    are kept (the least recently used dropped first, the newest always kept), so one scan thread or data
    loader worker holds a bounded amount whatever a record lists. size: the image's (width, height)."""

    def __init__(self, size: tuple[int, int] | None, budget: int = LABEL_MAP_BUDGET) -> None:
        self.size, self.budget = size, budget
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, path: str) -> np.ndarray:
        if path in self._maps:
            self._maps.move_to_end(path)
            return self._maps[path]
        array = load_label_map(path, self.size)
        self._maps[path] = array
        while len(self._maps) > 1 and sum(a.nbytes for a in self._maps.values()) > self.budget:
            self._maps.popitem(last=False)
        return array


def int_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel bounds [x1, y1, x2, y2) covering the box, clamped to the image."""
    x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x2, y2 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    return x1, y1, x2, y2


def dominant_label(labels: np.ndarray, box: Sequence[float]) -> int | None:
    """The most frequent non-zero label inside ``box`` (the authors' choice of an object's segment)."""
    x1, y1, x2, y2 = int_box(box, labels.shape[1], labels.shape[0])
    inside = labels[y1:y2, x1:x2].ravel()
    inside = inside[inside > 0]
    if inside.size == 0:
        return None
    values, counts = np.unique(inside, return_counts=True)
    return int(values[counts.argmax()])


def object_mask(labels: np.ndarray, label: int | None) -> np.ndarray:
    """Boolean mask [H, W] of one object: pixels equal to ``label``, or non-zero for a binary mask."""
    return labels == label if label is not None else labels > 0


def crop_range(
    boxes: Sequence[Sequence[float]], width: int, height: int
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Offsets (left range, top range) of the ``min(W, H)`` square crops that hold every box, or None."""
    side = min(width, height)
    x1 = min(math.floor(b[0]) for b in boxes)
    y1 = min(math.floor(b[1]) for b in boxes)
    x2 = max(math.ceil(b[2]) for b in boxes)
    y2 = max(math.ceil(b[3]) for b in boxes)
    left = (max(0, min(x2, width) - side), min(max(x1, 0), width - side))
    top = (max(0, min(y2, height) - side), min(max(y1, 0), height - side))
    if left[0] > left[1] or top[0] > top[1]:
        return None
    return left, top


def authors_box_check(labels: np.ndarray, box: Sequence[float]) -> bool:
    """The authors' ``is_valid_bbox`` on a mask [H, W] and a float box: inside the box (corners truncated)
    2 to 5 distinct values, the most frequent one (background included) filling at least 60% of the
    box's area, and the dominant object value (the most frequent after the smallest value, as theirs)
    covering no more pixels in the whole mask than the box's area."""
    x1, y1, x2, y2 = (float(v) for v in box)
    inside = labels[int(y1) : int(y2), int(x1) : int(x2)]
    values, counts = np.unique(inside, return_counts=True)
    if not 2 <= len(counts) <= MAX_VALUES_IN_BOX:
        return False
    area = (x2 - x1) * (y2 - y1)
    if counts.max() / area < MIN_BOX_FILL:
        return False
    dominant = values[counts[1:].argmax() + 1]
    return bool((labels == dominant).sum() <= area)


def crop_box(box: Sequence[float], left: int, top: int, side: int, resolution: int) -> Box | None:
    """The part of ``box`` inside the square crop (left, top, side), in the frame of the crop resized to
    ``resolution`` (corners truncated to pixels first, as the authors draw their box masks); None when
    nothing of it is inside."""
    scale = resolution / side
    x1, y1 = max(int(box[0]), left), max(int(box[1]), top)
    x2, y2 = min(int(box[2]), left + side), min(int(box[3]), top + side)
    if x2 <= x1 or y2 <= y1:
        return None
    return ((x1 - left) * scale, (y1 - top) * scale, (x2 - left) * scale, (y2 - top) * scale)


def passes_post_crop(box: Box | None) -> bool:
    """The authors' ``post_bbox_filter`` on a box in the training frame: area above 200 px and a
    height/width ratio strictly between 0.3 and 3."""
    if box is None:
        return False
    width, height = box[2] - box[0], box[3] - box[1]
    return (
        width > 0
        and width * height > MIN_CROP_BOX_AREA
        and CROP_BOX_RATIO[0] < height / width < CROP_BOX_RATIO[1]
    )


def final_subjects(
    objects: Sequence[ObjectRecord],
    crop: tuple[int, int, int],
    rules: SubjectRules,
    rejected: Counter | None = None,
) -> list[ObjectRecord]:
    """The subjects of one training crop (left, top, side), best first: the post-crop filter (when on),
    then the first ``max_subjects``; raises `DataError` when fewer than ``min_subjects`` remain or, with
    ``duplicate_names="drop_sample"``, when two of them share a name (the authors' rules)."""
    rejected = rejected if rejected is not None else Counter()
    left, top, side = crop
    kept = []
    for obj in objects:
        if rules.post_crop_filter and not passes_post_crop(
            crop_box(obj.box, left, top, side, rules.resolution)
        ):
            rejected[OBJECT_POST_CROP] += 1
            continue
        kept.append(obj)
    if len(kept) > rules.max_subjects:
        rejected[OBJECT_OVER_MAX_SUBJECTS] += len(kept) - rules.max_subjects
        kept = kept[: rules.max_subjects]
    if len(kept) < rules.min_subjects:
        raise DataError(
            NO_VALID_OBJECT, f"{len(kept)} subjects left in the training crop, need {rules.min_subjects}"
        )
    names = [o.name.strip().lower() for o in kept]
    if rules.duplicate_names == "drop_sample" and len(set(names)) < len(names):
        raise DataError(DUPLICATE_NAMES, f"the subjects {[o.name for o in kept]} share a name")
    return kept


def authors_crop(
    region: Sequence[float], width: int, height: int
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The authors' offsets (left range, top range) of the ``min(W, H)`` square holding ``region``
    (corners truncated to int, as theirs), or None when no square does."""
    side = min(width, height)
    x1, y1, x2, y2 = (int(v) for v in region)
    left = (max(0, x2 - side), min(x1, width - side))
    top = (max(0, y2 - side), min(y1, height - side))
    if left[0] > left[1] or top[0] > top[1]:
        return None
    return left, top


@dataclass(frozen=True)
class SubjectRules:
    """How subjects are chosen (see `mipadapter.training.config.FilterConfig` and ``DataConfig``).

    crop: ``authors`` or ``subjects``; resolution: the training side (for the post-crop filter)."""

    filters: ObjectFilterConfig
    min_mask_fill: float
    min_subjects: int
    max_subjects: int
    authors_box_check: bool = False
    post_crop_filter: bool = False
    duplicate_names: str = "keep_best"
    crop: str = "subjects"
    resolution: int = 512


def _union(boxes: Sequence[Sequence[float]]) -> Box:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def choose_subjects(
    record: ImageRecord, rules: SubjectRules, rejected: Counter, label_map: bool = False
) -> ImageRecord:
    """The record with only its training subject candidates, best first, each mask resolved and non-empty.

    Order (the authors'): the object rules by descending score, with the authors' mask check
    (``authors_box_check``) before the nesting rule; then our optional ``min_mask_fill``. Then

    * crop ``authors``: ``crop_region`` is set to the union of every detected box; when one square crop
      holds it, the post-crop filter, the cap and the name rule (`final_subjects`) are decided here,
      else (the centre crop) every candidate is kept and each sample decides;
    * crop ``subjects``: the cap at ``max_subjects``, then the lowest-ranked subjects are dropped until
      one square crop holds all boxes.

    Raises `DataError` when fewer than ``min_subjects`` are left. Object rejections are added to
    ``rejected``. label_map: objects without a ``mask_label`` take the most frequent non-zero label inside
    their box (the authors' label maps); otherwise a mask without a label is binary.
    """
    label_maps = LabelMaps((record.width, record.height))

    def labels_of(obj: ObjectRecord) -> np.ndarray | None:
        return label_maps(obj.mask) if obj.mask is not None else None

    def accept(obj: ObjectRecord) -> str | None:
        labels = labels_of(obj)
        if labels is not None and not authors_box_check(labels, obj.box):
            return OBJECT_INVALID_BOX
        return None

    kept, dropped = select_objects(
        list(record.objects),
        (record.width, record.height),
        record.caption,
        rules.filters,
        accept=accept if rules.authors_box_check else None,
    )
    rejected.update(reason for _, reason in dropped)
    if len(kept) < rules.min_subjects:
        raise DataError(
            NO_VALID_OBJECT, f"{record.id}: {len(kept)} objects pass the filters, need {rules.min_subjects}"
        )
    checked: list[ObjectRecord] = []
    empty = 0
    for obj in kept:
        labels = labels_of(obj)
        if labels is None:
            rejected[OBJECT_EMPTY_MASK] += 1
            empty += 1
            continue
        label = obj.mask_label
        if label is None and label_map:
            label = dominant_label(labels, obj.box)
            if label is None:
                rejected[OBJECT_EMPTY_MASK] += 1
                empty += 1
                continue
        x1, y1, x2, y2 = int_box(obj.box, labels.shape[1], labels.shape[0])
        filled = object_mask(labels[y1:y2, x1:x2], label).sum()
        if filled == 0:
            rejected[OBJECT_EMPTY_MASK] += 1
            empty += 1
            continue
        if filled < rules.min_mask_fill * max(1, (x2 - x1) * (y2 - y1)):
            rejected[OBJECT_LOW_MASK_FILL] += 1
            continue
        checked.append(replace(obj, mask_label=label))
    if rules.crop == "authors":
        region = _union([o.box for o in record.objects])
        if len(checked) < rules.min_subjects:
            reason = EMPTY_MASK if empty and len(checked) + empty >= rules.min_subjects else NO_VALID_OBJECT
            raise DataError(reason, f"{record.id}: {len(checked)} subjects left after the mask checks")
        ranges = authors_crop(region, record.width, record.height)
        if ranges is not None:
            crop = (ranges[0][0], ranges[1][0], min(record.width, record.height))
            try:  # any square holding every box sees the same boxes: decided once, here
                checked = final_subjects(checked, crop, rules, rejected)
            except DataError as error:
                raise DataError(error.reason, f"{record.id}: {error}") from None
        return replace(record, objects=tuple(checked), crop_region=region)
    if len(checked) > rules.max_subjects:
        rejected[OBJECT_OVER_MAX_SUBJECTS] += len(checked) - rules.max_subjects
    checked = checked[: rules.max_subjects]
    while checked and crop_range([o.box for o in checked], record.width, record.height) is None:
        checked.pop()
        rejected[OBJECT_CROP_DOES_NOT_FIT] += 1
    if len(checked) < rules.min_subjects:
        reason = EMPTY_MASK if empty and len(checked) + empty >= rules.min_subjects else NO_VALID_OBJECT
        raise DataError(reason, f"{record.id}: {len(checked)} subjects left after mask and crop checks")
    names = [o.name.strip().lower() for o in checked]
    if rules.duplicate_names == "drop_sample" and len(set(names)) < len(names):
        raise DataError(
            DUPLICATE_NAMES, f"{record.id}: the subjects {[o.name for o in checked]} share a name"
        )
    return replace(record, objects=tuple(checked))


def build_index(
    keys: Sequence[str],
    read: Callable[[str], Candidate],
    rules: SubjectRules,
    workers: int = 8,
    limit: int | None = None,
) -> tuple[list[ImageRecord], ScanReport]:
    """Read, filter and choose the subjects of every key; order follows ``keys``.

    limit: read only the first ``limit`` keys. Raises `NoValidDataError` (with the counts) when no image
    is usable.
    """
    report = ScanReport()
    keys = list(keys)[:limit] if limit is not None else list(keys)

    def one(key: str) -> tuple[ImageRecord | None, DataError | None, Counter]:
        rejected: Counter = Counter()
        try:
            candidate = read(key)
            if candidate.error is not None:
                return None, candidate.error, rejected
            return choose_subjects(candidate.record, rules, rejected, candidate.label_map), None, rejected
        except DataError as error:
            return None, error, rejected
        except Exception as error:  # one sample never stops the scan: counted, its message kept
            return None, DataError(UNEXPECTED_ERROR, f"{key}: {type(error).__name__}: {error}"), rejected

    records: list[ImageRecord] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for record, error, rejected in pool.map(one, keys):
            report.total += 1
            report.objects_rejected.update(rejected)
            if error is not None:
                report.skipped[error.reason] += 1
                report.examples.setdefault(error.reason, str(error))
            else:
                records.append(record)
    report.kept = len(records)
    if not records:
        examples = "; ".join(f"{k}: {v}" for k, v in report.examples.items())
        raise NoValidDataError(
            f"no usable training image: {report.summary()}" + (f" (e.g. {examples})" if examples else "")
        )
    return records, report
