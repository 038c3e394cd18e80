"""Modules: the one attention processor, the image projections, and the adapter container."""

from mipadapter.modeling.adapter import MIPAdapter, cross_attention_layers
from mipadapter.modeling.conditioning import RelevanceRecorder, SubjectConditioning
from mipadapter.modeling.processor import MIPAttnProcessor
from mipadapter.modeling.projection import build_image_projection

__all__ = [
    "MIPAdapter",
    "MIPAttnProcessor",
    "RelevanceRecorder",
    "SubjectConditioning",
    "build_image_projection",
    "cross_attention_layers",
]
