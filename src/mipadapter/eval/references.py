"""Reference photos as the pipeline and the metrics see them.

Conditioning references (what the adapter sees) follow the authors' Concept101 preparation
(``data/concept101_dataset.py`` of hqhQAQ/MIP-Adapter), step by step:

1. resize the photo so its short side is 800 px (bilinear; the long side ``int(800·long/short)``);
2. crop it to the object's box in that frame, each coordinate truncated to an integer (a box reaching
   past the photo is filled black there, as PIL's crop does);
3. resize the crop to fit 224×224 keeping its aspect ratio (the long side 224, the short side
   ``int(224·short/long)``, bilinear) and pad it white, centred (left/top get the smaller half);
4. the pipeline's CLIP image processor takes it from there.

The box of a photo is the first object entry (``mask[1]["box"]``) of ``<boxes>/<concept>/<stem>.json``:
the authors' ``json_data`` layout (Grounding-DINO output; ``<stem>`` is the file name up to its first
dot). Without such a folder the box is detected with Grounding DINO on the 800-px photo and cached in
the same layout inside the run folder (`BoxSource`), so a second run detects nothing. A photo with no
box (nothing detected) is used whole, fitted and padded the same way.

Boxes are in the stored pixel frame (as the authors' loader reads the file, without its EXIF
orientation); the crop is then turned upright by the photo's EXIF orientation, like every photo the
project opens (`mipadapter.photos`). Metrics compare against whole photos (`metric_references`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mipadapter.eval.cases import SubjectSpec
from mipadapter.fileio import atomic_write_text
from mipadapter.photos import open_photo, upright

logger = logging.getLogger(__name__)

AUTHORS_SHORT_SIDE = 800
REFERENCE_SIDE = 224
WHITE = (255, 255, 255)
REFERENCE_MODES = ("crop", "whole")

__all__ = [
    "AUTHORS_SHORT_SIDE",
    "REFERENCE_MODES",
    "REFERENCE_SIDE",
    "BoxSource",
    "box_file",
    "conditioning_references",
    "crop_reference",
    "fit_pad_white",
    "metric_references",
    "read_box_file",
    "resize_short_side",
    "stored_frame_800",
    "write_box_file",
]

Box = tuple[float, float, float, float]


def resize_short_side(photo: Image.Image, short: int = AUTHORS_SHORT_SIDE) -> Image.Image:
    """Bilinear resize to short side ``short``; the long side is ``int(short·long/short_side)``."""
    width, height = photo.size
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    return photo.resize(size, Image.Resampling.BILINEAR)


def fit_pad_white(photo: Image.Image, side: int = REFERENCE_SIDE) -> Image.Image:
    """Fit ``photo`` into ``side``×``side`` keeping its aspect ratio (bilinear), padded white, centred."""
    width, height = photo.size
    aspect = width / height
    if aspect > 1.0:
        new_w, new_h = side, int(side / aspect)
    else:
        new_w, new_h = int(side * aspect), side
    new_w, new_h = max(1, new_w), max(1, new_h)
    fitted = photo.convert("RGB").resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (side, side), WHITE)
    canvas.paste(fitted, ((side - new_w) // 2, (side - new_h) // 2))
    return canvas


def stored_frame_800(path: str | Path, what: str = "reference photo") -> Image.Image:
    """The photo in its stored pixel frame (no EXIF turn yet), RGB, resized to short side 800.

    The EXIF bytes stay in ``info`` (convert, resize and crop keep them), so `upright` can turn a crop.
    """
    return resize_short_side(open_photo(path, what, turn=False))


def crop_reference(
    path: str | Path, box: Sequence[float] | None, *, what: str = "reference photo"
) -> Image.Image:
    """The authors' conditioning reference of one photo (module docstring): [224, 224] RGB.

    box: ``(x0, y0, x1, y1)`` in the frame of the photo resized to short side 800, or None (whole photo).
    """
    photo = stored_frame_800(path, what)
    if box is not None:
        x0, y0, x1, y1 = (int(v) for v in box)  # truncation, as numpy's astype(int32)
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"{what} {str(path)!r}: box {tuple(box)} is empty")
        photo = photo.crop((x0, y0, x1, y1))
    return fit_pad_white(upright(photo))


def box_file(boxes_dir: str | Path, photo: str | Path) -> Path:
    """``<boxes_dir>/<concept folder>/<stem>.json`` of a photo ``.../<concept folder>/<stem>.<ext>``."""
    photo = Path(photo)
    return Path(boxes_dir) / photo.parent.name / (photo.name.split(".")[0] + ".json")


def read_box_file(path: str | Path) -> Box | None:
    """The box of the first object entry (``mask[1]["box"]``) of an authors'-layout file, or None when
    the file lists no object (our cache's record of a detection that found nothing)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"box file {str(path)!r} is not readable JSON: {error}") from None
    entries = data.get("mask") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"box file {str(path)!r}: expected a 'mask' list (background first, then objects)")
    if len(entries) < 2:
        return None
    box = entries[1].get("box") if isinstance(entries[1], dict) else None
    if (
        not isinstance(box, list)
        or len(box) != 4
        or not all(isinstance(v, int | float) for v in box)
        or not (box[0] < box[2] and box[1] < box[3])
    ):
        raise ValueError(
            f"box file {str(path)!r}: mask[1]['box'] must be [x0, y0, x1, y1] with x0 < x1, y0 < y1"
        )
    return tuple(float(v) for v in box)


def write_box_file(path: str | Path, label: str, box: Box | None, detector: str) -> None:
    """Write a detected box in the authors' layout (no object entry when nothing was detected)."""
    entries: list[dict[str, Any]] = [{"value": 0, "label": "background"}]
    if box is not None:
        entries.append({"value": 1, "label": label, "box": [float(v) for v in box]})
    atomic_write_text(Path(path), json.dumps({"mask": entries, "detector": detector}, indent=1) + "\n")


@dataclass
class BoxSource:
    """Where each reference photo's crop box comes from.

    boxes_dir: the authors' ``json_data`` folder (read only); cache_dir: where detected boxes are kept
    (a run's ``reference_boxes/``); detector: a zero-argument factory of a `Detector`, called once, only
    when a box is neither in boxes_dir nor in the cache.
    """

    boxes_dir: Path | None = None
    cache_dir: Path | None = None
    detector: Callable[[], Any] | None = None
    _loaded: Any = field(default=None, repr=False)

    def describe(self) -> str:
        if self.boxes_dir is not None:
            return f"authors' json_data layout at {self.boxes_dir}"
        return "detected with Grounding DINO on the 800-px photo, cached in reference_boxes/"

    def lookup(self, photo: Path) -> tuple[bool, Box | None]:
        """(known, box) from the files alone; known is False when the box still has to be detected."""
        if self.boxes_dir is not None:
            path = box_file(self.boxes_dir, photo)
            if not path.is_file():
                raise FileNotFoundError(
                    f"box file {str(path)!r} not found (the box of {str(photo)!r}) in the reference boxes "
                    "folder (reference_boxes, --reference-boxes): give the authors' json_data folder, or "
                    "leave it out to detect the boxes"
                )
            return True, read_box_file(path)
        if self.cache_dir is not None:
            path = box_file(self.cache_dir, photo)
            if path.is_file():
                return True, read_box_file(path)
        return False, None

    def box(self, photo: Path, label: str) -> Box | None:
        """The box of ``photo`` (showing ``label``), detecting and caching it when needed."""
        known, box = self.lookup(photo)
        if known:
            return box
        if self.detector is None or self.cache_dir is None:
            raise ValueError(f"no crop box for {str(photo)!r}: give --reference-boxes or a detector")
        if self._loaded is None:
            self._loaded = self.detector()
        (box,) = self._loaded.detect(stored_frame_800(photo), [label])
        if box is None:
            logger.warning("no %r detected in %s: that reference is used whole", label, photo)
        write_box_file(
            box_file(self.cache_dir, photo), label, box, getattr(self._loaded, "model_id", "detector")
        )
        return box

    def release(self) -> None:
        """Drop the loaded detector (before the generation models load)."""
        self._loaded = None


def conditioning_references(
    root: str | Path, subject: SubjectSpec, *, mode: str = "crop", boxes: BoxSource | None = None
) -> list[Image.Image]:
    """The subject's photos as the adapter sees them: ``crop`` (the authors' crop, module docstring) or
    ``whole`` (each photo upright, whole; the CLIP processor resizes and centre-crops it)."""
    if mode not in REFERENCE_MODES:
        raise ValueError(f"reference mode must be one of {REFERENCE_MODES}, got {mode!r}")
    paths = [Path(root) / relative for relative in subject.references]
    what = f"reference photo of {subject.key!r}"
    if mode == "whole":
        return [open_photo(path, what) for path in paths]
    if boxes is None:
        raise ValueError("reference mode 'crop' needs a BoxSource")
    return [crop_reference(path, boxes.box(path, subject.name), what=what) for path in paths]


def metric_references(root: str | Path, subject: SubjectSpec) -> list[Image.Image]:
    """The subject's whole photos (upright, RGB): what CLIP-I and DINO compare generated images with."""
    return [
        open_photo(Path(root) / relative, f"reference photo of {subject.key!r}")
        for relative in subject.references
    ]
