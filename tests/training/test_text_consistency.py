"""Training and generation encode subject names identically (one definition of the name rows)."""

from __future__ import annotations

import pytest
import torch

from mipadapter.pipeline.encoding import encode_names
from mipadapter.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline
from mipadapter.training.batching import name_token_mask
from mipadapter.training.text import TextConditioner


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_training_name_rows_equal_the_pipelines(arch):
    pipe = tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd15_pipeline()
    names = ["cat", "wooden pot", ""]
    expected, expected_mask = encode_names(pipe, names, torch.device("cpu"))  # [3, m, c], [3, m]

    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if arch == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    ids, mask = [], None
    for tokenizer in tokenizers:  # as the training collator tokenizes: padded to the longest name only
        encoded = tokenizer(names, padding="longest", truncation=True, return_tensors="pt")
        mask, _ = name_token_mask(encoded.attention_mask, 1, len(names))
        ids.append(encoded.input_ids)
    rows = TextConditioner(encoders, arch).encode_names(ids, mask)[0]  # [3, m, c]

    assert torch.equal(mask[0], expected_mask)
    torch.testing.assert_close(rows * mask[0, ..., None], expected, rtol=1e-5, atol=1e-6)
