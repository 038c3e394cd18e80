"""CLIP embeddings for the object quality score (`CLIPModel`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mipadapter.data.backends._common import from_pretrained, processor_from_pretrained, to_model

if TYPE_CHECKING:
    from PIL import Image


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding;
    # older versions return the tensor itself
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ClipEmbedder:
    """Projected CLIP image / text embeddings [n, e], batched by `batch_size`, returned on the CPU in float32."""

    def __init__(self, model: Any, processor: Any, *, batch_size: int = 64):
        self.model = model
        self.processor = processor
        self.batch_size = batch_size

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.processor(images=list(images[start : start + self.batch_size]), return_tensors="pt")
            output = self.model.get_image_features(pixel_values=to_model(inputs, self.model)["pixel_values"])
            chunks.append(_features(output).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros((0, self.model.config.projection_dim))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.processor.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                return_tensors="pt",
            )
            inputs = to_model({k: inputs[k] for k in ("input_ids", "attention_mask")}, self.model)
            chunks.append(_features(self.model.get_text_features(**inputs)).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros((0, self.model.config.projection_dim))


def load_clip(model_id: str, device: torch.device | str, dtype: torch.dtype, **options: Any) -> ClipEmbedder:
    from transformers import CLIPModel

    model = from_pretrained(
        CLIPModel, model_id, device, dtype, what="CLIP model for the quality score", key="clip_model"
    )
    return ClipEmbedder(
        model,
        processor_from_pretrained(model_id, what="CLIP model for the quality score", key="clip_model"),
        **options,
    )
