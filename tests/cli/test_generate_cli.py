"""`mipadapter generate` end to end on the tiny models: outputs, recipes, --from-png, --tiny forms,
repeated names, EXIF photos, -v and --help."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from cli_checks import pixels
from PIL import Image

from mipadapter.cli.main import build_parser, main
from mipadapter.fileio import current_umask
from mipadapter.photos import EXIF_ORIENTATION
from mipadapter.recipe import file_sha256, read_recipe

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CAT, BACKPACK = ASSETS / "cat.jpg", ASSETS / "backpack.jpg"
PROMPT = "a cat wearing a backpack in Boston"


def generate(
    out: Path, *extra: str, prompt: str = PROMPT, subjects=(f"cat={CAT}", f"backpack={BACKPACK}")
) -> int:
    argv = ["generate", "--tiny", "--prompt", prompt, "--steps", "2", "-o", str(out)]
    for subject in subjects:
        argv += ["--subject", subject]
    return main(argv + list(extra))


def test_generate_writes_images_with_recipes_and_a_sheet_of_every_image(tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    code = generate(
        tmp_path / "out.png",
        "--scale", "cat=0.5", "--region", "backpack=0,0,32,64", "--num-images", "2",
        "--contact-sheet", str(sheet),
    )  # fmt: skip
    assert code == 0
    outputs = [tmp_path / "out_1.png", tmp_path / "out_2.png"]
    assert capsys.readouterr().out.split() == [str(p) for p in outputs] + [str(sheet)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_1.png", "out_2.png", "sheet.png"]
    recipe = read_recipe(outputs[1])
    assert recipe["prompt"] == PROMPT and recipe["seed"] == 420 and recipe["image_index"] == 1
    assert recipe["guidance"] == 5.0 and (recipe["height"], recipe["width"]) == (64, 64)
    assert recipe["num_images"] == 2 and recipe["rule"] == "official" and recipe["models"]["tiny"] == "sdxl"
    cat, backpack = recipe["subjects"]
    assert cat["scale"] == 0.5 and backpack["region"] == [0.0, 0.0, 32.0, 64.0]
    assert cat["photos"] == [{"path": str(CAT.resolve()), "sha256": file_sha256(CAT)}]
    assert not np.array_equal(pixels(outputs[0]), pixels(outputs[1]))
    with Image.open(sheet) as drawn:  # every result in the top row, one row per subject below
        assert drawn.size == (3 * 256, 3 * (256 + 18))


def test_from_png_reproduces_bit_for_bit_and_flags_override(tmp_path):
    first = tmp_path / "first.png"
    assert generate(first, "--scale", "backpack=0.6", "--region", "cat=0,0,40,64", "--seed", "11") == 0
    again, jpeg_again, other = tmp_path / "again.png", tmp_path / "again2.png", tmp_path / "other.png"
    assert main(["generate", "--from-png", str(first), "-o", str(again)]) == 0
    assert np.array_equal(pixels(first), pixels(again))
    assert read_recipe(again) == read_recipe(first)
    # a JPEG carries the same recipe (its pixels are lossy; the recipe is exact)
    assert main(["generate", "--from-png", str(first), "-o", str(tmp_path / "copy.jpg")]) == 0
    assert main(["generate", "--from-png", str(tmp_path / "copy.jpg"), "-o", str(jpeg_again)]) == 0
    assert np.array_equal(pixels(first), pixels(jpeg_again))
    assert main(["generate", "--from-png", str(first), "--seed", "12", "-o", str(other)]) == 0
    assert not np.array_equal(pixels(first), pixels(other))
    changed = read_recipe(other)
    assert changed["seed"] == 12 and changed["subjects"] == read_recipe(first)["subjects"]


def test_from_png_reports_a_changed_or_missing_photo(tmp_path, capsys):
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(CAT.read_bytes())
    first = tmp_path / "first.png"
    assert generate(first, subjects=(f"cat={photo}", f"backpack={BACKPACK}")) == 0
    out = tmp_path / "out"
    out.mkdir()
    photo.write_bytes(BACKPACK.read_bytes())
    capsys.readouterr()
    assert main(["generate", "--from-png", str(first), "-o", str(out / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"mipadapter generate: error: recorded photo 1 of 'cat' '{photo}' has changed since '{first}' "
        "was made (its SHA-256 differs)\n"
    )
    photo.unlink()
    assert main(["generate", "--from-png", str(first), "-o", str(out / "x.png")]) == 2
    assert f"'{photo}', recorded in '{first}', is missing" in capsys.readouterr().err
    # new photos given with --subject replace the recorded ones (nothing recorded is checked then)
    assert main(["generate", "--from-png", str(first), "--subject", f"cat={CAT}", "--subject",
                 f"backpack={BACKPACK}", "-o", str(out / "x.png")]) == 0  # fmt: skip
    assert os.listdir(out) == ["x.png"]


def test_tiny_sd15_and_an_adapter_trained_on_the_tiny_models(tmp_path):
    from mipadapter import save_adapter
    from mipadapter.testing.mip import tiny_mip_pipeline

    assert generate(tmp_path / "sd15.png", "--tiny", "sd15") == 0
    assert read_recipe(tmp_path / "sd15.png")["models"]["tiny"] == "sd15"
    plus = tiny_mip_pipeline("sdxl", "plus", text_weight=True, seed=3).adapter
    saved = save_adapter(plus, tmp_path / "tiny_plus.safetensors")
    assert generate(tmp_path / "plus.png", "--adapter", str(saved)) == 0
    assert generate(tmp_path / "builtin.png") == 0
    assert not np.array_equal(pixels(tmp_path / "plus.png"), pixels(tmp_path / "builtin.png"))
    recipe = read_recipe(tmp_path / "plus.png")
    assert recipe["models"]["adapter"] == str(saved.resolve()) and "plus" in recipe["models"]["image_encoder"]
    assert (
        main(["generate", "--from-png", str(tmp_path / "plus.png"), "-o", str(tmp_path / "again.png")]) == 0
    )
    assert np.array_equal(pixels(tmp_path / "plus.png"), pixels(tmp_path / "again.png"))


def test_the_same_name_twice_is_two_subjects_addressed_by_number(tmp_path):
    code = generate(
        tmp_path / "dogs.png",
        "--scale", "dog#2=0.25", "--region", "dog#1=0,0,32,64", "--region", "dog#2=32,0,64,64",
        "--contact-sheet", str(tmp_path / "sheet.png"),
        prompt="a dog and a dog on a sofa", subjects=(f"dog={CAT}", f"dog={BACKPACK}"),
    )  # fmt: skip
    assert code == 0
    first, second = read_recipe(tmp_path / "dogs.png")["subjects"]
    assert (first["name"], second["name"]) == ("dog", "dog")
    assert first["scale"] == 1.0 and second["scale"] == 0.25  # the tiny adapter's default, then dog#2's
    assert first["region"] == [0.0, 0.0, 32.0, 64.0] and second["region"] == [32.0, 0.0, 64.0, 64.0]
    assert first["photos"][0]["path"] == str(CAT.resolve()) and second["photos"][0]["path"] == str(
        BACKPACK.resolve()
    )


def _exif_rotated(tmp_path: Path) -> tuple[Path, Path]:
    """The cat photo stored sideways with Orientation=6, and the same photo physically upright."""
    upright = Image.open(CAT).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote; 6 turns it back
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    tagged, turned = tmp_path / "tagged.png", tmp_path / "turned.png"
    stored.save(tagged, exif=exif)
    stored.transpose(Image.Transpose.ROTATE_270).save(turned)
    assert np.array_equal(np.asarray(Image.open(turned)), np.asarray(upright))
    return tagged, turned


def test_an_exif_tagged_photo_gives_the_image_of_the_upright_photo(tmp_path):
    tagged, turned = _exif_rotated(tmp_path)
    assert generate(tmp_path / "a.png", subjects=(f"cat={tagged}", f"backpack={BACKPACK}")) == 0
    assert generate(tmp_path / "b.png", subjects=(f"cat={turned}", f"backpack={BACKPACK}")) == 0
    sideways = tmp_path / "sideways.png"
    Image.open(tagged).save(sideways)  # the stored pixels without the tag: really sideways
    assert generate(tmp_path / "c.png", subjects=(f"cat={sideways}", f"backpack={BACKPACK}")) == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert generate(tmp_path / "out.png", "--contact-sheet", str(tmp_path / "sheet.jpg")) == 0
    finally:
        os.umask(old)
    for name in ("out.png", "sheet.jpg"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640 != 0o666 & ~current_umask()


def test_verbose_works_after_the_verb(tmp_path):
    with pytest.raises(ValueError, match="--steps must be an integer between 1 and 100"):  # -v: the real exception
        generate(tmp_path / "x.png", "--steps", "0", "-v")
    with pytest.raises(ValueError, match="--steps must be an integer between 1 and 100"):
        main(["-v", "generate", "--tiny", "--prompt", "a cat", "--subject", f"cat={CAT}", "--steps", "0"])


def _generate_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["generate"]


def test_every_generate_option_has_help_and_shows_its_default():
    no_default = {"--prompt", "--subject", "--from-png", "--contact-sheet", "-h", "-v", "--no-text-weight"}
    for action in _generate_parser()._actions:
        flags = set(action.option_strings)
        if not flags or flags & {"-h", "-v"}:
            continue
        assert action.help and len(action.help) > 15, action.option_strings
        if not flags & no_default:
            assert "(default" in action.help, action.option_strings


def test_every_web_option_shows_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in subparsers.choices["web"]._actions:
        if action.option_strings and not set(action.option_strings) & {"-h", "-v"}:
            assert action.help and "(default" in action.help, action.option_strings


def test_the_help_examples_keep_their_line_continuations(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    lines = capsys.readouterr().out.splitlines()
    examples = [line for line in lines if "mipadapter generate --preset ip-flux" in line]
    assert len(examples) == 1 and examples[0].endswith(" \\")
    following = lines[lines.index(examples[0]) + 1]
    assert following.strip().startswith("--subject cat=cat.jpg --subject jacket=jacket.jpg")


def test_top_level_help_is_written_for_users(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "reference photos" in text and "examples:" in text and "mipadapter generate --from-png" in text
    assert "register(subparsers)" not in text and "sub-command module" not in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "dog#2" in text and "--tiny [ARCH]" in text


def test_the_largest_seed_is_accepted_and_recorded(tmp_path):
    assert generate(tmp_path / "x.png", "--seed", str(2**64 - 1)) == 0
    assert read_recipe(tmp_path / "x.png")["seed"] == 2**64 - 1


def test_models_from_local_folders_are_recorded_and_rerun(tmp_path, monkeypatch):
    """The non-tiny path: --base-model, --adapter, --image-encoder as local paths (relative ones too)."""
    from mipadapter.testing import tiny_checkpoint_files, tiny_sdxl_pipeline

    base = tiny_sdxl_pipeline()
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "files").mkdir()
    files = tiny_checkpoint_files(tmp_path / "files", base)
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--prompt", "a cat on a sofa", "--subject", f"cat={CAT}", "--steps", "2"]
    argv += ["--base-model", "base", "--adapter", "files/" + files.mip_basic_bin.name]
    argv += ["--image-encoder", str(files.basic_image_encoder), "-o", "first.png"]
    assert main(argv) == 0
    recipe = read_recipe(tmp_path / "first.png")
    assert (
        recipe["models"]["adapter"] == str(files.mip_basic_bin.resolve()) and recipe["models"]["tiny"] is None
    )
    assert recipe["models"]["base_model"] == str(tmp_path / "base")  # absolute: a rerun works from anywhere
    assert recipe["models"]["preset"] == "mip-sdxl" and recipe["subjects"][0]["scale"] == 0.75  # the preset's
    assert recipe["negative_prompt"] == "monochrome, lowres, bad anatomy, worst quality, low quality"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["generate", "--from-png", "../first.png", "-o", "again.png"]) == 0
    assert np.array_equal(pixels(tmp_path / "first.png"), pixels(elsewhere / "again.png"))


def test_tiny_stands_for_the_default_preset_and_records_the_negative_prompt_it_used(tmp_path):
    """The built-in tiny MIP adapter stands for mip-sdxl: the authors' negative prompt by default, recorded;
    --negative-prompt "" turns it off, recorded as none."""
    from mipadapter.config import AUTHORS_NEGATIVE_PROMPT

    base = ["generate", "--tiny", "--prompt", "a cat wearing a backpack", "--subject", f"cat={CAT}",
            "--subject", f"backpack={BACKPACK}", "--steps", "1"]  # fmt: skip
    assert main(base + ["-o", str(tmp_path / "default.png")]) == 0
    assert read_recipe(tmp_path / "default.png")["negative_prompt"] == AUTHORS_NEGATIVE_PROMPT
    assert main(base + ["--negative-prompt", "", "-o", str(tmp_path / "off.png")]) == 0
    assert read_recipe(tmp_path / "off.png")["negative_prompt"] is None


# ----------------------------------------------------------------------------------------------- --from-png
def test_from_png_with_one_new_subject_keeps_every_other_recorded_subject(tmp_path, capsys):
    first, mine = tmp_path / "first.png", tmp_path / "mine.png"
    settings = ("--scale", "backpack=0.6", "--region", "cat=0,0,40,64", "--seed", "5")
    assert generate(first, *settings) == 0
    assert read_recipe(first)["subjects"][1]["scale"] == 0.6  # as given, not float32's 0.6000000238418579
    assert main(["generate", "--from-png", str(first), "--subject", f"cat={BACKPACK}", "-o", str(mine)]) == 0
    cat, backpack = read_recipe(mine)["subjects"]
    assert cat["photos"][0]["path"] == str(BACKPACK.resolve()) and cat["region"] == [0.0, 0.0, 40.0, 64.0]
    assert backpack == read_recipe(first)["subjects"][1]  # kept: its photo, scale 0.6 and region
    # the same image as asking for all of it by hand
    direct = tmp_path / "direct.png"
    assert generate(direct, *settings, subjects=(f"cat={BACKPACK}", f"backpack={BACKPACK}")) == 0
    assert np.array_equal(pixels(mine), pixels(direct))
    # a new --prompt keeps the recorded subjects it still names, and only those
    beach, alone = tmp_path / "beach.png", tmp_path / "alone.png"
    rerun = ["generate", "--from-png", str(first), "--subject", f"cat={BACKPACK}"]
    assert main(rerun + ["--prompt", "a Cat wearing a backpack on a beach", "-o", str(beach)]) == 0
    assert [s["name"] for s in read_recipe(beach)["subjects"]] == ["cat", "backpack"]
    assert main(rerun + ["--prompt", "a cat on a beach", "-o", str(alone)]) == 0
    assert [s["name"] for s in read_recipe(alone)["subjects"]] == ["cat"]
    # a kept subject's photo is checked like any recorded one
    photo = tmp_path / "backpack.jpg"
    photo.write_bytes(BACKPACK.read_bytes())
    assert generate(first, *settings, subjects=(f"cat={CAT}", f"backpack={photo}")) == 0
    photo.write_bytes(CAT.read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    assert main(["generate", "--from-png", str(first), "--subject", f"cat={BACKPACK}", "-o", str(out / "x.png")]) == 2
    assert capsys.readouterr().err == (
        f"mipadapter generate: error: recorded photo 1 of 'backpack' '{photo}' has changed since '{first}' "
        "was made (its SHA-256 differs)\n"
    )
    assert os.listdir(out) == []


def test_from_png_of_image_2_of_a_batch_writes_that_image_alone_at_o(tmp_path, capsys):
    batch, again = tmp_path / "batch", tmp_path / "again"
    batch.mkdir(), again.mkdir()
    assert generate(batch / "b.png", "--num-images", "2", "--seed", "3") == 0
    second = batch / "b_2.png"
    capsys.readouterr()
    assert main(["generate", "--from-png", str(second), "-o", str(again / "x.png")]) == 0
    assert capsys.readouterr().out == f"{again / 'x.png'}\n" and os.listdir(again) == ["x.png"]
    assert np.array_equal(pixels(again / "x.png"), pixels(second))
    assert read_recipe(again / "x.png") == read_recipe(second)
    # --num-images given: the whole batch again, numbered
    assert main(["generate", "--from-png", str(second), "--num-images", "2", "-o", str(again / "y.png")]) == 0
    assert sorted(os.listdir(again)) == ["x.png", "y_1.png", "y_2.png"]
    assert np.array_equal(pixels(again / "y_1.png"), pixels(batch / "b_1.png"))


def test_a_recipe_reruns_only_on_its_model_family(tmp_path, capsys):
    made = tmp_path / "sd15.png"
    assert generate(made, "--tiny", "sd15") == 0
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    assert main(["generate", "--from-png", str(made), "--tiny", "flux", "-o", str(out / "x.png")]) == 2
    assert capsys.readouterr().err == (
        f"mipadapter generate: error: '{made}' was made on SD1.5, but --tiny flux is FLUX: a recipe reruns on "
        "its own model family (give --prompt and --subject for a new image on this model)\n"
    )
    assert main(["generate", "--from-png", str(made), "--tiny", "sdxl", "-o", str(out / "x.png")]) == 2
    assert "was made on SD1.5, but --tiny sdxl is SDXL" in capsys.readouterr().err
    assert os.listdir(out) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_folder_that_refuses_files_is_refused_before_generating(tmp_path, capsys, monkeypatch):
    import mipadapter.cli.options as options

    def no_loading(*args, **kwargs):
        raise AssertionError("models were loaded")

    monkeypatch.setattr(options, "load_pipeline", no_loading)
    assert generate(Path("/proc/x.png")) == 2
    assert capsys.readouterr().err == (
        "mipadapter generate: error: -o '/proc/x.png': the folder '/proc' is not writable (creating a file "
        "there fails: No such file or directory)\n"
    )
    assert not Path("/proc/x.png").exists()


def test_the_contact_sheet_numbers_every_subject_of_a_repeated_name(tmp_path, monkeypatch):
    import mipadapter.figures as figures

    shown = []
    real = figures.contact_sheet

    def recording(references, results, relevance=None, **kwargs):
        shown.append((list(references), [sorted(r) for r in relevance]))
        return real(references, results, relevance, **kwargs)

    monkeypatch.setattr(figures, "contact_sheet", recording)
    code = generate(
        tmp_path / "dogs.png", "--contact-sheet", str(tmp_path / "sheet.png"),
        prompt="a dog and a dog and a cat", subjects=(f"dog={CAT}", f"dog={BACKPACK}", f"cat={CAT}"),
    )  # fmt: skip
    assert code == 0
    assert shown == [(["dog#1", "dog#2", "cat"], [["cat", "dog#1", "dog#2"]])]


def test_from_png_warns_in_one_line_when_the_tokenizers_differ(tmp_path, capsys, monkeypatch):
    from mipadapter.provenance import tokenizer_identity
    from mipadapter.recipe import write_image
    from mipadapter.testing import build_clip_tokenizer, has_real_clip_vocab

    first, same = tmp_path / "first.png", tmp_path / "same.png"
    assert generate(first) == 0
    recorded = read_recipe(first)["tokenizers"]
    assert set(recorded) == {"tokenizer", "tokenizer_2"}
    capsys.readouterr()
    assert main(["generate", "--from-png", str(first), "-o", str(same)]) == 0
    assert "warning" not in capsys.readouterr().err and np.array_equal(pixels(first), pixels(same))
    # a recipe written before the field reruns without a word
    old, again = tmp_path / "old.png", tmp_path / "again.png"
    without = {key: value for key, value in read_recipe(first).items() if key != "tokenizers"}
    with Image.open(first) as image:
        write_image(image.copy(), old, without)
    assert main(["generate", "--from-png", str(old), "-o", str(again)]) == 0
    assert "warning" not in capsys.readouterr().err and np.array_equal(pixels(first), pixels(again))
    if not has_real_clip_vocab():
        pytest.skip("CLIP's real BPE (open_clip) is not installed: both runs used the fallback vocabulary")
    # this environment's tiny models now tokenize with the tests' fallback vocabulary, not CLIP's BPE
    monkeypatch.setattr("mipadapter.testing.tokenizer.has_real_clip_vocab", lambda: False)
    here = {
        "tokenizer": tokenizer_identity(build_clip_tokenizer()),
        "tokenizer_2": tokenizer_identity(build_clip_tokenizer("!")),
    }
    assert main(["generate", "--from-png", str(first), "-o", str(tmp_path / "other.png")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]  # not the progress bar
    assert err == [
        f"mipadapter generate: warning: '{first}' was made with other tokenizers than this environment's "
        f"(tokenizer {recorded['tokenizer']} there, {here['tokenizer']} here; tokenizer_2 "
        f"{recorded['tokenizer_2']} there, {here['tokenizer_2']} here): the image may differ (e.g. the tests' "
        "fallback vocabulary vs CLIP's real BPE)"
    ]
