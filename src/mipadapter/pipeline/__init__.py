"""The generation API: ``MIPAdapterPipeline`` over stock diffusers SDXL / SD1.5 pipelines."""

from mipadapter.pipeline.adapters import DEFAULT_ADAPTER, AdapterSet
from mipadapter.pipeline.core import MIPAdapterOutput, MIPAdapterPipeline, SubjectWarning, subject_labels
from mipadapter.pipeline.encoding import encode_names, encode_photos, unconditional_names
from mipadapter.pipeline.subjects import Subject, region_mask

__all__ = [
    "DEFAULT_ADAPTER",
    "AdapterSet",
    "MIPAdapterOutput",
    "MIPAdapterPipeline",
    "Subject",
    "SubjectWarning",
    "encode_names",
    "encode_photos",
    "region_mask",
    "subject_labels",
    "unconditional_names",
]
