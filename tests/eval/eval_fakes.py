"""Helpers of the evaluation tests: tiny Concept101 / DreamBench folders built from the photos in
``tests/assets/dreambooth``, a pipeline wrapper that counts (and can interrupt) calls, and a deterministic
fake pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "dreambooth"
# Real benchmark files (not redistributed here): a folder holding customconcept101/ and dreambooth/;
# the tests that read them are skipped without it.
REAL_DATA_ENV = "MIPADAPTER_TEST_DATA"


def real_data(name: str) -> Path | None:
    """``$MIPADAPTER_TEST_DATA/<name>`` when set and present, else None."""
    import os

    base = os.environ.get(REAL_DATA_ENV)
    path = Path(base) / name if base else None
    return path if path is not None and path.is_dir() else None


def build_tiny_encoders(seed: int = 0):
    from mipadapter.eval.api import tiny_encoders

    return tiny_encoders(seed)


class CountingPipeline:
    """Wraps a pipeline: counts calls and raises KeyboardInterrupt at call number ``interrupt_at``."""

    def __init__(self, pipe, interrupt_at: int | None = None) -> None:
        self.pipe = pipe
        self.adapter = getattr(pipe, "adapter", None)
        self.calls = 0
        self.interrupt_at = interrupt_at
        self.kwargs: list[dict] = []

    def __call__(self, prompt, subjects, **kwargs):
        if self.interrupt_at is not None and self.calls >= self.interrupt_at:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.kwargs.append({"prompt": prompt, "subjects": subjects, **kwargs})
        return self.pipe(prompt, subjects, **kwargs)


def write_box_files(root: Path, folder: str = "json_data") -> Path:
    """The authors' json_data layout for every photo under ``root/benchmark_dataset``: a box covering the
    middle of the photo resized to short side 800 (``mask[1]["box"]``, with a fraction to truncate)."""
    out = root / folder
    for photo in sorted((root / "benchmark_dataset").glob("*/*.jpg")):
        target = out / photo.parent.name / (photo.name.split(".")[0] + ".json")
        target.parent.mkdir(parents=True, exist_ok=True)
        entries = [
            {"value": 0, "label": "background"},
            {"value": 1, "label": "thing", "logit": 0.9, "box": [100.7, 220.2, 651.9, 540.99]},
        ]
        target.write_text(json.dumps({"caption": "a thing", "mask": entries}))
    return out


def make_concept101(root: Path) -> Path:
    """A two-combination CustomConcept101 folder: (backpack, teapot) and (cat, dog), 2 prompts each,
    with the authors' ``json_data`` crop boxes of every photo (`write_box_files`).

    The second combination names its second concept ``sofa`` while pointing at ``pet_dog1``: the kind of
    mismatch the real file has at index 4, which must be flagged."""
    concepts = {
        "things_backpack": "backpack",
        "things_teapot": "teapot",
        "pet_cat1": "cat",
        "pet_dog1": "dog",
    }
    for folder, asset in concepts.items():
        target = root / "benchmark_dataset" / folder
        target.mkdir(parents=True)
        for photo in sorted((ASSETS / asset).glob("*.jpg")):
            shutil.copy(photo, target / photo.name)
    (root / "prompts").mkdir()
    (root / "prompts" / "things_things.txt").write_text(
        "photo of the {0} and {1}.\n{1} and {0} on a table.\n\n"
    )
    (root / "prompts" / "pet_pet.txt").write_text("A photo of the {0} and {1}.\nthe {0} playing with {1}.\n")

    def concept(folder, cls, number):
        return {
            "instance_prompt": f"photo of a <new{number}> {cls}",
            "class_prompt": cls,
            "instance_data_dir": f"./benchmark_dataset/{folder}",
            "class_data_dir": f"./regularization/{folder}",
            "prompt_filename": f"prompts/{cls}.txt",
        }

    entries = [
        [
            concept("things_backpack", "backpack", 1),
            concept("things_teapot", "teapot", 2),
            {"prompt_filename_compose": "prompts/things_things.txt"},
        ],
        [
            concept("pet_cat1", "cat", 1),
            concept("pet_dog1", "sofa", 2),
            {"prompt_filename_compose": "prompts/pet_pet.txt"},
        ],
    ]
    (root / "dataset_multiconcept.json").write_text(json.dumps(entries, indent=1))
    write_box_files(root)
    return root


def make_scene_pet(root: Path) -> Path:
    """Two scene+pet combinations built like the real file's 82 and 83 (a scene, then a pet; 12 templates
    of which one names the scene twice and the pet never, as Concept101's scene_pet prompts do). The
    templates here are our own words with that structure (the benchmark's files are not redistributed)."""
    concepts = {"scene_barn": "backpack", "pet_dog1": "dog", "scene_lighthouse": "teapot", "pet_cat1": "cat"}
    for folder, asset in concepts.items():
        target = root / "benchmark_dataset" / folder
        target.mkdir(parents=True)
        for photo in sorted((ASSETS / asset).glob("*.jpg")):
            shutil.copy(photo, target / photo.name)
    (root / "prompts").mkdir()
    templates = [
        "a picture of {0} and the {1}.",
        "{1} sitting before {0}.",
        "{1} with a red scarf before {0}.",
        "{1} before {0} under heavy rain.",
        "A view of {0} at noon with {0} glowing warmly.",  # never names the second subject
        "hills behind and {1} before {0}.",
        "An oil painting of the {1} before the {0}.",
        "A pencil sketch of the {1} before {0}.",
        "pixel art of the {1} before {0}.",
        "A bronze statue of the {1} before {0}.",
        "{1} chasing a butterfly before {0}.",
        "{0} in spring, {1} chasing a ball. ",
    ]
    (root / "prompts" / "scene_pet.txt").write_text("\n".join(templates) + "\n")

    def concept(folder, cls):
        return {"class_prompt": cls, "instance_data_dir": f"./benchmark_dataset/{folder}"}

    entries = [
        [
            concept("scene_barn", "barn"),
            concept("pet_dog1", "dog"),
            {"prompt_filename_compose": "prompts/scene_pet.txt"},
        ],
        [
            concept("scene_lighthouse", "lighthouse"),
            concept("pet_cat1", "cat"),
            {"prompt_filename_compose": "prompts/scene_pet.txt"},
        ],
    ]
    (root / "dataset_multiconcept.json").write_text(json.dumps(entries, indent=1))
    write_box_files(root)
    return root


def make_dreambench(root: Path) -> Path:
    """A DreamBench folder with the backpack, teapot, cat and dog subjects and a 2-prompt table."""
    for subject in ("backpack", "teapot", "cat", "dog"):
        shutil.copytree(ASSETS / subject, root / subject)
    (root / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\nbackpack,backpack\nteapot,teapot\ncat,cat\ndog,dog\nclock,clock\n\n"
        "Prompts\n\nObject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token),\n"
        "'a red {0} {1}'.format(unique_token, class_token)\n]\n\n"
        "Live Subject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the snow'.format(unique_token, class_token),\n"
        "'a {0} {1} wearing a red hat'.format(unique_token, class_token)\n]\n"
    )
    return root


class FakePipeline:
    """A deterministic stand-in for ``MIPAdapterPipeline`` (no model): records every call.

    Images are 32×32. Without a text perturbation the image is flat grey (128). With one, it calls
    ``text_perturbation(z, relevance)`` on ``z = 1`` [1, 1, 16, 2] and a relevance map that puts subject
    0 three times as high in the top-left 2×2 block of a 4×4 grid (subject 1: the opposite, 1/3), and
    paints grey + 120·|Δz| / max|Δz| (nearest-upsampled ×8)."""

    class _Config:
        default_scale = 0.5

    class _Adapter:
        pass

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.adapter = self._Adapter()
        self.adapter.config = self._Config()

    @staticmethod
    def relevance() -> torch.Tensor:
        grid = torch.ones(4, 4)
        grid[:2, :2] = 3.0
        first = (grid / grid.sum()).flatten()
        second = (1.0 / grid / (1.0 / grid).sum()).flatten()
        return torch.stack([first, second])[None]  # [1, 2, 16]

    def __call__(self, prompt, subjects, **kwargs):
        import re
        from types import SimpleNamespace

        from PIL import Image

        self.calls.append({"prompt": prompt, "subjects": list(subjects), **kwargs})
        warnings = []
        for index, subject in enumerate(subjects):  # the pipeline's rule: whole words, any case
            if not re.search(rf"(?<!\w){re.escape(subject.name)}(?!\w)", prompt, flags=re.IGNORECASE):
                if kwargs.get("require_names_in_prompt", True):
                    raise ValueError(f"subject {subject.name!r} does not occur in the prompt {prompt!r}")
                warnings.append(
                    SimpleNamespace(
                        subject=subject.name,
                        index=index,
                        kind="not_named",
                        message=f"{subject.name!r} not named",
                    )
                )
        count = kwargs.get("num_images_per_prompt", 1)
        perturb = kwargs.get("text_perturbation")
        if perturb is None:
            pixels = np.full((32, 32, 3), 128, dtype=np.uint8)
        else:
            z = torch.ones(1, 1, 16, 2)
            delta = (perturb(z, self.relevance()) - z).abs().mean(dim=(0, 1, 3)).reshape(4, 4)
            delta = (120 * delta / delta.max()).round().numpy().astype(np.uint8)
            block = np.kron(delta, np.ones((8, 8), dtype=np.uint8))
            pixels = np.repeat((128 + block)[..., None], 3, axis=-1).astype(np.uint8)
        images = [Image.fromarray(pixels) for _ in range(count)]
        relevance = by_res = None
        if kwargs.get("return_relevance"):
            maps = {s.name: np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32) for s in subjects}
            relevance = [maps] * count
            by_res = [{name: {(4, 4): value, (2, 2): 1 - value} for name, value in maps.items()}] * count
        attention = None
        if kwargs.get("return_image_attention"):
            maps = {s.name: np.linspace(1, 0, 32 * 32, dtype=np.float32).reshape(32, 32) for s in subjects}
            attention = [maps] * count
        settings = {"prompt": prompt, "negative_prompt": kwargs.get("negative_prompt")}
        return SimpleNamespace(
            images=images,
            relevance=relevance,
            relevance_by_resolution=by_res,
            image_attention=attention,
            warnings=warnings,
            settings=settings,
        )
