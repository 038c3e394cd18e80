"""The paper's §4 verification that relevance maps find the objects (see ``docs/evaluation.md``).

For each prompt: generate a clean image; regenerate with the same seed while noise is added to the text
attention output ``Z_text`` in every cross-attention layer, either uniformly or weighted by subject i's
relevance ``A_i / mean_p A_i`` (the same noise norm per batch row); locate subject i's box in the clean
image (Grounding DINO); and compare the mean pixel change inside the box to outside it:
``S_relevance = mean over (prompt, subject) of Δ_in_box / Δ_outside``. The paper reports 1.33
(uniform) vs 1.66 (weighted) on Concept101's 1,212 prompts.

Two models (``model``):

* ``"base"`` (default, the paper's setting: "in the original text-to-image diffusion model"): the base
  diffusers pipeline alone, no adapter attached and no reference photos; `mipadapter.eval.text_noise`
  installs an eval-only processor for the run and restores the pipeline's own afterwards. Only the
  conditional half of classifier-free guidance is perturbed (the reasons are in that module).
* ``"adapter"`` (an explicit option): the MIP-Adapter pipeline with the references, the perturbation
  passed through its ``text_perturbation`` hook, which perturbs every batch row (both CFG halves).

Noise: ``level · rms(Z_text) · ε`` per batch row (rms over heads, positions and channels), ``ε`` drawn
from a generator on ``Z_text``'s device seeded with ``noise_seed`` for each generation, so the uniform
and the weighted runs draw the same ``ε`` sequence and differ only by the weighting. The noise level is
not given by the paper; ``level`` = 0.5 by default.

Layout: ``relevance/clean/<case>.png``, ``relevance/uniform/<case>.png``,
``relevance/weighted/<case>_<i>.png``, ``relevance/boxes/<case>.json``, ``reference_boxes/`` (adapter
model: the references' crop boxes); ``relevance.json`` holds every number.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mipadapter.eval.cases import Case
from mipadapter.eval.datasets import concept101_cases
from mipadapter.eval.detect import Box, Detector
from mipadapter.eval.generate import save_image, write_json
from mipadapter.eval.references import BoxSource, conditioning_references
from mipadapter.eval.variants import GenerationSettings
from mipadapter.photos import open_photo

logger = logging.getLogger(__name__)
Sampler = Callable[[tuple[int, ...], torch.Tensor], torch.Tensor]

__all__ = ["MODELS", "SCHEMA", "box_change", "relevance_noise", "run_relevance", "s_relevance"]
SCHEMA = "mipadapter.eval.relevance/2"
MODELS = ("base", "adapter")


def _randn_sampler(seed: int) -> Sampler:
    state: dict[str, torch.Generator] = {}

    def sample(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if "g" not in state:
            state["g"] = torch.Generator(device=like.device).manual_seed(seed)
        return torch.randn(shape, generator=state["g"], device=like.device, dtype=torch.float32)

    return sample


def relevance_noise(
    mode: str,
    *,
    level: float,
    subject: int = 0,
    noise_seed: int = 0,
    sampler: Sampler | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``text_perturbation`` for the pipeline: ``f(z [b, h, p, d], relevance [b, n, p]) -> z + noise``.

    mode ``"uniform"``: ``noise = level·rms(z)·ε``; ``"weighted"``: ``ε⊙w`` with ``w = A_subject /
    mean_p A_subject`` (broadcast over heads and channels), rescaled so each row's noise norm equals the
    uniform one. sampler(shape, like) draws ``ε`` (default: standard normal, seeded by ``noise_seed``).
    """
    if mode not in ("uniform", "weighted"):
        raise ValueError(f"mode must be 'uniform' or 'weighted', got {mode!r}")
    if level < 0:
        raise ValueError(f"noise level must be ≥ 0, got {level}")
    draw = sampler or _randn_sampler(noise_seed)

    def perturb(z: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        b, h, p, d = z.shape
        if relevance.shape[0] != b or relevance.shape[-1] != p:
            raise ValueError(f"relevance {tuple(relevance.shape)} does not fit Z_text {tuple(z.shape)}")
        if not 0 <= subject < relevance.shape[1]:
            raise ValueError(f"subject {subject} out of range for {relevance.shape[1]} subjects")
        zf = z.float()
        rms = zf.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()  # [b, 1, 1, 1]
        eps = draw((b, h, p, d), z).to(device=z.device, dtype=torch.float32)
        if mode == "weighted":
            a = relevance[:, subject].float()  # [b, p]
            w = (a / a.mean(dim=-1, keepdim=True).clamp_min(1e-12)).view(b, 1, p, 1)
            weighted = eps * w
            ratio = eps.flatten(1).norm(dim=1) / weighted.flatten(1).norm(dim=1).clamp_min(1e-12)  # [b]
            eps = weighted * ratio.view(b, 1, 1, 1)
        return (zf + level * rms * eps).to(z.dtype)

    return perturb


def box_change(clean: Image.Image, perturbed: Image.Image, box: Box) -> tuple[float, float]:
    """Mean absolute pixel change (channels averaged, on [0, 1]) inside ``box`` and outside it.

    A pixel is inside when its centre lies in ``[x0, x1) × [y0, y1)``. Raises if either part is empty.
    """
    a = np.asarray(clean.convert("RGB"), dtype=np.float64) / 255.0
    b = np.asarray(perturbed.convert("RGB"), dtype=np.float64) / 255.0
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape} vs {b.shape}")
    delta = np.abs(b - a).mean(axis=-1)  # [H, W]
    height, width = delta.shape
    x0, y0, x1, y1 = box
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    if not inside.any() or inside.all():
        raise ValueError(
            f"box {tuple(box)} leaves no pixels {'inside' if not inside.any() else 'outside'} of a {width}x{height} image"
        )
    return float(delta[inside].mean()), float(delta[~inside].mean())


def s_relevance(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Mean of Δ_in / Δ_out over (prompt, subject) pairs whose Δ_out is not zero (None if none is)."""
    ratios = [inside / outside for inside, outside in pairs if outside > 0]
    return float(np.mean(ratios)) if ratios else None


def _generate_adapter(
    pipe, case: Case, refs, settings: GenerationSettings, seed: int, perturbation, path: Path
) -> bool:
    if path.exists():
        return False
    from mipadapter.pipeline import Subject

    subjects = [Subject(name=s.name, images=refs(s), scale=settings.scale) for s in case.subjects]
    output = pipe(
        case.prompt,
        subjects,
        **settings.call_kwargs(),
        generator=torch.Generator().manual_seed(seed),
        text_perturbation=perturbation,
        show_progress=False,
        require_names_in_prompt=False,
    )
    save_image(output.images[0], path)
    return True


def _generate_base(
    pipe, case: Case, settings: GenerationSettings, seed: int, perturbation, path: Path
) -> bool:
    """One image of the base diffusers pipeline; with a perturbation, through `text_noise` (installed)."""
    if path.exists():
        return False
    from mipadapter.eval.text_noise import KWARG, TextNoisePlan
    from mipadapter.pipeline import encode_names

    kwargs = settings.base_call_kwargs()
    guidance = kwargs.get("guidance_scale")
    if guidance is None:  # the pipeline's own default decides, as it does for the call below
        import inspect

        guidance = inspect.signature(pipe.__call__).parameters["guidance_scale"].default
    cfg = guidance > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
    extra = {}
    if perturbation is not None:
        device = next(pipe.unet.parameters()).device
        embeds, mask = encode_names(pipe, [s.name for s in case.subjects], device)  # [n, m, c], [n, m]
        extra["cross_attention_kwargs"] = {KWARG: TextNoisePlan(perturbation, embeds, mask, cfg)}
    with torch.no_grad():
        image = pipe(
            prompt=case.prompt, generator=torch.Generator().manual_seed(seed), **kwargs, **extra
        ).images[0]
    save_image(image, path)
    return True


def run_relevance(
    benchmark_dir: str | Path,
    out_dir: str | Path,
    *,
    pipeline: Callable[[], Any],
    detector: Detector,
    model: str = "base",
    combinations: Sequence[int] | None = None,
    cases: Sequence[Case] | None = None,
    seed: int = 420,
    level: float = 0.5,
    noise_seed: int = 0,
    settings: GenerationSettings | None = None,
    sampler: Sampler | None = None,
    models: dict[str, Any] | None = None,
    reference_boxes: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the experiment on Concept101 prompts (or the given ``cases``); resumable; returns the results
    written to ``relevance.json`` (uniform and weighted ``S_relevance``, every per-subject number).

    pipeline: a factory of the base diffusers pipeline (``model="base"``) or of a `MIPAdapterPipeline`
    (``model="adapter"``; its references are cropped as the benchmarks do, boxes from
    ``reference_boxes`` or detected with ``detector``).
    """
    from tqdm.auto import tqdm

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    settings = settings or GenerationSettings()
    root, out_dir = Path(benchmark_dir), Path(out_dir)
    cases = list(cases) if cases is not None else concept101_cases(root, combinations=combinations)
    boxes = BoxSource(
        Path(reference_boxes) if reference_boxes is not None else None,
        out_dir / "reference_boxes",
        lambda: detector,
    )
    cache: dict[str, list[Image.Image]] = {}

    def refs(subject):
        if subject.key not in cache:
            cache[subject.key] = conditioning_references(root, subject, mode="crop", boxes=boxes)
        return cache[subject.key]

    pipe = pipeline()
    if model == "base" and hasattr(pipe, "adapter"):
        raise TypeError("model='base' needs the base diffusers pipeline, got a pipeline with an adapter")

    def generate(case: Case, perturbation, path: Path) -> bool:
        if model == "adapter":
            return _generate_adapter(pipe, case, refs, settings, seed, perturbation, path)
        return _generate_base(pipe, case, settings, seed, perturbation, path)

    calls = 0
    folder = out_dir / "relevance"
    entries: list[dict[str, Any]] = []
    context = contextlib.nullcontext()
    if model == "base":
        from mipadapter.eval.text_noise import installed

        context = installed(pipe.unet)
    with context:
        for case in tqdm(cases, desc="relevance", disable=not progress):
            clean_path = folder / "clean" / f"{case.index:05d}.png"
            uniform_path = folder / "uniform" / f"{case.index:05d}.png"
            calls += generate(case, None, clean_path)
            uniform = relevance_noise("uniform", level=level, noise_seed=noise_seed, sampler=sampler)
            calls += generate(case, uniform, uniform_path)
            box_path = folder / "boxes" / f"{case.index:05d}.json"
            if box_path.exists():
                boxes_found = [tuple(b) if b else None for b in json.loads(box_path.read_text())["boxes"]]
            else:
                boxes_found = detector.detect(
                    open_photo(clean_path, "clean image"), [s.name for s in case.subjects]
                )
                write_json(
                    {
                        "detector": getattr(detector, "model_id", None),
                        "boxes": [list(b) if b else None for b in boxes_found],
                    },
                    box_path,
                )
            for i, subject in enumerate(case.subjects):
                weighted_path = folder / "weighted" / f"{case.index:05d}_{i}.png"
                weighted = relevance_noise(
                    "weighted", level=level, subject=i, noise_seed=noise_seed, sampler=sampler
                )
                calls += generate(case, weighted, weighted_path)
                entry: dict[str, Any] = {
                    "case": case.index,
                    "prompt": case.prompt,
                    "subject": i,
                    "name": subject.name,
                    "key": subject.key,
                    "box": list(boxes_found[i]) if boxes_found[i] else None,
                    "quirks": list(case.quirks),
                }
                if boxes_found[i] is not None:
                    clean = open_photo(clean_path, "clean image")
                    for name, path in (("uniform", uniform_path), ("weighted", weighted_path)):
                        inside, outside = box_change(clean, open_photo(path, f"{name} image"), boxes_found[i])
                        entry[name] = {
                            "delta_in": inside,
                            "delta_out": outside,
                            "ratio": inside / outside if outside > 0 else None,
                        }
                entries.append(entry)
    detected = [e for e in entries if e["box"] is not None]
    results = {
        "schema": SCHEMA,
        "models": {**(models or {}), "detector": getattr(detector, "model_id", None)},
        "settings": {
            **settings.to_json(),
            "model": model,
            "seed": seed,
            "noise_level": level,
            "noise_seed": noise_seed,
            "noise": "level * rms(Z_text) * eps per batch row; weighted: eps * A_i/mean A_i rescaled to the same norm",
            "cfg": (
                "conditional half only (the unconditional half is left as it is)"
                if model == "base"
                else "every batch row (both CFG halves)"
            ),
        },
        "S_relevance": {
            mode: s_relevance([(e[mode]["delta_in"], e[mode]["delta_out"]) for e in detected])
            for mode in ("uniform", "weighted")
        },
        "pairs": len(entries),
        "detected": len(detected),
        "not_detected": [{"case": e["case"], "name": e["name"]} for e in entries if e["box"] is None],
        "entries": entries,
    }
    if len(detected) < len(entries):
        logger.warning(
            "%d of %d subjects were not detected in the clean image (left out)",
            len(entries) - len(detected),
            len(entries),
        )
    write_json(results, out_dir / "relevance.json")
    logger.info("relevance experiment: %d pipeline calls", calls)
    results["pipeline_calls"] = calls
    return results
