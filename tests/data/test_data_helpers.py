"""Phrases, label maps, crops, rankings and the histogram figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mipadapter.data.masks import (
    dominant_label,
    encode_png,
    object_crop,
    paint_label_map,
    read_label_map,
    visible_masks,
)
from mipadapter.data.phrases import caption_nouns, grounding_text
from mipadapter.data.ranking import draw_histograms, histogram, rank, summary
from mipadapter.manifest import ImageRecord


@pytest.mark.parametrize(
    "caption,nouns",
    [
        ("a cat sitting on a couch next to a red jacket", ["cat", "couch", "jacket"]),
        ("A man riding a bike in front of a building", ["man", "bike", "building"]),
        ("two dogs and a dog on the bed", ["dogs", "dog", "bed"]),
        ("", []),
    ],
)
def test_caption_nouns(caption, nouns):
    assert caption_nouns(caption) == nouns


def test_grounding_text():
    assert grounding_text(["Cat", " couch. ", ""]) == "cat. couch."


def test_label_map_paints_small_objects_on_top():
    masks = torch.zeros(2, 6, 6, dtype=torch.bool)
    masks[0, :, :] = True  # large, first
    masks[1, 1:3, 1:3] = True  # small, inside
    label_map = paint_label_map(masks)
    assert label_map.dtype == torch.uint8 and int(label_map[1, 1]) == 2 and int(label_map[5, 5]) == 1
    regions = visible_masks(label_map, [1, 2])
    assert regions.shape == (2, 6, 6) and int(regions[0].sum()) == 32 and int(regions[1].sum()) == 4
    assert visible_masks(label_map, []).shape == (0, 6, 6)


def test_label_map_png_round_trip_and_dominant_label(tmp_path):
    label_map = np.zeros((8, 10), np.uint8)
    label_map[2:6, 3:9] = 7
    label_map[2:3, 3:5] = 4
    (tmp_path / "m.png").write_bytes(encode_png(label_map))
    read = read_label_map(str(tmp_path / "m.png"))
    np.testing.assert_array_equal(read, label_map)
    assert dominant_label(read, (3, 2, 9, 6)) == 7
    assert dominant_label(read, (0, 0, 2, 2)) is None


def test_object_crop_is_the_segment_on_white_padded_square():
    image = Image.fromarray(np.full((10, 20, 3), 50, np.uint8))
    mask = torch.zeros(10, 20, dtype=torch.bool)
    mask[2:6, 4:8] = True
    crop = np.asarray(object_crop(image, (2.0, 2.0, 10.0, 6.0), mask))
    assert crop.shape == (8, 8, 3)  # the 8x4 box, padded to a square
    assert (crop[2:6, 2:6] == 50).all()  # the segment keeps its pixels
    assert (crop[0:2] == 255).all() and (
        crop[2:6, 0:2] == 255
    ).all()  # padding and outside the segment: white
    box_only = np.asarray(object_crop(image, (2.0, 2.0, 10.0, 6.0), None))
    assert (box_only[2:6] == 50).all()
    with pytest.raises(ValueError, match="is empty"):
        object_crop(image, (5.0, 5.0, 5.0, 9.0), None)
    with pytest.raises(ValueError, match="does not match image size"):
        object_crop(image, (0.0, 0.0, 4.0, 4.0), torch.zeros(4, 4, dtype=torch.bool))


def record(i: str, **scores):
    return ImageRecord(id=i, image=f"{i}.png", width=1, height=1, caption="", scores=scores)


def test_rankings_break_ties_by_id():
    records = [
        record("b", s_quality=1.0, s_pair=-0.5),
        record("a", s_quality=1.0, s_pair=-0.1),
        record("c", s_quality=2.0),
        record("d", s_quality=0.5, s_pair=-0.9),
    ]
    assert [r.id for r in rank(records, "s_quality")] == ["c", "a", "b", "d"]
    assert [r.id for r in rank(records, "s_pair_high", k=2)] == ["a", "b"]
    assert [r.id for r in rank(records, "s_pair_low")] == ["d", "b", "a"]  # "c" has no S_pair
    with pytest.raises(ValueError, match="ranking must be one of"):
        rank(records, "s_single")


def test_summary_and_histogram(tmp_path):
    records = [record(str(i), s_single=i / 10, s_quality=i / 10) for i in range(11)]
    stats = summary(records)
    assert stats["s_single"]["count"] == 11 and stats["s_single"]["p50"] == pytest.approx(0.5)
    assert stats["s_single"]["mean"] == pytest.approx(0.5) and "s_pair" not in stats
    counts, low, high = histogram([r.scores["s_single"] for r in records], 5)
    assert sum(counts) == 11 and (low, high) == (0.0, 1.0)
    assert draw_histograms(records, str(tmp_path / "h.png"), bins=5, threshold=0.8)
    assert Image.open(tmp_path / "h.png").size == (840, 260)  # two panels: s_single, s_quality
    assert not draw_histograms([record("x")], str(tmp_path / "none.png"))
