"""The web handler as a plain function (no gradio, no server): the success path with tiny models, and
every problem a person can make shown as a message next to the subject (or request) that caused it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mipadapter.figures import overlay_map
from mipadapter.photos import open_photo
from mipadapter.pipeline import Subject
from mipadapter.recipe import ModelRecord, file_sha256, read_recipe, recorded_region, upload_record
from mipadapter.testing.mip import tiny_mip_pipeline
from mipadapter.web.handler import (
    GenerateRequest,
    Limits,
    SlotRegion,
    SubjectForm,
    adapter_choices,
    default_guidance,
    generate,
    model_family,
    page_number,
    painted_digest,
    painted_mask,
    parse_box,
    read_photo,
    settle_region,
    slot_color,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CAT, BACKPACK = str(ASSETS / "cat.jpg"), str(ASSETS / "backpack.jpg")
PROMPT = "a cat wearing a backpack in Boston"


@pytest.fixture(scope="module")
def pipe():
    """One tiny pipeline for the module: the handler never changes it (tests only read its outputs)."""
    return tiny_mip_pipeline("sdxl", "basic", text_weight=True)


class Recording:
    """Stands in for the pipeline, forwarding to it and keeping the arguments and output of each call."""

    def __init__(self, pipe) -> None:
        self.inner, self.calls, self.outputs = pipe, [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, prompt, subjects, **kwargs):
        self.calls.append((prompt, list(subjects), kwargs))
        self.outputs.append(self.inner(prompt, subjects, **kwargs))
        return self.outputs[-1]


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
    region = np.asarray(recording.calls[0][1][1].region)  # an 8-bit mask: what the recipe stores
    assert region.shape == (40, 40) and region[:, :20].max() == 0 and region[:, 20:].min() == 255
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
    assert parse_box([" ", "", "  ", ""]) is None  # the page's text fields: blank is blank
    assert parse_box([" 8", "0 ", "16", "32"]) == (8.0, 0.0, 16.0, 32.0)
    with pytest.raises(ValueError, match="must be numbers"):
        parse_box(["8", "0", "sixteen", "32"])


def painting(shape: tuple[int, int], seed: int) -> dict:
    """An editor value with one random stroke-like layer of ``shape`` (RGBA, alpha painted)."""
    alpha = (np.random.default_rng(seed).random(shape) > 0.6).astype(np.uint8) * 255
    return {"layers": [np.dstack([np.zeros((*shape, 3), np.uint8), alpha])]}


@pytest.mark.parametrize("shape", [(8, 8), (6, 10)])
def test_a_subject_keeps_one_region_the_one_changed_last(shape):
    stroke, other = painting(shape, 1), painting(shape, 2)
    box, half_typed = ("0", "0", "32", "32"), ("4", "", "", "")
    painted = SlotRegion(name="cat", painted=stroke, digest=painted_digest(stroke))

    typed, cleared = settle_region(painted, box=half_typed)  # typing clears the painting, which is kept aside
    assert cleared == "painted"
    assert typed == SlotRegion(name="cat", box=half_typed, cleared=painted_digest(stroke))
    boxed = SlotRegion(name="cat", box=box)
    repainted, cleared = settle_region(boxed, painted=other)  # painting clears a box
    assert cleared == "box"
    assert repainted == SlotRegion(name="cat", painted=other, digest=painted_digest(other))

    # an event carrying what is kept changes nothing, whatever it was fired by: both fields and the name
    # come back as the page holds them
    assert settle_region(repainted, name="cat", box=["", "", "", ""]) == (repainted, None)
    assert settle_region(typed, name="cat", box=list(half_typed)) == (typed, None)
    both = SlotRegion(name="cat", box=box, painted=stroke, digest=painted_digest(stroke))  # as a refresh may keep
    assert settle_region(both, box=box, painted=stroke) == (both, None)

    # the cleared painting arriving late (uploaded before it was cleared) is dropped, the box stays; any
    # other painting is a new one and clears the box
    late, cleared = settle_region(typed, painted={"layers": [stroke["layers"][0].copy()]})
    assert (late, cleared) == (typed, None)
    assert settle_region(typed, painted=other)[1] == "box"

    # blank fields are no box; a blank or unreadable painting is no painting (the preview says why)
    for blank in (["", " ", None, ""], None):
        assert settle_region(painted, box=blank)[1] is None
    untouched = {"layers": [np.zeros((*shape, 4), np.uint8)]}
    assert settle_region(boxed, painted=untouched) == (replace(boxed, painted=untouched), None)
    big = {"layers": [np.full((40, 40), 255, np.uint8)]}  # painted, but past this server's pixel limit
    unreadable, cleared = settle_region(boxed, painted=big, max_painted_pixels=1000)
    assert cleared is None and unreadable.painted is big and unreadable.box == box
    assert settle_region(boxed, painted=big, max_painted_pixels=1600)[1] == "box"  # at the limit: read
    assert settle_region(boxed, name=None) == (replace(boxed, name=""), None)  # a field Gradio sent as None


def test_a_paintings_digest_tells_paintings_apart_and_not_their_encodings():
    stroke = painting((8, 8), 1)
    assert painted_digest(stroke) == painted_digest({"layers": [stroke["layers"][0][..., 3]]})  # alpha alone
    assert painted_digest(stroke) != painted_digest(painting((8, 8), 2))
    flat = np.full((8, 8), 255, np.uint8)
    assert painted_digest({"layers": [flat]}) != painted_digest({"layers": [np.full((4, 16), 255, np.uint8)]})
    assert painted_digest(None) is painted_digest({"layers": [np.zeros((8, 8), np.uint8)]}) is None
    assert painted_digest({"layers": [flat]}, max_painted_pixels=63) is None  # unreadable here
    assert painted_digest({"layers": [flat]}, max_painted_pixels=64) == painted_digest({"layers": [flat]})


def test_page_numbers_are_made_exact_for_the_checks():
    assert page_number(64.0) == 64 and type(page_number(64.0)) is int
    assert page_number(1e20) == 10**20  # a 20-digit seed reaches the check whole, and is refused
    assert page_number(4.5) == 4.5 and page_number(None) is None and page_number(-5) == -5
    assert page_number(float("nan")) != page_number(float("nan"))  # NaN passes on, to be refused


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
        (
            "subject 'dog' does not occur in the prompt 'a cat wearing a backpack in Boston': write the name as it"
            " appears in the prompt (the match is on whole tokens, so 'cat' does not match 'cats') (text encoder 1)."
        ),
    ),
    (
        "unreadable upload",
        lambda tmp: [SubjectForm("cat", [CAT]), SubjectForm("backpack", [unreadable(tmp)])],
        {},
        {},
        1,
        "Photo of subject 'backpack': holiday.jpg is not a readable image (JPEG, PNG, WebP …).",
    ),
    (
        "too many subjects",
        lambda tmp: [*two_subjects(), SubjectForm("Boston", [CAT])],
        {},
        {"max_subjects": 2},
        None,
        "Too many subjects: 3 given, this server takes at most 2 (remove subject 3).",
    ),
    (
        "empty name",
        lambda tmp: [SubjectForm("cat", [CAT]), SubjectForm("  ", [BACKPACK])],
        {},
        {},
        1,
        "Give this subject a name: the words the prompt uses for it (e.g. 'cat').",
    ),
    (
        "no photo",
        lambda tmp: [SubjectForm("cat", [CAT]), SubjectForm("backpack", [])],
        {},
        {},
        1,
        "Upload at least one photo of subject 'backpack'.",
    ),
    (
        "upload too large",
        lambda tmp: [SubjectForm("cat", [CAT])],
        {},
        {"max_upload_bytes": 1000},
        0,
        "Photo of subject 'cat': cat.jpg is 5.8 kB; the limit is 1.0 kB.",
    ),
    (
        "photo with too many pixels",
        lambda tmp: [SubjectForm("cat", [CAT])],
        {},
        {"max_photo_pixels": 100},
        0,
        "Photo of subject 'cat': cat.jpg is 128×128 pixels; the limit is 0.0001 megapixels.",
    ),
    (
        "too many photos",
        lambda tmp: [SubjectForm("cat", [CAT, CAT, CAT])],
        {},
        {"max_photos": 2},
        0,
        "Too many photos of subject 'cat': at most 2, got 3.",
    ),
    (
        "the same name twice",
        lambda tmp: [SubjectForm("cat", [CAT]), SubjectForm("cat", [BACKPACK])],
        {},
        {},
        1,
        "Another subject is already called 'cat': give each its own name.",
    ),
    (
        "half a box",
        lambda tmp: two_subjects(box=[0, 0, None, 8]),
        {},
        {},
        1,
        "Region of subject 'backpack': fill in all four box fields x0, y0, x1, y1 (or leave all four blank).",
    ),
    (
        "box outside the image (the library's check)",
        lambda tmp: two_subjects(box=[0, 0, 500, 8]),
        {},
        {},
        1,
        "subject 'backpack': box (0.0, 0.0, 500.0, 8.0) must satisfy 0 ≤ x0 < x1 ≤ 64 and 0 ≤ y0 < y1 ≤ 64.",
    ),
    (
        "box and painted region",
        lambda tmp: two_subjects(box=[0, 0, 8, 8], painted=np.ones((4, 4), np.float32)),
        {},
        {},
        1,
        "Region of subject 'backpack': give a box or a painted region, not both.",
    ),
    ("no prompt", lambda tmp: two_subjects(), {"prompt": "  "}, {}, None, "Write a prompt that names each subject."),
    ("a prompt field sent as None", lambda tmp: two_subjects(), {"prompt": None}, {}, None,
     "Write a prompt that names each subject."),
    # issue 20: numbers typed into the page's fields, refused with the CLI's messages before the model runs
    (
        "width typed past the slider",
        lambda tmp: two_subjects(),
        {"width": 5000},
        {},
        None,
        "The width must be a multiple of 16 between 32 and 96 pixels, got 5000.",
    ),
    (
        "a 20-digit seed",
        lambda tmp: two_subjects(),
        {"seed": 10**20},
        {},
        None,
        f"The seed must be an integer between 0 and {2**64 - 1}, got {10**20}.",
    ),
    ("a blank step count", lambda tmp: two_subjects(), {"steps": None}, {}, None,
     "Steps must be an integer between 1 and 100, got None."),
    (
        "a fractional image count",
        lambda tmp: two_subjects(),
        {"num_images": 1.5},
        {},
        None,
        "Images must be an integer between 1 and 4, got 1.5.",
    ),
    ("no subject", lambda tmp: [SubjectForm(), SubjectForm()], {}, {}, None,
     "Add at least one subject: a name and one or more photos."),
    (
        "size off the grid",
        lambda tmp: two_subjects(),
        {"width": 72},
        {},
        None,
        "The width must be a multiple of 16 between 32 and 96 pixels, got 72.",
    ),
    ("height off the grid", lambda tmp: two_subjects(), {"height": 40}, {}, None,
     "The height must be a multiple of 16 between 32 and 96 pixels, got 40."),
    ("both sides off the grid", lambda tmp: two_subjects(), {"width": 20, "height": 100}, {}, None,
     "The width must be a multiple of 16 between 32 and 96 pixels, got 20. "
     "The height must be a multiple of 16 between 32 and 96 pixels, got 100."),
    # two whole sides, each within the server's limit, whose product is not (its own limit)
    ("too many output pixels", lambda tmp: two_subjects(), {"width": 96, "height": 80}, {"max_output_pixels": 6000},
     None, "the output size 96×80 is 0.0 MP, above the limit of 0.0 MP."),
    ("unknown rule", lambda tmp: two_subjects(), {"rule": "loud"}, {}, None,
     "unknown merge rule 'loud'; choose one of uniform, paper, official."),
    (
        "guidance out of range",
        lambda tmp: two_subjects(),
        {"guidance": -1.0},
        {},
        None,
        "Guidance must be a finite number between 0 and 30, got -1.0.",
    ),
    # issue 18: the numbers go through mipadapter.limits, the checks (and messages) generate uses
    (
        "guidance that overflows",
        lambda tmp: two_subjects(),
        {"guidance": 1e308},
        {},
        None,
        "Guidance must be a finite number between 0 and 30, got 1e+308.",
    ),
    ("too many steps", lambda tmp: two_subjects(), {"steps": 10**9}, {}, None,
     "Steps must be an integer between 1 and 100, got 1000000000."),
    ("too many images", lambda tmp: two_subjects(), {"num_images": 5}, {}, None,
     "Images must be an integer between 1 and 4, got 5."),
    ("a negative seed", lambda tmp: two_subjects(), {"seed": -1}, {}, None,
     f"The seed must be an integer between 0 and {2**64 - 1}, got -1."),
    ("a seed above 2**64-1", lambda tmp: two_subjects(), {"seed": 2**64}, {}, None,
     f"The seed must be an integer between 0 and {2**64 - 1}, got {2**64}."),
    ("a strength that overflows", lambda tmp: two_subjects(strength=1e39), {}, {}, 1,
     "The strength of subject 'backpack' must be a finite number between 0 and 1.5, got 1e+39."),
    ("a NaN strength", lambda tmp: two_subjects(strength=float("nan")), {}, {}, 1,
     "The strength of subject 'backpack' must be a finite number between 0 and 1.5, got nan."),
    (
        "unknown region mode",
        lambda tmp: two_subjects(),
        {"region_mode": "swap"},
        {},
        None,
        "The region mode must be one of 'replace', 'multiply', got 'swap'.",
    ),
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
    assert shown == message, (result.error, result.subject_errors)  # the whole line, word for word
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


TINY_MODELS = ModelRecord("tiny-sdxl (random)", "tiny-mip (random)", "tiny", tiny="sdxl")


def right_half_painted(side: int = 40) -> dict:
    layer = np.zeros((side, side, 4), dtype=np.uint8)
    layer[:, side // 2 :, 3] = 255
    return {"background": None, "layers": [layer], "composite": None}


def test_advanced_settings_and_modes_reach_the_pipeline(pipe):
    recording = Recording(pipe)
    options = {"negative_prompt": "blurry", "guidance": 3.5, "region_mode": "multiply", "multi_image": "each"}
    result = generate(recording, request(*two_subjects(box=[0, 0, 32, 64]), **options))
    assert result.ok, result.status
    ((_, subjects, kwargs),) = recording.calls
    assert kwargs["negative_prompt"] == "blurry" and kwargs["guidance_scale"] == 3.5
    assert kwargs["multi_image"].value == "each"
    assert [subject.region_mode.value for subject in subjects] == ["multiply", "multiply"]
    defaults = Recording(pipe)
    assert generate(defaults, request(*two_subjects())).ok
    assert defaults.calls[0][2]["negative_prompt"] is None and defaults.calls[0][2]["guidance_scale"] is None


def test_routing_maps_take_their_slots_colour(pipe):
    recording = Recording(pipe)  # slot 1 left blank: the subjects sit in slots 2 and 3
    result = generate(recording, request(SubjectForm(), *two_subjects()))
    assert result.ok, result.status
    output = recording.outputs[0]
    for (overlay, caption), slot in zip(result.maps, (1, 2), strict=True):
        expected = overlay_map(output.images[0], output.relevance[0][caption], slot_color(slot))
        assert np.array_equal(np.asarray(overlay), np.asarray(expected)), caption
    assert slot_color(1) != slot_color(0)


def test_written_images_carry_a_recipe_naming_every_subject(pipe, tmp_path):
    recording = Recording(pipe)
    forms = [
        SubjectForm("cat", [CAT, BACKPACK], strength=0.5, box=[0, 0, 32, 64]),
        SubjectForm("backpack", [BACKPACK], painted=right_half_painted()),
    ]
    options = {"seed": 11, "num_images": 2, "guidance": 4.0, "negative_prompt": "blurry"}
    result = generate(recording, request(*forms, **options), models=TINY_MODELS, output_dir=tmp_path)
    assert result.ok, result.status
    assert len(result.images) == 2 and all(Path(path).parent.parent == tmp_path for path in result.images)
    # one new run-* folder per generation; the files named by seed and image number, counted from 1
    (folder,) = {Path(path).parent for path in result.images}
    assert folder.name.startswith("run-") and list(tmp_path.iterdir()) == [folder]
    assert [Path(path).name for path in result.images] == ["mipadapter-seed11-1.png", "mipadapter-seed11-2.png"]
    for index, path in enumerate(result.images):
        recipe = read_recipe(path)
        assert (recipe["image_index"], recipe["num_images"], recipe["seed"]) == (index, 2, 11)
        assert (recipe["prompt"], recipe["steps"], recipe["guidance"]) == (PROMPT, 2, 4.0)
        assert recipe["negative_prompt"] == "blurry" and recipe["models"] == TINY_MODELS.to_dict()
        assert (recipe["height"], recipe["width"], recipe["region_mode"]) == (64, 64, "replace")
        cat, backpack = recipe["subjects"]
        assert (cat["name"], backpack["name"]) == ("cat", "backpack")
        # by file name and SHA-256: the server's upload folder is not shown to whoever gets the image
        assert cat["photos"] == [upload_record(CAT), upload_record(BACKPACK)]
        assert cat["photos"][0] == {"name": "cat.jpg", "sha256": file_sha256(CAT)}
        assert cat["scale"] == 0.5 and cat["region"] == [0, 0, 32, 64]
        assert backpack["scale"] == pipe.adapter.config.default_scale
        mask = np.asarray(recorded_region(backpack["region"]))
        assert mask.shape == (40, 40) and mask[:, :20].max() == 0 and mask[:, 20:].min() == 255
        with Image.open(path) as written:  # the file holds the image itself, losslessly
            generated = recording.outputs[0].images[index]
            assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(generated))
    assert result.recipe["subjects"] == recipe["subjects"]


def test_a_written_image_reruns_with_generate_from_png_to_the_same_pixels(pipe, tmp_path, capsys):
    from mipadapter.cli.main import main
    from mipadapter.cli.options import load_tiny

    _, record = load_tiny("sdxl")  # what `mipadapter web --tiny` records: the models of `pipe`
    forms = [
        SubjectForm("cat", [CAT], strength=0.5, box=[0, 0, 32, 64]),
        SubjectForm("backpack", [BACKPACK], painted=right_half_painted()),
    ]
    (tmp_path / "web").mkdir()
    result = generate(pipe, request(*forms, seed=5), models=record, output_dir=tmp_path / "web")
    assert result.ok, result.status
    (written,) = result.images
    again = tmp_path / "again.png"
    # the recipe names the uploaded photos, not where the server kept them: the rerun asks for them
    assert main(["generate", "--from-png", str(written), "-o", str(again)]) == 2
    sha = file_sha256(CAT)[:12]
    assert capsys.readouterr().err.strip().splitlines() == [
        f"mipadapter generate: error: recorded photo 1 'cat.jpg' of subject #1 'cat' (SHA-256 {sha}…) was uploaded "
        f"to the web page, so {str(written)!r} names it without a path: give the photos again, "
        "e.g. --subject cat=cat.jpg"
    ]
    assert not again.exists()
    rerun = ["generate", "--from-png", str(written), "--subject", f"cat={CAT}"]
    rerun += ["--subject", f"backpack={BACKPACK}"]
    assert main([*rerun, "-o", str(again)]) == 0
    with Image.open(written) as first, Image.open(again) as second:
        assert np.array_equal(np.asarray(first.convert("RGB")), np.asarray(second.convert("RGB")))
    recorded, rerun_subjects = read_recipe(written)["subjects"], read_recipe(again)["subjects"]
    for subject in (*recorded, *rerun_subjects):  # the CLI records paths, the web names: the rest is equal
        subject["photos"] = [photo["sha256"] for photo in subject["photos"]]
    assert rerun_subjects == recorded


def test_without_models_or_files_no_recipe_is_made(pipe, tmp_path):
    plain = generate(pipe, request(*two_subjects()), output_dir=tmp_path)
    assert plain.ok and plain.recipe is None and all(isinstance(i, Image.Image) for i in plain.images)
    with Image.open(CAT) as photo:  # a photo without a file cannot be recorded
        forms = [SubjectForm("cat", [photo.copy()]), SubjectForm("backpack", [BACKPACK])]
    unrecorded = generate(pipe, request(*forms), models=TINY_MODELS, output_dir=tmp_path)
    assert unrecorded.ok and unrecorded.recipe is None
    # a pipeline that reports no settings: a recipe would be a guess at what ran, so none is made
    unreported = generate(Bare(pipe), request(*two_subjects()), models=TINY_MODELS, output_dir=tmp_path)
    assert unreported.ok and unreported.recipe is None and len(unreported.images) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_starved_subject_is_warned_about_at_its_own_slot(pipe):
    """A box of one latent cell (8×8 pixels of 64×64) in replace mode leaves the subject almost no share."""
    forms = [SubjectForm(), SubjectForm("cat", [CAT]), SubjectForm("backpack", [BACKPACK], box=[0, 0, 8, 8])]
    result = generate(pipe, request(*forms, region_mode="replace"))
    assert result.ok and len(result.images) == 1, result.status
    assert set(result.subject_warnings) == {2}, result.subject_warnings
    assert "backpack" in result.subject_warnings[2]
    assert result.status.endswith("See the warning at subject 3.")


def test_photos_are_read_upright_and_whole_as_the_cli_reads_them(tmp_path):
    path = tmp_path / "portrait.jpg"
    pixels = np.random.default_rng(0).integers(0, 255, (900, 1300, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90° clockwise to view
    Image.fromarray(pixels).save(path, quality=90, exif=exif)
    photo = read_photo(str(path), Limits())
    assert photo.size == (900, 1300)  # upright and not shrunk
    assert np.array_equal(np.asarray(photo), np.asarray(open_photo(path)))


@pytest.mark.parametrize(
    ("class_name", "family"),
    [
        ("StableDiffusionXLPipeline", "SDXL"),
        ("StableDiffusionPipeline", "SD1.5"),
        ("FluxPipeline", "FLUX"),
        ("FluxImg2ImgPipeline", "FLUX"),
        ("StableDiffusion3Pipeline", "SD3"),
        ("KandinskyPipeline", "Kandinsky"),
    ],
)
def test_model_family_follows_the_wrapped_pipeline_class(class_name, family):
    inner = type(class_name, (), {})()
    assert model_family(SimpleNamespace(pipe=inner)) == family
    assert model_family(inner) == family


def test_model_family_and_default_guidance_of_the_tiny_pipelines(pipe, monkeypatch):
    sd15 = tiny_mip_pipeline("sd15", "basic", text_weight=False)
    assert (model_family(pipe), model_family(sd15)) == ("SDXL", "SD1.5")
    assert (default_guidance(pipe), default_guidance(sd15)) == (5.0, 7.5)  # diffusers' own defaults
    settings = pipe(PROMPT, [Subject("cat", [open_photo(CAT)])], num_inference_steps=1).settings
    assert settings["guidance_scale"] == default_guidance(pipe)  # what a call without one uses
    monkeypatch.setattr(pipe, "default_guidance_scale", 3.5, raising=False)
    assert default_guidance(pipe) == 3.5


def test_a_flux_pipeline_serves_the_page_as_sdxl_does():
    """The page needs nothing FLUX-specific: the handler runs the tiny FLUX, names it, and sizes it."""
    from mipadapter.web.handler import Limits, native_side, side_multiple

    flux = tiny_mip_pipeline("flux")
    assert model_family(flux) == "FLUX" and default_guidance(flux) == 3.5
    assert (native_side(flux), side_multiple(flux)) == (64, 16)
    result = generate(flux, request(*two_subjects(), prompt="a cat with a backpack", width=64, height=64),
                      limits=Limits.for_pipeline(flux))  # fmt: skip
    assert result.ok, result.status
    assert result.images[0].size == (64, 64) and len(result.maps) == 2


def test_flux_true_cfg_reaches_the_pipeline_and_its_recipe(tmp_path):
    """The page's true-CFG scale runs FLUX's second pass against the negative prompt (an empty one too, as
    diffusers' XLabs example), and is recorded; official is refused in one line; SDXL takes no true CFG."""
    from mipadapter.cli.options import TINY_ADAPTER

    flux = Recording(tiny_mip_pipeline("flux"))
    limits = Limits.for_pipeline(flux)
    forms = two_subjects()
    models = ModelRecord("tiny-flux (random)", TINY_ADAPTER, "tiny", tiny="flux")
    asked = request(*forms, prompt="a cat with a backpack", width=64, height=64, negative_prompt="",
                    true_cfg_scale=3.0)  # fmt: skip
    guided = generate(flux, asked, limits=limits, models=models)
    assert guided.ok, guided.status
    assert flux.calls[-1][2]["true_cfg_scale"] == 3.0 and flux.outputs[-1].settings["negative_prompt"] == ""
    assert guided.recipe["true_cfg_scale"] == 3.0 and guided.recipe["negative_image"] == "black"
    off = generate(flux, request(*forms, prompt="a cat with a backpack", width=64, height=64, negative_prompt=""),
                   limits=limits)  # fmt: skip
    assert "true_cfg_scale" not in flux.calls[-1][2] and flux.outputs[-1].settings["negative_prompt"] is None
    assert not np.array_equal(np.asarray(off.images[0]), np.asarray(guided.images[0]))
    bad = generate(flux, request(*forms, prompt="a cat with a backpack", true_cfg_scale=0.5), limits=limits)
    assert bad.error == "True CFG (1: off) must be a finite number between 1 and 30, got 0.5."
    official = generate(flux, request(*forms, prompt="a cat with a backpack", rule="official"), limits=limits)
    assert official.error.startswith("rule 'official' is not offered on FLUX")


def test_true_cfg_is_refused_on_sdxl(pipe):
    result = generate(pipe, request(*two_subjects(), true_cfg_scale=2.0))
    assert result.error == "True CFG is FLUX's classifier-free guidance; this model's is Guidance."
@pytest.mark.parametrize(
    ("option", "limit", "largest"),
    [("steps", "max_steps", 3), ("num_images", "max_images", 2), ("guidance", "max_guidance", 7.5)],
)
def test_the_largest_allowed_value_runs_and_one_more_is_refused(pipe, option, limit, largest):
    """Guards the upper bounds of the request against an off-by-one: the limit itself is accepted and
    generated, the limit + 1 refused with the range in the message, and nothing runs. Fails when
    ``steps <= max_steps`` (or the images' or guidance's bound) becomes ``<``."""
    limits = Limits.for_pipeline(pipe, **{limit: largest})
    recording = Recording(pipe)
    result = generate(recording, request(*two_subjects(), **{"steps": 1, option: largest}), limits)
    assert result.ok, result.status
    assert len(recording.calls) == 1
    refused = generate(recording, request(*two_subjects(), **{"steps": 1, option: largest + 1}), limits)
    assert not refused.ok and len(recording.calls) == 1
    lowest = 0 if option == "guidance" else 1
    assert refused.error.endswith(f"between {lowest} and {largest:g}, got {largest + 1}.")


@pytest.mark.parametrize(("option", "lowest"), [("steps", 1), ("num_images", 1), ("guidance", 0.0)])
def test_the_smallest_allowed_value_runs_and_one_less_is_refused(pipe, option, lowest):
    recording = Recording(pipe)
    result = generate(recording, request(*two_subjects(), **{"steps": 1, option: lowest}))
    assert result.ok, result.status
    refused = generate(recording, request(*two_subjects(), **{"steps": 1, option: lowest - 1}))
    assert not refused.ok and len(recording.calls) == 1
    assert refused.error.endswith(f"got {lowest - 1}.")


@pytest.mark.parametrize("strength", [0, 0.0, 1.5])
def test_a_strength_of_zero_or_more_is_accepted(pipe, strength):
    """Guards the documented strength range (≥ 0, zero included: the subject's photos then have no
    effect): fails when a strength of 0 is refused (``> 0`` instead of ``>= 0``)."""
    recording = Recording(pipe)
    result = generate(recording, request(*two_subjects(strength=strength), steps=1))
    assert result.ok, result.status
    assert recording.calls[0][1][1].scale == strength


@pytest.mark.parametrize("strength", [-0.1, float("nan"), float("inf"), 1.6])
def test_a_negative_non_finite_or_too_large_strength_is_refused(pipe, strength):
    recording = Recording(pipe)
    result = generate(recording, request(*two_subjects(strength=strength), steps=1))
    assert not result.ok and recording.calls == []
    assert result.subject_errors == {
        1: f"The strength of subject 'backpack' must be a finite number between 0 and 1.5, got {strength}."
    }


@pytest.fixture(scope="module")
def two_adapters():
    """A tiny pipeline holding two adapters, ``default`` and ``face`` (another adapter on the same
    encoder, as plus and plus-face are)."""
    from mipadapter.testing.mip import ARCHS, tiny_adapter

    mixed = tiny_mip_pipeline("sdxl", "basic", text_weight=True)
    face = tiny_adapter(mixed.pipe.unet, ARCHS["sdxl"][0].basic_image_encoder, "basic", True, seed=7)
    mixed.add_adapter("face", face)
    return mixed


def test_each_subjects_adapter_choice_reaches_its_subject_and_changes_the_image(two_adapters):
    assert adapter_choices(two_adapters) == ["default", "face"]
    recording = Recording(two_adapters)
    chosen = [SubjectForm("cat", [CAT], adapter="face"), SubjectForm("backpack", [BACKPACK], adapter="default")]
    result = generate(recording, request(*chosen, seed=5))
    assert result.ok, result.status
    (_, subjects, _), = recording.calls
    assert [subject.adapter for subject in subjects] == ["face", None]  # the default by None
    assert recording.outputs[0].settings["adapters"] == {"cat": "face", "backpack": "default"}
    assert "'cat' (adapter face), 'backpack' (adapter default)" in result.status
    # the choice acts: all on the default adapter gives another image (same seed)
    default = generate(two_adapters, request(*two_subjects(), seed=5))
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(default.images[0]))
    assert adapter_choices(tiny_mip_pipeline("sdxl", "basic")) == ["default"]


@pytest.mark.parametrize(
    ("which", "choices"), [("two_adapters", "'default', 'face'"), ("pipe", "'default'")]
)
def test_an_unknown_adapter_is_refused_at_its_subject_and_nothing_runs(request_fixture, which, choices):
    recording = Recording(request_fixture(which))
    asked = [SubjectForm("cat", [CAT]), SubjectForm("backpack", [BACKPACK], adapter="hands")]
    result = generate(recording, request(*asked))
    assert result.subject_errors == {
        1: f"The adapter of subject 'backpack': no adapter named 'hands'; this server has {choices}."
    }
    assert recording.calls == [] and result.images == []
    assert result.status == "Not generated. See the message at subject 2."


@pytest.fixture
def request_fixture(request):
    return request.getfixturevalue


def test_with_an_adapter_lacking_a_text_weight_the_page_leaves_the_rule_to_the_call():
    """Guards the page's rule choice with several adapters: it starts at BY_THE_ADAPTERS (no rule), so a
    subject put on an adapter without a text weight runs (paper, as the CLI without --rule) rather than
    being refused for the default adapter's official; official chosen by hand is refused before the
    model runs. Picking that adapter gives the subject its default scale (not the default adapter's)."""
    import dataclasses

    from mipadapter.testing.mip import ARCHS, tiny_adapter
    from mipadapter.web.handler import BY_THE_ADAPTERS, adapter_scale, first_rule, offered_rules

    mixed = tiny_mip_pipeline("sdxl", "basic", text_weight=True)
    plain = tiny_adapter(mixed.pipe.unet, ARCHS["sdxl"][0].basic_image_encoder, "basic", False, seed=3)
    plain.config = dataclasses.replace(plain.config, default_scale=0.55)
    mixed.add_adapter("plain", plain)
    assert offered_rules(mixed)[0] == (BY_THE_ADAPTERS, "") and first_rule(mixed) == ""
    single = tiny_mip_pipeline("sdxl", "basic", text_weight=True)
    assert first_rule(single) == "official" and all(label == value for label, value in offered_rules(single))
    assert adapter_scale(mixed, "plain") == 0.55
    assert adapter_scale(mixed, "default") == adapter_scale(mixed, None) == mixed.adapter.config.default_scale != 0.55

    forms = [SubjectForm("cat", [CAT], adapter="plain"), SubjectForm("backpack", [BACKPACK])]
    result = generate(mixed, request(*forms, rule=first_rule(mixed), steps=1))
    assert result.ok and "rule paper" in result.status, result.status
    refused = generate(mixed, request(*forms, rule="official", steps=1))  # by the pipeline's own check
    assert not refused.ok and refused.images == []
    assert "rule 'official' weighs each subject by its adapter's text weight, which the adapter of 'cat' has not" in (
        refused.status + "".join(refused.subject_errors.values())
    )


def test_problems_join_their_messages_and_count_the_subjects_they_name():
    """Several messages at one subject, or for the whole request, are joined by one space; the status
    says "messages" from two subjects on (a mutation run found the joins and the plural untested)."""
    from mipadapter.web.handler import _Problems

    problems = _Problems()
    problems.add(1, "first.")
    problems.add(1, "second.")
    problems.add(None, "The prompt is empty.")
    problems.add(None, "The seed is too large.")
    problems.add(0, "only.")
    result = problems.result()
    assert result.subject_errors == {0: "only.", 1: "first. second."}
    assert result.error == "The prompt is empty. The seed is too large."
    assert result.status == "Not generated. The prompt is empty. The seed is too large. See the messages at subject 1, 2."
    one = _Problems()
    one.add(2, "alone.")
    assert one.result().status == "Not generated. See the message at subject 3." and one.result().error is None


def test_a_pipeline_without_named_adapters_starts_subjects_at_its_adapters_scale():
    """A pipeline-like object without ``adapters`` (the page takes any with ``adapter``) is not refused."""
    from mipadapter.web.handler import adapter_scale

    duck = SimpleNamespace(adapter=SimpleNamespace(config=SimpleNamespace(default_scale=0.35)))
    assert adapter_scale(duck, "face") == adapter_scale(duck, None) == 0.35


def test_without_its_own_default_the_guidance_is_the_wrapped_pipelines_call_default():
    """The fallback of ``default_guidance`` for a pipeline without ``default_guidance_scale`` (or with
    None): the wrapped pipeline's ``__call__`` default, None where it has none (the tiny pipelines all set
    their own, so a mutation run found this path untested)."""

    class Defaulted:
        def __call__(self, prompt=None, guidance_scale=6.5): ...

    class Required:
        def __call__(self, prompt, guidance_scale): ...

    class Without:
        def __call__(self, prompt=None): ...

    assert default_guidance(SimpleNamespace(pipe=Defaulted())) == 6.5
    assert default_guidance(SimpleNamespace(pipe=Defaulted(), default_guidance_scale=None)) == 6.5
    own = default_guidance(SimpleNamespace(pipe=Defaulted(), default_guidance_scale=2))
    assert own == 2.0 and type(own) is float  # the page's number field shows it as given
    assert default_guidance(SimpleNamespace(pipe=Required())) is None
    assert default_guidance(SimpleNamespace(pipe=Without())) is None


def _slider_reference(value, minimum, maximum, step):
    """The slider's positions listed one by one; the one nearest the number clamped to the scale."""
    import math

    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return minimum
    if not math.isfinite(number):
        return minimum
    number = min(max(number, minimum), maximum)
    positions, k = [], 0
    while minimum + k * step <= maximum + 1e-9:
        positions.append(minimum + k * step)
        k += 1
    return min(positions, key=lambda position: abs(position - number))


@pytest.mark.parametrize(
    "scale",
    [(64, 2048, 64), (1, 100, 1), (0.0, 2.0, 0.05), (-1.0, 1.0, 0.3), (16, 1000, 48), (0.5, 7.0, 2.0)],
)
def test_on_slider_is_the_nearest_position_on_the_scale(scale):
    """Guards the number a field typed off its slider's scale is set to (the page shows it with the
    CLI's message): the nearest of the slider's positions, listed one by one, to the number clamped to
    the scale's ends; a scale whose end is off its steps (16 to 1000 by 48) never goes past that end;
    a whole number comes back as an int (the field shows 640, not 640.0)."""
    from mipadapter.web.handler import on_slider

    minimum, maximum, step = scale
    rng = np.random.default_rng(int(step * 1000))
    span = maximum - minimum
    values = list(rng.uniform(minimum - span, maximum + span, 300)) + [minimum, maximum, maximum + step / 3]
    for value in values:
        got, want = on_slider(value, minimum, maximum, step), _slider_reference(value, minimum, maximum, step)
        assert got == pytest.approx(want, abs=1e-9), (value, got, want)
        assert minimum <= got <= maximum
        assert isinstance(got, int) == float(got).is_integer(), (value, got)
    assert on_slider(str(values[0]), minimum, maximum, step) == on_slider(values[0], minimum, maximum, step)


@pytest.mark.parametrize("value", [None, "wide", float("nan"), float("inf"), float("-inf"), 10**400, [3]])
def test_on_slider_sets_what_is_no_number_to_the_minimum(value):
    """Guards on_slider's fallback: text, None, NaN, an infinity or an int too large for a float is set
    to the slider's minimum (an int when whole), not to its maximum or to 0."""
    from mipadapter.web.handler import on_slider

    assert on_slider(value, 64, 2048, 64) == 64 and type(on_slider(value, 64, 2048, 64)) is int
    assert on_slider(value, 0.25, 2.0, 0.05) == 0.25


@pytest.mark.parametrize(
    ("size", "limit", "shown"),
    [
        (2**20, 2**20 - 1, "1.0 MB; the limit is 1024.0 kB"),  # a MB from 2**20 bytes on, kB below
        (3 * 2**20 + 2**19, 3 * 2**20, "3.5 MB; the limit is 3.0 MB"),
        (1537, 1536, "1.5 kB; the limit is 1.5 kB"),
        (700, 512, "0.7 kB; the limit is 0.5 kB"),
    ],
)
def test_an_upload_over_the_byte_limit_is_refused_with_both_sizes(tmp_path, size, limit, shown):
    """Guards check_upload_size's boundary (the limit itself is accepted, one byte more refused) and
    how its message writes sizes: MB (2**20 bytes) from one MB on, kB (2**10) below, one decimal."""
    from mipadapter.web.handler import check_upload_size

    photo = tmp_path / "big.jpg"
    with open(photo, "wb") as file:
        file.truncate(size)
    with pytest.raises(ValueError) as refused:
        check_upload_size(str(photo), Limits(max_upload_bytes=limit))
    assert str(refused.value) == f"big.jpg is {shown}"
    assert check_upload_size(SimpleNamespace(path=str(photo)), Limits(max_upload_bytes=size)) == "big.jpg"
    assert photo.stat().st_size == size  # nothing written or removed


def test_a_library_error_goes_to_the_subject_it_names_the_longest_name_first():
    """Guards _owner_of, which puts a library error next to the subject it quotes: a name quoted inside a
    longer one ("a" in "the 'a' team") goes to the longer name's slot, whatever the slots' order; a
    message quoting no subject, or a name unquoted, belongs to no slot."""
    from mipadapter.web.handler import _owner_of

    longer = "the 'a' team"
    message = f"The region of subject {longer!r} is empty."
    assert _owner_of(message, {0: "a", 1: longer}) == 1
    assert _owner_of(message, {3: longer, 0: "a"}) == 3
    assert _owner_of("subject 'a' has no photo", {0: "a", 1: longer}) == 0
    assert _owner_of("subject a has no photo", {0: "a"}) is None
    assert _owner_of("nothing", {}) is None and _owner_of("nothing", {2: "cat"}) is None


def _png_bytes(image, *, chunk: tuple[bytes, bytes] | None = None) -> bytes:
    """``image`` as PNG bytes, with one extra chunk (type, data) after the header when given."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    if chunk is None:
        return data
    kind, body = chunk
    extra = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return data[:33] + extra + data[33:]  # 8 bytes of signature, 25 of IHDR


def test_a_painted_layer_silences_pillows_bomb_warning_and_no_other(monkeypatch):
    """Guards _layer_array's warning filter: the server's own pixel limit decides about size, so Pillow's
    DecompressionBombWarning is silenced while a layer is read (here with Pillow's threshold lowered
    below the layer); any other warning of Pillow's (an invalid APNG chunk) still reaches the log. A
    filter silencing every warning hid the second."""
    import warnings

    layer = Image.new("L", (20, 20), 255)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: Pillow warns (an error past 600)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = painted_mask({"layers": [_png_bytes(layer)]}, max_pixels=1000)
    assert [str(warning.message) for warning in caught] == []
    assert mask.shape == (20, 20) and mask.min() == 1.0
    invalid_apng = _png_bytes(layer, chunk=(b"acTL", bytes(8)))  # zero frames: Pillow warns, reads on
    with pytest.warns(UserWarning, match="Invalid APNG"):
        mask = painted_mask({"layers": [invalid_apng]}, max_pixels=1000)
    assert mask.shape == (20, 20) and mask.min() == 1.0


@pytest.mark.parametrize("kind", ["text", "truncated", "missing file", "bytearray of text"])
def test_a_painted_layer_that_is_no_image_is_refused_in_one_line(tmp_path, kind):
    """Guards _layer_array's refusal of a layer Pillow cannot read (not an image, cut short, a file gone):
    one line of ours, not Pillow's own error, so the page shows it next to the subject."""
    whole = _png_bytes(Image.new("L", (20, 20), 255))
    layer = {
        "text": b"not a png",
        "truncated": whole[: len(whole) - 30],
        "missing file": str(tmp_path / "gone.png"),
        "bytearray of text": bytearray(b"GIF89a?"),
    }[kind]
    with pytest.raises(ValueError) as refused:
        painted_mask({"layers": [layer]})
    assert str(refused.value) == "a painted layer is not a readable image"
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def test_a_pil_layer_is_read_by_its_alpha_else_its_luminance():
    """Guards _layer_array's branch for a PIL image: its alpha where it has one (a white LA layer that is
    fully transparent is nothing painted), else Pillow's luminance (pure red is 76 of 255), as for the
    same layer given as PNG bytes; read as a plain array it would be the channels' maximum instead."""
    red = Image.new("RGB", (12, 10), (255, 0, 0))
    for layer in (red, _png_bytes(red)):
        mask = painted_mask({"layers": [layer]})
        assert mask.shape == (10, 12) and np.allclose(mask, 76 / 255), np.unique(mask)
    clear = Image.new("LA", (12, 10), (255, 0))
    assert painted_mask({"layers": [clear]}) is None and painted_mask({"layers": [_png_bytes(clear)]}) is None
    half = Image.new("LA", (12, 10), (255, 128))
    assert np.allclose(painted_mask(half), 128 / 255)


def test_an_array_layer_is_read_by_its_alpha_else_its_brightest_channel():
    """Guards _layer_array's branch for arrays (the editor's RGBA layers as numpy): an [H, W, 4] layer by
    its alpha, an [H, W, 3] one by its brightest channel, [H, W] as it is, on a layer whose height,
    width and channel count all differ (5 wide, so no axis can stand in for another); any other shape
    is refused in one line naming it."""
    rng = np.random.default_rng(4)
    rgba = rng.integers(0, 256, size=(3, 5, 4), dtype=np.uint8)
    assert np.array_equal(painted_mask({"layers": [rgba]}), rgba[..., 3].astype(np.float32) / 255.0)
    rgb = rng.integers(1, 256, size=(3, 5, 3), dtype=np.uint8)
    assert np.array_equal(painted_mask(rgb), rgb.max(axis=-1).astype(np.float32) / 255.0)
    plain = rng.random((6, 5)).astype(np.float32)
    assert np.allclose(painted_mask(plain), plain)  # already in [0, 1]: not divided by 255
    for shape in [(2, 3, 4, 5), (7,)]:
        with pytest.raises(ValueError) as refused:
            painted_mask({"layers": [np.ones(shape, dtype=np.uint8)]})
        assert str(refused.value) == f"a painted region must be an image, got an array of shape {shape}"


def test_a_layer_over_the_pixel_limit_names_the_limit_in_megapixels():
    """Guards the limit's unit in _check_layer_pixels' line (pixels / 10**6, shown to six digits), with
    a limit whose sixth digit a slightly wrong divisor would change; the layer is checked, not copied."""
    layer = np.zeros((2500, 4000), dtype=np.uint8)
    with pytest.raises(ValueError) as refused:
        painted_mask({"layers": [layer]}, max_pixels=9_999_990)
    assert str(refused.value) == "a painted layer is 4000×2500 pixels; the limit is 9.99999 megapixels"
    assert painted_mask({"layers": [layer]}, max_pixels=10_000_000) is None  # at the limit: read (blank)


def test_a_slot_is_blank_only_when_nothing_in_it_was_touched():
    """Guards is_blank, which decides which slots the handler skips: box fields holding only spaces or
    nothing are blank; one typed box value, a name or a painted stroke is not; a painting that cannot be
    read, or is over the given pixel limit even when blank, is something (its slot reports it)."""
    from mipadapter.web.handler import is_blank

    stroke = np.zeros((20, 20), dtype=np.uint8)
    stroke[5:9, 5:9] = 255
    blank_png = _png_bytes(Image.new("L", (20, 20), 0))
    assert is_blank(SubjectForm()) and is_blank(SubjectForm(name="  ", box=["", " ", None, ""]))
    assert not is_blank(SubjectForm(box=[None, None, "8", None])) and not is_blank(SubjectForm(name="cat"))
    assert not is_blank(SubjectForm(painted={"layers": [stroke]}), max_painted_pixels=1000)
    assert is_blank(SubjectForm(painted={"layers": [blank_png]}), max_painted_pixels=1000)
    assert not is_blank(SubjectForm(painted={"layers": [blank_png]}), max_painted_pixels=100)  # too large
    assert is_blank(SubjectForm(painted={"layers": [blank_png]}), max_painted_pixels=None)
    assert not is_blank(SubjectForm(painted={"layers": [b"not a png"]}))


def test_a_mask_image_is_the_mask_clipped_to_0_1_in_eight_bits():
    """Guards mask_image's clip: a mask value past either end is its end (uint8 would wrap it: 1.5 to
    126, -0.5 to 129), values in between rounded to the nearest of 256 levels."""
    from mipadapter.web.handler import mask_image

    mask = np.array([[-0.5, 0.0, 0.5, 1.0, 1.5, 2.5], [0.2, 0.4, 0.6, 0.8, -3.0, 0.999]], dtype=np.float32)
    image = mask_image(mask)
    assert image.mode == "L" and image.size == (6, 2)
    expected = np.rint(np.clip(mask, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(image), expected) and expected[0].tolist() == [0, 0, 128, 255, 255, 255]
    assert mask_image(None) is None


def test_the_file_behind_an_upload_is_its_path_else_its_name():
    """Guards photo_path: gradio's file object by its ``.path`` (the server's copy) before its ``.name``,
    an object with only ``.name`` (a tempfile) by that, a plain path as it is; only a PIL image (it has a
    size *and* converts) has no file — an object with just a ``size`` is still a file. A ``Path`` is
    the file it names (it has a ``.name`` too, its last part: read as gradio's object, it named a file
    in the working folder, and a photo given as a Path was "missing")."""
    from mipadapter.web.handler import check_upload_size, photo_path

    assert photo_path(SimpleNamespace(path="/uploads/a1/cat.jpg", name="cat.jpg")) == Path("/uploads/a1/cat.jpg")
    assert photo_path(SimpleNamespace(path=None, name="/tmp/x/dog.png")) == Path("/tmp/x/dog.png")
    assert photo_path(SimpleNamespace(name="/tmp/x/dog.png")) == Path("/tmp/x/dog.png")
    assert photo_path(SimpleNamespace(size=120, path="/uploads/b2/bag.jpg")) == Path("/uploads/b2/bag.jpg")
    assert photo_path(CAT) == photo_path(Path(CAT)) == Path(CAT)
    assert check_upload_size(Path(CAT), Limits()) == "cat.jpg"
    assert photo_path(Image.new("RGB", (2, 2))) is None


def test_an_upload_gone_from_disk_and_a_pil_photo_are_named_in_their_messages(tmp_path):
    """Guards the names in two refusals: an upload whose file is gone is named by its file name, and a
    photo given as a PIL image (no file) is "a photo"; nothing is written either way."""
    from mipadapter.web.handler import check_upload_size

    with pytest.raises(ValueError) as gone:
        check_upload_size(SimpleNamespace(path=str(tmp_path / "a1" / "cat.jpg")), Limits())
    assert str(gone.value) == "cat.jpg could not be read (the upload is missing)"
    with pytest.raises(ValueError) as large:
        read_photo(Image.new("RGB", (300, 200)), Limits(max_photo_pixels=50_000))
    assert str(large.value) == "a photo is 300×200 pixels; the limit is 0.05 megapixels"  # not rounded to 0
    assert list(tmp_path.iterdir()) == []


def test_a_photo_at_the_pixel_limit_is_read_upright_in_rgb_and_one_more_pixel_is_refused():
    """Guards read_photo's own limit (the server's, which replaces photos' 50 MP default): a photo of
    exactly the limit is read (in RGB, whatever its mode), one pixel more is refused with the limit in
    megapixels to six digits; and a photo over the 50 MP default but within a larger server limit is
    read whole, by the header check and the decode both."""
    for mode in ("L", "RGBA", "P"):
        photo = read_photo(Image.new(mode, (300, 200)), Limits(max_photo_pixels=60_000))
        assert photo.mode == "RGB" and photo.size == (300, 200)
    with pytest.raises(ValueError) as refused:
        read_photo(Image.new("L", (4000, 2500)), Limits(max_photo_pixels=9_999_990))
    assert str(refused.value) == "a photo is 4000×2500 pixels; the limit is 9.99999 megapixels"
    with pytest.raises(ValueError) as refused:
        read_photo(Image.new("L", (301, 200)), Limits(max_photo_pixels=60_000))
    assert str(refused.value) == "a photo is 301×200 pixels; the limit is 0.06 megapixels"


def test_a_photo_over_the_default_50_mp_is_read_under_a_larger_server_limit(tmp_path):
    """Guards read_photo passing no default limit to photos' header check and decode (both would refuse
    past 50 MP): the server's own limit alone decides. A blank 7100×7100 greyscale PNG (50.4 MP)."""
    path = tmp_path / "wide.png"
    Image.new("L", (7100, 7100)).save(path, optimize=False, compress_level=1)
    photo = read_photo(str(path), Limits(max_photo_pixels=60_000_000, max_upload_bytes=2**30))
    assert photo.size == (7100, 7100) and photo.mode == "RGB"


def test_a_photo_whose_header_reads_but_whose_data_is_cut_short_is_refused_as_damaged(tmp_path):
    """Guards read_photo's second refusal: the header gives a size within the limit, the decode fails."""
    whole = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError) as refused:
        read_photo(str(cut), Limits())
    assert str(refused.value) == "cut.png is not a readable image (the file is damaged)"
    assert cut.read_bytes() == whole[: len(whole) // 2]


@pytest.mark.parametrize("box", [["0", " ", "10", "10"], [0, None, 10, 10], ["1", "2", "3"], ["", "", "", "4"]])
def test_a_box_with_some_fields_blank_asks_for_all_four(box):
    """Guards parse_box's partial-box line, word for word, for a blank (spaces too) or missing field and
    for three fields, rather than the numbers message ``float("")`` would give."""
    with pytest.raises(ValueError) as refused:
        parse_box(box)
    assert str(refused.value) == "fill in all four box fields x0, y0, x1, y1 (or leave all four blank)"
    assert parse_box(["", " ", None, ""]) is None and parse_box(["1", " 2 ", 3, 4.5]) == (1.0, 2.0, 3.0, 4.5)


def test_painted_layers_are_scaled_to_0_1_skipping_empty_layers_and_must_share_a_size():
    """Guards painted_mask's reading of its layers: 8-bit ones (any value above 1, a faint stroke of 2
    too) are divided by 255, float ones already in [0, 1] (a 1.0 included) are not; a missing layer
    (None) is skipped, not the end of the list; the union is clipped to [0, 1] (a float layer's -0.5
    and 300); layers of two sizes are refused in one line."""
    faint = np.zeros((4, 6), dtype=np.uint8)
    faint[1, 2] = 2
    assert np.allclose(painted_mask({"layers": [faint]}), faint / 255.0)
    exact = np.zeros((4, 6), dtype=np.float32)
    exact[0, 0], exact[3, 5] = 1.0, 0.25
    assert np.array_equal(painted_mask({"layers": [exact]}), exact)
    assert np.array_equal(painted_mask({"layers": [None, exact, None]}), exact)
    signed = np.array([[-0.5, 0.5, 0.0]], dtype=np.float32)
    assert painted_mask({"layers": [signed]}).tolist() == [[0.0, 0.5, 0.0]]
    bright = np.array([[300.0, 0.0, 51.0]], dtype=np.float32)
    assert np.allclose(painted_mask({"layers": [bright]}), [[1.0, 0.0, 0.2]])
    with pytest.raises(ValueError) as refused:
        painted_mask({"layers": [faint, np.ones((6, 4), dtype=np.uint8) * 255]})
    assert str(refused.value) == "the painted layers have different sizes"


def test_a_box_of_infinite_numbers_is_refused_by_name():
    with pytest.raises(ValueError) as refused:
        parse_box(["0", "0", "inf", "10"])
    assert str(refused.value) == "the box fields must be finite numbers, got ['0', '0', 'inf', '10']"


def test_a_pipeline_without_adapter_names_offers_the_default_adapter():
    """Guards adapter_choices' fallback for a pipeline object without ``adapter_names`` (or with none)."""
    from mipadapter.config import DEFAULT_ADAPTER

    assert adapter_choices(SimpleNamespace()) == adapter_choices(SimpleNamespace(adapter_names=[])) == [DEFAULT_ADAPTER]
    assert adapter_choices(SimpleNamespace(adapter_names=("default", "face"))) == ["default", "face"]


@pytest.mark.parametrize(("width", "height", "size"), [(96, 32, (96, 32)), (None, 48, (64, 48)), (32, None, (32, 64))])
def test_each_side_is_the_one_asked_or_the_models_native_side(pipe, width, height, size):
    """Guards generate's sizes: a side left blank (None) is the model's native side (64 for the tiny
    SDXL), the other as asked, on images that are not square."""
    result = generate(pipe, request(*two_subjects(), width=width, height=height, steps=1))
    assert result.ok, result.status
    assert result.images[0].size == size and all(overlay.size == size for overlay, _ in result.maps)
    assert f"of {size[0]}×{size[1]} in 1 step (" in result.status


def test_the_subject_limit_counts_filled_slots_and_names_the_ones_to_remove(pipe):
    """Guards the subject limit: as many filled slots as the limit run (blank slots between them do not
    count); past it, the slots to remove are named by their numbers on the page, counted after the blank
    ones, in one line."""
    limits = Limits.for_pipeline(pipe, max_subjects=2)
    forms = [SubjectForm("cat", [CAT]), SubjectForm(), SubjectForm("backpack", [BACKPACK])]
    assert generate(pipe, request(*forms, steps=1), limits).ok
    more = [*forms, SubjectForm("Boston", [CAT]), SubjectForm("wearing", [CAT])]
    result = generate(pipe, request(*more, steps=1), limits)
    assert result.error == "Too many subjects: 4 given, this server takes at most 2 (remove subjects 4, 5)."


def test_a_blank_painting_over_the_servers_pixel_limit_is_not_an_empty_slot(pipe):
    """Guards generate asking is_blank with the server's own painted-pixel limit: a slot holding only a
    painting larger than that limit (blank or not) is reported, not skipped as untouched."""
    painted = {"layers": [_png_bytes(Image.new("L", (20, 20), 0))]}
    forms = [*two_subjects(), SubjectForm(painted=painted)]
    result = generate(pipe, request(*forms, steps=1), Limits.for_pipeline(pipe, max_painted_pixels=100))
    assert not result.ok and result.images == []
    assert "a painted layer is 20×20 pixels; the limit is 0.0001 megapixels" in result.subject_errors[2]
    assert generate(pipe, request(*forms, steps=1), Limits.for_pipeline(pipe)).ok  # within it: blank, skipped


def test_a_nameless_subject_is_named_by_its_slot_number_in_every_message(pipe):
    """Guards the label of a subject without a name (None or spaces): "subject 3" for the page's third
    slot, in each message about it, beside the message asking for a name."""
    forms = [*two_subjects(), SubjectForm(name=None, box=["0", "0", "8", "8"]), SubjectForm(" ", [CAT], strength=9.0)]
    result = generate(pipe, request(*forms, steps=1))
    assert result.subject_errors == {
        2: "Give this subject a name: the words the prompt uses for it (e.g. 'cat'). "
        "Upload at least one photo of subject 3.",
        3: "Give this subject a name: the words the prompt uses for it (e.g. 'cat'). "
        "The strength of subject 4 must be a finite number between 0 and 1.5, got 9.0.",
    }


def test_the_servers_own_photo_and_strength_limits_apply_at_their_boundaries(pipe):
    """Guards generate passing the server's limits on: as many photos as its ``max_photos`` run, and a
    strength within the library's 1.5 but over the server's ``max_scale`` is refused with its limit."""
    limits = Limits.for_pipeline(pipe, max_photos=2, max_scale=1.0)
    assert generate(pipe, request(SubjectForm("cat", [CAT, CAT], strength=1.0), steps=1), limits).ok
    result = generate(pipe, request(SubjectForm("cat", [CAT], strength=1.2), steps=1), limits)
    assert result.subject_errors == {0: "The strength of subject 'cat' must be a finite number between 0 and 1, got 1.2."}


def test_an_adapter_name_is_read_without_its_surrounding_spaces(pipe):
    recording = Recording(pipe)
    result = generate(recording, request(SubjectForm("cat", [CAT], adapter=" default "), steps=1))
    assert result.ok, result.status
    assert recording.calls[0][1][0].adapter is None  # the default adapter, named as such: the plain call


class Raising(Recording):
    """A pipeline whose call fails with ``message`` (as the library's own checks fail, with ValueError)."""

    def __init__(self, pipe, message: str) -> None:
        super().__init__(pipe)
        self.message = message

    def __call__(self, prompt, subjects, **kwargs):
        raise ValueError(self.message)


def test_a_pipeline_error_goes_to_the_subject_it_names_with_one_full_stop():
    """Guards how generate shows the pipeline's own refusals: one naming a subject at that subject's
    slot, ended by a full stop; one naming none as the request's error, as written (it has its own)."""
    pipe = tiny_mip_pipeline("sdxl", "basic", text_weight=True)
    named = generate(Raising(pipe, "subject 'backpack' has no room in its box"), request(*two_subjects(), steps=1))
    assert named.subject_errors == {1: "subject 'backpack' has no room in its box."} and named.error is None
    general = generate(Raising(pipe, "The scheduler refused the timesteps."), request(*two_subjects(), steps=1))
    assert general.error == "The scheduler refused the timesteps." and general.subject_errors == {}
    assert general.status == "Not generated. The scheduler refused the timesteps."


class Bare(Recording):
    """A pipeline whose output carries its images and routing maps only: no settings, no warnings."""

    def __call__(self, prompt, subjects, **kwargs):
        output = super().__call__(prompt, subjects, **kwargs)
        return SimpleNamespace(images=output.images, relevance=output.relevance)


def test_an_output_without_settings_or_warnings_is_shown_with_the_asked_values(pipe):
    """A pipeline output without ``settings`` and ``warnings`` (a wrapped or older pipeline): the status
    names the rule asked for and no guidance, in steps counted in the singular for one."""
    result = generate(Bare(pipe), request(*two_subjects(), seed=9, steps=1, rule="paper"))
    assert result.ok and result.settings == {} and result.subject_warnings == {}
    assert result.status == "Generated 1 image of 64×64 in 1 step (seed 9, rule paper) with 'cat', 'backpack'."


def test_the_status_line_says_what_ran_word_for_word(pipe):
    """Guards the success status: images counted in the plural from two, the steps, the seed, the rule
    and guidance the pipeline reports, each subject with its kind of region; an adapter is named only
    when the server holds several (the tiny pipeline holds one)."""
    forms = [SubjectForm("cat", [CAT], box=[0, 0, 32, 64]), SubjectForm("backpack", [BACKPACK], painted=right_half_painted())]
    two = generate(pipe, request(*forms, seed=3, num_images=2, guidance=4.5, rule="paper"))
    assert two.status == (
        "Generated 2 images of 64×64 in 2 steps (seed 3, rule paper, guidance 4.5) with 'cat' (box), "
        "'backpack' (painted region)."
    )
    one = generate(pipe, request(SubjectForm("cat", [CAT]), seed=8, steps=1))
    assert one.status == (
        f"Generated 1 image of 64×64 in 1 step (seed 8, rule official, guidance {default_guidance(pipe):g}) with 'cat'."
    )


class Warning3(Recording):
    """A pipeline whose output carries three warnings: two about its first subject, one about its second."""

    def __call__(self, prompt, subjects, **kwargs):
        output = super().__call__(prompt, subjects, **kwargs)
        output.warnings = [SimpleNamespace(index=index, message=text) for index, text in
                           ((1, "Second, first."), (0, "First, first."), (1, "Second, second."))]  # fmt: skip
        return output


def test_the_pipelines_warnings_are_shown_at_each_subjects_slot_and_counted_in_the_status(pipe):
    """Guards how generate places the pipeline's warnings: by the subject's index (a blank slot before it
    shifts the slot), several at one subject joined by a space in their order, the status naming every
    warned slot ("warnings", plural, from two); the pipeline's settings come back with the result."""
    forms = [SubjectForm(), SubjectForm("cat", [CAT]), SubjectForm("backpack", [BACKPACK])]
    result = generate(Warning3(pipe), request(*forms, seed=2, steps=1, guidance=4.5))
    assert result.ok and result.subject_warnings == {1: "First, first.", 2: "Second, first. Second, second."}
    assert result.status.endswith("with 'cat', 'backpack'. See the warnings at subject 2, 3.")
    assert result.status.startswith("Generated 1 image of 64×64 in 1 step (seed 2, rule official, guidance 4.5)")
    assert result.settings["guidance_scale"] == 4.5 and result.settings["num_inference_steps"] == 1
