"""Open-vocabulary box detection for the relevance experiment and the local-add ablation.

A detector answers, for one image and a list of object names, the best box of each name (or None).
Backends: `GroundingDinoDetector` (transformers; model id configurable, loaded by
`load_grounding_dino`) and `FixedBoxDetector` (deterministic, for tests and for boxes known in advance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from PIL import Image

Box = tuple[float, float, float, float]
GROUNDING_DINO_ID = "IDEA-Research/grounding-dino-base"

__all__ = [
    "GROUNDING_DINO_ID",
    "Box",
    "Detector",
    "FixedBoxDetector",
    "GroundingDinoDetector",
    "load_grounding_dino",
]


class Detector(Protocol):
    model_id: str

    def detect(self, image: Image.Image, labels: Sequence[str]) -> list[Box | None]:
        """The highest-scoring box ``(x0, y0, x1, y1)`` in image pixels of each label, or None."""


class FixedBoxDetector:
    """Answers the same box for a label whatever the image (None for labels it does not know)."""

    model_id = "fixed-boxes"

    def __init__(self, boxes: Mapping[str, Box]) -> None:
        self.boxes = {label: tuple(float(v) for v in box) for label, box in boxes.items()}
        self.calls = 0

    def detect(self, image: Image.Image, labels: Sequence[str]) -> list[Box | None]:
        self.calls += 1
        return [self.boxes.get(label) for label in labels]


class GroundingDinoDetector:
    """Grounding DINO through transformers; each label is queried on its own (``"<label>."``) so labels
    never compete for one box. model: ``AutoModelForZeroShotObjectDetection``; processor: its processor."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        model_id: str = "unnamed",
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.model_id = model_id

    def detect(self, image: Image.Image, labels: Sequence[str]) -> list[Box | None]:
        import torch

        device = next(self.model.parameters()).device
        image = image.convert("RGB")
        boxes: list[Box | None] = []
        for label in labels:
            text = label.lower().strip().rstrip(".") + "."
            inputs = self.processor(images=image, text=text, return_tensors="pt").to(device)
            with torch.no_grad():
                outputs = self.model(**inputs)
            result = self.processor.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"],
                threshold=self.box_threshold,
                text_threshold=self.text_threshold,
                target_sizes=[(image.height, image.width)],
            )[0]
            if len(result["scores"]) == 0:
                boxes.append(None)
                continue
            best = int(result["scores"].argmax())
            x0, y0, x1, y1 = (float(v) for v in result["boxes"][best].tolist())
            x0, y0 = max(0.0, x0), max(0.0, y0)
            x1, y1 = min(float(image.width), x1), min(float(image.height), y1)
            boxes.append((x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None)
        return boxes


def load_grounding_dino(
    model_id_or_path: str = GROUNDING_DINO_ID,
    *,
    box_threshold: float = 0.35,
    text_threshold: float = 0.25,
    device: Any = None,
) -> GroundingDinoDetector:
    """Load a Grounding DINO checkpoint (hub id or folder); ``device`` only if the caller gives one.

    A model that is neither local nor cached fails at once offline, in one line naming ``--detector``
    (`mipadapter.hub`)."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    from mipadapter.hub import fetch_failed, resolve_folder

    what, where = "Grounding DINO detector", "--detector"
    location, subfolder = resolve_folder(model_id_or_path, what, where)
    extra = {"subfolder": subfolder} if subfolder else {}
    try:
        model = AutoModelForZeroShotObjectDetection.from_pretrained(location, **extra)
        processor = AutoProcessor.from_pretrained(location, **extra)
    except OSError as error:
        raise fetch_failed(model_id_or_path, what, where, error) from error
    if device is not None:
        model = model.to(device)
    return GroundingDinoDetector(
        model,
        processor,
        box_threshold=box_threshold,
        text_threshold=text_threshold,
        model_id=str(model_id_or_path),
    )
