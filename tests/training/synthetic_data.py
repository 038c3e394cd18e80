"""Synthetic training data: images of coloured shapes, label maps, JSONs, in both layouts."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mipadapter.manifest import ImageRecord, ObjectRecord, write_manifest
from mipadapter.testing.images import png_bomb

WIDTH, HEIGHT = 80, 64
NAMES = ("cat", "dog", "ball", "cup", "box")
COLOURS = ((220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 200, 20), (160, 40, 200))


@dataclass(frozen=True)
class Shape:
    name: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive)
    ellipse: bool


# Layouts of 1, 2 or 3 objects; every union fits one 64-px square of an 80x64 image, areas 8-70%.
LAYOUTS = (
    (Shape("cat", (8, 8, 36, 40), False), Shape("dog", (40, 20, 70, 56), True)),
    (Shape("ball", (10, 6, 42, 38), True),),
    (
        Shape("cup", (6, 4, 30, 30), False),
        Shape("box", (34, 6, 62, 30), True),
        Shape("dog", (12, 36, 44, 62), False),
    ),
)


def draw(shapes, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """(image [H, W, 3] uint8, label map [H, W] uint8 with label i+1 for shape i)."""
    image = np.full((HEIGHT, WIDTH, 3), 235, dtype=np.uint8)
    image += np.asarray([rng.randint(0, 15) for _ in range(3)], dtype=np.uint8)
    labels = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    for i, shape in enumerate(shapes):
        x1, y1, x2, y2 = shape.box
        inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
        if shape.ellipse:
            cx, cy, rx, ry = (x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            inside &= ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
        else:  # a detector's box has some background around the segment (the authors' box check needs it)
            inside &= (xs > x1) & (xs < x2 - 1) & (ys > y1) & (ys < y2 - 1)
        image[inside] = COLOURS[NAMES.index(shape.name)]
        labels[inside] = i + 1
        # a dark mark left of centre, so that a flipped reference differs from the original
        cy, mx = (y1 + y2) // 2, x1 + (x2 - x1) // 4
        mark = np.zeros_like(inside)
        mark[cy - 1 : cy + 2, mx - 1 : mx + 2] = True
        image[mark & inside] = (20, 20, 20)
    return image, labels


def caption_of(shapes) -> str:
    return "a photo of " + " and ".join(f"a {s.name}" for s in shapes)


def write_authors_layout(root: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` images cycling through `LAYOUTS`, in the authors' layout; returns the ids."""
    rng = random.Random(seed)
    for sub in ("images", "masks", "jsons"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for k in range(count):
        shapes = LAYOUTS[k % len(LAYOUTS)]
        image, labels = draw(shapes, rng)
        image_id = f"sa_{k}"
        Image.fromarray(image).save(root / "images" / f"{image_id}.png")
        Image.fromarray(labels).save(root / "masks" / f"{image_id}.png")
        data = {
            "original_size": [WIDTH * 4, HEIGHT * 4],
            "text": caption_of(shapes),
            "final_masks": [
                {"label": s.name, "logit": 0.9 - 0.1 * i, "box": [float(v) for v in s.box]}
                for i, s in enumerate(shapes)
            ],
        }
        (root / "jsons" / f"{image_id}.json").write_text(json.dumps(data))
        ids.append(image_id)
    return ids


def write_manifest_layout(root: Path, count: int, seed: int = 0, binary_masks: bool = True) -> Path:
    """The same images as a manifest: per-object binary masks (or one label map with labels)."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    records = []
    for k in range(count):
        shapes = LAYOUTS[k % len(LAYOUTS)]
        image, labels = draw(shapes, rng)
        Image.fromarray(image).save(root / "images" / f"img_{k}.png")
        objects = []
        for i, s in enumerate(shapes):
            if binary_masks:
                mask = f"masks/img_{k}_{i}.png"
                Image.fromarray(((labels == i + 1) * 255).astype(np.uint8)).save(root / mask)
                label = None
            else:
                mask, label = f"masks/img_{k}.png", i + 1
                Image.fromarray(labels).save(root / mask)
            objects.append(ObjectRecord(s.name, tuple(float(v) for v in s.box), 0.9 - 0.1 * i, mask, label))
        records.append(
            ImageRecord(f"img_{k}", f"images/img_{k}.png", WIDTH, HEIGHT, caption_of(shapes), tuple(objects))
        )
    path = root / "manifest.jsonl"
    write_manifest(records, path)
    return path


def write_png_bomb(path: Path, width: int, height: int) -> Path:
    """A small PNG at ``path`` (140 KB for 12000²) that would decode to ``width × height`` bytes."""
    path.write_bytes(png_bomb(width, height))
    return path


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def plant_bad_authors_samples(root: Path) -> dict[str, list[str]]:
    """Break images sa_0 … sa_11 of an authors' layout (written with at least 13 images), one way each;
    returns reason → the ids skipped for it. The images from sa_12 on stay good."""
    jsons, images, masks = root / "jsons", root / "images", root / "masks"

    def set_original(data):
        data["original_size"] = ["a", "b"]

    def set_logit(data):
        data["final_masks"][0]["logit"] = "high"

    def box_outside(data):
        data["final_masks"][0]["box"] = [0.0, 0.0, 5000.0, 5000.0]

    _edit_json(jsons / "sa_0.json", set_original)
    _edit_json(jsons / "sa_1.json", set_logit)
    (images / "sa_2.png").unlink()
    (masks / "sa_3.png").unlink()
    (jsons / "sa_4.json").unlink()
    (jsons / "sa_5.json").write_text("{not json")
    (images / "sa_6.png").write_bytes(b"not a png")
    (masks / "sa_7.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png either")
    write_png_bomb(masks / "sa_8.png", 12000, 12000)
    write_png_bomb(images / "sa_9.png", 12000, 12000)
    Image.fromarray(np.zeros((HEIGHT // 2, WIDTH // 2), np.uint8)).save(masks / "sa_10.png")
    _edit_json(jsons / "sa_11.json", box_outside)
    return {
        "bad_field": ["sa_0", "sa_1"],
        "missing_image": ["sa_2"],
        "missing_mask": ["sa_3"],
        "missing_json": ["sa_4"],
        "corrupt_json": ["sa_5"],
        "unreadable_image": ["sa_6"],
        "unreadable_mask": ["sa_7"],
        "too_many_pixels": ["sa_8", "sa_9"],
        "mask_size_mismatch": ["sa_10"],
        "box_outside_image": ["sa_11"],
    }
