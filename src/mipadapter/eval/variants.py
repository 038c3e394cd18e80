"""Configurations of the pipeline compared in one run: the merge rules, plain IP-Adapter, Table 4's ablations.

Each `Variant` is a set of pipeline call arguments on one of two models: ``"mip"`` (the adapter under
test, e.g. the authors' MIP checkpoint) or ``"ip"`` (a plain h94 IP-Adapter checkpoint).

The paper's Table 4 ablations are read as removing one factor at a time from the merge the released
checkpoints were trained with (``official``: ``Z_text + Σ s_i·w_i⊙g⊙Z_img_i`` with ``w_i = A_i/Σ_k A_k``
and ``g = f/mean f``; docs/method.md), all at inference on the same weights:

| Table 4 row | variant | merge it computes |
| --- | --- | --- |
| uniform add | ``uniform`` | ``Z_text + Σ s·Z_img_i`` |
| local add | ``t4-local-add`` | ``Z_text + Σ s·1[box_i]⊙Z_img_i``, ``box_i`` detected in the ``uniform`` image of the same seed |
| relevance weight only | ``t4-relevance`` | ``Z_text + Σ s·w_i⊙Z_img_i`` (official without ``g``) |
| text weight only | ``t4-text-weight`` | ``Z_text + Σ s·g⊙Z_img_i`` (official with every ``A_i`` replaced by 1 — a full-image region — so ``w_i = 1/n``, and ``s`` multiplied by ``n`` to undo that split) |
| both | ``official`` | ``Z_text + Σ s·w_i⊙g⊙Z_img_i`` |

The paper trained a model per row; here the rows share the released weights (training each is out of
scope of an evaluation run). The ``paper`` rule (``g⊙Z_text + Σ s·(A_i/mean A_i)⊙Z_img_i``) is its own
variant, and ``ip-adapter-weighted`` is the paper's training-free mode on stock IP-Adapter weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mipadapter.config import AUTHORS_NEGATIVE_PROMPT  # what the authors' generate() always encodes
from mipadapter.limits import LARGE_LIMITS, check_guidance, check_scale, check_side, check_steps, latent_sides

__all__ = [
    "AUTHORS_NEGATIVE_PROMPT",
    "GROUPS",
    "VARIANTS",
    "GenerationSettings",
    "Variant",
    "resolve_variants",
]


@dataclass(frozen=True)
class GenerationSettings:
    """Call arguments shared by every variant of a run (None: the pipeline's default).

    negative_prompt: the authors' string by default, passed explicitly to every call and recorded in
    ``run.json`` / ``results.json``; ``""`` turns it off (None leaves it to the pipeline's default).
    """

    num_inference_steps: int = 30
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = AUTHORS_NEGATIVE_PROMPT
    scale: float | None = None
    multi_image: str = "mean"

    def __post_init__(self) -> None:
        # the library's bounds are the large caps (--allow-large's): the CLI applies generate's own first
        caps = LARGE_LIMITS
        check_steps(self.num_inference_steps, "num_inference_steps", caps)
        if self.guidance_scale is not None:
            check_guidance(self.guidance_scale, "guidance_scale", caps)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_side(getattr(self, name), name, latent_sides(caps))
        if self.scale is not None:
            check_scale(self.scale, "scale", caps)
        if self.multi_image not in ("mean", "each"):
            raise ValueError(f"multi_image must be 'mean' or 'each', got {self.multi_image!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def base_call_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a plain diffusers pipeline call these settings fix (None left out;
        an empty negative prompt is none at all, as in the MIP pipeline: SDXL then zeroes its embeddings)."""
        kwargs = {
            "negative_prompt": self.negative_prompt or None,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
        }
        return {key: value for key, value in kwargs.items() if value is not None}

    def call_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``MIPAdapterPipeline.__call__`` these settings fix."""
        return {
            "multi_image": self.multi_image,
            "negative_prompt": self.negative_prompt,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
        }


@dataclass(frozen=True)
class Variant:
    """One configuration of the pipeline.

    model: ``"mip"`` or ``"ip"``; rule / use_text_weight: as in the pipeline call (None = its default);
    region: None, ``"detected"`` (each subject's box detected in ``box_source``'s image of the same case
    and seed) or ``"full"`` (the whole image, i.e. relevance replaced by 1); scale_times_subjects:
    multiply each subject's scale by the number of subjects.
    """

    name: str
    description: str
    model: str = "mip"
    rule: str | None = None
    use_text_weight: bool | None = None
    region: str | None = None
    box_source: str | None = None
    scale_times_subjects: bool = False

    def __post_init__(self) -> None:
        if self.model not in ("mip", "ip"):
            raise ValueError(f"variant {self.name!r}: model must be 'mip' or 'ip', got {self.model!r}")
        if self.region not in (None, "detected", "full"):
            raise ValueError(
                f"variant {self.name!r}: region must be None, 'detected' or 'full', got {self.region!r}"
            )
        if (self.region == "detected") != (self.box_source is not None):
            raise ValueError(f"variant {self.name!r}: a detected region needs a box_source (and only then)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_ALL = (
    Variant(
        "official",
        "MIP merge as trained: w_i = A_i/Σ A_k, gated by the text weight (Table 4: both)",
        rule="official",
    ),
    Variant("paper", "the paper's formulas: (f/mean f)·Z_text + Σ s (A_i/mean A_i) Z_img_i", rule="paper"),
    Variant(
        "uniform",
        "plain sum of every reference everywhere (Table 4: uniform add)",
        rule="uniform",
        use_text_weight=False,
    ),
    Variant(
        "ip-adapter", "stock IP-Adapter weights, plain sum", model="ip", rule="uniform", use_text_weight=False
    ),
    Variant(
        "ip-adapter-weighted",
        "stock IP-Adapter weights, relevance-weighted (the training-free mode)",
        model="ip",
        rule="paper",
        use_text_weight=False,
    ),
    Variant(
        "t4-local-add",
        "Table 4 local add: each reference only inside its box detected in the uniform image",
        rule="uniform",
        use_text_weight=False,
        region="detected",
        box_source="uniform",
    ),
    Variant(
        "t4-relevance",
        "Table 4 relevance weight only: official without the text weight",
        rule="official",
        use_text_weight=False,
    ),
    Variant(
        "t4-text-weight",
        "Table 4 text weight only: official with relevance replaced by 1 (scale × n undoes the 1/n split)",
        rule="official",
        use_text_weight=True,
        region="full",
        scale_times_subjects=True,
    ),
)
VARIANTS: dict[str, Variant] = {variant.name: variant for variant in _ALL}

GROUPS: dict[str, tuple[str, ...]] = {
    "rules": ("uniform", "paper", "official"),
    "table4": ("uniform", "t4-local-add", "t4-relevance", "t4-text-weight", "official"),
    "baselines": ("ip-adapter", "ip-adapter-weighted"),
    "all": tuple(VARIANTS),
}


def resolve_variants(names: str | list[str] | tuple[str, ...]) -> list[Variant]:
    """Variant names and group names (``rules``, ``table4``, ``baselines``, ``all``) → variants, in an
    order where every ``box_source`` comes before the variants that need it, without duplicates."""
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",") if part.strip()]
    expanded: list[str] = []
    for name in names:
        if name in GROUPS:
            expanded.extend(GROUPS[name])
        elif name in VARIANTS:
            expanded.append(name)
        else:
            raise ValueError(
                f"unknown variant {name!r}; choose from {sorted(VARIANTS)} or groups {sorted(GROUPS)}"
            )
    unique = list(dict.fromkeys(expanded))
    for name in list(unique):
        source = VARIANTS[name].box_source
        if source is not None and source not in unique:
            unique.insert(0, source)
    unique.sort(key=lambda name: 0 if name in {VARIANTS[n].box_source for n in unique} else 1)
    return [VARIANTS[name] for name in unique]
