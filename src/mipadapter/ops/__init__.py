"""Pure tensor functions (no modules, no diffusers, no device or dtype choices).

Notation (DESIGN.md §1): ``b`` batch (CFG halves included), ``n`` subjects, ``N`` conditions (photos
routed as their own condition), ``p`` latent positions at a layer, ``h`` heads, ``d`` head dim,
``c = h·d``, ``t`` image tokens per condition, ``m`` name tokens per subject.
"""

from mipadapter.ops.routing import (
    apply_regions,
    check_name_mask,
    expand_to_conditions,
    merge_outputs,
    merge_weights,
    relevance_maps,
    resize_regions,
    routed_attention,
    subject_attention,
    text_gate,
)

__all__ = [
    "apply_regions",
    "check_name_mask",
    "expand_to_conditions",
    "merge_outputs",
    "merge_weights",
    "relevance_maps",
    "resize_regions",
    "routed_attention",
    "subject_attention",
    "text_gate",
]
