"""Checkpoint formats: key tables, pure converters, strict loading and saving.

Model files are located through ``mipadapter.hub`` (local paths, the Hub cache, fail-fast offline).
"""

from mipadapter.checkpoint.convert import CheckpointError, infer_h94_config
from mipadapter.checkpoint.io import (
    SAVE_FORMATS,
    AdapterFile,
    adapter_from_file,
    adapter_state,
    check_adapter_file,
    convert_checkpoint,
    load_adapter,
    read_file,
    save_adapter,
)

__all__ = [
    "SAVE_FORMATS",
    "AdapterFile",
    "CheckpointError",
    "adapter_from_file",
    "adapter_state",
    "check_adapter_file",
    "convert_checkpoint",
    "infer_h94_config",
    "load_adapter",
    "read_file",
    "save_adapter",
]
