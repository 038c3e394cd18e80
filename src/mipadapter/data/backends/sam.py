"""Segmentation from box prompts with SAM (`SamModel`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mipadapter.data.backends._common import from_pretrained, processor_from_pretrained, to_model

if TYPE_CHECKING:
    from PIL import Image


class SamSegmenter:
    """One mask per box: the image encoder runs once per batch, the prompt decoder once per image."""

    def __init__(self, model: Any, processor: Any):
        self.model = model
        self.processor = processor

    @torch.no_grad()
    def segment(self, images: Sequence[Image.Image], boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(images) != len(boxes):
            raise ValueError(f"got {len(images)} images but {len(boxes)} box tensors")
        if not images:
            return []
        inputs = self.processor(images=list(images), return_tensors="pt")
        pixel_values = to_model({"pixel_values": inputs["pixel_values"]}, self.model)["pixel_values"]
        embeddings = self.model.get_image_embeddings(pixel_values)  # [b, c, h', w']
        masks = []
        for index, (image, image_boxes) in enumerate(zip(images, boxes, strict=True)):
            if image_boxes.ndim != 2 or image_boxes.shape[-1] != 4:
                raise ValueError(f"boxes of image {index} must be [k, 4], got {tuple(image_boxes.shape)}")
            if len(image_boxes) == 0:
                masks.append(torch.zeros((0, image.height, image.width), dtype=torch.bool))
                continue
            original = inputs["original_sizes"][index].tolist()  # [H, W]
            reshaped = inputs["reshaped_input_sizes"][
                index
            ].tolist()  # [H', W'] after the longest-edge resize
            scale = torch.tensor([reshaped[1] / original[1], reshaped[0] / original[0]] * 2)
            prompt = (image_boxes.float().cpu() * scale)[None].to(
                embeddings.device, embeddings.dtype
            )  # [1, k, 4]
            outputs = self.model(
                image_embeddings=embeddings[index : index + 1], input_boxes=prompt, multimask_output=False
            )
            low_res = outputs.pred_masks[0].float()  # [k, 1, h'', w'']
            full = self.processor.post_process_masks([low_res], [original], [reshaped])[
                0
            ]  # [k, 1, H, W] bool
            masks.append(full[:, 0].cpu())
        return masks


def load_sam(model_id: str, device: torch.device | str, dtype: torch.dtype) -> SamSegmenter:
    from transformers import SamModel

    model = from_pretrained(SamModel, model_id, device, dtype, what="segmenter (SAM)", key="segment_model")
    return SamSegmenter(
        model, processor_from_pretrained(model_id, what="segmenter (SAM)", key="segment_model")
    )
