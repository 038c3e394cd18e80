"""Benchmark layouts → cases: prompts, indices, quirks flagged, references cropped and padded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fakes import make_concept101, make_dreambench
from PIL import Image

from mipadapter.eval.cases import cases_from_json, cases_to_json
from mipadapter.eval.datasets import (
    concept101_cases,
    concept101_quirks,
    dreambench_cases,
    dreambench_pairs,
    read_dreambench_table,
)
from mipadapter.eval.references import crop_pad_white, load_references

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_concept101_cases_prompts_indices_and_quirks(tmp_path):
    root = make_concept101(tmp_path)
    cases = concept101_cases(root)
    assert [c.index for c in cases] == [0, 1, 2, 3]
    assert [c.prompt for c in cases] == [
        "photo of the backpack and teapot.",
        "teapot and backpack on a table.",
        "A photo of the cat and sofa.",
        "the cat playing with sofa.",
    ]
    assert cases[0].subject_keys == ["things_backpack", "things_teapot"]
    assert cases[0].subjects[0].references == (
        "benchmark_dataset/things_backpack/00.jpg",
        "benchmark_dataset/things_backpack/01.jpg",
    )
    assert cases[0].quirks == ()
    assert cases[2].quirks == ("class 'sofa' does not match folder './benchmark_dataset/pet_dog1'",)
    skipped = concept101_cases(root, on_quirk="skip")
    assert [c.index for c in skipped] == [0, 1]
    subset = concept101_cases(root, combinations=[1])
    assert [c.index for c in subset] == [2, 3]  # indices of the full run
    assert cases_from_json(json.loads(json.dumps(cases_to_json(cases)))) == cases


def test_concept101_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_multiconcept.json not found"):
        concept101_cases(tmp_path)
    root = make_concept101(tmp_path / "c")
    with pytest.raises(ValueError, match=r"combinations \[7\] do not exist \(the file has 2\)"):
        concept101_cases(root, combinations=[7])
    with pytest.raises(ValueError, match="on_quirk must be 'flag' or 'skip', got 'ignore'"):
        concept101_cases(root, on_quirk="ignore")


@pytest.mark.skipif(not (SHARED / "customconcept101").exists(), reason="shared data not present")
def test_the_real_concept101_file_has_exactly_the_known_quirks():
    entries = json.loads((SHARED / "customconcept101" / "dataset_multiconcept.json").read_text())
    flagged = {i: concept101_quirks(entry) for i, entry in enumerate(entries) if concept101_quirks(entry)}
    assert sorted(flagged) == [4, 99, 100]
    assert "sofa" in flagged[4][0] and "furniture_chair3" in flagged[4][0]
    assert "'dog'" in flagged[99][0] and "'cat'" in flagged[100][0]


def test_box_files_crop_references(tmp_path):
    root = make_concept101(tmp_path)
    photo = root / "benchmark_dataset" / "things_teapot" / "00.jpg"
    (photo.with_name("00.box.json")).write_text("[10, 20, 50, 40]")
    case = concept101_cases(root, combinations=[0])[0]
    teapot = case.subjects[1]
    assert teapot.boxes == ((10.0, 20.0, 50.0, 40.0), None)
    cropped, whole = load_references(root, teapot)
    assert cropped.size == (40, 40) and whole.size == Image.open(photo.with_name("01.jpg")).size
    assert cropped.getpixel((0, 0)) == (255, 255, 255)  # padded on white above and below
    assert load_references(root, teapot, crop=False)[0].size == Image.open(photo).size
    (photo.with_name("00.box.json")).write_text("[50, 20, 10, 40]")
    with pytest.raises(ValueError, match=r"00.box.json: expected \[x0, y0, x1, y1\]"):
        concept101_cases(root, combinations=[0])


def test_crop_pad_white():
    photo = Image.new("RGB", (60, 30), (10, 20, 30))
    padded = crop_pad_white(photo, None)
    assert padded.size == (60, 60)
    assert padded.getpixel((0, 0)) == (255, 255, 255) and padded.getpixel((30, 30)) == (10, 20, 30)
    assert crop_pad_white(photo, (0, 0, 10, 30)).size == (30, 30)
    with pytest.raises(ValueError, match=r"crop box \(0, 0, 70, 30\) does not fit a 60x30 photo"):
        crop_pad_white(photo, (0, 0, 70, 30))


def test_dreambench_single_and_multi(tmp_path):
    root = make_dreambench(tmp_path)
    single, missing = dreambench_cases(root, mode="single")
    assert missing == ["clock"]
    by_group = {}
    for case in single:
        by_group.setdefault(case.group, []).append(case.prompt)
    assert by_group["db/backpack"] == ["a backpack in the jungle", "a red backpack"]
    assert by_group["db/dog"] == ["a dog in the snow", "a dog wearing a red hat"]  # live-subject prompts
    token, _ = dreambench_cases(root, mode="single", subjects=["cat"], unique_token="sks")
    assert token[0].prompt == "a sks cat in the snow"
    multi, _ = dreambench_cases(root, mode="multi", pairs=[("backpack", "dog")])
    assert [c.prompt for c in multi] == ["a backpack and a dog in the jungle", "a red backpack and a dog"]
    assert multi[0].subject_keys == ["backpack", "dog"]
    with pytest.raises(FileNotFoundError, match=r"subjects \['clock'\] have no folder"):
        dreambench_cases(root, subjects=["clock"])
    with pytest.raises(ValueError, match="names 'vase'"):
        dreambench_cases(root, mode="multi", pairs=[("backpack", "vase")])


def test_dreambench_pairs_are_a_fixed_draw_of_different_classes():
    classes = {f"s{i}": "dog" if i < 3 else f"c{i}" for i in range(10)}
    pairs = dreambench_pairs(list(classes), classes, count=5)
    assert pairs == dreambench_pairs(list(reversed(classes)), classes, count=5)
    assert len(pairs) == 5 and all(classes[a] != classes[b] for a, b in pairs)
    assert len(dreambench_pairs(["s0", "s1", "s3"], classes, count=30)) == 2


@pytest.mark.skipif(not (SHARED / "dreambooth").exists(), reason="shared data not present")
def test_the_real_dreambench_table_parses():
    classes, objects, live = read_dreambench_table(
        (SHARED / "dreambooth" / "prompts_and_classes.txt").read_text()
    )
    assert len(classes) == 30 and classes["bear_plushie"] == "stuffed animal"
    assert len(objects) == 25 and len(live) == 25
    assert objects[0] == "a {0} {1} in the jungle" and live[-1] == "a cube shaped {0} {1}"
