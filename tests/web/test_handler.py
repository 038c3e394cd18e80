"""The web handler as a plain function (no gradio, no server): the success path with tiny models, and
every problem a person can make shown as a message next to the subject (or request) that caused it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mipadapter.testing.mip import tiny_mip_pipeline
from mipadapter.web.handler import (
    GenerateRequest,
    Limits,
    SubjectForm,
    generate,
    painted_mask,
    parse_box,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CAT, BACKPACK = str(ASSETS / "cat.jpg"), str(ASSETS / "backpack.jpg")
PROMPT = "a cat wearing a backpack in Boston"


@pytest.fixture(scope="module")
def pipe():
    """One tiny pipeline for the module: the handler never changes it (tests only read its outputs)."""
    return tiny_mip_pipeline("sdxl", "basic", text_weight=True)


class Recording:
    """Stands in for the pipeline, forwarding to it and keeping the subjects of each call."""

    def __init__(self, pipe) -> None:
        self.inner, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, prompt, subjects, **kwargs):
        self.calls.append((prompt, list(subjects), kwargs))
        return self.inner(prompt, subjects, **kwargs)


def request(*subjects: SubjectForm, prompt: str = PROMPT, **kwargs) -> GenerateRequest:
    kwargs.setdefault("steps", 2)
    return GenerateRequest(prompt=prompt, subjects=list(subjects), **kwargs)


def two_subjects(**backpack) -> list[SubjectForm]:
    return [SubjectForm("cat", [CAT], strength=0.5), SubjectForm("backpack", [BACKPACK], **backpack)]


def test_success_gives_images_and_one_routing_map_per_subject(pipe):
    steps = []
    result = generate(pipe, request(*two_subjects(), seed=3), progress=lambda s, t: steps.append((s, t)))
    assert result.ok, result.status
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert [caption for _, caption in result.maps] == ["cat", "backpack"]
    assert all(overlay.size == (64, 64) for overlay, _ in result.maps)
    assert steps == [(1, 2), (2, 2)]
    assert result.status.startswith("Generated 1 image of 64×64 in 2 steps (seed 3")
    assert result.subject_errors == {} and result.error is None


def test_several_images_get_maps_for_each_image_and_the_seed_reproduces(pipe):
    first = generate(pipe, request(*two_subjects(), num_images=2, seed=7))
    second = generate(pipe, request(*two_subjects(), num_images=2, seed=7))
    assert len(first.images) == 2
    assert [c for _, c in first.maps] == [
        "cat (image 1)",
        "backpack (image 1)",
        "cat (image 2)",
        "backpack (image 2)",
    ]
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))


def test_blank_slots_are_ignored_and_strength_box_and_rule_reach_the_pipeline(pipe):
    recording = Recording(pipe)
    forms = [SubjectForm(), *two_subjects(box=[0, 0, 32, 64]), SubjectForm(box=[None, None, None, None])]
    result = generate(recording, request(*forms, rule="uniform"))
    assert result.ok, result.status
    ((_, subjects, kwargs),) = recording.calls
    assert [s.name for s in subjects] == ["cat", "backpack"]
    assert subjects[0].scale == 0.5 and subjects[0].region is None
    assert subjects[1].region == (0.0, 0.0, 32.0, 64.0)
    assert kwargs["rule"].value == "uniform" and kwargs["num_inference_steps"] == 2
    assert "'backpack' (box)" in result.status and "rule uniform" in result.status


def test_a_painted_region_becomes_the_subjects_mask(pipe):
    layer = np.zeros((40, 40, 4), dtype=np.uint8)
    layer[:, 20:, 3] = 255  # right half painted (alpha), any colour
    recording = Recording(pipe)
    editor_value = {"background": np.full((40, 40, 4), 255, np.uint8), "layers": [layer], "composite": None}
    result = generate(recording, request(*two_subjects(painted=editor_value)))
    assert result.ok, result.status
    region = recording.calls[0][1][1].region
    assert region.shape == (40, 40) and region[:, :20].max() == 0 and region[:, 20:].min() == 1
    assert "'backpack' (painted region)" in result.status


def test_painted_mask_reads_editor_values():
    assert painted_mask(None) is None
    assert painted_mask({"background": None, "layers": [], "composite": None}) is None
    assert painted_mask({"layers": [np.zeros((8, 8, 4), np.uint8)]}) is None  # untouched canvas
    grey = np.zeros((8, 8), np.uint8)
    grey[2:4, 2:4] = 255
    assert painted_mask(grey).sum() == 4


def test_parse_box():
    assert parse_box(None) is None and parse_box([None, "", None, None]) is None
    assert parse_box([0, 1, "2", 3.5]) == (0.0, 1.0, 2.0, 3.5)
    with pytest.raises(ValueError, match="all four box fields"):
        parse_box([0, None, 3, 4])


def unreadable(tmp_path) -> str:
    path = tmp_path / "holiday.jpg"
    path.write_text("not a picture")
    return str(path)


# (case, subjects, request options, limits, slot the message is shown at (None: the request), message)
ERRORS = [
    (
        "name missing from the prompt",
        lambda tmp: [SubjectForm("cat", [CAT]), SubjectForm("dog", [BACKPACK])],
        {},
        {},
        1,
        "subject 'dog' does not occur in the prompt",
    ),
    (
        "unreadable upload",
        lambda tmp: [SubjectForm("cat", [CAT]), SubjectForm("backpack", [unreadable(tmp)])],
        {},
        {},
        1,
        "holiday.jpg is not a readable image",
    ),
    (
        "too many subjects",
        lambda tmp: [*two_subjects(), SubjectForm("Boston", [CAT])],
        {},
        {"max_subjects": 2},
        None,
        "Too many subjects: 3 given, this server takes at most 2 (remove subject 3)",
    ),
    (
        "empty name",
        lambda tmp: [SubjectForm("cat", [CAT]), SubjectForm("  ", [BACKPACK])],
        {},
        {},
        1,
        "Give this subject a name",
    ),
    (
        "no photo",
        lambda tmp: [SubjectForm("cat", [CAT]), SubjectForm("backpack", [])],
        {},
        {},
        1,
        "Upload at least one photo of subject 'backpack'",
    ),
    (
        "upload too large",
        lambda tmp: [SubjectForm("cat", [CAT])],
        {},
        {"max_upload_bytes": 1000},
        0,
        "cat.jpg is 5.8 kB; the limit is 1.0 kB",
    ),
    (
        "photo with too many pixels",
        lambda tmp: [SubjectForm("cat", [CAT])],
        {},
        {"max_photo_pixels": 100},
        0,
        "cat.jpg is 128×128 pixels",
    ),
    (
        "too many photos",
        lambda tmp: [SubjectForm("cat", [CAT, CAT, CAT])],
        {},
        {"max_photos": 2},
        0,
        "Too many photos of subject 'cat': at most 2, got 3",
    ),
    (
        "the same name twice",
        lambda tmp: [SubjectForm("cat", [CAT]), SubjectForm("cat", [BACKPACK])],
        {},
        {},
        1,
        "Another subject is already called 'cat'",
    ),
    (
        "half a box",
        lambda tmp: two_subjects(box=[0, 0, None, 8]),
        {},
        {},
        1,
        "fill in all four box fields",
    ),
    (
        "box outside the image (the library's check)",
        lambda tmp: two_subjects(box=[0, 0, 500, 8]),
        {},
        {},
        1,
        "subject 'backpack': box (0.0, 0.0, 500.0, 8.0) must satisfy",
    ),
    (
        "box and painted region",
        lambda tmp: two_subjects(box=[0, 0, 8, 8], painted=np.ones((4, 4), np.float32)),
        {},
        {},
        1,
        "give a box or a painted region, not both",
    ),
    ("no prompt", lambda tmp: two_subjects(), {"prompt": "  "}, {}, None, "Write a prompt"),
    ("no subject", lambda tmp: [SubjectForm(), SubjectForm()], {}, {}, None, "Add at least one subject"),
    (
        "size off the grid",
        lambda tmp: two_subjects(),
        {"width": 72},
        {},
        None,
        "The width must be a multiple of 16 between 32 and 96 pixels, got 72",
    ),
    ("unknown rule", lambda tmp: two_subjects(), {"rule": "loud"}, {}, None, "unknown merge rule 'loud'"),
]


@pytest.mark.parametrize(
    ("subjects", "options", "limits", "slot", "message"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
def test_each_problem_is_shown_next_to_its_cause(pipe, tmp_path, subjects, options, limits, slot, message):
    recording = Recording(pipe)
    result = generate(recording, request(*subjects(tmp_path), **options), Limits.for_pipeline(pipe, **limits))
    assert not result.ok and result.images == [] and result.maps == []
    shown = result.error if slot is None else result.subject_errors.get(slot)
    assert shown is not None and message in shown, (result.error, result.subject_errors)
    assert result.status.startswith("Not generated.")
    if slot is not None:
        assert f"subject {slot + 1}" in result.status
    assert "Traceback" not in result.status


def test_every_problem_is_reported_at_once_and_nothing_runs(pipe):
    recording = Recording(pipe)
    forms = [SubjectForm("cat", []), SubjectForm("dog", [BACKPACK]), SubjectForm("", [CAT])]
    result = generate(recording, request(*forms, prompt="a cat in Boston"))
    assert recording.calls == []
    assert set(result.subject_errors) == {0, 1, 2}
    assert "does not occur" in result.subject_errors[1]
    assert result.status == "Not generated. See the messages at subject 1, 2, 3."


def test_limits_follow_the_model(pipe):
    limits = Limits.for_pipeline(pipe)
    assert (limits.min_side, limits.max_side, limits.side_multiple) == (32, 96, 16)
    assert Limits.for_pipeline(pipe, max_subjects=2).max_subjects == 2
