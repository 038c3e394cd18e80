"""The stage interfaces of the data pipeline: small protocols any backend (real or fake) can fill.

Every stage takes a batch of RGB PIL images and returns one result per image, in order. Backends
follow the device and dtype of the model they hold; they never choose one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from PIL import Image


@dataclass(frozen=True)
class Detection:
    """One grounded phrase: its text, an [x1, y1, x2, y2] box in image pixels, the detector score."""

    name: str
    box: tuple[float, float, float, float]
    score: float


class Captioner(Protocol):
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per image."""
        ...


class Grounder(Protocol):
    def ground(
        self, images: Sequence[Image.Image], phrases: Sequence[Sequence[str]]
    ) -> list[list[Detection]]:
        """Detections of each image's phrases (`phrases[i]` belongs to `images[i]`)."""
        ...


class Segmenter(Protocol):
    def segment(self, images: Sequence[Image.Image], boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Masks from box prompts: boxes[i] [k_i, 4] pixels -> bool [k_i, H_i, W_i] on images[i]'s grid."""
        ...


class Embedder(Protocol):
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP image embeddings [n, e] (not normalised)."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings [n, e] (not normalised)."""
        ...


@dataclass(frozen=True)
class Backends:
    """The stages one run uses; `score` of an existing set needs only the embedder."""

    embedder: Embedder
    captioner: Captioner | None = None
    grounder: Grounder | None = None
    segmenter: Segmenter | None = None

    def require_build_stages(self) -> None:
        missing = [n for n in ("captioner", "grounder", "segmenter") if getattr(self, n) is None]
        if missing:
            raise ValueError(f"building a set needs every stage; missing backends: {missing}")
