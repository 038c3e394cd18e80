"""The resumable generation loop shared by the benchmark runners.

Layout of a run folder (every name derives from indices, never from prompt text):

    images/<variant>/<case:05d>_s<seed>_<k>.png   generated image k of a case under a seed
    meta/<variant>/<same stem>.json               the call's resolved settings and its warnings (e.g. a
                                                  subject not named in the prompt), written before the image
    maps/<variant>/<same stem>.npz                routing maps (when asked for): see `save_maps`
    attention/<variant>/<same stem>.npz           image-branch attention maps (when asked for)
    boxes/<variant>/<same stem>.json              boxes detected in that image (local-add ablation)

An image file that exists is never generated again; files are written to a temporary name and renamed,
so an interrupted write leaves nothing that looks finished. Image ``k`` of seed ``s`` comes from its
own CPU generator seeded `image_seed` (``s`` itself for k = 0), so an image depends only on its case,
seed and k — not on which other prompts share a batch, nor on how many processes generate the run (the
authors draw a batch of 4 prompts' noise from one generator, so theirs depend on both).

Benchmarks call the pipeline with ``require_names_in_prompt=False``: a template that never names one
subject (Concept101's "A photo of {0} at dawn with {0} sleeping peacefully.") is generated like any
other, the subject still routed by its own name's embedding, and the pipeline's ``not_named`` warning is
recorded in the image's meta file and carried into ``results.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mipadapter.eval.cases import Case, SubjectSpec
from mipadapter.eval.detect import Detector
from mipadapter.eval.ranks import Ranks
from mipadapter.eval.variants import GenerationSettings, Variant
from mipadapter.fileio import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "ImageKey",
    "generate_variant",
    "image_seed",
    "load_maps",
    "read_meta",
    "save_image",
    "save_maps",
    "write_json",
]


def image_seed(seed: int, k: int) -> int:
    """Seed of image ``k`` of a run seed: ``seed`` for k = 0, else ``seed·1000 + k``, modulo 2**64 (so
    every seed of ``limits.SEED_RANGE`` gives seeds a generator takes; below 2**64 / 1000 nothing wraps)."""
    if k < 0:
        raise ValueError(f"image number must be ≥ 0, got {k}")
    return seed if k == 0 else (seed * 1000 + k) % 2**64


@dataclass(frozen=True)
class ImageKey:
    """Identity of one generated image."""

    variant: str
    case: int
    seed: int
    k: int

    @property
    def stem(self) -> str:
        return f"{self.case:05d}_s{self.seed}_{self.k}"

    def path(self, out_dir: Path, kind: str = "images", suffix: str = ".png") -> Path:
        return Path(out_dir) / kind / self.variant / f"{self.stem}{suffix}"


def save_image(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_json(data: Any, path: Path) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    atomic_write_text(path, json.dumps(data, indent=1) + "\n", fsync=False)


def save_maps(
    path: Path,
    names: Sequence[str],
    relevance: dict[str, np.ndarray],
    by_resolution: dict[str, dict[tuple[int, int], np.ndarray]] | None,
) -> None:
    """Routing maps of one image as ``.npz``: ``avg_<i>`` [H, W] per subject i, ``res_<i>_<h>x<w>`` per
    layer grid, and ``names`` (subject names; by index because two subjects may share a name).

    relevance / by_resolution: the pipeline's per-image dicts, keyed by subject label in subject order
    (a repeated name is labelled ``dog#2``), so they are read in order here.
    """
    averages = list(relevance.values())
    grids = list((by_resolution or {}).values()) or [{} for _ in names]
    if len(averages) != len(names) or len(grids) != len(names):
        raise ValueError(f"{len(averages)} maps for {len(names)} subjects {list(names)}")
    arrays: dict[str, np.ndarray] = {"names": np.array(list(names))}
    for i in range(len(names)):
        arrays[f"avg_{i}"] = np.asarray(averages[i], dtype=np.float32)
        for (h, w), grid_map in sorted(grids[i].items()):
            arrays[f"res_{i}_{h}x{w}"] = np.asarray(grid_map, dtype=np.float32)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    atomic_write(path, write)


def read_meta(out_dir: Path, key: ImageKey) -> dict[str, Any]:
    """The meta record of an image (``{"settings": ..., "warnings": [...]}``); empty when absent."""
    path = key.path(out_dir, "meta", ".json")
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _warnings_json(warnings: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {"subject": w.subject, "index": int(w.index), "kind": w.kind, "message": w.message} for w in warnings
    ]


def _json_safe(value: Any) -> Any:
    """Settings as JSON data (tuples → lists, enums and other objects → strings)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(getattr(value, "value", value))


def load_maps(path: Path) -> tuple[list[str], list[np.ndarray], list[dict[tuple[int, int], np.ndarray]]]:
    """Inverse of `save_maps` → (names, average map per subject, {grid: map} per subject)."""
    with np.load(path) as data:
        names = [str(name) for name in data["names"]]
        averages = [data[f"avg_{i}"] for i in range(len(names))]
        grids: list[dict[tuple[int, int], np.ndarray]] = [{} for _ in names]
        for key in data.files:
            if key.startswith("res_"):
                _, index, size = key.split("_")
                h, w = (int(v) for v in size.split("x"))
                grids[int(index)][(h, w)] = data[key]
    return names, averages, grids


def _scale(variant: Variant, settings: GenerationSettings, pipe: Any, count: int) -> float | None:
    if not variant.scale_times_subjects:
        return settings.scale
    base = settings.scale
    if base is None:
        try:
            base = float(pipe.adapter.config.default_scale)
        except AttributeError as error:
            raise TypeError(
                f"variant {variant.name!r} needs the pipeline's default scale (pipe.adapter.config.default_scale)"
            ) from error
    return base * count


def _regions(
    variant: Variant, key: ImageKey, case: Case, out_dir: Path, detector: Detector | None
) -> tuple[list[Any], dict[str, Any] | None]:
    """Per subject the region to pass (None = none) and, for detected regions, the detection record."""
    if variant.region is None:
        return [None] * len(case.subjects), None
    if variant.region == "full":
        return [np.ones((1, 1), dtype=np.float32)] * len(case.subjects), None
    source = ImageKey(variant.box_source, key.case, key.seed, key.k)
    box_file = source.path(out_dir, "boxes", ".json")
    if box_file.exists():
        record = json.loads(box_file.read_text())
    else:
        if detector is None:
            raise ValueError(
                f"variant {variant.name!r} needs a detector to find boxes in {variant.box_source!r} images"
            )
        image_file = source.path(out_dir)
        if not image_file.exists():
            raise FileNotFoundError(
                f"variant {variant.name!r} needs {image_file} (generate {variant.box_source!r} first)"
            )
        with Image.open(image_file) as image:
            boxes = detector.detect(image, [s.name for s in case.subjects])
        record = {
            "detector": getattr(detector, "model_id", type(detector).__name__),
            "boxes": [list(b) if b else None for b in boxes],
        }
        write_json(record, box_file)
    return [tuple(b) if b else None for b in record["boxes"]], record


def generate_variant(
    pipe: Any,
    cases: Sequence[Case],
    variant: Variant,
    *,
    out_dir: str | Path,
    seeds: Sequence[int],
    images_per_prompt: int,
    settings: GenerationSettings,
    references: Callable[[SubjectSpec], list[Image.Image]],
    detector: Detector | None = None,
    maps: bool = False,
    attention: bool = False,
    progress: bool = False,
    ranks: Ranks | None = None,
) -> int:
    """Generate every missing image of ``variant`` over ``cases`` × ``seeds`` × ``images_per_prompt``.

    ``references(subject)`` returns the photos to condition on. Returns the number of pipeline calls.
    Images whose files exist are skipped (and so are their maps: ask for maps on the first run).
    maps: save the routing maps; attention: save the image branch's attention maps (Fig. 6 of the
    paper). ranks: this process's share of the (case, seed) list (`mipadapter.eval.ranks`; all of it
    by default).
    """
    from tqdm.auto import tqdm

    from mipadapter.pipeline import Subject

    out_dir = Path(out_dir)
    ranks = ranks or Ranks()
    calls = 0
    work = ranks.mine([(case, seed) for case in cases for seed in seeds])
    for case, seed in tqdm(work, desc=f"generate {variant.name}", disable=not progress):
        keys = [ImageKey(variant.name, case.index, seed, k) for k in range(images_per_prompt)]
        missing = [key for key in keys if not key.path(out_dir).exists()]
        if not missing:
            continue
        # Detected regions differ per image, so those images are generated one by one.
        batches = [[key] for key in missing] if variant.region == "detected" else [missing]
        for batch in batches:
            regions, detection = _regions(variant, batch[0], case, out_dir, detector)
            if detection is not None and any(r is None for r in regions):
                logger.warning(
                    "%s: no box for %s in %s; that subject is added everywhere",
                    batch[0].stem,
                    [s.name for s, r in zip(case.subjects, regions, strict=True) if r is None],
                    variant.box_source,
                )
            scale = _scale(variant, settings, pipe, len(case.subjects))
            subjects = [
                Subject(name=spec.name, images=references(spec), scale=scale, region=region)
                for spec, region in zip(case.subjects, regions, strict=True)
            ]
            output = pipe(
                case.prompt,
                subjects,
                rule=variant.rule,
                use_text_weight=variant.use_text_weight,
                **settings.call_kwargs(),
                num_images_per_prompt=len(batch),
                generator=[torch.Generator().manual_seed(image_seed(key.seed, key.k)) for key in batch],
                return_relevance=maps,
                show_progress=False,
                require_names_in_prompt=False,
                **({"return_image_attention": True} if attention else {}),
            )
            calls += 1
            if len(output.images) != len(batch):
                raise RuntimeError(
                    f"the pipeline returned {len(output.images)} images for {len(batch)} asked"
                )
            meta = {"settings": _json_safe(output.settings), "warnings": _warnings_json(output.warnings)}
            for i, key in enumerate(batch):
                write_json(meta, key.path(out_dir, "meta", ".json"))
                if attention:
                    save_maps(
                        key.path(out_dir, "attention", ".npz"),
                        [s.name for s in case.subjects],
                        output.image_attention[i],
                        None,
                    )
                if maps:
                    by_res = output.relevance_by_resolution[i] if output.relevance_by_resolution else None
                    save_maps(
                        key.path(out_dir, "maps", ".npz"),
                        [s.name for s in case.subjects],
                        output.relevance[i],
                        by_res,
                    )
                save_image(output.images[i], key.path(out_dir))
    return calls
