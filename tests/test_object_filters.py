"""The authors' object selection rules (shared by data construction and training)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mipadapter import object_filters as f
from mipadapter.manifest import ObjectRecord
from mipadapter.object_filters import (
    ObjectFilterConfig,
    box_overlap_of_smaller,
    name_in_caption,
    select_objects,
)


@dataclass(frozen=True)
class Obj:
    name: str
    box: tuple[float, float, float, float]
    score: float


SIZE = (100, 100)
CAPTION = "a cat and a dog next to a red car on the grass"


def test_keeps_the_best_objects_in_score_order():
    objects = [
        Obj("dog", (50, 10, 90, 50), 0.5),
        Obj("cat", (5, 5, 45, 45), 0.9),
        Obj("car", (10, 55, 50, 95), 0.7),
    ]
    kept, rejected = select_objects(objects, SIZE, CAPTION)
    assert [o.name for o in kept] == ["cat", "car"]  # max_objects=2, by score
    assert rejected == [(objects[0], f.TOO_MANY)]


@pytest.mark.parametrize(
    "obj,reason",
    [
        (Obj("cat", (0, 0, 20, 20), 0.9), f.AREA_TOO_SMALL),  # 4% of the image
        (Obj("cat", (0, 0, 90, 90), 0.9), f.AREA_TOO_LARGE),  # 81%
        (Obj("cat", (0, 0, 95, 30), 0.9), f.ASPECT_RATIO),  # w/h 3.2
        (Obj("cat", (0, 0, 15, 60), 0.9), f.ASPECT_RATIO),  # w/h 0.25
        (Obj("cat", (0, 0, 40, 40), 0.3), f.LOW_SCORE),  # the threshold itself fails: score > 0.3
        (Obj("cow", (0, 0, 40, 40), 0.9), f.NAME_NOT_IN_CAPTION),
        (Obj("gras", (0, 0, 40, 40), 0.9), f.NAME_NOT_IN_CAPTION),  # inside "grass" but not a word
        (Obj("red car", (0, 0, 40, 40), 0.9), f.MULTI_WORD_NAME),
        (Obj("  ", (0, 0, 40, 40), 0.9), f.EMPTY_NAME),
        (Obj("cat", (40, 40, 40, 60), 0.9), f.DEGENERATE_BOX),
    ],
)
def test_each_rule_rejects_with_its_reason(obj, reason):
    kept, rejected = select_objects([obj], SIZE, CAPTION)
    assert kept == [] and rejected == [(obj, reason)]


def test_nested_boxes_are_dropped_either_way():
    big, small = Obj("car", (10, 10, 65, 65), 0.8), Obj("cat", (20, 20, 50, 50), 0.9)
    kept, rejected = select_objects([big, small], SIZE, CAPTION)
    assert kept == [small] and rejected == [(big, f.NESTED)]  # the kept box lies inside the candidate
    side_by_side = Obj("car", (45, 20, 85, 60), 0.8)  # overlaps cat by less than 80% of the smaller box
    kept, _ = select_objects([side_by_side, small], SIZE, CAPTION)
    assert kept == [small, side_by_side]


def test_distinct_names_keep_the_best_of_each():
    objects = [Obj("cat", (5, 5, 45, 45), 0.6), Obj("cat", (50, 50, 95, 95), 0.8)]
    kept, rejected = select_objects(objects, SIZE, CAPTION)
    assert kept == [objects[1]] and rejected == [(objects[0], f.DUPLICATE_NAME)]
    kept, _ = select_objects(objects, SIZE, CAPTION, ObjectFilterConfig(distinct_names=False))
    assert kept == [objects[1], objects[0]]


def test_rules_switch_off_with_none():
    config = ObjectFilterConfig(
        min_area_frac=None,
        max_area_frac=None,
        min_aspect_ratio=None,
        max_aspect_ratio=None,
        min_score=None,
        name_in_caption=False,
        single_word_names=False,
        nested_overlap=None,
        max_objects=None,
    )
    objects = [Obj("tiny thing", (0, 0, 2, 1), 0.0), Obj("huge", (0, 0, 100, 100), 0.1)]
    kept, rejected = select_objects(objects, SIZE, "", config)
    assert kept == [objects[1], objects[0]] and rejected == []


def test_works_on_manifest_records():
    record = ObjectRecord(name="dog", box=(50, 10, 90, 50), score=0.5)
    assert select_objects([record], SIZE, CAPTION)[0] == [record]


def test_name_in_caption_is_word_bounded_and_case_blind():
    assert name_in_caption("Cat", "A CAT.")
    assert name_in_caption("teddy  bear", "a teddy bear")
    assert not name_in_caption("cat", "a category")
    assert not name_in_caption("", "anything")


def test_overlap_of_smaller():
    assert box_overlap_of_smaller((0, 0, 10, 10), (2, 2, 4, 4)) == 1.0
    assert box_overlap_of_smaller((0, 0, 10, 10), (5, 0, 15, 10)) == 0.5
    assert box_overlap_of_smaller((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


@pytest.mark.parametrize(
    "kwargs", [{"min_area_frac": 1.5}, {"max_aspect_ratio": 0}, {"max_objects": 0}, {"nested_overlap": -0.1}]
)
def test_bad_config_names_the_field(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ObjectFilterConfig(**kwargs)


def test_bad_image_size():
    with pytest.raises(ValueError, match=r"\(0, 10\)"):
        select_objects([], (0, 10), "")


def test_caption_match_substring_is_the_authors_test():
    """The authors test ``caption.find(label) != -1``: case-sensitive, and a part of a word counts."""
    objects = [Obj("cat", (5, 5, 45, 45), 0.9), Obj("Dog", (50, 10, 90, 50), 0.8)]
    caption = "a category of dogs"
    word = ObjectFilterConfig(max_objects=None)
    substring = ObjectFilterConfig(max_objects=None, caption_match="substring")
    assert select_objects(objects, SIZE, caption, word)[0] == []
    kept, rejected = select_objects(objects, SIZE, caption, substring)
    assert [o.name for o in kept] == ["cat"] and rejected == [(objects[1], f.NAME_NOT_IN_CAPTION)]
    with pytest.raises(ValueError, match="caption_match must be one of"):
        ObjectFilterConfig(caption_match="regex")


def test_accept_runs_before_the_nesting_rule():
    """A refused object does not block a nested one (the authors check is_valid_bbox first)."""
    outer = Obj("cat", (5, 5, 60, 60), 0.9)
    inner = Obj("dog", (10, 10, 50, 50), 0.8)
    kept, rejected = select_objects(
        [outer, inner], SIZE, CAPTION, accept=lambda o: "bad" if o is outer else None
    )
    assert kept == [inner] and rejected == [(outer, "bad")]
    kept, rejected = select_objects([outer, inner], SIZE, CAPTION)
    assert kept == [outer] and rejected == [(inner, f.NESTED)]


@pytest.mark.parametrize(("width", "height"), [(80, 64), (1500, 2250)])
def test_box_inside_image_allows_a_detectors_overshoot_only(width, height):
    from mipadapter.object_filters import BOX_SLACK, box_inside_image

    dx, dy = BOX_SLACK * width, BOX_SLACK * height
    assert box_inside_image((0, 0, width, height), width, height)
    assert box_inside_image((-dx, -dy, width + dx, height + dy), width, height)  # at the slack: kept
    for box in [
        (-dx - 1, 0, 10, 10),
        (0, -dy - 1, 10, 10),
        (0, 0, width + dx + 1, 10),
        (0, 0, 10, height + dy + 1),
        (0, 0, 5000, 5000),
        (width * 2, height * 2, width * 3, height * 3),  # wholly outside
        (float("nan"), 0, 10, 10),
    ]:
        assert not box_inside_image(box, width, height), box
