"""Evaluation: metrics, benchmark runners (CustomConcept101, DreamBench), the relevance experiment,
reports and figures (docs/evaluation.md).

Modules: `metrics` (pure functions over features), `aggregate` (mean ± std over seeds, per-subject
minimum), `datasets` (benchmark layouts → cases, quirks flagged), `variants` (rules, baselines, Table 4
ablations), `generate` (resumable generation), `scoring`, `schema` (``results.json``), `runner`,
`relevance`, `detect`, `report`, `figures`, `api` (model loading for the CLI).
"""

from mipadapter.eval.aggregate import aggregate
from mipadapter.eval.cases import Case, SubjectSpec
from mipadapter.eval.detect import FixedBoxDetector, GroundingDinoDetector, load_grounding_dino
from mipadapter.eval.metrics import clip_t, clip_t_convention, cosine_matrix, image_alignment
from mipadapter.eval.relevance import box_change, relevance_noise, run_relevance, s_relevance
from mipadapter.eval.report import load_results, markdown_report, report
from mipadapter.eval.runner import run_benchmark, run_concept101, run_dreambench
from mipadapter.eval.schema import validate_results
from mipadapter.eval.variants import GROUPS, VARIANTS, GenerationSettings, Variant, resolve_variants

__all__ = [
    "GROUPS",
    "VARIANTS",
    "Case",
    "FixedBoxDetector",
    "GenerationSettings",
    "GroundingDinoDetector",
    "SubjectSpec",
    "Variant",
    "aggregate",
    "box_change",
    "clip_t",
    "clip_t_convention",
    "cosine_matrix",
    "image_alignment",
    "load_grounding_dino",
    "load_results",
    "markdown_report",
    "relevance_noise",
    "report",
    "resolve_variants",
    "run_benchmark",
    "run_concept101",
    "run_dreambench",
    "run_relevance",
    "s_relevance",
    "validate_results",
]
