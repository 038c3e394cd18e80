"""A compiled pipeline compiles once per session: other prompts, photos and name lengths reuse the graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mipadapter.pipeline import Subject
from mipadapter.testing.mip import tiny_mip_pipeline

CALLS = [  # (prompt, names): the names' token counts change between calls 2 and 3
    ("a dog playing with a duck toy", ["dog", "duck toy"]),
    ("a photo of a dog next to a duck toy on a beach at dawn", ["dog", "duck toy"]),
    ("a dog and a toy", ["dog", "toy"]),
]


def _generate(pipe, photo, call: int):
    prompt, names = CALLS[call]
    subjects = [Subject(name, photo(10 * call + i)) for i, name in enumerate(names)]
    return pipe(
        prompt, subjects, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
        output_type="np", show_progress=False,
    ).images  # fmt: skip


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_three_calls_compile_once_and_equal_eager(backend, photo):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    pipe = tiny_mip_pipeline("sdxl", "basic", text_weight=True)
    eager = [_generate(pipe, photo, call) for call in range(3)]
    dynamo.reset()
    counters.clear()
    try:
        pipe.compile(backend=backend)
        graphs = []
        for call in range(3):
            before = counters["stats"]["unique_graphs"]
            np.testing.assert_allclose(_generate(pipe, photo, call), eager[call], atol=1e-4, rtol=0)
            graphs.append(counters["stats"]["unique_graphs"] - before)
        assert graphs[0] >= 1 and graphs[1:] == [0, 0], graphs  # calls 2 and 3 compile nothing new
        assert not counters["graph_break"], dict(counters["graph_break"])
        plain = pipe.unload()
        assert "forward" not in vars(plain.unet)  # unload undoes compile
    finally:
        dynamo.reset()
