"""Markdown tables of one or more runs, laid out like the paper's Table 2.

Each cell is ``mean ± std`` over seeds (sample std; the mean alone with one seed). Runs are grouped by
CLIP-T convention: a table never mixes ``2.5·max(cos, 0)`` (Concept101) with raw cosines (DreamBench).
A relevance run (``relevance.json``, the paper's §4 experiment) gets its own table of ``S_relevance``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mipadapter.eval.schema import validate_results

COLUMNS = (
    ("clip_t", "CLIP-T"),
    ("clip_i", "CLIP-I"),
    ("clip_i_min", "CLIP-I min"),
    ("dino", "DINO"),
    ("dino_min", "DINO min"),
)

__all__ = ["COLUMNS", "format_cell", "load_relevance", "load_results", "markdown_report", "report"]
RELEVANCE_SCHEMA = "mipadapter.eval.relevance/2"


def format_cell(entry: Mapping[str, Any]) -> str:
    """``0.7750 ± 0.0012`` (4 decimals), or ``0.7750`` when std is None (one seed)."""
    if entry["std"] is None:
        return f"{entry['mean']:.4f}"
    return f"{entry['mean']:.4f} ± {entry['std']:.4f}"


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``<run_dir>/results.json`` (or a results file given directly)."""
    path = Path(run_dir)
    path = path if path.suffix == ".json" else path / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: score the run first")
    data = json.loads(path.read_text())
    validate_results(data)
    return data


def load_relevance(path: str | Path) -> dict[str, Any]:
    """Read a relevance experiment's ``relevance.json`` (a folder holding it, or the file)."""
    path = Path(path)
    path = path if path.suffix == ".json" else path / "relevance.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the relevance experiment first")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("schema") != RELEVANCE_SCHEMA or "S_relevance" not in data:
        raise ValueError(f"{path}: not a relevance result of schema {RELEVANCE_SCHEMA!r}")
    return data


def _load_any(run_dir: str | Path) -> dict[str, Any]:
    """A run's results: ``results.json`` (a benchmark) or ``relevance.json`` (the relevance experiment)."""
    path = Path(run_dir)
    if path.suffix == ".json":
        data = json.loads(path.read_text()) if path.exists() else None
        if isinstance(data, dict) and str(data.get("schema", "")).startswith("mipadapter.eval.relevance"):
            return load_relevance(path)
        return load_results(path)
    if not (path / "results.json").exists() and (path / "relevance.json").exists():
        return load_relevance(path)
    return load_results(path)


def relevance_report(results: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str:
    """The table of relevance runs: S_relevance uniform vs weighted (the paper: 1.33 vs 1.66)."""
    lines = [
        "### relevance — S_relevance = mean over (prompt, subject) of Δ_in_box / Δ_outside",
        "",
        "| Run | Model | Noise level | Pairs | Detected | S uniform | S weighted |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, data in zip(labels, results, strict=True):
        s = data["S_relevance"]
        cells = [f"{s[m]:.4f}" if s[m] is not None else "–" for m in ("uniform", "weighted")]
        model = data["settings"].get("model", "?")
        level = data["settings"].get("noise_level")
        lines.append(
            f"| {label} | {model} | {level} | {data['pairs']} | {data['detected']} | {cells[0]} | {cells[1]} |"
        )
    lines.append("")
    lines.append(
        "Noise on the text branch of every cross-attention layer, uniform or weighted by the subject's "
        "relevance A_i/mean A_i at equal norm; same seed for each image of a pair. Paper: 1.33 vs 1.66."
    )
    lines.append("")
    return "\n".join(lines)


def _row(label: str, variant: str, aggregate: Mapping[str, Any]) -> str:
    cells = [format_cell(aggregate[key]) for key, _ in COLUMNS]
    seeds = ",".join(str(s) for s in aggregate["seeds"])
    return f"| {label} | {variant} | {aggregate['n_images']} | {seeds} | " + " | ".join(cells) + " |"


def markdown_report(results: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str:
    """One table per CLIP-T convention over the given runs (``labels`` name the runs)."""
    if len(results) != len(labels):
        raise ValueError(f"{len(results)} results but {len(labels)} labels")
    if not results:
        raise ValueError("nothing to report")
    lines: list[str] = []
    for convention in ("concept101", "raw"):
        runs = [
            (label, data)
            for label, data in zip(labels, results, strict=True)
            if data["clip_t_convention"] == convention
        ]
        if not runs:
            continue
        formula = runs[0][1]["clip_t_formula"]
        benchmarks = sorted({data["benchmark"] for _, data in runs})
        lines.append(f"### {', '.join(benchmarks)} — CLIP-T = {formula}")
        lines.append("")
        header = ["Run", "Variant", "Images", "Seeds", *(title for _, title in COLUMNS)]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        notes: list[str] = []
        for label, data in runs:
            if data.get("scoring") == "authors":  # the authors' quirks, never passed off as ours
                label = f"{label} (authors' scoring)"
            for name, variant in data["variants"].items():
                lines.append(_row(label, name, variant["aggregate"]))
                if variant["aggregate_without_quirks"] is not None:
                    lines.append(
                        _row(label, f"{name} (without flagged cases)", variant["aggregate_without_quirks"])
                    )
                worst = variant["aggregate"]["worst_subject"]
                notes.append(
                    f"{label}/{name}: weakest subject by CLIP-I {worst['clip_i']['subject']} "
                    f"({worst['clip_i']['value']:.4f}), by DINO {worst['dino']['subject']} ({worst['dino']['value']:.4f})"
                )
            for quirk in data["dataset"]["quirks"]:
                notes.append(f"{label}: flagged {quirk['group']}: {quirk['quirk']}")
            unnamed = data["dataset"].get("not_named", [])
            if unnamed:
                example = unnamed[0]
                notes.append(
                    f"{label}: {len(unnamed)} of {data['dataset']['cases']} prompts do not name a subject "
                    f"(subject not named in the prompt; routed by its own name), e.g. case {example['case']} "
                    f"{example['prompt']!r} without {', '.join(repr(n) for n in example['subjects'])}"
                )
            if data["dataset"]["missing_subjects"]:
                notes.append(
                    f"{label}: subjects missing from the dataset folder: {', '.join(data['dataset']['missing_subjects'])}"
                )
        lines.append("")
        lines.append(
            "Mean ± sample std over seeds of the per-seed mean over images. CLIP-I / DINO: mean cosine with "
            "every reference photo, averaged over the image's subjects; *min*: the lowest subject of each "
            "image (a missing subject shows here, not in the mean)."
        )
        lines.extend(f"- {note}" for note in notes)
        lines.append("")
    return "\n".join(lines)


def report(run_dirs: Sequence[str | Path], *, labels: Sequence[str] | None = None) -> str:
    """The markdown report of run folders (labels default to the folder names): benchmark runs by
    CLIP-T convention, relevance runs in their own table."""
    if not run_dirs:
        raise ValueError("give at least one run folder")
    loaded = [_load_any(run_dir) for run_dir in run_dirs]
    names = (
        list(labels) if labels is not None else [Path(run_dir).name or str(run_dir) for run_dir in run_dirs]
    )
    if len(names) != len(loaded):
        raise ValueError(f"{len(loaded)} runs but {len(names)} labels")
    benchmark = [(n, d) for n, d in zip(names, loaded, strict=True) if "S_relevance" not in d]
    relevance = [(n, d) for n, d in zip(names, loaded, strict=True) if "S_relevance" in d]
    parts = []
    if benchmark:
        parts.append(markdown_report([d for _, d in benchmark], [n for n, _ in benchmark]))
    if relevance:
        parts.append(relevance_report([d for _, d in relevance], [n for n, _ in relevance]))
    return "\n".join(parts)
