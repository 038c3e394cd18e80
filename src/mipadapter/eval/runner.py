"""Benchmark runs: generate (resumable), score, aggregate, and write ``results.json`` and ``table.md``.

`run_concept101` and `run_dreambench` read a benchmark layout into cases and call `run_benchmark`. Models
come in as factories (``{"mip": lambda: pipe, "ip": lambda: ip_pipe}``) so a model is loaded only when a
variant needs it, one at a time; the feature encoders load only when scoring starts.

A run folder holds ``run.json`` (benchmark and settings, fixed by the first run: a later run with other
settings is refused), ``prompts.json`` (the cases), the images (see `mipadapter.eval.generate`),
optional ``figures/`` and ``sheets/``, ``results.json`` (see `mipadapter.eval.schema`) and ``table.md``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from mipadapter.eval import metrics
from mipadapter.eval.aggregate import aggregate
from mipadapter.eval.cases import Case, SubjectSpec, cases_from_json, cases_to_json
from mipadapter.eval.datasets import concept101_cases, dreambench_cases
from mipadapter.eval.detect import Detector
from mipadapter.eval.generate import generate_variant, write_json
from mipadapter.eval.references import load_references
from mipadapter.eval.schema import SCHEMA, validate_results
from mipadapter.eval.scoring import score_images
from mipadapter.eval.variants import GenerationSettings, Variant, resolve_variants

logger = logging.getLogger(__name__)

__all__ = ["check_run_folder", "run_benchmark", "run_concept101", "run_dreambench"]


def check_run_folder(out_dir: Path, run_info: dict[str, Any], cases: list[Case]) -> None:
    """Write ``run.json`` / ``prompts.json`` on a first run; on a later run refuse other settings or cases."""
    run_file, prompts_file = out_dir / "run.json", out_dir / "prompts.json"
    if run_file.exists():
        before = json.loads(run_file.read_text())
        changed = sorted(key for key in set(before) | set(run_info) if before.get(key) != run_info.get(key))
        if changed:
            details = "; ".join(f"{key}: {before.get(key)!r} → {run_info.get(key)!r}" for key in changed)
            raise ValueError(f"{out_dir} holds a run with other settings ({details}); use another --out")
    if prompts_file.exists():
        before_cases = {case.index: case for case in cases_from_json(json.loads(prompts_file.read_text()))}
        for case in cases:
            old = before_cases.get(case.index)
            if old is not None and old != case:
                raise ValueError(
                    f"{out_dir}: case {case.index} was {old.prompt!r} with {old.subject_keys}, now "
                    f"{case.prompt!r} with {case.subject_keys}; use another --out"
                )
        merged = {**before_cases, **{case.index: case for case in cases}}
        cases_all = [merged[index] for index in sorted(merged)]
    else:
        cases_all = cases
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_info, run_file)
    write_json(cases_to_json(cases_all), prompts_file)


def _reference_cache(root: Path, crop: bool) -> Callable[[SubjectSpec], list[Image.Image]]:
    cache: dict[str, list[Image.Image]] = {}

    def get(subject: SubjectSpec) -> list[Image.Image]:
        if subject.key not in cache:
            cache[subject.key] = load_references(root, subject, crop=crop)
        return cache[subject.key]

    return get


def run_benchmark(
    benchmark: str,
    cases: list[Case],
    root: str | Path,
    out_dir: str | Path,
    *,
    pipelines: Mapping[str, Callable[[], Any]],
    encoders: Any,
    variants: Sequence[str] | str = ("official",),
    seeds: Sequence[int] = (420,),
    images_per_prompt: int = 1,
    settings: GenerationSettings | None = None,
    convention: str,
    detector: Detector | None = None,
    figures: bool = False,
    models: Mapping[str, Any] | None = None,
    missing_subjects: Sequence[str] = (),
    score: bool = True,
    progress: bool = False,
) -> dict[str, Any] | None:
    """Generate what is missing, then (``score``) score everything and write results; returns them.

    pipelines: ``{"mip": factory, "ip": factory}`` (only the models the variants use are needed);
    encoders: ``FeatureEncoders``; convention: the CLIP-T convention of this benchmark's table;
    figures: also record routing maps and draw a routing figure and a contact sheet per image.
    """
    settings = settings or GenerationSettings()
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be ≥ 1, got {images_per_prompt}")
    if not seeds:
        raise ValueError("give at least one seed")
    metrics.clip_t_convention(0.0, convention)
    chosen = resolve_variants(variants if isinstance(variants, str) else list(variants))
    needed = sorted({v.model for v in chosen})
    absent = [model for model in needed if model not in pipelines]
    if absent:
        raise ValueError(
            f"variants {[v.name for v in chosen if v.model in absent]} need models {absent}: none given"
        )
    if any(v.region == "detected" for v in chosen) and detector is None:
        raise ValueError("the local-add ablation needs a detector")
    root, out_dir = Path(root), Path(out_dir)
    run_info = {
        "benchmark": benchmark,
        "settings": settings.to_json(),
        "seeds": [int(s) for s in seeds],
        "images_per_prompt": images_per_prompt,
        "clip_t_convention": convention,
    }
    check_run_folder(out_dir, run_info, cases)
    quirks = sorted({(case.group, quirk) for case in cases for quirk in case.quirks})
    for group, quirk in quirks:
        logger.warning("%s: %s (flagged in results.json; aggregates also given without it)", group, quirk)

    conditioning_refs = _reference_cache(root, crop=True)
    for model in needed:
        pipe = pipelines[model]()
        for variant in (v for v in chosen if v.model == model):
            calls = generate_variant(
                pipe,
                cases,
                variant,
                out_dir=out_dir,
                seeds=seeds,
                images_per_prompt=images_per_prompt,
                settings=settings,
                references=conditioning_refs,
                detector=detector,
                maps=figures,
                progress=progress,
            )
            logger.info("%s: %d pipeline calls", variant.name, calls)
        del pipe
    if figures:
        from mipadapter.eval.figures import draw_run_figures

        draw_run_figures(
            out_dir, cases, [v.name for v in chosen], seeds, images_per_prompt, conditioning_refs
        )
    if not score:
        return None

    records = score_images(
        out_dir,
        cases,
        [v.name for v in chosen],
        seeds=seeds,
        images_per_prompt=images_per_prompt,
        encoders=encoders,
        references=_reference_cache(root, crop=False),
        convention=convention,
    )
    results = build_results(
        benchmark,
        chosen,
        records,
        root=root,
        cases=cases,
        run_info=run_info,
        convention=convention,
        models=dict(models or {}),
        encoders=encoders,
        detector=detector,
        missing_subjects=missing_subjects,
    )
    validate_results(results)
    write_json(results, out_dir / "results.json")
    from mipadapter.eval.report import markdown_report

    (out_dir / "table.md").write_text(markdown_report([results], [out_dir.name]))
    return results


def build_results(
    benchmark: str,
    variants: Sequence[Variant],
    records: list[dict[str, Any]],
    *,
    root: Path,
    cases: Sequence[Case],
    run_info: Mapping[str, Any],
    convention: str,
    models: dict[str, Any],
    encoders: Any,
    detector: Detector | None,
    missing_subjects: Sequence[str],
) -> dict[str, Any]:
    """Assemble the results document (see `mipadapter.eval.schema`)."""
    by_variant: dict[str, Any] = {}
    for variant in variants:
        mine = [r for r in records if r["variant"] == variant.name]
        clean = [r for r in mine if not r["quirks"]]
        has_quirks = len(clean) != len(mine)
        by_variant[variant.name] = {
            "config": variant.to_json(),
            "aggregate": aggregate(mine),
            "aggregate_without_quirks": aggregate(clean) if has_quirks and clean else None,
        }
    quirks = sorted({(case.group, quirk) for case in cases for quirk in case.quirks})
    return {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "clip_t_convention": convention,
        "clip_t_formula": metrics.CLIP_T_CONVENTIONS[convention],
        "models": {
            **models,
            "clip": encoders.clip.model_id,
            "dino": encoders.dino.model_id,
            "detector": getattr(detector, "model_id", None) if detector is not None else None,
        },
        "settings": {
            **run_info["settings"],
            "seeds": run_info["seeds"],
            "images_per_prompt": run_info["images_per_prompt"],
            "image_seed": "image k of seed s: torch.Generator().manual_seed(s if k == 0 else s*1000 + k)",
        },
        "dataset": {
            "root": str(root),
            "cases": len(cases),
            "quirks": [{"group": group, "quirk": quirk} for group, quirk in quirks],
            "missing_subjects": list(missing_subjects),
        },
        "variants": by_variant,
        "images": records,
    }


def run_concept101(
    benchmark_dir: str | Path,
    out_dir: str | Path,
    *,
    combinations: Sequence[int] | None = None,
    on_quirk: str = "flag",
    **kwargs: Any,
) -> dict[str, Any] | None:
    """CustomConcept101 multi-object evaluation (CLIP-T as 2.5·max(cos, 0)); see `run_benchmark`."""
    cases = concept101_cases(benchmark_dir, combinations=combinations, on_quirk=on_quirk)
    return run_benchmark("concept101", cases, benchmark_dir, out_dir, convention="concept101", **kwargs)


def run_dreambench(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    mode: str = "single",
    subjects: Sequence[str] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    unique_token: str = "",
    **kwargs: Any,
) -> dict[str, Any] | None:
    """DreamBench single- or multi-subject evaluation (CLIP-T raw); see `run_benchmark`."""
    cases, missing = dreambench_cases(
        dataset_dir, mode=mode, subjects=subjects, pairs=pairs, unique_token=unique_token
    )
    if missing:
        logger.warning("DreamBench subjects without a folder (left out): %s", ", ".join(missing))
    return run_benchmark(
        f"dreambench-{mode}",
        cases,
        dataset_dir,
        out_dir,
        convention="raw",
        missing_subjects=missing,
        **kwargs,
    )
