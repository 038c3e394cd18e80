"""Half-precision runs follow the models' dtype end to end (bf16 runs on CPUs; fp16 is the GPU path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mipadapter import Subject
from mipadapter.testing.mip import tiny_mip_pipeline


@pytest.mark.parametrize(("arch", "projection", "rule"), [("sdxl", "basic", "official"), ("sd15", "plus", "paper")])
def test_bfloat16_generation_matches_float32_closely(arch, projection, rule):
    photos = [Image.fromarray(np.full((40, 40, 3), value, dtype=np.uint8)) for value in (30, 200)]
    subjects = [Subject("cat", [photos[0]]), Subject("dog", [photos[1]], region=(0, 0, 32, 64))]
    kwargs = dict(rule=rule, num_inference_steps=2, output_type="np", show_progress=False, return_relevance=True)
    reference = tiny_mip_pipeline(arch, projection)
    half = tiny_mip_pipeline(arch, projection).to(dtype=torch.bfloat16)
    assert half.adapter.processor(half.adapter.layer_specs[0].name).to_k_ip.weight.dtype == torch.bfloat16
    full = reference("a cat and a dog", subjects, generator=torch.Generator().manual_seed(0), **kwargs)
    low = half("a cat and a dog", subjects, generator=torch.Generator().manual_seed(0), **kwargs)
    assert np.isfinite(low.images).all()
    assert np.abs(low.images - full.images).mean() < 0.05
    assert set(low.relevance[0]) == {"cat", "dog"}
