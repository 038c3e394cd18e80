"""Feature encoders for evaluation: CLIP ViT-B/32 (image and text) and DINO ViT-S/16 v1 (image).

Constructors take already-built transformers models (no I/O); ``load_clip`` / ``load_dino`` fetch the
public weights explicitly. Features are computed on the device and in the dtype of the model's
parameters; returned features are float32 on that device and *not* normalised (metrics normalise).

Preprocessing (docs/evaluation.md), done here with PIL so no image-processor backend is needed:

* CLIP: resize the shorter side to the model's ``image_size`` (bicubic), centre-crop a square of that
  side, scale to [0, 1], normalise with OpenAI CLIP's mean/std (what ``CLIPImageProcessor`` does).
* DINO: resize the shorter side to 256 (bicubic), centre-crop 224, ImageNet mean/std (the DINO
  repository's evaluation transform). For a model whose ``image_size`` is not 224 the resize keeps the
  ratio 256/224.

``FeatureEncoders`` holds the two, each built by its factory on first use, so a run that only generates
never loads them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

CLIP_MODEL_ID = "openai/clip-vit-base-patch32"
DINO_MODEL_ID = "facebook/dino-vits16"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "CLIP_MODEL_ID",
    "DINO_MODEL_ID",
    "ClipFeatures",
    "DinoFeatures",
    "FeatureEncoders",
    "load_clip",
    "load_dino",
    "preprocess_images",
]


def preprocess_images(
    images: Sequence[Image.Image],
    *,
    resize: int,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Resize the shorter side to ``resize`` (bicubic), centre-crop ``crop``², normalise.

    images: n PIL images of any mode and size → float32 [n, 3, crop, crop] on the CPU.
    """
    if crop > resize:
        raise ValueError(f"crop {crop} must not exceed resize {resize}")
    if len(images) == 0:
        raise ValueError("preprocess_images got no images")
    arrays = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected PIL images, got {type(image).__name__}")
        image = image.convert("RGB")
        width, height = image.size
        short = min(width, height)
        size = (max(resize, round(width * resize / short)), max(resize, round(height * resize / short)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)  # [crop, crop, 3]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [n, 3, crop, crop]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns an output object from ``get_*_features``; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _param(model: torch.nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _batched_image_features(model, images, batch_size: int, preprocessing: dict, forward) -> torch.Tensor:
    """Preprocess and encode images in batches on the model's device and dtype → float32 [n, e]."""
    param = _param(model)
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = preprocess_images(images[start : start + batch_size], **preprocessing)
        chunks.append(forward(pixels.to(device=param.device, dtype=param.dtype)).float())
    return torch.cat(chunks)


class ClipFeatures:
    """CLIP image and text features (the projected embeddings) for CLIP-T and CLIP-I.

    model: a ``transformers.CLIPModel``; tokenizer: its tokenizer. ``model_id`` names the weights in
    results files.
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, model_id: str = "unnamed", batch_size: int = 32
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.batch_size = batch_size
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """n PIL images → float32 [n, projection_dim]."""
        return _batched_image_features(
            self.model,
            images,
            self.batch_size,
            dict(resize=self.image_size, crop=self.image_size, mean=CLIP_MEAN, std=CLIP_STD),
            lambda pixels: _pooled(self.model.get_image_features(pixel_values=pixels)),
        )

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """n strings → float32 [n, projection_dim] (truncated to the text model's context)."""
        if isinstance(texts, str):
            raise TypeError("text_features takes a sequence of strings, not one string")
        device = _param(self.model).device
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            tokens = {
                key: value.to(device)
                for key, value in tokens.items()
                if key in ("input_ids", "attention_mask")
            }
            chunks.append(_pooled(self.model.get_text_features(**tokens)).float())
        return torch.cat(chunks)


class DinoFeatures:
    """DINO (v1) image features: the CLS token of the last layer of a ``transformers.ViTModel``."""

    def __init__(self, model: Any, *, model_id: str = "unnamed", batch_size: int = 32) -> None:
        self.model = model.eval()
        self.model_id = model_id
        self.batch_size = batch_size
        self.crop = int(model.config.image_size)
        self.resize = round(self.crop * 256 / 224)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """n PIL images → float32 [n, hidden_size]."""
        return _batched_image_features(
            self.model,
            images,
            self.batch_size,
            dict(resize=self.resize, crop=self.crop, mean=IMAGENET_MEAN, std=IMAGENET_STD),
            # the CLS token of the last layer: last_hidden_state [b, 1 + patches, c] → [b, c]
            lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0],
        )


def _pretrained(model_cls, source: str, what: str, where: str, **kwargs):
    """``model_cls.from_pretrained`` on a folder or Hub id resolved through ``mipadapter.hub`` (cache
    first, one line at once when offline)."""
    from mipadapter.hub import fetch_failed, resolve_folder

    location, subfolder = resolve_folder(source, what, where)
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        return model_cls.from_pretrained(location, **kwargs)
    except OSError as error:
        raise fetch_failed(source, what, where, error) from error


def load_clip(
    model_id_or_path: str = CLIP_MODEL_ID,
    *,
    torch_dtype: torch.dtype | None = None,
    device: Any = None,
    where: str = "model_id_or_path",
) -> ClipFeatures:
    """Load CLIP weights and tokenizer (hub id or local folder); ``device`` only if the caller gives one.

    where: how errors name the model's source (an argument name, a flag or a config key).
    """
    from transformers import CLIPModel, CLIPTokenizer

    source = str(model_id_or_path)
    model = _pretrained(CLIPModel, source, "CLIP model", where, dtype=torch_dtype)
    tokenizer = _pretrained(CLIPTokenizer, source, "CLIP model", where)
    if device is not None:
        model = model.to(device)
    return ClipFeatures(model, tokenizer, model_id=source)


def load_dino(
    model_id_or_path: str = DINO_MODEL_ID,
    *,
    torch_dtype: torch.dtype | None = None,
    device: Any = None,
    where: str = "model_id_or_path",
) -> DinoFeatures:
    """Load DINO ViT weights (hub id or local folder) without the unused pooler."""
    from transformers import ViTModel

    source = str(model_id_or_path)
    model = _pretrained(ViTModel, source, "DINO model", where, add_pooling_layer=False, dtype=torch_dtype)
    if device is not None:
        model = model.to(device)
    return DinoFeatures(model, model_id=source)


class FeatureEncoders:
    """The CLIP and DINO encoders of one evaluation, each given built or as a factory run on first use."""

    def __init__(
        self,
        clip: ClipFeatures | Callable[[], ClipFeatures],
        dino: DinoFeatures | Callable[[], DinoFeatures],
    ) -> None:
        self._clip = clip
        self._dino = dino

    @classmethod
    def from_pretrained(
        cls,
        clip_id: str = CLIP_MODEL_ID,
        dino_id: str = DINO_MODEL_ID,
        *,
        torch_dtype: torch.dtype | None = None,
        device: Any = None,
        clip_where: str = "clip_id",
        dino_where: str = "dino_id",
    ) -> FeatureEncoders:
        """Encoders that load ``clip_id`` / ``dino_id`` when first used (errors name them as
        ``clip_where`` / ``dino_where``: a CLI passes its flags)."""
        return cls(
            lambda: load_clip(clip_id, torch_dtype=torch_dtype, device=device, where=clip_where),
            lambda: load_dino(dino_id, torch_dtype=torch_dtype, device=device, where=dino_where),
        )

    @property
    def clip(self) -> ClipFeatures:
        if not isinstance(self._clip, ClipFeatures):
            self._clip = self._clip()
        return self._clip

    @property
    def dino(self) -> DinoFeatures:
        if not isinstance(self._dino, DinoFeatures):
            self._dino = self._dino()
        return self._dino
