"""What a user says about each subject, checked once per call, and their regions as latent masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mipadapter.config import RegionMode
from mipadapter.scales import check_scale

Box = tuple[float, float, float, float]


@dataclass
class Subject:
    """One subject of a generation.

    name: the words the prompt uses for it (e.g. "cat", "wooden pot").
    images: one or more reference photos (PIL images); or ``image_embeds``: precomputed image-encoder
        features, [k, D] for basic adapters or [k, L, D] for plus adapters.
    scale: the image scale ``s_i`` (the adapter's default when None); or one scale per layer, as
        diffusers' ``set_ip_adapter_scale`` takes them: on FLUX a list with one value per double-stream
        block (19 on FLUX.1), on a UNet the dict form ``{"down": {"block_2": [0.0, 1.0]}, "mid": 0.5,
        "up": {"block_0": [0.0, 1.0, 0.0]}}`` (parts and blocks left out get 0, as in diffusers).
    region: where the subject should go, as a box ``(x0, y0, x1, y1)`` in output pixels or a mask
        ([H, W] PIL image, array or tensor, values in [0, 1], any size: it is stretched to the output).
    region_mode: ``replace`` the relevance map with the region, or ``multiply`` it.
    adapter: the name of the pipeline's adapter that encodes this subject's photos (one added with
        ``MIPAdapterPipeline.add_adapter``, e.g. a face adapter for a person); None: the default adapter.
    """

    name: str
    images: Sequence[Any] = field(default_factory=tuple)
    image_embeds: torch.Tensor | None = None
    scale: float | list[float] | dict[str, Any] | None = None
    region: Box | Any | None = None
    region_mode: RegionMode | str = RegionMode.REPLACE
    adapter: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a subject needs a non-empty name, got {self.name!r}")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter.strip()):
            raise ValueError(f"subject {self.name!r}: adapter must be an adapter's name or None, got {self.adapter!r}")
        if hasattr(self.images, "size") and hasattr(self.images, "convert"):  # a single PIL image
            self.images = (self.images,)
        self.images = tuple(self.images)
        has_images, has_embeds = bool(self.images), self.image_embeds is not None
        if has_images == has_embeds:
            raise ValueError(
                f"subject {self.name!r}: give either images or image_embeds (exactly one of them)"
            )
        check_scale(self.scale, f"subject {self.name!r}")
        try:
            self.region_mode = RegionMode(self.region_mode)
        except ValueError:
            raise ValueError(
                f"subject {self.name!r}: region_mode must be 'replace' or 'multiply', got {self.region_mode!r}"
            ) from None
        for index, image in enumerate(self.images):
            if not (hasattr(image, "size") and hasattr(image, "convert")):
                raise TypeError(
                    f"subject {self.name!r}: photo #{index + 1} is a {type(image).__name__}, not a PIL image"
                )


def region_mask(subject: Subject, image_size: tuple[int, int], latent_size: tuple[int, int]) -> torch.Tensor:
    """The subject's region as a float mask at latent resolution: [H_latent, W_latent] in [0, 1].

    image_size, latent_size: (height, width). Boxes are in output pixels.
    """
    height, width = image_size
    region = subject.region
    if (
        isinstance(region, (tuple, list))
        and len(region) == 4
        and all(isinstance(v, (int, float)) for v in region)
    ):
        x0, y0, x1, y1 = (float(v) for v in region)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(
                f"subject {subject.name!r}: box {tuple(region)} must satisfy 0 ≤ x0 < x1 ≤ {width} and 0 ≤ y0 < y1 ≤ {height}"
            )
        ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
        xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
        mask = ((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)).float()
    else:
        if hasattr(region, "convert"):
            region = np.asarray(region.convert("L"), dtype=np.float32) / 255.0
        mask = torch.as_tensor(np.asarray(region, dtype=np.float32))
        if mask.ndim != 2:
            raise ValueError(
                f"subject {subject.name!r}: a region mask must be 2-D [H, W], got shape {tuple(mask.shape)}"
            )
        if float(mask.min()) < 0 or float(mask.max()) > 1:
            raise ValueError(f"subject {subject.name!r}: region mask values must lie in [0, 1]")
    latent = F.interpolate(mask[None, None], size=latent_size, mode="area")[0, 0]
    if float(latent.max()) <= 0:
        raise ValueError(
            f"subject {subject.name!r}: the region is empty at the latent resolution {latent_size}"
        )
    return latent
