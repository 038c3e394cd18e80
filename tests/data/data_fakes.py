"""Deterministic fake stages and synthetic SA-1B-like shards for the data pipeline tests.

Images are 64x64 grey canvases with coloured rectangles; each colour is one object name. The fakes
read the colours back exactly (images are stored as PNG, lossless), so every box, mask and score of a
build is known in advance and computed in the tests from the formula, not from the code under test.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mipadapter.data.stages import Backends, Detection

SIZE = 64
BACKGROUND = (128, 128, 128)
COLOURS = {"apple": (200, 30, 30), "frog": (30, 180, 40), "car": (40, 50, 210), "banana": (220, 200, 30)}
DETECTOR_SCORES = {"apple": 0.9, "frog": 0.8, "car": 0.7, "banana": 0.6}
TEXT_EMBEDDINGS = {
    "apple": (1.0, 0.0, 0.0),
    "frog": (0.0, 1.0, 0.0),
    "car": (0.0, 0.0, 1.0),
    "banana": (1.0, 1.0, 0.0),
}

# rectangles (x1, y1, x2, y2), end-exclusive; areas are 9.8%-14% of the image: inside the filters
SLOTS = [(2, 2, 22, 22), (30, 4, 54, 24), (4, 34, 26, 56), (34, 36, 56, 58)]


def draw(objects: dict[str, tuple[int, int, int, int]]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    pixels = np.asarray(image).copy()
    for name, (x1, y1, x2, y2) in objects.items():
        pixels[y1:y2, x1:x2] = COLOURS[name]
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def layout(*names: str) -> dict[str, tuple[int, int, int, int]]:
    return {name: SLOTS[i] for i, name in enumerate(names)}


def sa1b_json(stem: str, annotations: bool = True) -> bytes:
    return json.dumps(
        {
            "image": {"file_name": f"{stem}.png", "width": SIZE, "height": SIZE},
            "annotations": [{"id": 1}] if annotations else [],
        }
    ).encode()


def write_tar(path: Path, members: list[tuple[str, bytes]], cut_inside: str | None = None) -> None:
    """A tar of `members`; with `cut_inside`, the file ends halfway through that member's data."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            archive.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    if cut_inside is not None:
        data = dict(members)[cut_inside]
        raw = raw[: raw.index(data) + len(data) // 2]
    path.write_bytes(raw)


# what each synthetic image shows
SCENES = {
    "sa_1": ("apple", "frog"),
    "sa_2": ("apple", "car", "banana"),  # banana: 3rd object, over max_objects=2
    "sa_3": ("frog",),  # one object: no pair
    "sa_4": ("car", "banana"),
    "sa_6": ("apple", "frog"),  # its JSON lists no annotations
    "sa_7": ("frog", "banana"),
    "sa_8": ("apple", "car"),  # its tar member is cut
    "sa_9": ("apple", "banana"),
    "sa_10": ("car", "frog"),
}


def make_sa1b_shards(folder: Path) -> Path:
    """Four tar shards; sa_5 is a corrupt image, sa_6 a JSON without objects, sa_8 a truncated member."""
    folder.mkdir(parents=True, exist_ok=True)

    def pair(stem: str, annotations: bool = True) -> list[tuple[str, bytes]]:
        return [
            (f"{stem}.png", png_bytes(draw(layout(*SCENES[stem])))),
            (f"{stem}.json", sa1b_json(stem, annotations)),
        ]

    write_tar(folder / "sa_000000.tar", pair("sa_1") + pair("sa_2") + pair("sa_3"))
    write_tar(
        folder / "sa_000001.tar",
        pair("sa_4")
        + [("sa_5.png", b"\x89PNG\r\n\x1a\n garbage"), ("sa_5.json", sa1b_json("sa_5"))]
        + pair("sa_6", annotations=False),
    )
    last = pair("sa_8")
    write_tar(folder / "sa_000002.tar", pair("sa_7") + [last[1], last[0]], cut_inside="sa_8.png")
    write_tar(folder / "sa_000003.tar", pair("sa_9") + pair("sa_10"))
    return folder


# --- expected values, from the formula ----------------------------------------------------------------


def cos(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


def expected_scores(names: list[str], mode: str = "multi") -> tuple[list[float], dict[str, float]]:
    per_object = [cos(TEXT_EMBEDDINGS[n], COLOURS[n]) for n in names]
    scores = {"s_single": sum(per_object) / len(per_object)}
    if mode == "multi":
        pairs = [
            -cos(COLOURS[a], COLOURS[b]) for i, a in enumerate(names) for j, b in enumerate(names) if i != j
        ]
        scores["s_pair"] = sum(pairs) / len(pairs)
        scores["s_quality"] = scores["s_single"] + scores["s_pair"]
    else:
        scores["s_quality"] = scores["s_single"]
    return per_object, scores


# --- fakes --------------------------------------------------------------------------------------------


def _colour_mask(image: Image.Image, name: str) -> np.ndarray:
    return (np.asarray(image) == np.array(COLOURS[name], dtype=np.uint8)).all(-1)


class FakeCaptioner:
    """'a photo of an apple and a frog': the names of the colours present. Can fail after N images."""

    def __init__(self, fail_after: int | None = None):
        self.fail_after = fail_after
        self.seen = 0

    def caption(self, images):
        out = []
        for image in images:
            if self.fail_after is not None and self.seen >= self.fail_after:
                raise RuntimeError("injected failure")
            self.seen += 1
            names = [n for n in COLOURS if _colour_mask(image, n).any()]
            out.append("a photo of " + " and ".join(("an " if n[0] in "aeiou" else "a ") + n for n in names))
        return out


class FakeGrounder:
    """The exact box of each phrase's colour, plus a nested low-score duplicate of the first phrase."""

    def ground(self, images, phrases):
        out = []
        for image, names in zip(images, phrases, strict=True):
            found = []
            for name in names:
                mask = _colour_mask(image, name) if name in COLOURS else np.zeros((1, 1), bool)
                if not mask.any():
                    continue
                ys, xs = np.nonzero(mask)
                box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                found.append(Detection(name, box, DETECTOR_SCORES[name]))
            if found:
                x1, y1, x2, y2 = found[0].box
                found.append(
                    Detection(found[0].name, (x1 + 2, y1 + 2, x2 - 2, y2 - 2), 0.5)
                )  # dropped: nested
            out.append(found)
        return out


class FakeSegmenter:
    """The non-background pixels inside each box."""

    def segment(self, images, boxes):
        out = []
        for image, image_boxes in zip(images, boxes, strict=True):
            foreground = torch.from_numpy(
                ~(np.asarray(image) == np.array(BACKGROUND, dtype=np.uint8)).all(-1)
            )
            masks = torch.zeros((len(image_boxes), image.height, image.width), dtype=torch.bool)
            for i, (x1, y1, x2, y2) in enumerate(image_boxes.round().int().tolist()):
                masks[i, y1:y2, x1:x2] = foreground[y1:y2, x1:x2]
            out.append(masks)
        return out


class FakeEmbedder:
    """Image: the mean colour of a crop's non-white pixels; text: a fixed vector per name."""

    def __init__(self):
        self.images = 0

    def embed_images(self, images):
        self.images += len(images)
        rows = []
        for image in images:
            pixels = np.asarray(image).reshape(-1, 3).astype(np.float64)
            rows.append(pixels[(pixels != 255).any(-1)].mean(0))
        return torch.tensor(np.stack(rows), dtype=torch.float32)

    def embed_texts(self, texts):
        return torch.tensor([TEXT_EMBEDDINGS[t] for t in texts], dtype=torch.float32)


def fake_backends(fail_after: int | None = None) -> Backends:
    return Backends(
        embedder=FakeEmbedder(),
        captioner=FakeCaptioner(fail_after),
        grounder=FakeGrounder(),
        segmenter=FakeSegmenter(),
    )
