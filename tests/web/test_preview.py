"""The canvas preview: each subject's box or painted region drawn in its colour where the output puts it."""

from __future__ import annotations

import numpy as np
import pytest

from mipadapter.web.handler import Limits, SubjectForm, slot_color
from mipadapter.web.preview import (
    BACKGROUND,
    FILL_ALPHA,
    NO_REGIONS,
    OUTLINE,
    PAINT_ALPHA,
    PREVIEW_SIDE,
    canvas_size,
    preview_size,
    region_preview,
)

LABEL_ROWS = 16  # the slot number is written in the box's top-left corner


def tinted(alpha: float, color) -> np.ndarray:
    """A background pixel with ``color`` blended in at ``alpha`` (the reference the preview must match)."""
    return np.rint(np.array(BACKGROUND) * (1 - alpha) + np.array(color) * alpha).astype(int)


@pytest.mark.parametrize(("width", "height"), [(64, 64), (96, 64), (1024, 1536), (832, 1216)])
def test_canvas_keeps_the_outputs_aspect_ratio(width, height):
    drawn = region_preview([], width, height)
    assert drawn.image.size == canvas_size(width, height)
    assert max(drawn.image.size) == PREVIEW_SIDE
    assert abs(drawn.image.width / drawn.image.height - width / height) < 0.01
    assert np.all(np.asarray(drawn.image) == BACKGROUND)
    assert drawn.summary == NO_REGIONS


@pytest.mark.parametrize("seed", range(4))
def test_boxes_are_outlined_and_tinted_in_their_slots_colour_and_nothing_else_changes(seed):
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.choice([512, 768, 1024, 1536], size=2))
    forms, boxes = [], []
    for slot in range(int(rng.integers(1, 4))):  # unnamed: the label is the slot number only
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = (
            int(rng.integers(x0 + width // 4, width + 1)),
            int(rng.integers(y0 + height // 4, height + 1)),
        )
        forms.append(SubjectForm(box=[x0, y0, x1, y1]))
        boxes.append((slot, (x0, y0, x1, y1)))
    drawn = np.asarray(region_preview(forms, width, height).image).astype(int)
    scale = drawn.shape[1] / width
    covered = np.zeros(drawn.shape[:2], dtype=bool)
    for _, (x0, y0, x1, y1) in boxes:
        covered[round(y0 * scale) : round(y1 * scale), round(x0 * scale) : round(x1 * scale)] = True
    assert np.all(drawn[~covered] == BACKGROUND)  # outside every box: untouched
    slot, (x0, y0, x1, y1) = boxes[-1]  # the last is drawn on top of the others
    color = slot_color(slot)
    left, top, right, bottom = (round(v * scale) for v in (x0, y0, x1, y1))
    assert np.all(drawn[top, left + LABEL_ROWS : right] == color)  # the outline's top edge
    assert np.all(drawn[top + LABEL_ROWS : bottom, right - 1] == color)  # its right edge
    inside = drawn[top + LABEL_ROWS : bottom - OUTLINE, left + OUTLINE : right - OUTLINE]
    if len(boxes) == 1:
        assert np.all(inside == tinted(FILL_ALPHA, color))


def test_a_painted_region_is_tinted_where_painted_stretched_to_the_canvas():
    layer = np.zeros((40, 40, 4), dtype=np.uint8)
    layer[:, 20:, 3] = 255  # right half painted
    forms = [SubjectForm("cat"), SubjectForm("", painted={"layers": [layer]})]
    drawn = region_preview(forms, 96, 64)
    pixels = np.asarray(drawn.image).astype(int)
    width, height = canvas_size(96, 64)
    edge = 4  # the mask is stretched 6.4× with bilinear interpolation: a soft edge of a few pixels
    assert np.all(pixels[:, : width // 2 - edge] == BACKGROUND)
    assert np.all(pixels[LABEL_ROWS:, width // 2 + edge :] == tinted(PAINT_ALPHA, slot_color(1)))
    assert drawn.summary.splitlines() == [
        "**1** 'cat': anywhere its name is relevant (no region)  ",
        "**2**: painted region (50% of the canvas)",
    ]


def test_boxes_reaching_past_the_canvas_are_clipped():
    drawn = region_preview([SubjectForm("dog", box=[-50, -50, 2000, 40])], 64, 64)
    pixels = np.asarray(drawn.image).astype(int)
    assert pixels.shape == (256, 256, 3)
    assert np.all(pixels[200:] == BACKGROUND) and np.all(
        pixels[LABEL_ROWS:150, 100] == tinted(FILL_ALPHA, slot_color(0))
    )
    assert "**1** 'dog': box (-50, -50, 2000, 40)" in drawn.summary


@pytest.mark.parametrize(
    ("box", "reason"),
    [
        ([0, None, 10, 10], "fill in all four box fields"),
        ([10, 0, 5, 10], "x0 < x1 and y0 < y1 are needed"),
        (["a", 0, 5, 10], "must be numbers"),
        ([70, 0, 90, 10], "(70, 0, 90, 10) lies outside the canvas"),
    ],
)
def test_unfinished_boxes_are_not_drawn_and_the_summary_says_why(box, reason):
    drawn = region_preview([SubjectForm("dog", box=box)], 64, 64)
    assert np.all(np.asarray(drawn.image) == BACKGROUND)
    assert drawn.summary.startswith("**1** 'dog': box not drawn (") and reason in drawn.summary


def test_the_preview_draws_only_sizes_that_would_run():
    limits = Limits(min_side=32, max_side=96, side_multiple=16)
    assert preview_size(96, 32, 64, limits) == ((96, 32), None)
    size, refused = preview_size(5000, 32, 64, limits)  # typed past the slider: said, not an HTTP error
    assert size == (64, 64)
    assert refused == (
        "The width must be a multiple of 16 between 32 and 96 pixels, got 5000: nothing is generated at that size."
    )
    assert preview_size(64, None, 64, limits)[1].startswith("The height must be a multiple of 16")
    small = Limits(min_side=32, max_side=96, side_multiple=16, max_output_pixels=64 * 64)
    assert preview_size(96, 96, 64, small)[1].startswith("the output size 96×96 is")
