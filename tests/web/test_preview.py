"""The canvas preview: each subject's box or painted region drawn in its colour where the output puts it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mipadapter.web.handler import Limits, SubjectForm, painted_mask, slot_color
from mipadapter.web.preview import (
    BACKGROUND,
    FILL_ALPHA,
    NO_REGIONS,
    OUTLINE,
    PAINT_ALPHA,
    PREVIEW_SIDE,
    canvas_size,
    paint_canvas,
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



def layer_png(layer) -> bytes:
    """A layer as the page's editor sends it: PNG bytes."""
    import io

    buffer = io.BytesIO()
    layer.save(buffer, format="PNG")
    return buffer.getvalue()


def painted_on_page(value) -> dict:
    """``paint_canvas``'s value as it comes back from the page: the layers as PNG bytes, no background."""
    return {"background": None, "layers": [layer_png(layer) for layer in value["layers"]], "composite": None}


@pytest.mark.parametrize(("width", "height"), [(96, 32), (32, 96), (64, 64), (1024, 1536)])
def test_the_paint_canvas_takes_the_outputs_aspect_ratio_and_starts_blank(width, height):
    value = paint_canvas(width, height)
    background = value["background"]
    assert background.size == canvas_size(width, height)
    assert max(background.size) == PREVIEW_SIDE
    # the output's aspect ratio, to the pixel (the shorter side rounded)
    scale = PREVIEW_SIDE / max(width, height)
    assert abs(background.width - width * scale) <= 0.5 and abs(background.height - height * scale) <= 0.5
    assert np.all(np.asarray(background) == BACKGROUND)  # the browser test finds the canvas by this grey
    (layer,) = value["layers"]  # one, transparent: the editor's first change (see paint_canvas)
    assert layer.size == background.size and layer.getextrema()[3] == (0, 0)
    assert value["composite"] is None
    assert painted_mask(painted_on_page(value)) is None  # a blank canvas is no region


def test_a_region_painted_on_the_left_third_of_a_3_to_1_canvas_lands_in_the_left_third_of_the_output():
    """Canvas → output: the handler stretches the painted mask onto the whole output (guards against a
    letterboxed or cropped mapping, or height and width swapped on the way)."""
    from mipadapter.pipeline import Subject
    from mipadapter.pipeline.subjects import region_mask
    from mipadapter.web.handler import mask_image

    width, height = 96, 32
    columns, rows = canvas_size(width, height)
    assert (columns, rows) == (256, 85)
    painted = np.zeros((rows, columns), dtype=np.float32)
    painted[:, : round(columns / 3)] = 1.0  # the canvas's left third
    value = paint_canvas(width, height, painted, slot_color(0))
    mask = painted_mask(painted_on_page(value))
    assert mask.shape == (rows, columns)
    photo = Image.new("RGB", (8, 8))
    subject = Subject("cat", [photo], region=mask_image(mask))
    on_output = region_mask(subject, (height, width), (height, width)).numpy()
    third = width // 3
    assert on_output[:, : third - 1].min() > 0.99  # the output's left third, all of it
    assert on_output[:, third + 1 :].max() == 0.0  # and nothing right of it
    latent = region_mask(subject, (height, width), (height // 8, width // 8)).numpy()
    assert latent[:, :4].min() > 0.95 and latent[:, 4:].max() == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_a_painted_region_is_rescaled_with_the_canvas_when_the_output_size_changes(seed):
    """Width or height changed after painting: the region keeps its place relative to the canvas."""
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(2, 25)) * 16, int(rng.integers(2, 25)) * 16) for _ in range(2)]
    (old_columns, old_rows), (new_columns, new_rows) = (canvas_size(*size) for size in sizes)
    x0, x1 = sorted(rng.uniform(0, 1, 2)) if seed else (0.25, 0.75)
    y0, y1 = sorted(rng.uniform(0, 1, 2)) if seed else (0.1, 0.6)
    painted = np.zeros((old_rows, old_columns), dtype=np.float32)
    painted[round(y0 * old_rows) : round(y1 * old_rows), round(x0 * old_columns) : round(x1 * old_columns)] = 1
    color = slot_color(seed)
    before = painted_mask(painted_on_page(paint_canvas(*sizes[0], painted, color)))
    value = paint_canvas(*sizes[1], before, color)
    assert value["background"].size == (new_columns, new_rows)
    (layer,) = value["layers"]
    assert layer.size == (new_columns, new_rows)
    after = painted_mask(painted_on_page(value))
    assert after.shape == (new_rows, new_columns)
    inside = np.asarray(layer)[after > 0.5]
    assert np.all(inside[:, :3] == color)  # painted in the slot's colour
    rows, columns = np.nonzero(after > 0.5)
    # edges where they were, to one pixel of either canvas (the painting was rounded to the old one's)
    across, down = 1 + new_columns / old_columns, 1 + new_rows / old_rows
    assert abs(columns.min() - x0 * new_columns) <= across and abs(columns.max() + 1 - x1 * new_columns) <= across
    assert abs(rows.min() - y0 * new_rows) <= down and abs(rows.max() + 1 - y1 * new_rows) <= down
    assert painted_mask(paint_canvas(*sizes[1])) is None  # without a mask: a blank canvas
