"""Captioning with BLIP-2 (`Blip2ForConditionalGeneration`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mipadapter.data.backends._common import from_pretrained, processor_from_pretrained, to_model

if TYPE_CHECKING:
    from PIL import Image


class Blip2Captioner:
    """Greedy BLIP-2 captions; `prompt` (e.g. "a photo of") conditions every caption when given."""

    def __init__(self, model: Any, processor: Any, *, max_new_tokens: int = 30, prompt: str | None = None):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        if not images:
            return []
        text = [self.prompt] * len(images) if self.prompt else None
        inputs = to_model(self.processor(images=list(images), text=text, return_tensors="pt"), self.model)
        tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)  # [b, t]
        captions = self.processor.batch_decode(tokens, skip_special_tokens=True)
        return [" ".join(c.split()) for c in captions]


def load_blip2(
    model_id: str, device: torch.device | str, dtype: torch.dtype, **options: Any
) -> Blip2Captioner:
    from transformers import Blip2ForConditionalGeneration

    model = from_pretrained(
        Blip2ForConditionalGeneration, model_id, device, dtype, what="captioner (BLIP-2)", key="caption_model"
    )
    return Blip2Captioner(
        model, processor_from_pretrained(model_id, what="captioner (BLIP-2)", key="caption_model"), **options
    )
