"""Pure tensor functions (no modules, no diffusers, no device or dtype choices).

Notation (docs/method.md): ``b`` batch (CFG halves included), ``n`` subjects, ``N`` conditions (photos
routed as their own condition), ``p`` latent positions at a layer, ``h`` heads, ``d`` head dim,
``c = h·d``, ``t`` image tokens per condition, ``m`` name tokens per subject, ``R`` map columns.
"""

from mipadapter.ops.routing import (
    check_name_mask,
    merge_factors,
    override_regions,
    position_maps,
    relevance_maps,
    relevance_weights,
    resize_regions,
    routed_attention,
    routing_maps,
    text_gate,
    working_dtype,
)

__all__ = [
    "check_name_mask",
    "merge_factors",
    "override_regions",
    "position_maps",
    "relevance_maps",
    "relevance_weights",
    "resize_regions",
    "routed_attention",
    "routing_maps",
    "text_gate",
    "working_dtype",
]
