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


def make_concept101(root: Path) -> Path:
    """A two-combination CustomConcept101 folder: (backpack, teapot) and (cat, dog), 2 prompts each.

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
        from types import SimpleNamespace

        from PIL import Image

        self.calls.append({"prompt": prompt, "subjects": list(subjects), **kwargs})
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
        return SimpleNamespace(images=images, relevance=relevance, relevance_by_resolution=by_res)
