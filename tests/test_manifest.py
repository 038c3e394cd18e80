"""The training manifest schema: round trip, strict parsing with line numbers, atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from mipadapter.manifest import (
    SCHEMA_VERSION,
    ImageRecord,
    ManifestError,
    ObjectRecord,
    append_manifest,
    read_manifest,
    record_from_dict,
    record_to_dict,
    resolve,
    write_manifest,
)


def make_record(index: int = 0) -> ImageRecord:
    return ImageRecord(
        id=f"sa_{index}",
        image=f"images/sa_000000/sa_{index}.jpg",
        width=1500,
        height=2250,
        caption="a cat sitting next to a jacket",
        objects=(
            ObjectRecord("cat", (10, 20, 610, 900), 0.61, "masks/sa_000000/sa_1.png", 1, 0.31),
            ObjectRecord("jacket", (700.5, 100, 1400, 1200), 0.45, "masks/sa_000000/sa_1.png", 2, 0.27),
        ),
        scores={"s_quality": -0.13, "s_single": 0.29, "s_pair": -0.42},
        original_size=(3000, 4500),
    )


def test_round_trip(tmp_path):
    records = [make_record(i) for i in range(3)] + [
        ImageRecord(
            id="plain",
            image="x.png",
            width=4,
            height=3,
            caption="",
            objects=(ObjectRecord("cat", (0, 0, 1, 1), 1.0),),
        )
    ]
    path = tmp_path / "m.jsonl"
    write_manifest(records, path)
    assert read_manifest(path) == records
    assert len(path.read_text().splitlines()) == 4


def test_exact_json_of_a_record():
    data = record_to_dict(make_record(1))
    assert list(data) == [
        "schema_version",
        "id",
        "image",
        "width",
        "height",
        "original_size",
        "caption",
        "objects",
        "scores",
        "crop_region",
    ]
    assert data["schema_version"] == SCHEMA_VERSION == 2
    assert data["crop_region"] is None
    assert data["objects"][0] == {
        "name": "cat",
        "box": [10.0, 20.0, 610.0, 900.0],
        "score": 0.61,
        "mask": "masks/sa_000000/sa_1.png",
        "mask_label": 1,
        "clip_score": 0.31,
    }
    assert list(data["scores"]) == ["s_single", "s_pair", "s_quality"]  # fixed order whatever the input order
    assert data["original_size"] == [3000, 4500]


def test_append(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"
    append_manifest([make_record(0)], path)
    append_manifest([make_record(1), make_record(2)], path)
    assert [r.id for r in read_manifest(path)] == ["sa_0", "sa_1", "sa_2"]


def write_lines(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.update(extra=1), r"line 2: unknown field\(s\) \['extra'\]"),
        (lambda d: d.pop("caption"), r"line 2: missing field\(s\) \['caption'\]"),
        (
            lambda d: d["objects"][1].update(colour="red"),
            r"line 2: field 'objects\[1\]': unknown field\(s\) \['colour'\]",
        ),
        (
            lambda d: d["objects"][0].pop("mask_label"),
            r"line 2: field 'objects\[0\]': missing field\(s\) \['mask_label'\]",
        ),
        (lambda d: d.update(width="1500"), r"line 2: field 'width': expected int, got '1500'"),
        (lambda d: d.update(width=True), r"line 2: field 'width': expected int, got True"),
        (
            lambda d: d["objects"][0].update(box=[1, 2, 3]),
            r"line 2: field 'objects\[0\]'.box: expected a list of 4",
        ),
        (lambda d: d["objects"][0].update(box=[5, 0, 1, 1]), r"line 2: field 'objects\[0\]': box of 'cat'"),
        (lambda d: d["scores"].update(s_other=1.0), r"line 2: field 'scores' has unknown key 's_other'"),
        (lambda d: d.update(schema_version=3), r"line 2: field 'schema_version' is 3"),
        (lambda d: d.update(crop_region=[5, 0, 1]), r"line 2: field 'crop_region': expected a list of 4"),
        (lambda d: d.update(crop_region=[5, 0, 1, 1]), r"line 2: image 'sa_1': crop_region must be finite"),
        (lambda d: d.update(schema_version=1), r"line 2: unknown field\(s\) \['crop_region'\]"),
        (lambda d: d.update(height=0), r"line 2: image 'sa_1': size must be positive"),
    ],
)
def test_strict_parsing_names_line_and_field(tmp_path, mutate, message):
    good, bad = record_to_dict(make_record(0)), record_to_dict(make_record(1))
    mutate(bad)
    path = tmp_path / "m.jsonl"
    write_lines(path, [good, bad])
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_broken_json_line_is_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(record_to_dict(make_record(0))) + "\n\n{not json\n")
    with pytest.raises(ManifestError, match="line 3: not valid JSON"):
        read_manifest(path)


def test_undefined_scores_are_left_out_never_nan():
    with pytest.raises(ValueError, match="finite"):
        ImageRecord(id="a", image="a.png", width=1, height=1, caption="", scores={"s_pair": float("nan")})
    with pytest.raises(ValueError, match="unknown score keys"):
        ImageRecord(id="a", image="a.png", width=1, height=1, caption="", scores={"quality": 1.0})


def test_object_validation():
    with pytest.raises(ValueError, match="needs a mask"):
        ObjectRecord("cat", (0, 0, 1, 1), 0.5, mask=None, mask_label=1)
    with pytest.raises(ValueError, match="non-empty"):
        ObjectRecord(" ", (0, 0, 1, 1), 0.5)


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    write_manifest([make_record(0)], path)
    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_manifest([make_record(1)], path)
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temp file left behind


def test_resolve_is_relative_to_the_manifest_folder(tmp_path):
    assert (
        resolve(tmp_path / "set" / "m.jsonl", "images/a.jpg")
        == (tmp_path / "set" / "images" / "a.jpg").resolve()
    )


def test_record_from_dict_default_location():
    with pytest.raises(ManifestError, match="^record: expected a JSON object"):
        record_from_dict([])


def test_version_1_lines_are_still_read(tmp_path):
    """A manifest written before crop_region existed reads into the same records."""
    record = make_record(1)
    old = record_to_dict(record)
    old.pop("crop_region")
    old["schema_version"] = 1
    path = tmp_path / "old.jsonl"
    write_lines(path, [old])
    assert read_manifest(path) == [record]
    region = ImageRecord("x", "x.png", 4, 4, "a cat", crop_region=(0, 1, 2, 3))
    write_manifest([region], tmp_path / "new.jsonl")
    assert read_manifest(tmp_path / "new.jsonl")[0].crop_region == (0.0, 1.0, 2.0, 3.0)
