"""mipadapter: multi-subject personalized text-to-image generation (MIP-Adapter) on diffusers.

Heavy submodules import lazily, so `import mipadapter` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mipadapter.config import AdapterConfig, MergeRule, MultiImageMode, NegativeImage, RegionMode

__version__ = "0.1.0"

_LAZY = {
    "MIPAdapterPipeline": "mipadapter.pipeline",
    "MIPAdapterOutput": "mipadapter.pipeline",
    "Subject": "mipadapter.pipeline",
    "load_adapter": "mipadapter.checkpoint",
    "save_adapter": "mipadapter.checkpoint",
}

__all__ = [
    "AdapterConfig",
    "MergeRule",
    "MultiImageMode",
    "NegativeImage",
    "RegionMode",
    "MIPAdapterPipeline",
    "MIPAdapterOutput",
    "Subject",
    "load_adapter",
    "save_adapter",
]

if TYPE_CHECKING:
    from mipadapter.checkpoint import load_adapter, save_adapter
    from mipadapter.pipeline import MIPAdapterOutput, MIPAdapterPipeline, Subject


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mipadapter' has no attribute {name!r}")
