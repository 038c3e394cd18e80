"""Modules: the one attention processor, the image projections, and the adapter container."""

from mipadapter.modeling.adapter import MIPAdapter, adapter_layers, cross_attention_layers, model_architecture
from mipadapter.modeling.conditioning import RelevanceRecorder, SubjectConditioning
from mipadapter.modeling.processor import MIPAttnProcessor
from mipadapter.modeling.projection import build_image_projection

__all__ = [
    "MIPAdapter",
    "MIPAttnProcessor",
    "RelevanceRecorder",
    "SubjectConditioning",
    "build_image_projection",
    "adapter_layers",
    "cross_attention_layers",
    "model_architecture",
]
