"""Checkpoint formats: key tables, pure converters, strict loading and saving.

Each layout is a module that registers its records in ``layouts`` when imported: ``ours`` (the mipadapter
format), ``h94`` (h94's, the authors' and diffusers' UNet files), ``xlabs`` (XLabs' FLUX files and
diffusers' keys for them). They are imported here, once, so the table is complete whatever a caller imports
first; ``io`` reads and writes through the table and never names a layout. Model files are located through
``mipadapter.hub`` (local paths, the Hub cache, fail-fast offline).
"""

from mipadapter.checkpoint import h94, ours, xlabs  # noqa: F401 (each registers its layout)
from mipadapter.checkpoint.convert import CheckpointError
from mipadapter.checkpoint.h94 import infer_h94_config
from mipadapter.checkpoint.io import (
    AdapterFile,
    adapter_from_file,
    adapter_state,
    check_adapter_file,
    convert_checkpoint,
    load_adapter,
    read_file,
    save_adapter,
)
from mipadapter.checkpoint.layouts import save_format_names

SAVE_FORMATS = save_format_names()

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
