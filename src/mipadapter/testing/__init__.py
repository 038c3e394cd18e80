"""An offline factory of tiny models and checkpoints (used by the tests and by the CLI's ``--tiny`` mode).

Nothing here touches the network or picks a device: every model is built from a config with random
weights fixed by a seed (float32, CPU, eval mode), tokenizers from files shipped with installed packages.

* `build_clip_tokenizer` — CLIP tokenizers (the real 49,408-token vocabulary when `open_clip` is
  installed, else a small documented fallback).
* `tiny_sdxl_pipeline`, `tiny_sd15_pipeline`, `tiny_image_encoder` — toy-width models with the real
  structure; sizes in `TINY_SDXL`, `TINY_SD15`, `TINY_VIT_H`, `TINY_VIT_BIGG`.
* `fabricate_ip_adapter_state`, `save_checkpoint`, `tiny_checkpoint_files` — IP-Adapter / MIP-Adapter
  checkpoints in the published key layouts.
"""

from mipadapter.testing.checkpoints import (
    IPAdapterState,
    TinyCheckpointFiles,
    cross_attention_layers,
    fabricate_ip_adapter_state,
    flatten_state,
    save_checkpoint,
    tiny_checkpoint_files,
)
from mipadapter.testing.tiny import (
    TINY_SD15,
    TINY_SDXL,
    TINY_VIT_BIGG,
    TINY_VIT_H,
    TinyImageEncoderSpec,
    TinySpec,
    tiny_image_encoder,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)
from mipadapter.testing.tokenizer import (
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    build_clip_tokenizer,
    clip_vocab_files,
    has_real_clip_vocab,
)

__all__ = [
    "CLIP_MAX_LENGTH",
    "CLIP_VOCAB_SIZE",
    "IPAdapterState",
    "TINY_SD15",
    "TINY_SDXL",
    "TINY_VIT_BIGG",
    "TINY_VIT_H",
    "TinyCheckpointFiles",
    "TinyImageEncoderSpec",
    "TinySpec",
    "build_clip_tokenizer",
    "clip_vocab_files",
    "cross_attention_layers",
    "fabricate_ip_adapter_state",
    "flatten_state",
    "has_real_clip_vocab",
    "save_checkpoint",
    "tiny_checkpoint_files",
    "tiny_image_encoder",
    "tiny_sd15_pipeline",
    "tiny_sdxl_pipeline",
]
