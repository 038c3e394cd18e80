"""Reference photos as the pipeline and the metrics see them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from mipadapter.eval.cases import SubjectSpec

__all__ = ["crop_pad_white", "load_references"]


def crop_pad_white(photo: Image.Image, box: Sequence[float] | None) -> Image.Image:
    """Crop ``photo`` to ``box`` (x0, y0, x1, y1 in pixels; None keeps the whole photo) and pad it to a
    square on white, centred (how the authors prepare Concept101 references). Returns RGB."""
    photo = photo.convert("RGB")
    if box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        width, height = photo.size
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"crop box {tuple(box)} does not fit a {width}x{height} photo")
        photo = photo.crop((x0, y0, x1, y1))
    width, height = photo.size
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(photo, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_references(root: str | Path, subject: SubjectSpec, *, crop: bool = True) -> list[Image.Image]:
    """The subject's reference photos (RGB). ``crop``: crop to the boxes (if any) and pad white; without
    it the photos are returned whole, as the metrics compare against them."""
    images = []
    for number, relative in enumerate(subject.references):
        with Image.open(Path(root) / relative) as photo:
            if crop:
                box = subject.boxes[number] if subject.boxes else None
                images.append(crop_pad_white(photo, box) if box is not None else photo.convert("RGB"))
            else:
                images.append(photo.convert("RGB"))
    return images
