"""Scoring generated images: each record's CLIP-T is with its own prompt, CLIP-I and DINO with its own
subjects' photos, through batches that split the images unevenly (fake encoders with known features)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mipadapter.eval.cases import Case, SubjectSpec
from mipadapter.eval.generate import ImageKey
from mipadapter.eval.scoring import score_images

WIDTH = 6  # feature width of the fake encoders
RNG = np.random.default_rng(11)
CLIP_OF = {red: RNG.standard_normal(WIDTH) for red in range(256)}  # the CLIP feature of an image of red r
DINO_OF = {red: RNG.standard_normal(WIDTH) for red in range(256)}


class FakeImageEncoder:
    """Features chosen by an image's red value (every image here is one colour)."""

    def __init__(self, table: dict[int, np.ndarray], text: dict[str, np.ndarray] | None = None) -> None:
        self.table, self.text = table, text

    def image_features(self, images):
        return torch.tensor(np.stack([self.table[image.getpixel((0, 0))[0]] for image in images]))

    def text_features(self, prompts):
        return torch.tensor(np.stack([self.text[prompt] for prompt in prompts]))


def cosine(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


# four prompts whose sorted order is not the case order; even in number, so reversing moves every one
PROMPTS = ["a dog on a sofa", "a cat and a dog", "the bird above a cat", "a bird"]
TEXT_OF = {prompt: RNG.standard_normal(WIDTH) for prompt in PROMPTS}
SUBJECTS = {
    name: SubjectSpec(name, f"key_{name}", (f"{name}/00.jpg", f"{name}/01.jpg")) for name in ("cat", "dog", "bird")
}
REF_RED = {"cat": (200, 201), "dog": (210, 211), "bird": (220, 221)}


def reference_photos(subject: SubjectSpec) -> list[Image.Image]:
    return [Image.new("RGB", (8, 8), (red, 0, 0)) for red in REF_RED[subject.name]]


def image_red(case: int, seed: int, k: int) -> int:
    return 10 + 20 * case + 4 * seed + k


@pytest.fixture
def scored_folder(tmp_path):
    cases = [
        Case(0, PROMPTS[0], (SUBJECTS["dog"],), "g1"),
        Case(1, PROMPTS[1], (SUBJECTS["cat"], SUBJECTS["dog"]), "g2"),
        Case(2, PROMPTS[2], (SUBJECTS["bird"], SUBJECTS["cat"]), "g2", quirks=("typo",)),
        Case(3, PROMPTS[3], (SUBJECTS["bird"],), "g3"),
    ]
    for case in cases:
        for seed in (1, 2):
            for k in range(2):
                path = ImageKey("v", case.index, seed, k).path(tmp_path)
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (image_red(case.index, seed, k), 0, 0)).save(path)
    meta = ImageKey("v", 2, 2, 1).path(tmp_path, "meta", ".json")
    meta.parent.mkdir(parents=True)
    warning = {"subject": "bird", "index": 0, "kind": "not_named", "message": "'bird' is not named"}
    meta.write_text(json.dumps({"warnings": [warning]}))
    return tmp_path, cases


@pytest.mark.parametrize("batch_size", [3, 16])
def test_each_record_is_scored_against_its_own_prompt_and_subjects(scored_folder, batch_size):
    """Guards which prompt each image is scored against: the fake text features differ per prompt, so a
    record's CLIP-T cosine must be that of its image with its own prompt (not merely "a cosine"). Fails
    when the text features are computed in another order than the prompts they are keyed by (e.g.
    ``clip.text_features(prompts[::-1])``), or when a batch pairs images with another chunk's prompts."""
    out_dir, cases = scored_folder
    encoders = type("Encoders", (), {})()
    encoders.clip, encoders.dino = FakeImageEncoder(CLIP_OF, TEXT_OF), FakeImageEncoder(DINO_OF)
    records = score_images(
        out_dir, cases, ["v"], seeds=[1, 2], images_per_prompt=2, encoders=encoders,
        references=reference_photos, convention="concept101", batch_size=batch_size,
    )  # fmt: skip
    assert [(r["case"], r["seed"], r["k"]) for r in records] == [
        (c, s, k) for c in range(4) for s in (1, 2) for k in range(2)
    ]
    for record in records:
        case = cases[record["case"]]
        red = image_red(case.index, record["seed"], record["k"])
        own = cosine(CLIP_OF[red], TEXT_OF[case.prompt])
        assert record["clip_t_cos"] == pytest.approx(own, abs=1e-12)
        assert all(abs(own - cosine(CLIP_OF[red], TEXT_OF[p])) > 1e-3 for p in PROMPTS if p != case.prompt)
        assert record["clip_t"] == pytest.approx(2.5 * max(own, 0.0), abs=1e-12)
        for subject in case.subjects:
            refs = REF_RED[subject.name]
            clip_i = np.mean([cosine(CLIP_OF[red], CLIP_OF[r]) for r in refs])
            dino = np.mean([cosine(DINO_OF[red], DINO_OF[r]) for r in refs])
            assert record["clip_i"][subject.key] == pytest.approx(clip_i, abs=1e-12)
            assert record["dino"][subject.key] == pytest.approx(dino, abs=1e-12)
        assert set(record["clip_i"]) == set(record["dino"]) == set(case.subject_keys)
        assert record["prompt"] == case.prompt and record["group"] == case.group
        assert record["names"] == [s.name for s in case.subjects] and record["subjects"] == case.subject_keys
        assert record["variant"] == "v" and record["quirks"] == list(case.quirks)
        assert record["file"] == f"images/v/{case.index:05d}_s{record['seed']}_{record['k']}.png"
        warned = (case.index, record["seed"], record["k"]) == (2, 2, 1)
        assert record["not_named"] == (["bird"] if warned else [])
        assert len(record["warnings"]) == int(warned)


def fake_encoders(text: dict[str, np.ndarray] | None = None):
    encoders = type("Encoders", (), {})()
    encoders.clip, encoders.dino = FakeImageEncoder(CLIP_OF, TEXT_OF if text is None else text), FakeImageEncoder(DINO_OF)
    return encoders


def score(out_dir, cases, encoders=None, **overrides):
    settings = dict(seeds=[1, 2], images_per_prompt=2, encoders=encoders or fake_encoders(),
                    references=reference_photos, convention="raw")  # fmt: skip
    return score_images(out_dir, cases, ["v"], **{**settings, **overrides})


def test_a_record_says_whether_the_authors_keep_it_only_when_scored_their_way(scored_folder):
    """Guards the record's fields: ``authors_kept`` appears with ``authors=True`` (and its own CLIP-T
    text), never without (a mutant computing it always added the field to every record)."""
    out_dir, cases = scored_folder
    ours = score(out_dir, cases)
    assert all("authors_kept" not in record for record in ours)
    assert [record["clip_t_text"] for record in ours] == [cases[r["case"]].prompt for r in ours]
    authors_text = {f"{prompt}_gen.png".split(".")[0] + "." : TEXT_OF[prompt] for prompt in PROMPTS}
    theirs = score(out_dir, cases, fake_encoders(authors_text), authors=True)
    assert all(record["authors_kept"] is True for record in theirs)  # one prompt per group here


def test_authors_kept_keeps_the_highest_index_of_a_prompt_in_its_group_in_any_order():
    """Guards ``authors_kept``'s max: cases of one prompt and group listed with the highest index first
    keep that one (a mutant taking the last listed kept 2 here); other groups or prompts are apart."""
    from mipadapter.eval.scoring import authors_kept

    dog = (SUBJECTS["dog"],)
    cases = [Case(7, "a dog", dog, "g"), Case(2, "a dog", dog, "g"), Case(5, "a dog", dog, "h"),
             Case(4, "a dog.", dog, "g"), Case(9, "a dog", dog, "g"), Case(8, "a dog", dog, "g")]  # fmt: skip
    assert authors_kept(cases) == {9, 5, 4}
    assert authors_kept(cases[:2]) == {7}


def test_missing_images_are_counted_and_named_before_anything_is_scored(scored_folder):
    """Guards the missing-image message: the count and the first three paths as they are on disk."""
    out_dir, cases = scored_folder
    gone = [ImageKey("v", 3, seed, k).path(out_dir) for seed in (1, 2) for k in range(2)]
    for path in gone:
        path.unlink()
    with pytest.raises(FileNotFoundError) as error:
        score(out_dir, cases)
    assert str(error.value) == f"4 images to score do not exist, e.g. {[str(p) for p in gone[:3]]}"


def test_bad_inputs_are_refused_with_their_reason(scored_folder):
    """Guards the refusals: a case repeating a subject key (named with the case), a CLIP encoder that
    gives another number of text features than prompts (zip(strict=True): a silent shift would score
    images against other prompts), and a generated image that is not an image (named as one)."""
    out_dir, cases = scored_folder
    twice = Case(4, "two dogs", (SUBJECTS["dog"], SUBJECTS["dog"]), "g4")
    with pytest.raises(ValueError) as error:
        score(out_dir, [*cases, twice])
    assert str(error.value) == "case 4 repeats a subject key: ['key_dog', 'key_dog']"

    class OneShort(FakeImageEncoder):
        def text_features(self, prompts):
            return super().text_features(prompts)[:-1]

    short = fake_encoders()
    short.clip = OneShort(CLIP_OF, TEXT_OF)
    with pytest.raises(ValueError, match="zip"):
        score(out_dir, cases, short)

    broken = ImageKey("v", 1, 2, 0).path(out_dir)
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError) as error:
        score(out_dir, cases)
    assert str(error.value) == f"generated image '{broken}' is not an image file Pillow can read"
