"""The generation API: ``MIPAdapterPipeline`` over stock diffusers SDXL / SD1.5 pipelines."""

from mipadapter.pipeline.core import MIPAdapterOutput, MIPAdapterPipeline
from mipadapter.pipeline.encoding import encode_names, encode_photos
from mipadapter.pipeline.subjects import Subject, region_mask

__all__ = [
    "MIPAdapterOutput",
    "MIPAdapterPipeline",
    "Subject",
    "encode_names",
    "encode_photos",
    "region_mask",
]
