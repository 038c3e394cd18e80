"""Benchmark layouts → cases: prompts, indices, quirks flagged, references cropped and padded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_fakes import ASSETS, REAL_DATA_ENV, make_concept101, make_dreambench, real_data
from PIL import Image

from mipadapter.eval.cases import cases_from_json, cases_to_json
from mipadapter.eval.datasets import (
    concept101_cases,
    concept101_quirks,
    dreambench_cases,
    dreambench_pairs,
    read_dreambench_table,
)
from mipadapter.eval.references import (
    BoxSource,
    box_file,
    conditioning_references,
    crop_reference,
    fit_pad_white,
    metric_references,
    read_box_file,
)

CONCEPT101 = real_data("customconcept101")
DREAMBOOTH = real_data("dreambooth")


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


@pytest.mark.skipif(CONCEPT101 is None, reason=f"set {REAL_DATA_ENV} to a folder with customconcept101/")
def test_the_real_concept101_file_has_exactly_the_known_quirks():
    entries = json.loads((CONCEPT101 / "dataset_multiconcept.json").read_text())
    flagged = {i: concept101_quirks(entry) for i, entry in enumerate(entries) if concept101_quirks(entry)}
    assert sorted(flagged) == [4, 99, 100]
    assert "sofa" in flagged[4][0] and "furniture_chair3" in flagged[4][0]
    assert "'dog'" in flagged[99][0] and "'cat'" in flagged[100][0]


def test_the_authors_crop_equals_a_hand_computation_on_a_real_photo(tmp_path):
    """A real DreamBooth photo cut to 128×96: short side 800 → 1066×800 (int(800·128/96)); box
    [100.7, 220.2, 651.9, 540.99] truncates to (100, 220, 651, 540), a 551×320 crop; fitted into 224:
    224×int(224·320/551) = 224×130, pasted at (0, (224-130)//2 = 47) on white."""
    with Image.open(ASSETS / "cat" / "00.jpg") as photo:
        real = photo.convert("RGB").crop((0, 16, 128, 112))
    path = tmp_path / "pet_cat1" / "00.png"
    path.parent.mkdir()
    real.save(path)
    boxes = tmp_path / "json_data" / "pet_cat1"
    boxes.mkdir(parents=True)
    entries = [
        {"value": 0, "label": "background"},
        {"value": 1, "label": "cat", "box": [100.7, 220.2, 651.9, 540.99]},
    ]
    (boxes / "00.json").write_text(json.dumps({"caption": "a cat", "mask": entries}))

    box = read_box_file(box_file(tmp_path / "json_data", path))
    assert box == (100.7, 220.2, 651.9, 540.99)
    expected = Image.new("RGB", (224, 224), (255, 255, 255))
    piece = real.resize((1066, 800), Image.Resampling.BILINEAR).crop((100, 220, 651, 540))
    expected.paste(piece.resize((224, 130), Image.Resampling.BILINEAR), (0, 47))
    got = crop_reference(path, box)
    assert got.size == (224, 224)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))

    # the same photo stored sideways with an EXIF orientation: the box is in the stored frame, the crop
    # then turned upright (as every photo the project opens)
    sideways = tmp_path / "pet_cat1" / "01.jpg"
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    real.transpose(Image.Transpose.ROTATE_90).save(sideways, exif=exif.tobytes(), quality=100)
    with Image.open(sideways) as stored:
        stored_rgb = stored.convert("RGB")
    by_hand = stored_rgb.resize((800, 1066), Image.Resampling.BILINEAR).crop((10, 20, 810, 320))
    by_hand = by_hand.transpose(Image.Transpose.ROTATE_270)  # 300×800 upright
    np.testing.assert_array_equal(
        np.asarray(crop_reference(sideways, (10.5, 20.5, 810.2, 320.9))), np.asarray(fit_pad_white(by_hand))
    )


def test_box_files_errors_name_the_file(tmp_path):
    bad = tmp_path / "b.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="b.json' is not readable JSON"):
        read_box_file(bad)
    bad.write_text(json.dumps({"mask": [{"value": 0}, {"value": 1, "box": [5, 5, 1, 9]}]}))
    with pytest.raises(ValueError, match=r"b.json': mask\[1\]\['box'\] must be \[x0, y0, x1, y1\]"):
        read_box_file(bad)
    bad.write_text(json.dumps({"mask": [{"value": 0, "label": "background"}]}))
    assert read_box_file(bad) is None  # nothing detected: the photo is used whole


def test_references_crop_whole_and_detect_once(tmp_path):
    from mipadapter.eval.detect import FixedBoxDetector

    root = make_concept101(tmp_path / "c101")
    case = concept101_cases(root, combinations=[0])[0]
    teapot = case.subjects[1]
    authors = BoxSource(root / "json_data")
    cropped = conditioning_references(root, teapot, mode="crop", boxes=authors)
    assert [im.size for im in cropped] == [(224, 224), (224, 224)]
    assert cropped[0].getpixel((0, 0)) == (255, 255, 255)  # padded on white
    whole = conditioning_references(root, teapot, mode="whole")
    assert [im.size for im in whole] == [(128, 128), (128, 128)]
    assert [im.size for im in metric_references(root, teapot)] == [(128, 128), (128, 128)]

    loads = []
    detector = FixedBoxDetector({"teapot": (100.7, 220.2, 651.9, 540.99)})

    def factory():
        loads.append(1)
        return detector

    detected = BoxSource(None, tmp_path / "cache", factory)
    first = conditioning_references(root, teapot, mode="crop", boxes=detected)
    assert [
        np.asarray(a).tolist() == np.asarray(b).tolist() for a, b in zip(first, cropped, strict=True)
    ] == [True, True]
    assert loads == [1] and detector.calls == 2
    cached = tmp_path / "cache" / "things_teapot" / "00.json"
    assert read_box_file(cached) == (100.7, 220.2, 651.9, 540.99)
    again = BoxSource(None, tmp_path / "cache", factory)
    conditioning_references(root, teapot, mode="crop", boxes=again)
    assert loads == [1] and detector.calls == 2  # read from the cache, the detector never loaded

    with pytest.raises(FileNotFoundError, match=r"box file .*things_teapot/00.json' not found .* \(reference_boxes, --reference-boxes\)"):
        conditioning_references(root, teapot, mode="crop", boxes=BoxSource(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"reference mode must be one of \('crop', 'whole'\), got 'box'"):
        conditioning_references(root, teapot, mode="box")


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


@pytest.mark.skipif(DREAMBOOTH is None, reason=f"set {REAL_DATA_ENV} to a folder with dreambooth/")
def test_the_real_dreambench_table_parses():
    classes, objects, live = read_dreambench_table((DREAMBOOTH / "prompts_and_classes.txt").read_text())
    assert len(classes) == 30 and classes["bear_plushie"] == "stuffed animal"
    assert len(objects) == 25 and len(live) == 25
    assert objects[0] == "a {0} {1} in the jungle" and live[-1] == "a cube shaped {0} {1}"
