"""The generation recipe: built from a real tiny call, written into PNG and JPEG, read back, refused when bad."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_photos import _png_header

from mipadapter.fileio import current_umask
from mipadapter.pipeline import Subject
from mipadapter.recipe import (
    MAX_EMBEDDED_MASK_PIXELS,
    MAX_RECIPE_BYTES,
    RECIPE_VERSION,
    SETTINGS_KEYS,
    ModelRecord,
    RecipeError,
    RecipeSubject,
    build_recipe,
    embedded_mask_bytes,
    encode_recipe,
    file_sha256,
    parse_recipe_json,
    read_recipe,
    recorded_region,
    verify_inputs,
    write_image,
)
from mipadapter.testing.mip import tiny_mip_pipeline

ASSETS = Path(__file__).resolve().parent / "assets"
CAT, BACKPACK = ASSETS / "cat.jpg", ASSETS / "backpack.jpg"
MODELS = ModelRecord("tiny-sdxl (random)", "tiny-mip (random)", "tiny", preset=None, tiny="sdxl")


@pytest.fixture(scope="module")
def generated():
    """One tiny two-image call with a box region and a mask region; its pipeline, output and call."""
    pipe = tiny_mip_pipeline("sdxl")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    call = dict(
        prompt="a cat wearing a backpack",
        num_inference_steps=1,
        num_images_per_prompt=2,
    )
    subjects = [
        Subject("cat", [Image.open(CAT)], scale=0.5, region=(0, 0, 32, 64)),
        Subject("backpack", [Image.open(BACKPACK)], region=mask),
    ]
    output = pipe(
        call["prompt"],
        subjects,
        generator=torch.Generator().manual_seed(3),
        show_progress=False,
        **{k: v for k, v in call.items() if k != "prompt"},
    )
    return pipe, output, call, mask


def recipe_of(generated, mask_region) -> dict:
    pipe, output, _, _ = generated
    return build_recipe(
        pipe,
        output,
        seed=3,
        subjects=[
            RecipeSubject("cat", [CAT], region=(0, 0, 32, 64)),
            RecipeSubject("backpack", [BACKPACK], region=mask_region),
        ],
        models=MODELS,
    )


def test_recipe_records_the_resolved_call(generated):
    pipe, _, _, mask = generated
    recipe = recipe_of(generated, mask)
    assert recipe["recipe_version"] == RECIPE_VERSION
    # what the tiny SDXL pipeline resolved: guidance 5.0 (never null), its native 64² size
    assert recipe["guidance"] == 5.0 and (recipe["height"], recipe["width"]) == (64, 64)
    assert recipe["steps"] == 1 and recipe["num_images"] == 2 and recipe["seed"] == 3
    assert recipe["rule"] == "official" and recipe["text_weight"] is True and recipe["multi_image"] == "mean"
    assert recipe["scheduler"] == type(pipe.pipe.scheduler).__name__
    cat, backpack = recipe["subjects"]
    assert cat["scale"] == 0.5 and backpack["scale"] == pipe.adapter.config.default_scale
    assert cat["region"] == [0.0, 0.0, 32.0, 64.0]
    assert cat["photos"] == [{"path": str(CAT.resolve()), "sha256": file_sha256(CAT)}]
    assert recipe["models"]["tiny"] == "sdxl" and recipe["dtype"] == "float32" and recipe["device"] == "cpu"
    assert set(recipe["versions"]) == {"mipadapter", "torch", "diffusers", "transformers"}
    assert recipe["versions"]["torch"] == torch.__version__
    # a mask without a file travels inside the recipe and comes back pixel for pixel
    assert np.array_equal(np.asarray(recorded_region(backpack["region"])), np.asarray(mask))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg"])
def test_round_trip_through_png_and_jpeg(generated, tmp_path, suffix):
    _, output, _, mask = generated
    recipe = recipe_of(generated, mask)
    path = write_image(output.images[1], tmp_path / f"out{suffix}", recipe, image_index=1)
    assert read_recipe(path) == {**recipe, "image_index": 1}
    with Image.open(path) as written:
        assert written.format == ("PNG" if suffix == ".png" else "JPEG")  # never PNG bytes under .jpg
        if suffix == ".png":
            assert np.array_equal(np.asarray(written), np.asarray(output.images[1]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{suffix}"]  # no temporary file left


def test_written_images_follow_the_umask(generated, tmp_path):
    _, output, _, mask = generated
    old = os.umask(0o027)
    try:
        path = write_image(output.images[0], tmp_path / "out.png", recipe_of(generated, mask))
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~current_umask() == 0o640
    finally:
        os.umask(old)


def test_mask_file_regions_are_recorded_by_path_and_hash(generated, tmp_path):
    mask_file = tmp_path / "mask.png"
    generated[3].save(mask_file)
    recipe = recipe_of(generated, mask_file)
    assert recipe["subjects"][1]["region"] == {
        "path": str(mask_file.resolve()),
        "sha256": file_sha256(mask_file),
    }
    assert np.array_equal(
        np.asarray(recorded_region(recipe["subjects"][1]["region"])), np.asarray(generated[3])
    )


def test_verify_inputs_names_a_changed_or_missing_photo(generated, tmp_path):
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(CAT.read_bytes())
    recipe = recipe_of(generated, None)
    recipe["subjects"][0]["photos"] = [{"path": str(photo), "sha256": file_sha256(photo)}]
    verify_inputs(recipe, "out.png")  # unchanged: passes
    photo.write_bytes(BACKPACK.read_bytes())
    with pytest.raises(RecipeError, match=r"recorded photo 1 of 'cat'.*cat\.jpg.*has changed since 'out\.png'"):
        verify_inputs(recipe, "out.png")
    photo.unlink()
    with pytest.raises(
        FileNotFoundError, match=r"recorded photo 1 of 'cat'.*cat\.jpg.*recorded in 'out\.png', is missing"
    ):
        verify_inputs(recipe, "out.png")


def test_write_refuses_unknown_extensions_and_leaves_nothing(generated, tmp_path):
    _, output, _, mask = generated
    with pytest.raises(ValueError, match=r"out\.gif.*\.png, \.jpg, \.jpeg"):
        write_image(output.images[0], tmp_path / "out.gif", recipe_of(generated, mask))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(generated, tmp_path):
    class Broken:
        def save(self, *args, **kwargs):
            Path(args[0]).write_bytes(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_image(Broken(), tmp_path / "out.png", recipe_of(generated, None))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_a_jpeg_is_written_in_rgb_at_quality_95(generated, tmp_path, mode):
    """Guards the JPEG writer's codec settings: an image of any mode is written as RGB at quality 95,
    pixel for pixel what Pillow writes with those settings. Fails on Pillow's default quality (75), and
    on the image saved in its own mode (a greyscale JPEG; RGBA cannot be a JPEG at all)."""
    _, output, _, mask = generated
    image = output.images[0].convert(mode)
    path = write_image(image, tmp_path / "out.jpg", recipe_of(generated, mask))
    reference = tmp_path / "reference.jpg"
    image.convert("RGB").save(reference, format="JPEG", quality=95)
    with Image.open(path) as written, Image.open(reference) as expected:
        assert written.mode == "RGB" and np.array_equal(np.asarray(written), np.asarray(expected))


def test_a_recipe_fills_a_jpeg_comment_to_its_last_byte_and_no_further(generated, tmp_path):
    """Guards the JPEG comment's limit at its boundary: a comment of exactly 65,511 bytes (what Pillow's
    encoder can write, not the 65,533 a COM segment could hold: it failed there with "broken data
    stream") is written and read back; one byte more is refused with a message naming the file and both
    sizes, and nothing is written."""
    from mipadapter.recipe import JPEG_COMMENT_LIMIT, JPEG_PREFIX

    _, output, _, mask = generated
    recipe = recipe_of(generated, mask)
    overhead = len(JPEG_PREFIX + encode_recipe({**recipe, "prompt": "x"}, 0).encode("utf-8")) - 1
    assert JPEG_COMMENT_LIMIT == 65511
    fits = {**recipe, "prompt": "x" * (JPEG_COMMENT_LIMIT - overhead)}
    path = write_image(output.images[0], tmp_path / "full.jpg", fits)
    assert read_recipe(path) == fits
    over = {**recipe, "prompt": "x" * (JPEG_COMMENT_LIMIT - overhead + 1)}
    target = tmp_path / "over.jpg"
    with pytest.raises(ValueError) as error:
        write_image(output.images[0], target, over)
    assert str(error.value) == (
        f"{str(target)!r}: the recipe (65512 bytes) does not fit a JPEG comment (65511 bytes); write a .png"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.jpg"]


def test_a_package_that_is_not_installed_is_recorded_as_null(monkeypatch):
    """Guards the versions record of a missing package: null (JSON's none), not an empty string that reads
    as a version."""
    import torch

    import mipadapter.recipe as recipe_module

    monkeypatch.setattr(recipe_module, "VERSIONED_PACKAGES", ("torch", "mipadapter-no-such-package"))
    assert recipe_module.package_versions() == {"torch": torch.__version__, "mipadapter-no-such-package": None}


def _png_with_text(path: Path, text: str | None) -> Path:
    info = PngInfo()
    if text is not None:
        info.add_text("mipadapter", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def _bad_files(tmp_path: Path, good: dict) -> dict[str, tuple[Path, str]]:
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.gif")
    wrong_type = {**good, "steps": "thirty"}
    wrong_subject = {**good, "subjects": [{**good["subjects"][0], "photos": ["cat.jpg"]}]}
    old = {"prompt": "a cat", "guidance": None, "version": "0.1.0"}
    return {
        "missing": (tmp_path / "missing.png", "not found"),
        "folder": (tmp_path / "folder.png", "is a folder"),
        "not an image": (tmp_path / "text.png", "is not an image file"),
        "gif": (tmp_path / "plain.gif", "is a GIF image"),
        "no recipe": (_png_with_text(tmp_path / "none.png", None), "carries no mipadapter recipe"),
        "bad json": (_png_with_text(tmp_path / "json.png", "{oops"), "is not valid JSON"),
        "old metadata": (_png_with_text(tmp_path / "old.png", json.dumps(old)), "older mipadapter"),
        "wrong type": (_png_with_text(tmp_path / "type.png", json.dumps(wrong_type)), "'steps' must be"),
        "wrong subject": (_png_with_text(tmp_path / "subj.png", json.dumps(wrong_subject)), "subject #1"),
        "truncated": (tmp_path / "cut.png", "cannot be read"),
    }


def test_bad_files_are_refused_with_one_line_naming_the_file(generated, tmp_path):
    good = recipe_of(generated, None)
    whole = write_image(generated[1].images[0], tmp_path / "whole.png", good)
    cases = _bad_files(tmp_path, good)
    data = whole.read_bytes()
    cases["truncated"][0].write_bytes(data[: len(data) - 40])  # the image data and IEND cut off
    for label, (path, message) in cases.items():
        with pytest.raises((RecipeError, FileNotFoundError)) as error:
            read_recipe(path)
        text = str(error.value)
        assert message in text and path.name in text and "\n" not in text, (label, text)


def test_jpeg_without_our_comment_is_refused(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(path, comment=b"some camera")
    with pytest.raises(RecipeError, match=r"photo\.jpg' carries no mipadapter recipe"):
        read_recipe(path)


def test_a_jpeg_with_no_comment_at_all_carries_no_recipe(tmp_path):
    path = tmp_path / "bare.jpg"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(RecipeError) as error:
        read_recipe(path)
    assert str(error.value) == f"{str(path)!r} carries no mipadapter recipe (it was not written by mipadapter generate)"


def test_a_truncated_image_cannot_be_read_naming_it(generated, tmp_path):
    whole = write_image(generated[1].images[0], tmp_path / "whole.png", recipe_of(generated, None))
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:-40])
    with pytest.raises(RecipeError) as error:
        read_recipe(cut)
    assert str(error.value).startswith(f"{str(cut)!r} cannot be read: ")


def test_a_text_chunk_past_pillows_limit_cannot_be_read_naming_the_file(tmp_path):
    """A 3 KB PNG whose compressed recipe chunk inflates to 3 MB: Pillow refuses it with a ValueError,
    reported as the file that cannot be read."""
    info = PngInfo()
    info.add_text("mipadapter", "a" * 3_000_000, zip=True)
    path = tmp_path / "bomb.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    with pytest.raises(RecipeError) as error:
        read_recipe(path)
    assert str(error.value).startswith(f"{str(path)!r} cannot be read: Decompressed data too large")


def test_the_stored_recipe_keeps_its_fields_in_order_and_an_invalid_one_is_not_written(generated):
    """The JSON in an image lists the fields as the recipe has them (a reader sees prompt and models
    first), and a recipe that would not read back is refused as "the recipe to write"."""
    good = recipe_of(generated, None)
    assert list(json.loads(encode_recipe(good, 1))) == list({**good, "image_index": 1})
    with pytest.raises(RecipeError) as error:
        encode_recipe({**good, "steps": "thirty"}, 0)
    assert str(error.value).startswith("the recipe to write: ")


def test_refusals_raised_while_the_file_is_open_are_not_wrapped_again(tmp_path):
    """Guards the messages of a GIF and of a PNG over the default pixel limit (a header naming 8000×7000,
    no pixels), word for word: each names the file once (they were wrapped in "cannot be read" and named
    it three times)."""
    gif = tmp_path / "plain.gif"
    Image.new("RGB", (8, 8)).save(gif)
    big = _png_header(tmp_path / "big.png", 8000, 7000)
    expected = {
        gif: f"{str(gif)!r} is a GIF image; recipes live in PNG and JPEG files",
        big: f"the image {str(big)!r} is 8000×7000 (56.0 MP), above the 50 MP limit: downscale it, or raise the limit",
    }
    for path, message in expected.items():
        with pytest.raises(RecipeError) as error:
            read_recipe(path)
        assert str(error.value) == message


def test_recipe_json_up_to_the_byte_limit_is_read_and_one_byte_more_is_refused():
    fits = '"' + "a" * (MAX_RECIPE_BYTES - 2) + '"'
    assert parse_recipe_json(fits, "'x.png'") == "a" * (MAX_RECIPE_BYTES - 2)
    with pytest.raises(RecipeError) as error:
        parse_recipe_json(fits + " ", "'x.png'")
    assert str(error.value) == (
        f"'x.png': its mipadapter recipe is {MAX_RECIPE_BYTES + 1} bytes, above the {MAX_RECIPE_BYTES} byte limit"
    )


def test_recipe_json_nested_too_deeply_is_refused_in_one_line():
    with pytest.raises(RecipeError) as error:
        parse_recipe_json("[" * 100_000 + "]" * 100_000, "'x.png'")
    assert str(error.value) == "'x.png': its mipadapter recipe is nested too deeply to be a recipe"


def test_an_embedded_mask_must_be_strict_base64_of_an_image_within_its_limit(tmp_path):
    """Base64 with stray characters is refused, not decoded around them; the mask's header is checked
    against ``MAX_EMBEDDED_MASK_PIXELS`` (not the photos' larger default), and named as the embedded mask."""
    import base64

    mask = tmp_path / "mask.png"
    Image.new("L", (8, 8), 255).save(mask)
    encoded = base64.b64encode(mask.read_bytes()).decode()
    assert embedded_mask_bytes({"png_base64": encoded}, "'x.png'") == mask.read_bytes()
    with pytest.raises(RecipeError) as error:
        embedded_mask_bytes({"png_base64": encoded[:8] + "!" + encoded[8:]}, "'x.png'")
    assert str(error.value) == "'x.png': recipe field 'png_base64' is not base64 text"
    side = math.isqrt(MAX_EMBEDDED_MASK_PIXELS) + 1  # just over the limit, far below the photos' 50 MP
    over = base64.b64encode(_png_header(tmp_path / "over.png", side, side).read_bytes()).decode()
    with pytest.raises(RecipeError) as error:
        embedded_mask_bytes({"png_base64": over}, "'x.png'")
    megapixels = side * side / 1e6
    limit = MAX_EMBEDDED_MASK_PIXELS / 1e6
    assert str(error.value) == (
        f"'x.png': recipe field 'png_base64': the embedded mask is {side}×{side} ({megapixels:.1f} MP), above "
        f"the {limit:.1f} MP limit: downscale it, or raise the limit"
    )


# ----------------------------------------------------------------------------------------------- FLUX
DOG = ASSETS / "dreambooth" / "dog" / "00.jpg"
FLUX_MODELS = ModelRecord("tiny-flux (random)", "tiny (random)", "tiny", preset=None, tiny="flux")


@pytest.fixture(scope="module")
def flux_generated():
    pipe = tiny_mip_pipeline("flux")
    call = dict(prompt="a dog with a backpack", num_inference_steps=1, negative_prompt="blurry", true_cfg_scale=2.5)
    subjects = [Subject("dog", [Image.open(DOG)]), Subject("backpack", [Image.open(BACKPACK)], scale=0.5)]
    output = pipe(
        call["prompt"],
        subjects,
        generator=torch.Generator().manual_seed(1),
        show_progress=False,
        **{k: v for k, v in call.items() if k != "prompt"},
    )
    return pipe, output, call


def test_a_flux_recipe_names_flux_and_records_true_guidance(flux_generated, tmp_path):
    pipe, output, call = flux_generated
    subjects = [RecipeSubject("dog", [DOG]), RecipeSubject("backpack", [BACKPACK])]
    recipe = build_recipe(pipe, output, seed=1, subjects=subjects, models=FLUX_MODELS)
    assert recipe["model_family"] == "FLUX" and recipe["models"]["tiny"] == "flux"
    assert recipe["true_cfg_scale"] == 2.5 and recipe["negative_prompt"] == "blurry"
    assert recipe["guidance"] == pipe.default_guidance_scale == 3.5
    assert recipe["rule"] == "paper" and recipe["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert [s["scale"] for s in recipe["subjects"]] == [1.0, 0.5] and recipe["device"] == "cpu"
    path = write_image(output.images[0], tmp_path / "flux.png", recipe)
    assert read_recipe(path) == recipe


def test_a_recipe_is_made_only_from_what_the_pipeline_reports(generated):
    """Guards against a recipe recording a guess instead of what ran: an output whose settings lack a key
    (an older or wrapped pipeline) is refused naming every missing key, and so are subjects other than
    those the call ran with (another name, another order), since their scales and files would be
    recorded against the wrong subject."""
    from types import SimpleNamespace

    pipe, output, _, _ = generated
    subjects = [RecipeSubject("cat", [CAT]), RecipeSubject("backpack", [BACKPACK])]
    partial = {k: v for k, v in output.settings.items() if k not in ("guidance_scale", "scheduler")}
    for settings, missing in (({}, ", ".join(SETTINGS_KEYS)), (partial, "guidance_scale, scheduler")):
        bare = SimpleNamespace(images=output.images, settings=settings)
        with pytest.raises(ValueError) as error:
            build_recipe(pipe, bare, seed=3, subjects=subjects, models=MODELS)
        assert str(error.value) == (
            f"a recipe records the settings the pipeline reports, and this output's settings lack {missing} "
            "(a MIPAdapterPipeline output carries them all)"
        )
    for names in (["backpack", "cat"], ["cat"], ["cat", "bag"]):
        others = [RecipeSubject(name, [CAT]) for name in names]
        with pytest.raises(ValueError) as error:
            build_recipe(pipe, output, seed=3, subjects=others, models=MODELS)
        assert str(error.value) == (
            f"the recipe's subjects {names} are not those the pipeline ran with, ['cat', 'backpack']"
        )


def test_unet_recipes_carry_their_family_and_no_true_guidance(generated):
    recipe = recipe_of(generated, None)
    assert recipe["model_family"] == "SDXL" and "true_cfg_scale" not in recipe


def test_optional_fields_may_be_absent_but_not_wrong(generated, tmp_path):
    good = recipe_of(generated, None)
    older = {k: v for k, v in good.items() if k != "model_family"}
    assert read_recipe(_png_with_text(tmp_path / "older.png", json.dumps(older))) == older
    cases = {
        "cfg.png": ({**good, "true_cfg_scale": "high"}, "recipe field 'true_cfg_scale' must be a finite number"),
        "family.png": ({**good, "model_family": 3}, "recipe field 'model_family' must be"),
        "negative.png": ({**good, "negative_image": "grey"}, "recipe field 'negative_image' must be \"black\" or"),
        "embeds.png": ({**good, "negative_prompt_embeds": False}, "recipe field 'negative_prompt_embeds' must be true"),
        "length.png": ({**good, "max_sequence_length": 513}, "recipe field 'max_sequence_length' must be an integer"),
        "prompt2.png": ({**good, "prompt_2": 3}, "recipe field 'prompt_2' must be a string"),
    }
    for index, bad in enumerate(([1.0, -1.0], {"middle": 1.0}, "0.5", [])):
        subjects = [{**good["subjects"][0], "scale": bad}, *good["subjects"][1:]]
        cases[f"scale{index}.png"] = ({**good, "subjects": subjects}, "subject #1: recipe field 'scale' must be")
    layered = {**good, "subjects": [{**good["subjects"][0], "scale": {"down": 0.5, "up": {"block_0": [0.0, 1.0]}}},
                                     {**good["subjects"][1], "scale": [0.1, 0.2]}, *good["subjects"][2:]]}  # fmt: skip
    assert read_recipe(_png_with_text(tmp_path / "layered.png", json.dumps(layered))) == layered
    for name, (recipe, message) in cases.items():
        with pytest.raises(RecipeError, match=message):
            read_recipe(_png_with_text(tmp_path / name, json.dumps(recipe)))


def test_subject_fields_are_refused_unless_whole(generated, tmp_path):
    """Guards the subject fields' validators: a photo record without its hash, with an extra key, with a
    hash of 64 characters that are not lowercase hex ("X"), an uploaded photo's record without its hash,
    an uploaded photo named with a Windows folder, and a null scale are each refused, naming the subject
    and the field. Fails when a record is accepted
    for being a mapping (``or`` for ``and``), on a wider hex alphabet, and on a null scale let through."""
    good = recipe_of(generated, None)
    first, rest = good["subjects"][0], good["subjects"][1:]
    photo = first["photos"][0]
    bad = {
        "nohash": ("photos", [{"path": photo["path"]}]),
        "extra": ("photos", [{**photo, "size": 3}]),
        "upper": ("photos", [{**photo, "sha256": "X" * 64}]),
        "uploaded": ("photos", [{"name": "cat.jpg"}]),
        "backslash": ("photos", [{"name": "photos\\cat.jpg", "sha256": photo["sha256"]}]),
        "noscale": ("scale", None),
    }
    for label, (field, value) in bad.items():
        recipe = {**good, "subjects": [{**first, field: value}, *rest]}
        path = _png_with_text(tmp_path / f"{label}.png", json.dumps(recipe))
        with pytest.raises(RecipeError) as error:
            read_recipe(path)
        assert str(error.value).startswith(f"{str(path)!r} subject #1: recipe field {field!r} must be "), label


def test_tokenizer_records_are_names_and_hashes_of_1_to_64_characters(generated, tmp_path):
    """Guards the ``tokenizers`` field's validator at its bounds: identities of 1 and 64 characters are
    read back; an empty one, one of 65, a number, and a list instead of an object are refused."""
    good = recipe_of(generated, None)
    for identity in ("a", "f" * 64):
        recipe = {**good, "tokenizers": {"tokenizer": identity, "tokenizer_2": "0" * 16}}
        assert read_recipe(_png_with_text(tmp_path / f"ok{len(identity)}.png", json.dumps(recipe))) == recipe
    for label, value in {"empty": {"tokenizer": ""}, "long": {"tokenizer": "f" * 65}, "number": {"tokenizer": 3},
                         "list": ["tokenizer", "0" * 16]}.items():  # fmt: skip
        path = _png_with_text(tmp_path / f"{label}.png", json.dumps({**good, "tokenizers": value}))
        with pytest.raises(RecipeError) as error:
            read_recipe(path)
        assert str(error.value).startswith(
            f"{str(path)!r}: recipe field 'tokenizers' must be an object of names and hashes (strings), got "
        ), label


def test_a_new_recipe_records_the_tokenizers_and_is_validated_before_it_is_returned(generated):
    """Guards two of ``build_recipe``'s own steps: the identity of each tokenizer the pipeline holds (a
    rerun warns when they differ) is recorded under ``tokenizers``; and a recipe that would not read
    back (here a guidance the pipeline reports as NaN) is refused at once, as "the new recipe"."""
    from types import SimpleNamespace

    from mipadapter.recipe import tokenizer_identities

    pipe, output, _, _ = generated
    subjects = [RecipeSubject("cat", [CAT]), RecipeSubject("backpack", [BACKPACK])]
    recipe = build_recipe(pipe, output, seed=3, subjects=subjects, models=MODELS)
    assert recipe["tokenizers"] == tokenizer_identities(pipe.pipe)
    assert sorted(recipe["tokenizers"]) == ["tokenizer", "tokenizer_2"]  # SDXL's two
    broken = SimpleNamespace(images=output.images, settings={**output.settings, "guidance_scale": float("nan")})
    with pytest.raises(RecipeError) as error:
        build_recipe(pipe, broken, seed=3, subjects=subjects, models=MODELS)
    assert str(error.value).startswith("the new recipe: recipe field 'guidance' must be ")


def test_the_recipe_structure_is_refused_word_for_word(generated):
    """Guards ``validate_recipe``'s structural refusals, each message whole: not an object, another
    version, an image index equal to the number of images (one below is read), a subject that is not an
    object (numbered from 1), an embedded mask that is not an image (its header is read here, so a
    recipe never reads back with a mask that cannot), and regions that are not one of the recorded kinds
    (three numbers, an embedded mask that is not text)."""
    from mipadapter.recipe import validate_recipe

    good = recipe_of(generated, None)
    validate_recipe({**good, "image_index": good["num_images"] - 1}, "W")
    cases = [
        (["a", "list"], "W: the recipe is a list, not a JSON object"),
        ({**good, "recipe_version": 1}, "W: recipe version 1, this mipadapter reads version 2"),
        ({**good, "image_index": 2, "num_images": 2}, "W: image_index 2 is not below num_images 2"),
        ({**good, "subjects": [good["subjects"][0], "backpack"]}, "W: subject #2 is not an object"),
    ]
    for recipe, message in cases:
        with pytest.raises(RecipeError) as error:
            validate_recipe(recipe, "W")
        assert str(error.value) == message
    embedded = [{**good["subjects"][0], "region": {"png_base64": "bm90IGEgcG5n"}}, *good["subjects"][1:]]
    with pytest.raises(RecipeError) as error:  # the embedded mask's header is read: "not a png" is none
        validate_recipe({**good, "subjects": embedded}, "W")
    assert str(error.value).startswith("W subject #1: recipe field 'png_base64': the embedded mask ")
    for region in ([1, 2, 3], {"png_base64": 3}, "0,0,32,64"):
        subjects = [{**good["subjects"][0], "region": region}, *good["subjects"][1:]]
        with pytest.raises(RecipeError) as error:
            validate_recipe({**good, "subjects": subjects}, "W")
        assert str(error.value).startswith("W subject #1: recipe field 'region' must be null, [x0, y0, x1, y1], "), region


def test_regions_are_recorded_as_given(generated):
    """Guards how ``build_recipe`` records each kind of region: a box as four floats, a mask without a
    file as an optimized greyscale PNG (whatever the mask's mode: an RGB mask is stored as its L
    conversion), and a box of another length refused word for word."""
    import base64
    import io

    pipe, output, _, mask = generated
    rgb = mask.convert("RGB")

    def recorded(region):
        subjects = [
            RecipeSubject("cat", [CAT], region=(1, 2, 30, 60)),
            RecipeSubject("backpack", [BACKPACK], region=region),
        ]
        return build_recipe(pipe, output, seed=3, subjects=subjects, models=MODELS)["subjects"]

    cat, backpack = recorded(rgb)
    assert cat["region"] == [1.0, 2.0, 30.0, 60.0] and all(type(v) is float for v in cat["region"])
    expected = io.BytesIO()
    rgb.convert("L").save(expected, format="PNG", optimize=True)
    assert base64.b64decode(backpack["region"]["png_base64"]) == expected.getvalue()
    with Image.open(io.BytesIO(expected.getvalue())) as stored:
        assert stored.mode == "L"
    with pytest.raises(ValueError) as error:
        recorded((0, 0, 32))
    assert str(error.value) == "a region box has 4 numbers x0, y0, x1, y1, got (0, 0, 32)"


def test_a_negative_given_as_embeddings_is_recorded_only_when_the_pipeline_says_so(generated):
    """Guards the ``negative_prompt_embeds`` flag: true in the recipe exactly when the pipeline reports
    it (a recipe cannot hold the embeddings, and a rerun must know), absent otherwise; and an output
    with no ``settings`` attribute at all is refused like one with empty settings."""
    from types import SimpleNamespace

    pipe, output, _, _ = generated
    subjects = [RecipeSubject("cat", [CAT]), RecipeSubject("backpack", [BACKPACK])]
    flagged = SimpleNamespace(images=output.images, settings={**output.settings, "negative_prompt_embeds": True})
    recipe = build_recipe(pipe, flagged, seed=3, subjects=subjects, models=MODELS)
    assert recipe["negative_prompt_embeds"] is True
    assert "negative_prompt_embeds" not in build_recipe(pipe, output, seed=3, subjects=subjects, models=MODELS)
    with pytest.raises(ValueError, match="this output's settings lack prompt, negative_prompt, "):
        build_recipe(pipe, SimpleNamespace(images=output.images), seed=3, subjects=subjects, models=MODELS)


@pytest.mark.parametrize(
    ("class_name", "family"),
    [("StableDiffusionXLPipeline", "SDXL"), ("StableDiffusionXLImg2ImgPipeline", "SDXL"),
     ("StableDiffusionPipeline", "SD1.5"), ("StableDiffusion3Pipeline", "SD3"), ("FluxPipeline", "FLUX"),
     ("FluxImg2ImgPipeline", "FLUX"), ("KandinskyPipeline", "Kandinsky")],
)  # fmt: skip
def test_model_family_follows_the_wrapped_pipeline_class(class_name, family):
    from types import SimpleNamespace

    from mipadapter.recipe import model_family

    inner = type(class_name, (), {})()
    assert model_family(SimpleNamespace(pipe=inner)) == model_family(inner) == family


@pytest.mark.parametrize(
    ("multi_image", "region_mode"), [("each", "multiply"), ("mean", "multiply"), ("each", "replace")]
)
def test_non_default_modes_are_recorded_and_round_trip(generated, tmp_path, multi_image, region_mode):
    """Guards against the recipe recording ``multi_image`` (or ``region_mode``) as its default whatever
    the call used: a rerun from the PNG would then route the photos differently. Fails when
    ``build_recipe`` writes ``"multi_image": "mean"`` (or ``"region_mode": "replace"``) unconditionally."""
    pipe = generated[0]
    call = dict(prompt="a cat wearing a backpack", num_inference_steps=1, multi_image=multi_image)
    subjects = [
        Subject("cat", [Image.open(CAT), Image.open(BACKPACK)], region=(0, 0, 32, 64),
                region_mode=region_mode),
        Subject("backpack", [Image.open(BACKPACK)]),
    ]
    output = pipe(call["prompt"], subjects, generator=torch.Generator().manual_seed(5), show_progress=False,
                  **{k: v for k, v in call.items() if k != "prompt"})  # fmt: skip
    recorded = [
        RecipeSubject("cat", [CAT, BACKPACK], region=(0, 0, 32, 64)),
        RecipeSubject("backpack", [BACKPACK]),
    ]
    recipe = build_recipe(pipe, output, seed=5, subjects=recorded, models=MODELS)
    assert (recipe["multi_image"], recipe["region_mode"]) == (multi_image, region_mode)
    path = write_image(output.images[0], tmp_path / "modes.png", recipe)
    assert read_recipe(path) == recipe


# ----------------------------------------------------------------------------------------------- adapters
FACE_SHA = "ab" * 32


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One tiny call whose two subjects are encoded by two adapters (MIP basic default, Plus "face")."""
    from mipadapter.recipe import AdapterRecord
    from mipadapter.testing.mip import tiny_adapter, tiny_parts
    from mipadapter.testing.tiny import TINY_SDXL

    pipe = tiny_mip_pipeline("sdxl")
    _, encoder, processor = tiny_parts("sdxl", "plus", base_pipe=pipe.pipe)
    pipe.add_adapter("face", tiny_adapter(pipe.pipe.unet, TINY_SDXL.plus_image_encoder, "plus", False, 5), encoder, processor)
    subjects = [Subject("man", [Image.open(CAT)], adapter="face", scale=0.4), Subject("cat", [Image.open(BACKPACK)])]
    call = dict(prompt="a man holding a cat", num_inference_steps=1)
    output = pipe(call["prompt"], subjects, generator=torch.Generator().manual_seed(2), show_progress=False,
                  num_inference_steps=1)  # fmt: skip
    models = ModelRecord(
        "tiny-sdxl (random)", "/m/model_sdxl.bin", "tiny sdxl basic (random)", tiny="sdxl", adapter_sha256="cd" * 32,
        adapters=(AdapterRecord("face", "/m/face.bin", FACE_SHA, "/m/image_encoder"),),
    )
    return build_recipe(
        pipe, output, seed=2, subjects=[RecipeSubject("man", [CAT]), RecipeSubject("cat", [BACKPACK])],
        models=models,
    )  # fmt: skip


def test_a_mixed_call_records_each_subjects_adapter_and_every_adapter_file(mixed, tmp_path):
    """Guards the recipe of a call that mixes adapters: which adapter encoded whom, each file's SHA-256
    (and the region mode of a call without regions: "replace", the subjects' default)."""
    assert [s["adapter"] for s in mixed["subjects"]] == ["face", "default"]
    assert mixed["region_mode"] == "replace" and all(s["region"] is None for s in mixed["subjects"])
    assert mixed["models"]["adapter_sha256"] == "cd" * 32
    assert mixed["models"]["adapters"] == [
        {"name": "face", "adapter": "/m/face.bin", "sha256": FACE_SHA, "image_encoder": "/m/image_encoder"}
    ]
    assert mixed["rule"] == "paper" and mixed["text_weight"] is False  # the face adapter has no text weight
    assert read_recipe(write_image(Image.new("RGB", (8, 8)), tmp_path / "m.png", mixed)) == mixed


def test_a_one_adapter_recipe_records_no_adapter_names(generated):
    recipe = recipe_of(generated, None)
    assert all("adapter" not in subject for subject in recipe["subjects"])
    assert set(recipe["models"]) == {"base_model", "adapter", "image_encoder", "preset", "tiny"}


def test_recorded_adapters_are_checked_like_every_field(mixed, tmp_path):
    face = mixed["models"]["adapters"][0]

    def with_models(**changes):
        return {**mixed, "models": {**mixed["models"], **changes}}

    def with_subject_adapter(name):
        return {**mixed, "subjects": [{**mixed["subjects"][0], "adapter": name}, *mixed["subjects"][1:]]}

    cases = {
        "sha.png": (with_models(adapter_sha256="XY"), "models: recipe field 'adapter_sha256' must be 64 lowercase hex"),
        "empty.png": (with_models(adapters=[]), "models: recipe field 'adapters' must be a non-empty list"),
        "entry.png": (with_models(adapters=["face"]), "models adapter #1 is not an object"),
        "lacks.png": (with_models(adapters=[{"name": "face"}]), "models adapter #1: the recipe lacks adapter, sha256"),
        "default.png": (
            with_models(adapters=[{**face, "name": "default"}]),
            "models adapter #1: recipe field 'name' must be an adapter name (letters, digits, '_', '-', '.') other "
            "than 'default', got 'default'",
        ),
        "spaces.png": (with_models(adapters=[{**face, "name": "my face"}]), "recipe field 'name' must be an adapter name"),
        "twice.png": (
            with_models(adapters=[face, {**face, "sha256": "ef" * 32}]),
            "models adapter #2: the adapter name 'face' is recorded twice",
        ),
        "filesha.png": (with_models(adapters=[{**face, "sha256": "00"}]), "recipe field 'sha256' must be 64 lowercase"),
        "unknown.png": (
            with_subject_adapter("hair"),
            "subject #1: its adapter 'hair' is not one the recipe records (default, face)",
        ),
        "badname.png": (with_subject_adapter(""), "subject #1: recipe field 'adapter' must be an adapter name"),
        "preset.png": (
            with_models(adapters=[{**face, "preset": "ip-sdxl-plus-hair"}]),
            "models adapter #1: recipe field 'preset' must be one of the presets (",
        ),
    }
    for name, (recipe, message) in cases.items():
        with pytest.raises(RecipeError) as error:
            read_recipe(_png_with_text(tmp_path / name, json.dumps(recipe)))
        assert message in str(error.value) and name in str(error.value), (name, str(error.value))


def test_the_preset_that_named_an_added_adapter_is_recorded_and_read_back_for_a_rerun(mixed, tmp_path):
    """Guards a rerun's added subject on a preset-named adapter: it must get the preset's default scale
    (0.6 for ip-sdxl-plus-face), not a plain file's 1.0, so the preset is recorded and handed back."""
    from mipadapter.cli.generate import _recorded_adapters
    from mipadapter.config import PRESETS
    from mipadapter.recipe import AdapterRecord

    record = AdapterRecord("face", "/m/face.bin", FACE_SHA, "/m/image_encoder", preset="ip-sdxl-plus-face")
    assert record.to_dict() == {
        "name": "face", "adapter": "/m/face.bin", "sha256": FACE_SHA, "image_encoder": "/m/image_encoder",
        "preset": "ip-sdxl-plus-face",
    }  # fmt: skip
    recipe = {**mixed, "models": {**mixed["models"], "adapters": [record.to_dict()]}}
    read = read_recipe(write_image(Image.new("RGB", (8, 8)), tmp_path / "p.png", recipe))
    (added,) = _recorded_adapters(read["models"], "p.png")
    assert (added.name, added.adapter, added.preset, added.sha256) == ("face", "/m/face.bin", "ip-sdxl-plus-face", FACE_SHA)
    assert PRESETS[added.preset].scale == 0.6
    (plain,) = _recorded_adapters(mixed["models"], "m.png")  # a file: no preset, its own default scale
    assert plain.preset is None
