"""Phrase grounding with Grounding DINO (`GroundingDinoForObjectDetection` + its processor)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mipadapter.data.backends._common import from_pretrained, processor_from_pretrained, to_model
from mipadapter.data.phrases import grounding_text
from mipadapter.data.stages import Detection

if TYPE_CHECKING:
    from PIL import Image


def _clean(label: str, specials: list[str]) -> str:
    """A phrase label without tokenizer specials ("[SEP]") or the prompt's periods."""
    for token in specials:
        label = label.replace(token, " ")
    return " ".join(label.replace(" .", " ").strip(" .").split())


class GroundingDinoGrounder:
    """Boxes for each image's phrases, labelled by the phrase span the detector attends to."""

    def __init__(
        self, model: Any, processor: Any, *, box_threshold: float = 0.3, text_threshold: float = 0.25
    ):
        self.model = model
        self.processor = processor
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold

    @torch.no_grad()
    def ground(
        self, images: Sequence[Image.Image], phrases: Sequence[Sequence[str]]
    ) -> list[list[Detection]]:
        if len(images) != len(phrases):
            raise ValueError(f"got {len(images)} images but {len(phrases)} phrase lists")
        results: list[list[Detection] | None] = [[] for _ in images]
        # images without phrases have nothing to ground; the model needs non-empty text
        active = [i for i, p in enumerate(phrases) if grounding_text(list(p))]
        if not active:
            return [[] for _ in images]
        texts = [grounding_text(list(phrases[i])) for i in active]
        batch = [images[i] for i in active]
        inputs = self.processor(images=batch, text=texts, padding=True, return_tensors="pt")
        outputs = self.model(
            **to_model(inputs, self.model)
        )  # logits [b, q, max_text_len], pred_boxes [b, q, 4]
        sizes = [(image.height, image.width) for image in batch]
        processed = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"].to(outputs.logits.device),
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=sizes,
        )
        specials = [t for t in self.processor.tokenizer.all_special_tokens if t]
        for index, found in zip(active, processed, strict=True):
            results[index] = [
                Detection(
                    name=_clean(str(label), specials),
                    box=tuple(float(v) for v in box.tolist()),
                    score=float(score),
                )
                for label, box, score in zip(
                    found["text_labels"],
                    found["boxes"].float().cpu(),
                    found["scores"].float().cpu(),
                    strict=True,
                )
            ]
        return results


def load_grounding_dino(
    model_id: str, device: torch.device | str, dtype: torch.dtype, **options: Any
) -> GroundingDinoGrounder:
    from transformers import GroundingDinoForObjectDetection

    model = from_pretrained(
        GroundingDinoForObjectDetection,
        model_id,
        device,
        dtype,
        what="grounding detector (Grounding DINO)",
        key="grounding_model",
    )
    return GroundingDinoGrounder(
        model,
        processor_from_pretrained(
            model_id, what="grounding detector (Grounding DINO)", key="grounding_model"
        ),
        **options,
    )
