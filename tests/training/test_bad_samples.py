"""One bad training sample never stops a run: each kind is skipped under its own reason while the good
images are indexed, masks are measured from their headers before decoding, and the counts reach stderr."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageFile
from synthetic_data import (
    HEIGHT,
    WIDTH,
    plant_bad_authors_samples,
    write_authors_layout,
    write_manifest_layout,
    write_png_bomb,
)

from mipadapter.training import config_from_dict
from mipadapter.training.config import FilterConfig
from mipadapter.training.loop import prepare_index
from mipadapter.training.samples import SampleSettings, SkippedSample, safe_build_sample
from mipadapter.training.sources import (
    DataError,
    SubjectRules,
    authors_candidates,
    build_index,
    load_label_map,
    manifest_candidates,
)

RULES = SubjectRules(FilterConfig().object_filter(), 0.0, 1, 3)
SETTINGS = SampleSettings(resolution=64, reference_size=32, drop_text=0.0, drop_image=0.0, drop_both=0.0)
GOOD = ["sa_12", "sa_13", "sa_14"]


@pytest.fixture
def bad_authors(tmp_path):
    """15 images, 12 broken; the id list names every one (a deleted JSON is only missed when listed)."""
    root = tmp_path / "bad"
    ids = write_authors_layout(root, 15)
    (root / "ids.txt").write_text("\n".join(ids) + "\n")
    return root, plant_bad_authors_samples(root)


def test_each_bad_sample_is_skipped_with_its_reason_and_the_good_ones_are_indexed(bad_authors):
    root, expected = bad_authors
    records, report = build_index(*authors_candidates(root, str(root / "ids.txt")), RULES, workers=4)
    assert [r.id for r in records] == GOOD
    assert report.skipped == {reason: len(ids) for reason, ids in expected.items()}
    assert report.total == 15 and report.kept == 3
    for reason, ids in expected.items():  # the first message of each reason names its sample
        assert ids[0] in report.examples[reason], (reason, report.examples[reason])
    assert "'original_size'" in report.examples["bad_field"]
    assert "5000" in report.examples["box_outside_image"] and "80×64" in report.examples["box_outside_image"]
    assert "12000×12000" in report.examples["too_many_pixels"]


def test_bad_manifest_lines_are_skipped_with_their_reasons(tmp_path):
    path = write_manifest_layout(tmp_path / "m", 7)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[0]["original_size"] = ["a", "b"]
    lines[1]["original_size"] = [10**9, 5]
    lines[2]["objects"][0]["box"] = [0.0, 0.0, 5000.0, 5000.0]
    (tmp_path / "m" / "images" / "img_3.png").unlink()
    write_png_bomb(tmp_path / "m" / lines[4]["objects"][0]["mask"], 12000, 12000)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records, report = build_index(*manifest_candidates(path), RULES)
    assert [r.id for r in records] == ["img_5", "img_6"]
    assert report.skipped == {
        "bad_field": 2, "box_outside_image": 1, "missing_image": 1, "too_many_pixels": 1,
    }  # fmt: skip


def test_json_nested_too_deep_is_corrupt_in_both_layouts(tmp_path):
    root = tmp_path / "a"
    write_authors_layout(root, 2)
    (root / "jsons" / "sa_0.json").write_text("[" * 100_000)
    records, report = build_index(*authors_candidates(root, None), RULES)
    assert [r.id for r in records] == ["sa_1"] and report.skipped == {"corrupt_json": 1}
    path = write_manifest_layout(tmp_path / "m", 2)
    good = path.read_bytes().splitlines()[1]
    path.write_bytes(b"[" * 100_000 + b"\n" + good.replace(b"a photo", b"a ph\xffoto") + b"\n" + good + b"\n")
    records, report = build_index(*manifest_candidates(path), RULES)
    assert [r.id for r in records] == ["img_1"] and report.skipped == {"corrupt_json": 2}
    assert report.examples["corrupt_json"].startswith("manifest.jsonl line 1: RecursionError: ")


def test_a_slightly_overshooting_detector_box_is_kept(tmp_path):
    root = tmp_path / "a"
    write_authors_layout(root, 1)
    data = json.loads((root / "jsons" / "sa_0.json").read_text())
    data["final_masks"][1]["box"][3] = HEIGHT + 2.0  # 3% of the side past the bottom edge: rounding
    (root / "jsons" / "sa_0.json").write_text(json.dumps(data))
    records, report = build_index(*authors_candidates(root, None), RULES)
    assert report.kept == 1 and [o.name for o in records[0].objects] == ["cat", "dog"]


def test_an_unexpected_failure_skips_that_sample_only(authors_data, monkeypatch):
    import mipadapter.training.sources as sources

    real = sources.dominant_label

    def fails_on_sa_2(labels, box):
        if labels.shape == (HEIGHT, WIDTH) and (labels == 3).any():  # only sa_2 has a third shape
            raise RuntimeError("a bug in one sample's path")
        return real(labels, box)

    monkeypatch.setattr(sources, "dominant_label", fails_on_sa_2)
    records, report = build_index(*authors_candidates(authors_data, None), RULES)
    assert report.skipped == {"unexpected_error": 2} and len(records) == 4  # sa_2 and sa_5 share the layout
    assert report.examples["unexpected_error"] == "sa_2: RuntimeError: a bug in one sample's path"


def test_a_mask_bomb_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    bomb = write_png_bomb(tmp_path / "bomb.png", 12000, 12000)
    assert bomb.stat().st_size < 200_000  # 144 MP behind 140 KB
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self)
    )
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as error:
            load_label_map(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.value.reason == "too_many_pixels"
    assert str(error.value) == f"mask {bomb} is 12000×12000 (144.0 MP), above the 50 MP limit"
    assert decoded == [] and peak < 2_000_000  # decoding would take 144 MB (1.15 GB as int64)


def test_a_mask_past_pillows_own_bomb_limit_is_too_many_pixels_even_without_ours(tmp_path):
    bomb = write_png_bomb(tmp_path / "bomb.png", 14000, 14000)  # 196 MP: Pillow refuses above 179 MP
    with pytest.raises(DataError, match="has more pixels than Pillow will decode") as error:
        load_label_map(bomb, max_pixels=None)
    assert error.value.reason == "too_many_pixels"


def test_scanning_many_bomb_masks_in_parallel_stays_small(tmp_path):
    root = tmp_path / "a"
    write_authors_layout(root, 9)
    for k in range(8):
        write_png_bomb(root / "masks" / f"sa_{k}.png", 12000, 12000)
    tracemalloc.start()
    try:
        records, report = build_index(*authors_candidates(root, None), RULES, workers=8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.skipped == {"too_many_pixels": 8} and [r.id for r in records] == ["sa_8"]
    assert peak < 10_000_000


@pytest.mark.parametrize(
    ("mode", "dtype"), [("L", np.uint8), ("I;16", np.uint16), ("1", np.uint8), ("RGB", np.uint8)]
)
def test_label_maps_keep_their_own_integer_type(tmp_path, mode, dtype):
    labels = np.zeros((HEIGHT, WIDTH), np.uint8)
    labels[10:20, 5:30] = 1
    labels[30:40, 40:70] = 2
    if mode == "RGB":
        image = Image.fromarray(np.stack([labels * 100] * 3, axis=-1))
    elif mode == "1":
        image = Image.fromarray(labels > 0)
    else:
        image = Image.fromarray(labels).convert(mode)
    image.save(tmp_path / "mask.png")
    loaded = load_label_map(tmp_path / "mask.png", (WIDTH, HEIGHT))
    assert loaded.dtype == dtype and loaded.shape == (HEIGHT, WIDTH)
    want = labels * 100 if mode == "RGB" else labels if mode in ("L", "I;16") else (labels > 0).astype(np.uint8)
    assert np.array_equal(loaded, want)
    with pytest.raises(DataError, match="is 80×64, its image 64×80") as error:
        load_label_map(tmp_path / "mask.png", (HEIGHT, WIDTH))
    assert error.value.reason == "mask_size_mismatch"


def _break(kind, record):
    from pathlib import Path

    image, mask = Path(record.image), Path(record.objects[0].mask)
    if kind == "missing_image":
        image.unlink()
    elif kind == "changed_since_index":
        Image.open(image).resize((WIDTH * 2, HEIGHT * 2)).save(image)
    elif kind == "mask_size_mismatch":
        Image.open(mask).resize((WIDTH // 2, HEIGHT // 2)).save(mask)
    elif kind == "too_many_pixels":
        write_png_bomb(mask, 12000, 12000)
    elif kind == "missing_mask":
        mask.unlink()
    elif kind == "unreadable_image":
        image.write_bytes(b"not a png")


@pytest.mark.parametrize(
    "kind",
    ["missing_image", "changed_since_index", "mask_size_mismatch", "too_many_pixels", "missing_mask",
     "unreadable_image"],
)  # fmt: skip
def test_a_sample_broken_after_indexing_is_skipped_with_its_reason(authors_data, kind):
    records, _ = build_index(*authors_candidates(authors_data, None), RULES)
    _break(kind, records[0])
    skipped = safe_build_sample(records[0], 0, 1, SETTINGS)
    assert isinstance(skipped, SkippedSample) and skipped.reason == kind, skipped
    assert not isinstance(safe_build_sample(records[1], 1, 1, SETTINGS), SkippedSample)


def test_a_failure_while_building_a_sample_is_counted_not_raised(authors_data, monkeypatch):
    import mipadapter.training.samples as samples

    records, _ = build_index(*authors_candidates(authors_data, None), RULES)
    monkeypatch.setattr(samples, "segment_square", lambda *a: 1 / 0)
    skipped = safe_build_sample(records[0], 0, 1, SETTINGS)
    assert isinstance(skipped, SkippedSample) and skipped.reason == "unexpected_error"
    assert skipped.message == "sa_0: ZeroDivisionError: division by zero"


def _index_config(root, out, **data):
    return config_from_dict(
        {
            "model": {"base_model": "-", "image_encoder": "-", "adapter_init": "-"},
            "data": {"root": str(root), "min_subjects": 1, "max_subjects": 3, "scan_workers": 2, **data},
            "run": {"output_dir": str(out)},
        }
    )


def test_the_end_of_indexing_prints_the_counts_and_a_share_warning(bad_authors, tmp_path, capsys):
    root, expected = bad_authors
    config = _index_config(root, tmp_path / "run", ids_file=str(root / "ids.txt"))
    records = prepare_index(config, write=True)
    assert [r.id for r in records] == GOOD
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "training data: 3 of 15 images usable"
    reasons = sorted(expected)
    assert len(err) == 1 + len(reasons) + 1
    for line, reason in zip(err[1:-1], reasons, strict=True):
        assert line.startswith(f"  skipped {len(expected[reason])}: {reason} (e.g. ")
        assert len(line) < 200
    assert err[-1] == (
        "warning: 12 of 15 training images (80%) were skipped, more than data.warn_skipped_share (0.1): "
        "check the reasons above"
    )
    report = json.loads((tmp_path / "run" / "data" / "report.json").read_text())
    assert report["skipped"] == {reason: len(ids) for reason, ids in expected.items()}


def test_no_warning_below_the_share(tmp_path, capsys):
    root = tmp_path / "a"
    write_authors_layout(root, 10)
    (root / "images" / "sa_3.png").unlink()
    prepare_index(_index_config(root, tmp_path / "run"), write=True)  # 1 of 10: not above 0.1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "training data: 9 of 10 images usable"
    assert err[1].startswith("  skipped 1: missing_image")
    assert len(err) == 2
    prepare_index(_index_config(root, tmp_path / "run2", warn_skipped_share=0.05), write=True)
    assert capsys.readouterr().err.splitlines()[-1].startswith("warning: 1 of 10 training images (10%)")


def test_choose_subjects_holds_a_bounded_number_of_label_maps(tmp_path):
    """Per-object binary masks: the scan keeps at most the budget's worth decoded at once."""
    from mipadapter.training.sources import LabelMaps

    paths = []
    for k in range(5):
        Image.fromarray(np.full((100, 100), k + 1, np.uint8)).save(tmp_path / f"{k}.png")
        paths.append(str(tmp_path / f"{k}.png"))
    maps = LabelMaps((100, 100), budget=25_000)  # two 10 000-byte maps fit, three do not
    for path in paths + paths[-2:]:
        maps(path)
    assert list(maps._maps) == paths[-2:]
    assert int(maps(paths[0])[0, 0]) == 1 and list(maps._maps) == [paths[-1], paths[0]]
    big = LabelMaps((100, 100), budget=1)  # the newest map is always kept
    assert int(big(paths[2])[0, 0]) == 3 and list(big._maps) == [paths[2]]



def test_changing_the_warning_share_keeps_the_index(tmp_path, capsys):
    root = tmp_path / "a"
    write_authors_layout(root, 3)
    first = prepare_index(_index_config(root, tmp_path / "run"), write=True)
    again = prepare_index(_index_config(root, tmp_path / "run", warn_skipped_share=0.5), write=True)
    assert [r.id for r in again] == [r.id for r in first]  # reused, not refused as other data settings
    with pytest.raises(ValueError, match="was built with other data settings"):
        prepare_index(_index_config(root, tmp_path / "run", resolution=256), write=True)


def test_a_sample_is_the_same_for_the_same_seed_and_a_failure_keeps_its_index(authors_data, monkeypatch):
    """``safe_build_sample`` draws everything random (flips, crop position) from its seed: the same seed
    gives the same sample, another seed another one; a sample that fails is skipped under the index it
    was asked for. Guards an unseeded generator (samples then differ between workers and resumes) and
    the index lost from the skip."""
    import torch

    import mipadapter.training.samples as samples

    records, _ = build_index(*authors_candidates(authors_data, None), RULES)
    settings = SampleSettings(resolution=64, reference_size=32, flip_prob=0.5)
    first, again = (safe_build_sample(records[0], 3, 11, settings) for _ in range(2))
    others = [safe_build_sample(records[0], 3, seed, settings) for seed in range(12, 20)]
    assert torch.equal(first.references, again.references) and first.caption == again.caption
    assert any(not torch.equal(first.references, other.references) for other in others)
    monkeypatch.setattr(samples, "segment_square", lambda *a: 1 / 0)
    skipped = safe_build_sample(records[0], 7, 1, SETTINGS)
    assert isinstance(skipped, SkippedSample) and (skipped.index, skipped.reason) == (7, "unexpected_error")


def test_the_per_sample_seed_is_pinned_and_distinct():
    """The per-sample seed is part of a run's reproducibility (a resumed or repeated run must draw the
    same samples): pinned to its formula, an integer, distinct over run seeds, epochs and indices.
    Guards any change to the formula."""
    from mipadapter.training.samples import sample_seed

    assert sample_seed(0, 0, 0) == 0
    assert sample_seed(2, 3, 5) == (2 * 1_000_003 + 3) * 10_000_019 + 5
    seeds = [sample_seed(s, e, i) for s in (0, 1, 7) for e in range(4) for i in range(50)]
    assert all(isinstance(seed, int) for seed in seeds) and len(set(seeds)) == len(seeds)


def test_a_changed_or_undecodable_image_is_skipped_with_a_line_naming_it(authors_data):
    """Guards _load_rgb's two refusals after the header check, word for word: an image whose size is not
    the one indexed (both sizes, width first), and a JPEG whose header reads but whose data is cut
    short (the decoder's reason, naming it as a training image)."""
    import io
    from pathlib import Path

    records, _ = build_index(*authors_candidates(authors_data, None), RULES)
    changed, cut = Path(records[0].image), Path(records[1].image)
    Image.open(changed).resize((WIDTH * 2, HEIGHT + 3)).save(changed)
    skipped = safe_build_sample(records[0], 0, 1, SETTINGS)
    assert (skipped.reason, skipped.message) == (
        "changed_since_index", f"{changed} is {WIDTH * 2}×{HEIGHT + 3} but was indexed as {WIDTH}×{HEIGHT}"
    )
    noise = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    cut.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 6 // 10])
    skipped = safe_build_sample(records[1], 1, 1, SETTINGS)
    assert skipped.reason == "unreadable_image", skipped
    assert skipped.message.startswith(
        f"{cut}: not a readable image (training image {str(cut)!r} cannot be decoded: image file is truncated"
    ), skipped.message
    Path(records[2].image).unlink()  # missing: named by the record's id
    skipped = safe_build_sample(records[2], 2, 1, SETTINGS)
    assert skipped.message == f"{records[2].id}: image {records[2].image} does not exist"
