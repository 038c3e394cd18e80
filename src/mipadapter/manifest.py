"""The training manifest: one JSON object per line, one line per image. Defined once, here.

The data-construction command writes it; the trainer reads it. Paths inside a record (the image, the
mask PNGs) are relative to the folder that holds the manifest, so a dataset folder can be moved whole.

One line (keys always present; `null` where a value is absent)::

    {"schema_version": 2, "id": "sa_1", "image": "images/sa_000000/sa_1.jpg", "width": 1500,
     "height": 2250, "original_size": null, "caption": "a cat sitting next to a jacket",
     "objects": [{"name": "cat", "box": [10.0, 20.0, 610.0, 900.0], "score": 0.61,
                  "mask": "masks/sa_000000/sa_1.png", "mask_label": 1, "clip_score": 0.31}, ...],
     "scores": {"s_single": 0.29, "s_pair": -0.42, "s_quality": -0.13},
     "crop_region": null}

* `box` is `[x1, y1, x2, y2]` in pixels of the referenced image (`width` × `height`).
* `mask` is a PNG: with `mask_label` null, a binary mask (non-zero = object); with an integer, an
  instance label map in which the object's pixels equal that label.
* `original_size` is `[W, H]` of the photo before any resize (SDXL micro-conditioning); null means
  the referenced image is the original.
* `scores` holds the object quality scores that were computed (`s_single`, `s_pair`, `s_quality`);
  a score that is undefined (e.g. `s_pair` with one object) is absent, never NaN.
* `crop_region` is `[x1, y1, x2, y2]` (pixels), the region a square training crop should hold when one
  can: the union of every detected box, the authors' rule (the trainer's index sets it); null: the
  objects' boxes decide.

Version 1 lines (without `crop_region`) are still read.

Parsing is strict: an unknown or missing key, a wrong type or a newer schema version is an error that
names the line and the field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mipadapter.fileio import atomic_write_text

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
SCORE_KEYS = ("s_single", "s_pair", "s_quality")

Box = tuple[float, float, float, float]


class ManifestError(ValueError):
    """A manifest line that does not follow the schema; the message names the line and field."""


@dataclass(frozen=True)
class ObjectRecord:
    """One selected object of an image.

    name: the object's word(s) as they occur in the caption ("cat").
    box: [x1, y1, x2, y2] in image pixels, x1 <= x2 and y1 <= y2.
    score: the detector's confidence in [0, 1].
    mask: PNG path relative to the manifest folder, or None when no mask was made.
    mask_label: the object's value in an instance label map; None for a binary mask.
    clip_score: cos(g_text(name), g_img(object)) of the quality score, when computed.
    """

    name: str
    box: Box
    score: float
    mask: str | None = None
    mask_label: int | None = None
    clip_score: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"object name must be a non-empty string, got {self.name!r}")
        box = tuple(float(v) for v in self.box)
        if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[0] > box[2] or box[1] > box[3]:
            raise ValueError(
                f"box of {self.name!r} must be finite [x1, y1, x2, y2] with x1<=x2, y1<=y2, got {self.box!r}"
            )
        object.__setattr__(self, "box", box)
        if self.mask_label is not None and (self.mask is None or self.mask_label < 1):
            raise ValueError(
                f"mask_label of {self.name!r} needs a mask and a value >= 1, got {self.mask_label!r}"
            )


@dataclass(frozen=True)
class ImageRecord:
    """One image of the manifest: where it is, what it shows, and its quality scores."""

    id: str
    image: str
    width: int
    height: int
    caption: str
    objects: tuple[ObjectRecord, ...] = ()
    scores: Mapping[str, float] = field(default_factory=dict)
    original_size: tuple[int, int] | None = None
    schema_version: int = SCHEMA_VERSION
    crop_region: Box | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("image record id must be a non-empty string")
        if self.crop_region is not None:
            region = tuple(float(v) for v in self.crop_region)
            if (
                len(region) != 4
                or not all(math.isfinite(v) for v in region)
                or region[0] > region[2]
                or region[1] > region[3]
            ):
                raise ValueError(
                    f"image {self.id!r}: crop_region must be finite [x1, y1, x2, y2], got {self.crop_region!r}"
                )
            object.__setattr__(self, "crop_region", region)
        if self.width < 1 or self.height < 1:
            raise ValueError(f"image {self.id!r}: size must be positive, got {self.width}x{self.height}")
        object.__setattr__(self, "objects", tuple(self.objects))
        unknown = sorted(set(self.scores) - set(SCORE_KEYS))
        if unknown:
            raise ValueError(f"image {self.id!r}: unknown score keys {unknown}; allowed {list(SCORE_KEYS)}")
        bad = {k: v for k, v in self.scores.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(
                f"image {self.id!r}: scores must be finite (leave undefined ones out), got {bad}"
            )
        object.__setattr__(self, "scores", {k: float(self.scores[k]) for k in SCORE_KEYS if k in self.scores})
        if self.original_size is not None:
            object.__setattr__(self, "original_size", tuple(int(v) for v in self.original_size))


# --- to and from JSON -------------------------------------------------------------------------------

_OBJECT_FIELDS = ("name", "box", "score", "mask", "mask_label", "clip_score")
_IMAGE_FIELDS = (
    "schema_version",
    "id",
    "image",
    "width",
    "height",
    "original_size",
    "caption",
    "objects",
    "scores",
    "crop_region",
)


def record_to_dict(record: ImageRecord) -> dict[str, Any]:
    """The JSON object of one manifest line (every key present, in a fixed order)."""
    return {
        "schema_version": record.schema_version,
        "id": record.id,
        "image": record.image,
        "width": record.width,
        "height": record.height,
        "original_size": list(record.original_size) if record.original_size is not None else None,
        "caption": record.caption,
        "objects": [
            {
                "name": o.name,
                "box": list(o.box),
                "score": o.score,
                "mask": o.mask,
                "mask_label": o.mask_label,
                "clip_score": o.clip_score,
            }
            for o in record.objects
        ],
        "scores": dict(record.scores),
        "crop_region": list(record.crop_region) if record.crop_region is not None else None,
    }


def record_to_json(record: ImageRecord) -> str:
    return json.dumps(record_to_dict(record), ensure_ascii=False, allow_nan=False)


def _check_keys(data: Any, expected: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
    unknown = [k for k in data if k not in expected]
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {unknown}")
    missing = [k for k in expected if k not in data]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {missing}")


def _typed(value: Any, types: tuple[type, ...], where: str, nullable: bool = False) -> Any:
    if value is None and nullable:
        return None
    # bool is an int subclass: reject it where a number is meant
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = "/".join(t.__name__ for t in types) + (" or null" if nullable else "")
        raise ManifestError(f"{where}: expected {names}, got {value!r}")
    return value


def _number_list(value: Any, length: int, where: str, kind: type = float) -> list:
    if not isinstance(value, list) or len(value) != length:
        raise ManifestError(f"{where}: expected a list of {length} numbers, got {value!r}")
    types = (int,) if kind is int else (int, float)
    return [_typed(v, types, f"{where}[{i}]") for i, v in enumerate(value)]


def _object_from_dict(data: Any, where: str) -> ObjectRecord:
    _check_keys(data, _OBJECT_FIELDS, where)
    try:
        return ObjectRecord(
            name=_typed(data["name"], (str,), f"{where}.name"),
            box=tuple(_number_list(data["box"], 4, f"{where}.box")),
            score=float(_typed(data["score"], (int, float), f"{where}.score")),
            mask=_typed(data["mask"], (str,), f"{where}.mask", nullable=True),
            mask_label=_typed(data["mask_label"], (int,), f"{where}.mask_label", nullable=True),
            clip_score=_typed(data["clip_score"], (int, float), f"{where}.clip_score", nullable=True),
        )
    except ManifestError:
        raise
    except ValueError as error:
        raise ManifestError(f"{where}: {error}") from None


def record_from_dict(data: Any, where: str = "record") -> ImageRecord:
    """Parse one manifest object strictly; `where` (e.g. "manifest.jsonl line 3") prefixes errors."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
    version = _typed(data.get("schema_version"), (int,), f"{where}: field 'schema_version'")
    if version not in READABLE_VERSIONS:
        raise ManifestError(
            f"{where}: field 'schema_version' is {version}; this reader knows {list(READABLE_VERSIONS)}"
        )
    _check_keys(data, _IMAGE_FIELDS if version >= 2 else _IMAGE_FIELDS[:-1], where)
    objects = _typed(data["objects"], (list,), f"{where}: field 'objects'")
    scores = _typed(data["scores"], (dict,), f"{where}: field 'scores'")
    for key, value in scores.items():
        if key not in SCORE_KEYS:
            raise ManifestError(
                f"{where}: field 'scores' has unknown key {key!r}; allowed {list(SCORE_KEYS)}"
            )
        _typed(value, (int, float), f"{where}: field 'scores.{key}'")
    original = data["original_size"]
    try:
        return ImageRecord(
            id=_typed(data["id"], (str,), f"{where}: field 'id'"),
            image=_typed(data["image"], (str,), f"{where}: field 'image'"),
            width=_typed(data["width"], (int,), f"{where}: field 'width'"),
            height=_typed(data["height"], (int,), f"{where}: field 'height'"),
            caption=_typed(data["caption"], (str,), f"{where}: field 'caption'"),
            objects=tuple(
                _object_from_dict(o, f"{where}: field 'objects[{i}]'") for i, o in enumerate(objects)
            ),
            scores=scores,
            original_size=None
            if original is None
            else tuple(_number_list(original, 2, f"{where}: field 'original_size'", int)),
            schema_version=SCHEMA_VERSION,  # a version 1 line is read into the current record
            crop_region=None
            if data.get("crop_region") is None
            else tuple(_number_list(data["crop_region"], 4, f"{where}: field 'crop_region'")),
        )
    except ManifestError:
        raise
    except ValueError as error:
        raise ManifestError(f"{where}: {error}") from None


# --- files ------------------------------------------------------------------------------------------


def _lines(records: Iterable[ImageRecord]) -> str:
    return "".join(record_to_json(r) + "\n" for r in records)


def write_manifest(records: Iterable[ImageRecord], path: str | os.PathLike) -> None:
    """Write `records` as JSONL at `path` atomically (temp file, then rename)."""
    atomic_write_text(path, _lines(records))


def append_manifest(records: Iterable[ImageRecord], path: str | os.PathLike) -> None:
    """Append `records` to `path` (created if absent) and fsync.

    Not atomic across a crash: a killed writer can leave a partial last line, which `read_manifest`
    reports with its line number. Use `write_manifest` for files others read while you write.
    """
    text = _lines(records)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def iter_manifest(path: str | os.PathLike) -> Iterator[ImageRecord]:
    """Yield the records of a JSONL manifest one by one; blank lines are allowed, anything else strict."""
    name = os.fspath(path)
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{name} line {number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                raise ManifestError(
                    f"{where}: not valid JSON ({error.msg} at column {error.colno})"
                ) from None
            yield record_from_dict(data, where)


def read_manifest(path: str | os.PathLike) -> list[ImageRecord]:
    """All records of a JSONL manifest, in file order."""
    return list(iter_manifest(path))


def resolve(manifest_path: str | os.PathLike, relative: str) -> Path:
    """The absolute location of a path stored in a record of the manifest at `manifest_path`."""
    return (Path(manifest_path).resolve().parent / relative).resolve()
