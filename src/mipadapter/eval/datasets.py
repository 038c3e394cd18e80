"""Readers of the benchmark layouts into `Case` lists (no model, no generation).

CustomConcept101 (multi-object), as released: ``dataset_multiconcept.json`` (a list of combinations,
each ``[concept_a, concept_b, {"prompt_filename_compose": ...}]`` where a concept has ``class_prompt``
and ``instance_data_dir``), ``prompts/*.txt`` (templates with ``{0}`` / ``{1}``) and the separately
downloaded ``benchmark_dataset/<concept>/`` photos. Crop boxes of the references (the authors'
``json_data/``) are read by `mipadapter.eval.references`.

DreamBench: ``<subject>/`` photo folders and ``prompts_and_classes.txt`` (the subject → class table and
the 25 object / 25 live-subject prompt templates). Multi-subject prompts are built from the object
templates by naming both subjects (``"a {0} {1} in the jungle"`` → ``"a backpack and a dog in the
jungle"``); pairs come from a pairs file or from a fixed, seeded draw (documented in `dreambench_pairs`).

Known quirks are flagged, never silently used: each affected case lists them in ``Case.quirks``.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from mipadapter.eval.cases import Case, SubjectSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LIVE_CLASSES = ("cat", "dog")  # DreamBench's live subjects use the live-subject prompt list

__all__ = [
    "IMAGE_SUFFIXES",
    "LIVE_CLASSES",
    "concept101_cases",
    "concept101_quirks",
    "dreambench_cases",
    "dreambench_pairs",
    "list_photos",
    "read_dreambench_table",
]


def list_photos(folder: Path) -> list[Path]:
    """The photos of a concept folder, sorted by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder {folder} does not exist")
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not photos:
        raise FileNotFoundError(f"reference folder {folder} holds no photos ({', '.join(IMAGE_SUFFIXES)})")
    return photos


def _subject(root: Path, folder_rel: str, name: str, key: str) -> SubjectSpec:
    photos = list_photos(root / folder_rel)
    return SubjectSpec(name=name, key=key, references=tuple(str(photo.relative_to(root)) for photo in photos))


def _folder_key(instance_data_dir: str) -> str:
    return Path(instance_data_dir).name


def concept101_quirks(combination: Sequence[dict]) -> list[str]:
    """Known problems of one combination entry (README of the shared data): each a readable line.

    * the class word does not occur in the concept's folder name (combination 4 names ``sofa`` but points
      at ``furniture_chair3``);
    * both concepts have the same class (``dog`` + ``dog``): routing by name cannot tell them apart.
    """
    quirks = []
    concepts = combination[:2]
    for concept in concepts:
        folder = _folder_key(concept["instance_data_dir"]).lower().replace("_", "")
        words = concept["class_prompt"].lower().split()
        if not any(word in folder for word in words):
            quirks.append(
                f"class {concept['class_prompt']!r} does not match folder {concept['instance_data_dir']!r}"
            )
    if concepts[0]["class_prompt"] == concepts[1]["class_prompt"]:
        quirks.append(
            f"both subjects are {concepts[0]['class_prompt']!r}: name-based routing cannot separate them"
        )
    return quirks


def concept101_cases(
    benchmark_dir: str | Path,
    *,
    combinations: Sequence[int] | None = None,
    on_quirk: str = "flag",
) -> list[Case]:
    """The multi-object prompts of CustomConcept101 as cases (1,212 for the full benchmark).

    Case indices run over every prompt of every combination in file order, so a subset keeps the indices
    of the full run. ``on_quirk``: ``"flag"`` keeps quirky combinations (their cases list the quirk),
    ``"skip"`` leaves them out. Subject names are the class words; keys are the photo folder names.
    """
    if on_quirk not in ("flag", "skip"):
        raise ValueError(f"on_quirk must be 'flag' or 'skip', got {on_quirk!r}")
    root = Path(benchmark_dir)
    spec_file = root / "dataset_multiconcept.json"
    if not spec_file.exists():
        raise FileNotFoundError(f"{spec_file} not found: is {root} a CustomConcept101 folder?")
    entries = json.loads(spec_file.read_text())
    wanted = set(range(len(entries))) if combinations is None else set(combinations)
    unknown = sorted(wanted - set(range(len(entries))))
    if unknown:
        raise ValueError(f"combinations {unknown} do not exist (the file has {len(entries)})")
    cases: list[Case] = []
    index = 0
    for number, entry in enumerate(entries):
        prompt_file = root / entry[2]["prompt_filename_compose"]
        templates = [line.strip() for line in prompt_file.read_text().splitlines() if line.strip()]
        quirks = tuple(concept101_quirks(entry))
        take = number in wanted and not (quirks and on_quirk == "skip")
        if take:
            a, b = entry[0], entry[1]
            subjects = (
                _subject(
                    root, a["instance_data_dir"], a["class_prompt"], _folder_key(a["instance_data_dir"])
                ),
                _subject(
                    root, b["instance_data_dir"], b["class_prompt"], _folder_key(b["instance_data_dir"])
                ),
            )
        for template in templates:
            if take:
                prompt = template.format(subjects[0].name, subjects[1].name)
                cases.append(Case(index, prompt, subjects, f"c101/{number:03d}", quirks))
            index += 1
    return cases


_TEMPLATE = re.compile(r"'(.*)'\.format\(\s*unique_token\s*,\s*class_token\s*\)")


def read_dreambench_table(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """Parse ``prompts_and_classes.txt`` → (subject → class, object templates, live templates)."""
    classes: dict[str, str] = {}
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "subject_name,class")
    except StopIteration:
        raise ValueError("prompts_and_classes.txt: no 'subject_name,class' header") from None
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        subject, _, cls = line.strip().partition(",")
        classes[subject] = cls
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in lines:
        if line.strip().startswith("prompt_list"):
            current = []
            blocks.append(current)
        elif current is not None and (match := _TEMPLATE.search(line)):
            current.append(match.group(1))
    if len(blocks) != 2 or not all(blocks):
        raise ValueError(f"prompts_and_classes.txt: expected 2 prompt lists, found {len(blocks)}")
    return classes, blocks[0], blocks[1]


def _fill(template: str, unique_token: str, class_word: str) -> str:
    return " ".join(template.format(unique_token, class_word).split())


def _pair_prompt(template: str, first: str, second: str) -> str:
    if "{0} {1}" not in template:
        raise ValueError(f"cannot build a two-subject prompt from {template!r}")
    before, after = template.split("{0} {1}", 1)
    words = template.split()
    article = words[0] if words and words[0] in ("a", "an") else ""
    joiner = f"{first} and {article} {second}" if article in ("a", "an") else f"{first} and {second}"
    return " ".join((before + joiner + after).split())


def dreambench_pairs(
    subjects: Sequence[str], classes: dict[str, str], *, count: int = 30, seed: int = 0
) -> list[tuple[str, str]]:
    """A fixed draw of ``count`` subject pairs of different classes (``random.Random(seed).sample`` over the
    sorted list of all such pairs; all of them if fewer). Pass a pairs file for a published list."""
    candidates = [(a, b) for a, b in itertools.combinations(sorted(subjects), 2) if classes[a] != classes[b]]
    if len(candidates) <= count:
        return candidates
    return sorted(random.Random(seed).sample(candidates, count))


def dreambench_cases(
    dataset_dir: str | Path,
    *,
    mode: str = "single",
    subjects: Sequence[str] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    unique_token: str = "",
) -> tuple[list[Case], list[str]]:
    """DreamBench cases and the subjects of the table whose folders are missing.

    ``single``: every subject × its 25 class prompts (live-subject list for cats and dogs).
    ``multi``: every pair × the 25 object prompts naming both subjects (see the module docstring).
    ``unique_token`` fills DreamBooth's ``{0}`` (empty for encoder-based methods; spaces collapsed).
    """
    root = Path(dataset_dir)
    table = root / "prompts_and_classes.txt"
    if not table.exists():
        raise FileNotFoundError(f"{table} not found: is {root} a DreamBench folder?")
    classes, object_templates, live_templates = read_dreambench_table(table.read_text())
    present = [s for s in classes if (root / s).is_dir()]
    missing = [s for s in classes if s not in present]
    chosen = list(subjects) if subjects is not None else present
    absent = [s for s in chosen if s not in present]
    if absent:
        raise FileNotFoundError(f"subjects {absent} have no folder under {root}")
    specs = {s: _subject(root, s, classes[s], s) for s in chosen}
    cases: list[Case] = []
    if mode == "single":
        for subject in chosen:
            live = classes[subject] in LIVE_CLASSES
            for template in live_templates if live else object_templates:
                prompt = _fill(template, unique_token, classes[subject])
                cases.append(Case(len(cases), prompt, (specs[subject],), f"db/{subject}"))
    elif mode == "multi":
        pair_list = list(pairs) if pairs is not None else dreambench_pairs(chosen, classes)
        for a, b in pair_list:
            for name in (a, b):
                if name not in specs:
                    raise ValueError(
                        f"pair ({a}, {b}) names {name!r}, not among the subjects {sorted(specs)}"
                    )
            quirks = (
                (f"both subjects are {classes[a]!r}: name-based routing cannot separate them",)
                if classes[a] == classes[b]
                else ()
            )
            for template in object_templates:
                first = " ".join(f"{unique_token} {classes[a]}".split())
                second = " ".join(f"{unique_token} {classes[b]}".split())
                prompt = _pair_prompt(template, first, second)
                cases.append(Case(len(cases), prompt, (specs[a], specs[b]), f"db/{a}+{b}", quirks))
    else:
        raise ValueError(f"mode must be 'single' or 'multi', got {mode!r}")
    return cases, missing
