"""Checkpoint formats: key tables, pure converters, strict loading and saving."""

from mipadapter.checkpoint.convert import CheckpointError, infer_h94_config
from mipadapter.checkpoint.hub import ModelNotFoundError, resolve_file, resolve_folder
from mipadapter.checkpoint.io import (
    SAVE_FORMATS,
    AdapterFile,
    adapter_state,
    convert_checkpoint,
    load_adapter,
    read_file,
    save_adapter,
)

__all__ = [
    "SAVE_FORMATS",
    "AdapterFile",
    "CheckpointError",
    "ModelNotFoundError",
    "adapter_state",
    "convert_checkpoint",
    "infer_h94_config",
    "load_adapter",
    "read_file",
    "resolve_file",
    "resolve_folder",
    "save_adapter",
]
