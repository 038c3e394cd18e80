"""Benchmark runs: generate (resumable), score, aggregate, and write ``results.json`` and ``table.md``.

`run_concept101` and `run_dreambench` read a benchmark layout into cases and call `run_benchmark`. Models
come in as factories (``{"mip": lambda: pipe, "ip": lambda: ip_pipe}``) so a model is loaded only when a
variant needs it, one at a time; the feature encoders load only when scoring starts.

A run folder holds ``run.json`` (benchmark and settings, fixed by the first run: a later run with other
settings is refused), ``prompts.json`` (the cases), the images (see `mipadapter.eval.generate`),
``reference_boxes/`` (detected crop boxes of the references, in the authors' json_data layout),
optional ``figures/``, ``attention_figures/`` and ``sheets/``, ``results.json`` (see `mipadapter.eval.schema`) and ``table.md``.

Under ``accelerate launch`` each rank generates its own slice of the work (`mipadapter.eval.ranks`);
the main process writes the run files, resolves the reference boxes, and scores once all ranks are done.
Everything checkable from the arguments and the files (settings, reference photos' headers, box files)
is checked before any model loads.
"""

from __future__ import annotations

import json
import logging
import shutil
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
from mipadapter.eval.ranks import Ranks, current_ranks
from mipadapter.eval.references import REFERENCE_MODES, BoxSource, conditioning_references, metric_references
from mipadapter.eval.schema import SCHEMA, validate_results
from mipadapter.eval.scoring import score_images
from mipadapter.eval.variants import GenerationSettings, Variant, resolve_variants
from mipadapter.provenance import check_same_models

logger = logging.getLogger(__name__)

__all__ = ["check_run_folder", "run_benchmark", "run_concept101", "run_dreambench"]


def _produced_anything(out_dir: Path) -> bool:
    """Whether a run folder holds a generated image."""
    return any((out_dir / "images").rglob("*.png"))


def check_run_folder(
    out_dir: Path, run_info: dict[str, Any], cases: list[Case], *, write: bool = True
) -> None:
    """Write ``run.json`` / ``prompts.json`` on a first run; on a later run refuse other settings, models
    or cases — unless the folder holds no image yet, when the run starts again with what it is given.

    write: False only checks (the other ranks of a sharded run, after the main process wrote)."""
    run_file, prompts_file = out_dir / "run.json", out_dir / "prompts.json"
    if write and run_file.exists() and not _produced_anything(out_dir):
        # a run that made no image yet (it failed early, or was stopped at once) starts again as asked;
        # boxes cached by another box source go with it
        before = json.loads(run_file.read_text())
        if before.get("reference_boxes") != run_info.get("reference_boxes"):
            shutil.rmtree(out_dir / "reference_boxes", ignore_errors=True)
        run_file.unlink()
        prompts_file.unlink(missing_ok=True)
    if run_file.exists():
        before = json.loads(run_file.read_text())
        if before.get("models") is not None or run_info.get("models") is not None:
            check_same_models(out_dir, before.get("models"), run_info.get("models") or {})
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
    if not write:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_info, run_file)
    write_json(cases_to_json(cases_all), prompts_file)


def _cached(load: Callable[[SubjectSpec], list[Image.Image]]) -> Callable[[SubjectSpec], list[Image.Image]]:
    """``load`` once per subject key."""
    cache: dict[str, list[Image.Image]] = {}

    def get(subject: SubjectSpec) -> list[Image.Image]:
        if subject.key not in cache:
            cache[subject.key] = load(subject)
        return cache[subject.key]

    return get


def _unique_subjects(cases: Sequence[Case]) -> list[SubjectSpec]:
    return list({subject.key: subject for case in cases for subject in case.subjects}.values())


def check_reference_photos(root: Path, cases: Sequence[Case]) -> None:
    """Every reference photo exists and has a readable header within the pixel limit (no decoding)."""
    from mipadapter.photos import photo_size

    for subject in _unique_subjects(cases):
        for relative in subject.references:
            photo_size(root / relative, f"reference photo of {subject.key!r}")


def _lazy_detector(detector: Detector | Callable[[], Detector] | None) -> Callable[[], Detector] | None:
    """A detector instance or a zero-argument factory of one → a factory (loading at most once)."""
    if detector is None:
        return None
    if hasattr(detector, "detect"):
        return lambda: detector
    loaded: list[Detector] = []

    def load() -> Detector:
        if not loaded:
            loaded.append(detector())
        return loaded[0]

    return load


def prepare_reference_boxes(root: Path, cases: Sequence[Case], boxes: BoxSource, ranks: Ranks) -> None:
    """Resolve every reference's crop box before any generation model loads: the main process reads
    the box files and detects (and caches) what is missing, then drops the detector; the other ranks
    wait and read the cache."""
    if ranks.main:
        for subject in _unique_subjects(cases):
            for relative in subject.references:
                boxes.box(root / relative, subject.name)
        boxes.release()
    ranks.barrier()


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
    references: str = "crop",
    reference_boxes: str | Path | None = None,
    detector: Detector | Callable[[], Detector] | None = None,
    figures: bool = False,
    models: Mapping[str, Any] | None = None,
    identities: Mapping[str, Any] | None = None,
    missing_subjects: Sequence[str] = (),
    score: bool = True,
    authors_scoring: bool = False,
    progress: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any] | None:
    """Generate what is missing, then (``score``) score everything and write results; returns them
    (None when not scoring, and on every rank but the main one).

    pipelines: ``{"mip": factory, "ip": factory}`` (only the models the variants use are needed);
    encoders: ``FeatureEncoders`` (or a zero-argument factory of them, called when scoring starts);
    convention: the CLIP-T convention of this benchmark's table; references: ``crop`` (the authors'
    crop of each reference to its object's box, see `mipadapter.eval.references`) or ``whole``;
    reference_boxes: the authors' ``json_data`` folder of boxes (without it, boxes are detected and
    cached in ``reference_boxes/``); authors_scoring: score as the authors' evaluation does, quirks
    included (CLIP-T against the prompt as read back from their file names; of repeated prompts in a
    combination only the last image; each combination weighted equally), see `mipadapter.eval.scoring`;
    identities: ``{role: identity}`` of the models (see
    `mipadapter.provenance`), recorded in ``run.json``: a later call on the folder with other models is
    refused before anything loads; detector: a `Detector` or a factory of one (boxes of references and
    the local-add ablation); figures: also record routing maps and the image branch's attention maps,
    and draw routing and attention figures and a contact sheet per image; rank / world_size: this
    process's share of the work (default: accelerate's when launched through it, else all of it).
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
    if references not in REFERENCE_MODES:
        raise ValueError(f"references must be one of {REFERENCE_MODES}, got {references!r}")
    if reference_boxes is not None and references != "crop":
        raise ValueError("reference_boxes only applies to references='crop'")
    detector_factory = _lazy_detector(detector)
    if any(v.region == "detected" for v in chosen) and detector_factory is None:
        raise ValueError("the local-add ablation needs a detector")
    root, out_dir = Path(root), Path(out_dir)
    boxes_dir = Path(reference_boxes) if reference_boxes is not None else None
    if boxes_dir is not None and not boxes_dir.is_dir():
        raise FileNotFoundError(
            f"reference_boxes {str(boxes_dir)!r} is not a folder (the authors' json_data)"
        )
    if references == "crop" and boxes_dir is None and detector_factory is None:
        raise ValueError("references='crop' needs reference_boxes (the authors' json_data) or a detector")
    boxes = BoxSource(boxes_dir, out_dir / "reference_boxes", detector_factory)
    run_info = {
        "benchmark": benchmark,
        "settings": settings.to_json(),
        "seeds": [int(s) for s in seeds],
        "images_per_prompt": images_per_prompt,
        "clip_t_convention": convention,
        "references": references,
        "reference_boxes": (boxes.describe() if references == "crop" else None),
        "models": dict(identities) if identities is not None else None,
    }
    ranks = current_ranks(rank, world_size)
    check_reference_photos(root, cases)
    if ranks.main:
        check_run_folder(out_dir, run_info, cases)
    ranks.barrier()
    if not ranks.main:
        check_run_folder(out_dir, run_info, cases, write=False)
    quirks = sorted({(case.group, quirk) for case in cases for quirk in case.quirks})
    if ranks.main:
        for group, quirk in quirks:
            logger.warning("%s: %s (flagged in results.json; aggregates also given without it)", group, quirk)

    if references == "crop":
        prepare_reference_boxes(root, cases, boxes, ranks)
    conditioning_refs = _cached(lambda s: conditioning_references(root, s, mode=references, boxes=boxes))
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
                detector=detector_factory() if variant.region == "detected" else None,
                maps=figures,
                attention=figures,
                progress=progress,
                ranks=ranks,
            )
            logger.info("%s: %d pipeline calls", variant.name, calls)
        del pipe
    ranks.barrier()
    if not ranks.main:
        return None
    if figures:
        from mipadapter.eval.figures import draw_run_figures

        draw_run_figures(
            out_dir, cases, [v.name for v in chosen], seeds, images_per_prompt, conditioning_refs
        )
    if not score:
        return None

    if not hasattr(encoders, "clip"):
        encoders = encoders()
    records = score_images(
        out_dir,
        cases,
        [v.name for v in chosen],
        seeds=seeds,
        images_per_prompt=images_per_prompt,
        encoders=encoders,
        references=_cached(lambda s: metric_references(root, s)),
        convention=convention,
        authors=authors_scoring,
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
        authors_scoring=authors_scoring,
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
    authors_scoring: bool = False,
) -> dict[str, Any]:
    """Assemble the results document (see `mipadapter.eval.schema`)."""
    by_variant: dict[str, Any] = {}
    for variant in variants:
        mine = [r for r in records if r["variant"] == variant.name and r.get("authors_kept", True)]
        clean = [r for r in mine if not r["quirks"]]
        has_quirks = len(clean) != len(mine)
        by_variant[variant.name] = {
            "config": variant.to_json(),
            "aggregate": aggregate(mine, by_group=authors_scoring),
            "aggregate_without_quirks": (
                aggregate(clean, by_group=authors_scoring) if has_quirks and clean else None
            ),
        }
    quirks = sorted({(case.group, quirk) for case in cases for quirk in case.quirks})
    by_case = {case.index: case for case in cases}
    unnamed: dict[int, list[str]] = {}
    for record in records:
        if record["not_named"]:
            unnamed.setdefault(record["case"], record["not_named"])
    return {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "clip_t_convention": convention,
        "clip_t_formula": metrics.CLIP_T_CONVENTIONS[convention],
        "scoring": "authors" if authors_scoring else "ours",
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
            "references": run_info["references"],
            "reference_boxes": run_info["reference_boxes"],
            "require_names_in_prompt": False,
        },
        "dataset": {
            "root": str(root),
            "cases": len(cases),
            "quirks": [{"group": group, "quirk": quirk} for group, quirk in quirks],
            "missing_subjects": list(missing_subjects),
            "not_named": [
                {"case": index, "prompt": by_case[index].prompt, "subjects": names}
                for index, names in sorted(unnamed.items())
            ],
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
    references: str = "whole",
    **kwargs: Any,
) -> dict[str, Any] | None:
    """DreamBench single- or multi-subject evaluation (CLIP-T raw); see `run_benchmark`. References are
    the whole photos by default (the protocol later papers use)."""
    if kwargs.get("authors_scoring"):
        raise ValueError("authors_scoring reproduces the authors' Concept101 evaluation; DreamBench has none")
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
        references=references,
        **kwargs,
    )
