"""What a rerun checks before any model loads, function by function, word for word: the recipe's field
rules at their bounds, the tokenizer warning, the recorded files (missing, changed, not a file, uploaded)
and the recorded regions. Fast unit tests; tests/test_recipe.py and the CLI tests run them end to end.

Each test was written against mutants that survived the suite (issue 23): a bound that became strict, a
warning that never fires or names the wrong file, a message that names the wrong photo."""

from __future__ import annotations

import base64
import io
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mipadapter.photos import PhotoError
from mipadapter.recipe import (
    RecipeError,
    _int_in,
    _non_empty_string,
    _number_in,
    _shown,
    check_recorded_file,
    file_sha256,
    recorded_region,
    tokenizer_mismatch,
    verify_inputs,
)

# --------------------------------------------------------------------------------------------- field rules


@pytest.mark.parametrize(("low", "high"), [(1, 5), (0, 4096)])
def test_an_integer_rule_takes_both_bounds_and_nothing_outside(low, high):
    wanted, ok = _int_in(low, high)
    assert wanted == f"an integer in {low}..{high}"
    assert ok(low) is True and ok(high) is True and ok((low + high) // 2) is True
    assert not ok(low - 1) and not ok(high + 1)
    assert not ok(float(low)) and not ok(True) and not ok(str(low)) and not ok(None)


@pytest.mark.parametrize(("low", "high", "shown"), [(0, 30, "0..30"), (0.5, 2.25, "0.5..2.25")])
def test_a_number_rule_takes_both_bounds_and_no_infinity_nan_or_text(low, high, shown):
    wanted, ok = _number_in(low, high)
    assert wanted == f"a finite number in {shown}"
    assert ok(low) is True and ok(high) is True and ok(int(high)) is (int(high) >= low)
    assert not ok(low - 0.01) and not ok(high + 0.01)
    assert not ok(math.nan) and not ok(math.inf) and not ok(str(low)) and not ok(None)


def test_a_non_empty_string_rule_refuses_blank_text_and_non_strings():
    wanted, ok = _non_empty_string()
    assert wanted == "a non-empty string"
    assert ok("x") is True and ok(" a b ") is True
    assert not ok("") and not ok("  \t") and not ok(None) and not ok(3) and not ok(["x"])


@pytest.mark.parametrize("length", [1, 59, 60])
def test_a_shown_value_up_to_sixty_characters_is_its_repr(length):
    value = "x" * (length - 2)  # repr adds the two quotes
    assert _shown(value) == repr(value)


@pytest.mark.parametrize("length", [61, 1000])
def test_a_longer_value_is_cut_to_sixty_characters_with_its_length(length):
    value = "y" * (length - 2)
    assert _shown(value) == repr(value)[:59] + f"… ({length} characters)"
    assert _shown(value, limit=10) == repr(value)[:9] + f"… ({length} characters)"


# --------------------------------------------------------------------------------------------- tokenizers


class _Tokenizer:
    """A stand-in a tokenizer identity can be computed from (a vocabulary and its special tokens)."""

    def __init__(self, *words: str):
        self.vocab = {word: index for index, word in enumerate(words)}
        self.bos_token = self.eos_token = self.pad_token = words[0]

    def get_vocab(self):
        return dict(self.vocab)


def _base(**tokenizers):
    return SimpleNamespace(components={"unet": object(), "text_encoder": object(), **tokenizers})


def _identity(tokenizer) -> str:
    from mipadapter.provenance import tokenizer_identity

    return tokenizer_identity(tokenizer)


def test_no_warning_when_the_tokenizers_are_those_recorded_or_none_are_recorded():
    one, two = _Tokenizer("a", "b"), _Tokenizer("c")
    base = _base(tokenizer=one, tokenizer_2=two)
    recorded = {"tokenizer": _identity(one), "tokenizer_2": _identity(two)}
    assert tokenizer_mismatch({"tokenizers": recorded}, base, "out.png") is None
    assert tokenizer_mismatch({}, base, "out.png") is None
    assert tokenizer_mismatch({"tokenizers": {}}, base, "out.png") is None


def test_the_warning_names_the_file_and_each_differing_tokenizer_with_both_hashes():
    one, two, other = _Tokenizer("a", "b"), _Tokenizer("c"), _Tokenizer("z")
    base = _base(tokenizer=one, tokenizer_2=other, tokenizer_3=None)
    recorded = {"tokenizer": _identity(one), "tokenizer_2": _identity(two)}
    assert tokenizer_mismatch({"tokenizers": recorded}, base, Path("runs/out.png")) == (
        "warning: 'runs/out.png' was made with other tokenizers than this environment's "
        f"(tokenizer_2 {_identity(two)} there, {_identity(other)} here): the image may differ "
        "(e.g. the tests' fallback vocabulary vs CLIP's real BPE)"
    )


def test_a_tokenizer_on_one_side_only_is_listed_with_none_on_the_other():
    one, two = _Tokenizer("a", "b"), _Tokenizer("c")
    recorded = {"tokenizer": _identity(one)}
    warning = tokenizer_mismatch({"tokenizers": recorded}, _base(tokenizer=one, tokenizer_2=two), "a.png")
    assert f"(tokenizer_2 None there, {_identity(two)} here)" in warning
    both = {"tokenizer": _identity(two), "tokenizer_2": _identity(two)}
    warning = tokenizer_mismatch({"tokenizers": both}, _base(tokenizer=one), "a.png")
    assert (
        f"(tokenizer {_identity(two)} there, {_identity(one)} here; tokenizer_2 {_identity(two)} there, None here)"
        in warning
    )


# ----------------------------------------------------------------------------------------- recorded files


def _record(path: Path) -> dict[str, str]:
    return {"path": str(path), "sha256": file_sha256(path)}


def test_a_recorded_file_still_there_and_unchanged_is_returned(tmp_path):
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(b"a photo")
    assert check_recorded_file(_record(photo), "recorded photo 1 of 'cat'", "out.png") == photo


def test_a_changed_missing_or_special_recorded_file_is_refused_in_one_line(tmp_path):
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(b"a photo")
    record = _record(photo)
    photo.write_bytes(b"another photo")
    with pytest.raises(RecipeError) as error:
        check_recorded_file(record, "recorded photo 2 of 'cat'", Path("out.png"))
    assert str(error.value) == (
        f"recorded photo 2 of 'cat' {str(photo)!r} has changed since 'out.png' was made (its SHA-256 differs)"
    )
    photo.unlink()
    with pytest.raises(FileNotFoundError) as error:
        check_recorded_file(record, "recorded photo 2 of 'cat'", Path("out.png"))
    assert str(error.value) == f"recorded photo 2 of 'cat' {str(photo)!r}, recorded in 'out.png', is missing"
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(RecipeError) as error:  # refused by its kind, never opened (reading a FIFO blocks)
        check_recorded_file({"path": str(pipe), "sha256": record["sha256"]}, "the mask", Path("out.png"))
    assert str(error.value) == f"the mask {str(pipe)!r}, recorded in 'out.png', is a named pipe (FIFO), not a file"
    with pytest.raises(RecipeError) as error:
        check_recorded_file({"path": str(tmp_path), "sha256": record["sha256"]}, "the mask", "out.png")
    assert str(error.value) == f"the mask {str(tmp_path)!r}, recorded in 'out.png', is a folder, not a file"


def _subject(name: str, photos: list, region=None) -> dict:
    return {"name": name, "photos": photos, "scale": 1.0, "region": region}


def test_verify_inputs_names_the_photo_and_subject_that_changed(tmp_path):
    files = {}
    for name in ("cat1.jpg", "cat2.jpg", "bag.jpg", "mask.png"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    recipe = {
        "subjects": [
            _subject("cat", [_record(files["cat1.jpg"]), _record(files["cat2.jpg"])]),
            _subject("bag", [_record(files["bag.jpg"])], region=_record(files["mask.png"])),
        ]
    }
    verify_inputs(recipe, "out.png")
    files["cat2.jpg"].write_bytes(b"changed")
    with pytest.raises(RecipeError) as error:
        verify_inputs(recipe, "out.png")
    assert str(error.value).startswith(f"recorded photo 2 of 'cat' {str(files['cat2.jpg'])!r} has changed")
    recipe["subjects"][0]["photos"][1] = _record(files["cat2.jpg"])
    files["mask.png"].write_bytes(b"changed")
    with pytest.raises(RecipeError) as error:
        verify_inputs(recipe, "out.png")
    assert str(error.value).startswith(f"the recorded region mask of 'bag' {str(files['mask.png'])!r} has changed")
    recipe["subjects"][1]["region"] = [0.0, 0.0, 8.0, 8.0]  # a box: no file to check
    verify_inputs(recipe, "out.png")


def test_an_uploaded_photo_is_asked_for_again_by_name(tmp_path):
    """A photo uploaded to the web page has no path: the rerun names it (the first uploaded one) and shows
    the --subject flag to give, with every photo of the subject in order."""
    kept = tmp_path / "cat1.jpg"
    kept.write_bytes(b"cat")
    sha = "ab" * 32
    subjects = [
        _subject("dog", [_record(kept)]),
        _subject("cat", [_record(kept), {"name": "IMG_2.jpg", "sha256": sha}, {"name": "IMG_3.jpg", "sha256": "cd" * 32}]),
    ]
    with pytest.raises(RecipeError) as error:
        verify_inputs({"subjects": subjects}, Path("web/out.png"))
    assert str(error.value) == (
        "recorded photo 2 'IMG_2.jpg' of subject #2 'cat' (SHA-256 abababababab…) was uploaded to the web page, "
        f"so 'web/out.png' names it without a path: give the photos again, e.g. --subject cat={kept},IMG_2.jpg,IMG_3.jpg"
    )


# --------------------------------------------------------------------------------------------- regions


def _png(image: Image.Image, **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_a_recorded_box_is_a_tuple_of_floats_and_none_stays_none():
    assert recorded_region(None) is None
    box = recorded_region([1, 2.5, 30, 40])
    assert box == (1.0, 2.5, 30.0, 40.0) and isinstance(box, tuple) and all(type(v) is float for v in box)


def test_an_embedded_mask_is_decoded_in_its_stored_frame_as_l():
    """A recorded mask is in the output's pixel frame: an EXIF orientation in its PNG is not applied."""
    mask = Image.new("RGB", (6, 4), (0, 0, 0))
    mask.paste((255, 255, 255), (0, 0, 2, 4))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    decoded = recorded_region({"png_base64": _png(mask, exif=exif.tobytes())})
    assert decoded.mode == "L" and decoded.size == (6, 4)
    assert np.array_equal(np.asarray(decoded), np.asarray(mask.convert("L")))


def test_a_recorded_mask_file_is_read_upright_as_l(tmp_path):
    mask = Image.new("RGB", (6, 4), (0, 0, 0))
    mask.paste((255, 255, 255), (0, 0, 2, 4))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "mask.png"
    mask.save(path, exif=exif.tobytes())
    decoded = recorded_region({"path": str(path), "sha256": file_sha256(path)})
    assert decoded.mode == "L" and decoded.size == (4, 6)
    assert np.array_equal(np.asarray(decoded), np.asarray(mask.convert("L").transpose(Image.Transpose.ROTATE_270)))


def test_a_bad_embedded_mask_is_named_as_told(tmp_path):
    not_png = base64.b64encode(b"not an image").decode("ascii")
    with pytest.raises(RecipeError) as error:
        recorded_region({"png_base64": not_png}, "subject #2's region")
    assert str(error.value).startswith("subject #2's region: recipe field 'png_base64': ")
    with pytest.raises(RecipeError) as error:
        recorded_region({"png_base64": not_png})
    assert str(error.value).startswith("the embedded mask: recipe field 'png_base64': ")
    whole = base64.b64decode(_png(Image.new("L", (64, 64), 7)))
    cut = base64.b64encode(whole[:-30]).decode("ascii")  # a sound header, truncated pixels
    with pytest.raises(PhotoError) as error:
        recorded_region({"png_base64": cut}, "subject #2's region")
    assert str(error.value) == "subject #2's region cannot be decoded: image file is truncated"
    path = tmp_path / "mask.png"
    path.write_bytes(b"not an image")
    with pytest.raises(PhotoError) as error:
        recorded_region({"path": str(path), "sha256": file_sha256(path)})
    assert str(error.value) == f"region mask {str(path)!r} is not an image file Pillow can read"
