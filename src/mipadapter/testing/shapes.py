"""Pictures of coloured shapes, and data-pipeline stages that read them back exactly (offline, no model).

Each colour is one object name (`COLOURS`) on a grey background. `ShapeCaptioner` names the colours a
picture shows, `ShapeGrounder` boxes each asked-for name's colour, `ShapeSegmenter` keeps the
non-background pixels of each box. With the tiny random CLIP as the scorer they are what
``mipadapter data build --tiny`` runs: tiny random BLIP-2 / Grounding DINO / SAM find nothing in any
picture, so a set that ``mipadapter train --tiny`` can train on needs stages that see what is there.
Store the pictures losslessly (PNG): the stages match colours exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from mipadapter.data.stages import Backends, Detection

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "DETECTOR_SCORES",
    "ShapeCaptioner",
    "ShapeGrounder",
    "ShapeSegmenter",
    "colour_mask",
    "draw_shapes",
    "shape_backends",
]

BACKGROUND = (128, 128, 128)
COLOURS = {"apple": (200, 30, 30), "frog": (30, 180, 40), "car": (40, 50, 210), "banana": (220, 200, 30)}
DETECTOR_SCORES = {"apple": 0.9, "frog": 0.8, "car": 0.7, "banana": 0.6}


def draw_shapes(size: int, objects: dict[str, tuple[int, int, int, int]], ellipses: bool = False) -> Image.Image:
    """A ``size``-px square grey picture with one rectangle (or ellipse) of each name's colour in its box
    (x1, y1, x2, y2; end-exclusive)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for name, (x1, y1, x2, y2) in objects.items():
        shape = pen.ellipse if ellipses else pen.rectangle
        shape((x1, y1, x2 - 1, y2 - 1), fill=COLOURS[name])
    return image


def colour_mask(image: Image.Image, name: str) -> np.ndarray:
    """[H, W] bool: the pixels of ``name``'s colour."""
    return (np.asarray(image.convert("RGB")) == np.array(COLOURS[name], dtype=np.uint8)).all(-1)


class ShapeCaptioner:
    """'a photo of an apple and a frog': the names of the colours present, in `COLOURS` order."""

    def caption(self, images):
        out = []
        for image in images:
            names = [n for n in COLOURS if colour_mask(image, n).any()]
            out.append("a photo of " + " and ".join(("an " if n[0] in "aeiou" else "a ") + n for n in names))
        return out


class ShapeGrounder:
    """The exact box of each phrase's colour, scored by `DETECTOR_SCORES`; unknown phrases find nothing."""

    def ground(self, images, phrases):
        out = []
        for image, names in zip(images, phrases, strict=True):
            found = []
            for name in names:
                mask = colour_mask(image, name) if name in COLOURS else np.zeros((1, 1), bool)
                if mask.any():
                    ys, xs = np.nonzero(mask)
                    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                    found.append(Detection(name, box, DETECTOR_SCORES[name]))
            out.append(found)
        return out


class ShapeSegmenter:
    """The non-background pixels inside each box."""

    def segment(self, images, boxes):
        out = []
        for image, image_boxes in zip(images, boxes, strict=True):
            pixels = np.asarray(image.convert("RGB"))
            foreground = torch.from_numpy(~(pixels == np.array(BACKGROUND, dtype=np.uint8)).all(-1))
            masks = torch.zeros((len(image_boxes), image.height, image.width), dtype=torch.bool)
            for i, (x1, y1, x2, y2) in enumerate(image_boxes.round().int().tolist()):
                masks[i, y1:y2, x1:x2] = foreground[y1:y2, x1:x2]
            out.append(masks)
        return out


def shape_backends(config, seed: int = 0) -> Backends:
    """``data build --tiny``: the shape-reading captioner, grounder and segmenter, and the real CLIP stage
    on the tiny random CLIP of ``seed`` (`mipadapter.testing.tiny_data_models.tiny_clip`)."""
    from mipadapter.data.backends.clip import ClipEmbedder
    from mipadapter.testing.tiny_data_models import tiny_clip

    clip = tiny_clip(seed)
    return Backends(
        embedder=ClipEmbedder(clip.model, clip.processor, batch_size=config.clip_batch_size),
        captioner=ShapeCaptioner(),
        grounder=ShapeGrounder(),
        segmenter=ShapeSegmenter(),
    )
