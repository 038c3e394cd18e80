"""Issue 21 through the CLI: several adapters in one call (``--adapter NAME=FILE``, ``--image-encoder
NAME=DIR``, ``--subject-adapter``) on the tiny models, recorded and rerun bit for bit, every wrong combination
refused in one line before the model runs, with nothing written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_checks import pixels, refusal

from mipadapter.cli.main import main
from mipadapter.recipe import file_sha256, read_recipe

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CAT, BACKPACK = ASSETS / "cat.jpg", ASSETS / "backpack.jpg"
PROMPT = "a man holding a cat"


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    """h94-layout basic/plus and MIP files for the tiny SDXL, with both tiny image encoder folders."""
    from mipadapter.testing import tiny_checkpoint_files, tiny_sdxl_pipeline

    return tiny_checkpoint_files(tmp_path_factory.mktemp("sdxl_files"), tiny_sdxl_pipeline())


@pytest.fixture(scope="module")
def sd15_files(tmp_path_factory):
    from mipadapter.testing import tiny_checkpoint_files, tiny_sd15_pipeline

    return tiny_checkpoint_files(tmp_path_factory.mktemp("sd15_files"), tiny_sd15_pipeline())


@pytest.fixture
def never_called(monkeypatch):
    """Running the pipeline fails the test: the mistakes must be found before the model runs."""
    from mipadapter.pipeline import MIPAdapterPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline ran before the mistake was found")

    monkeypatch.setattr(MIPAdapterPipeline, "__call__", refuse)


def argv(out: Path, *extra: str, tiny: str = "sdxl") -> list[str]:
    return [
        "generate", "--tiny", tiny, "--prompt", PROMPT, "--subject", f"man={CAT}", "--subject", f"cat={BACKPACK}",
        "--steps", "2", "--seed", "7", "-o", str(out), *extra,
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------- end to end
def test_two_adapters_and_two_encoders_are_recorded_and_rerun_bit_for_bit(sdxl_files, tmp_path, capsys):
    """Guards the whole CLI path of a mixed call: the man's photos through the Plus adapter ("face", its own
    ViT-H folder), the cat's through the MIP basic default (the tiny bigG), both files' SHA-256 recorded,
    ``--from-png`` giving the same pixels, and a changed adapter file (added or default) refused on the rerun."""
    face, mip = tmp_path / "face.bin", tmp_path / "model_sdxl.bin"
    shutil.copyfile(sdxl_files.plus_bin, face)
    shutil.copyfile(sdxl_files.mip_basic_bin, mip)
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    flags = ["--adapter", str(mip), "--adapter", f"face={face}",
             "--image-encoder", f"face={sdxl_files.plus_image_encoder}", "--scale", "cat=0.6"]  # fmt: skip
    assert main(argv(first, *flags, "--subject-adapter", "man=face")) == 0
    recipe = read_recipe(first)
    assert recipe["models"]["adapter"] == str(mip)
    assert recipe["models"]["adapter_sha256"] == file_sha256(mip)
    assert recipe["models"]["adapters"] == [
        {"name": "face", "adapter": str(face), "sha256": file_sha256(face),
         "image_encoder": str(sdxl_files.plus_image_encoder.resolve())}
    ]  # fmt: skip
    assert [s["adapter"] for s in recipe["subjects"]] == ["face", "default"]
    assert recipe["rule"] == "paper" and recipe["text_weight"] is False  # h94's Plus has no text weight
    assert [s["scale"] for s in recipe["subjects"]] == [1.0, 0.6]

    assert main(["generate", "--from-png", str(first), "-o", str(again)]) == 0
    assert np.array_equal(pixels(first), pixels(again))
    assert read_recipe(again) == recipe

    # the man through the default adapter instead: another image (the routing by name is not ignored)
    default = tmp_path / "default.png"
    assert main(argv(default, *flags)) == 0
    assert not np.array_equal(pixels(first), pixels(default))
    assert [s["adapter"] for s in read_recipe(default)["subjects"]] == ["default", "default"]

    # the face file replaced by another adapter: the rerun is refused before anything runs
    shutil.copyfile(sdxl_files.mip_plus_bin, face)
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    code = main(["generate", "--from-png", str(first), "-o", str(out / "x.png")])
    assert refusal(capsys, code, out) == (
        f"the recorded adapter 'face' '{face}' has changed since '{first}' was made (its SHA-256 differs)"
    )
    shutil.copyfile(sdxl_files.plus_bin, face)
    shutil.copyfile(sdxl_files.basic_bin, mip)  # the default adapter's file now another one
    code = main(["generate", "--from-png", str(first), "-o", str(out / "x.png")])
    assert refusal(capsys, code, out) == (
        f"the recorded adapter '{mip}' has changed since '{first}' was made (its SHA-256 differs)"
    )


def test_tiny_sd15_mixes_a_basic_and_a_plus_adapter_on_one_encoder_and_reruns(sd15_files, tmp_path):
    """SD1.5's basic and Plus adapters read the same ViT-H: the added one takes the tiny encoder without
    --image-encoder; under --rule uniform (any mix routes) the rerun is bit for bit."""
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    flags = ["--adapter", str(sd15_files.basic_bin), "--adapter", f"mip_plus={sd15_files.mip_plus_bin}",
             "--subject-adapter", "cat=mip_plus", "--rule", "uniform"]  # fmt: skip
    assert main(argv(first, *flags, tiny="sd15")) == 0
    recipe = read_recipe(first)
    assert recipe["model_family"] == "SD1.5" and recipe["rule"] == "uniform"
    assert recipe["models"]["adapters"][0]["image_encoder"] == "tiny sd15 plus (random)"
    assert [s.get("adapter") for s in recipe["subjects"]] == ["default", "mip_plus"]
    assert main(["generate", "--from-png", str(first), "-o", str(again)]) == 0
    assert np.array_equal(pixels(first), pixels(again))


# ----------------------------------------------------------------------------------------------- refusals
@pytest.mark.usefixtures("no_models")
def test_flag_mistakes_are_refused_before_any_model_loads(sdxl_files, out, capsys):
    plus = sdxl_files.plus_bin
    cases = [
        (["--subject-adapter", "man=face"], "--subject-adapter man=face: no adapter is named 'face' (adapters: default)"),
        (["--adapter", f"face={plus}", "--subject-adapter", "man=hair"],
         "--subject-adapter man=hair: no adapter is named 'hair' (adapters: default, face)"),
        (["--subject-adapter", "dog=default"], "--subject-adapter dog: no --subject is called 'dog' (subjects: ['man', 'cat'])"),
        (["--adapter", f"face={plus}", "--adapter", f"face={sdxl_files.basic_bin}"],
         f"--adapter face={sdxl_files.basic_bin}: --adapter face={plus} names 'face' already"),
        (["--adapter", str(plus), "--adapter", str(sdxl_files.basic_bin)],
         f"--adapter gives the default adapter twice ('{plus}' and '{sdxl_files.basic_bin}'): add another one "
         "under a name, --adapter NAME=FILE"),
        (["--adapter", "face=/no/such/face.bin"], "--adapter face=/no/such/face.bin: no such file"),
        (["--adapter", f"face={sdxl_files.root}"], f"--adapter face={sdxl_files.root}: that is a folder; name the checkpoint file inside it"),
        (["--adapter", f"face={plus}", "--image-encoder", f"hair={sdxl_files.plus_image_encoder}"],
         f"--image-encoder hair={sdxl_files.plus_image_encoder}: no --adapter is named 'hair' (added adapters: face)"),
        (["--adapter", f"face={plus}", "--image-encoder", "face=/no/encoder"],
         "--image-encoder face=/no/encoder: no such folder"),
        (["--image-encoder", str(sdxl_files.plus_image_encoder)],
         "--image-encoder cannot be used with --tiny (it picks the tiny base model and image encoder)"),
        (["--adapter", "face=ip-sdxl-plus-face"],
         "--adapter face=ip-sdxl-plus-face: a preset names real models; with --tiny give a file made for the tiny "
         "models"),
        (["--adapter", "face="], "--adapter takes FILE or NAME=FILE, got 'face='"),
        (["--adapter", f"face={plus}", "--image-encoder", "face=/a", "--image-encoder", "face=/b"],
         "--image-encoder face=/b: --image-encoder face=/a names 'face' already"),
        (["--adapter", f"face={plus}", "--image-encoder", "face="], "--image-encoder takes DIR or NAME=DIR, got 'face='"),
    ]  # fmt: skip
    for args, expected in cases:
        assert refusal(capsys, main(argv(out / "x.png", *args)), out) == expected, args


@pytest.mark.usefixtures("no_models")
def test_a_flux_pipeline_takes_no_added_adapter(sdxl_files, out, capsys):
    code = main(argv(out / "x.png", "--adapter", f"face={sdxl_files.plus_bin}", tiny="flux"))
    assert refusal(capsys, code, out) == (
        f"--adapter face={sdxl_files.plus_bin}: adapters are added on SDXL and SD1.5; a FLUX pipeline holds one "
        "(XLabs')"
    )


@pytest.mark.usefixtures("never_called")
def test_files_and_rules_that_do_not_fit_are_refused_before_the_model_runs(sdxl_files, sd15_files, tmp_path, out, capsys):
    """Found once the files are read (an adapter for another base model, an encoder of the wrong width, a
    corrupt file) or the adapters known (official or the text weight with an adapter lacking one)."""
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 64)
    face = ["--adapter", f"face={sdxl_files.plus_bin}", "--subject-adapter", "man=face"]
    cases = [
        (["--adapter", f"face={sd15_files.plus_bin}"],
         f"--adapter face={sd15_files.plus_bin}: adapter tokens are 48 wide but the model's attention layers take "
         "[96]: this adapter belongs to another base model", ""),
        (["--adapter", f"face={corrupt}"], f"--adapter face={corrupt}: {corrupt} is not a readable safetensors file", ""),
        ([*face, "--image-encoder", f"face={sdxl_files.basic_image_encoder}"],
         f"--image-encoder face '{sdxl_files.basic_image_encoder}' has hidden size 56, but the plus adapter takes "
         "48-wide features", ""),
        ([*face, "--rule", "official"],
         "--rule official: official weighs each subject by its own adapter's text weight, and the adapter of 'man' "
         "(face) has none (use --rule paper or uniform)", ""),
        ([*face, "--text-weight"],  # no rule would take it: not advised to use --rule official
         "--text-weight: the adapter of 'man' (face) has no text weight (use --no-text-weight)", ""),
        (["--adapter", f"mip2={sdxl_files.mip_basic_bin}", "--subject-adapter", "man=mip2", "--rule", "paper",
          "--text-weight"],
         "--text-weight: under rule paper a call that mixes adapters runs ungated (paper gates the text with one "
         "adapter's weight): use --no-text-weight, or --rule official", ""),
        ([*face, "--rule", "uniform", "--text-weight"],
         "--text-weight: the adapter of 'man' (face) has no text weight (use --no-text-weight)", ""),
    ]  # fmt: skip
    for args, start, words in cases:
        err = refusal(capsys, main(argv(out / "x.png", *args)), out)
        assert err.startswith(start) and words in err, (args, err)


def test_a_recorded_subject_adapter_the_rerun_does_not_load_is_refused(sdxl_files, tmp_path, capsys):
    """A tiny recipe rerun on real models drops the recorded tiny files; a subject recorded with one of them
    is named instead of silently moved to the default adapter."""
    first = tmp_path / "first.png"
    assert main(argv(first, "--adapter", f"face={sdxl_files.plus_bin}", "--subject-adapter", "man=face",
                     "--steps", "1")) == 0  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    code = main(["generate", "--from-png", str(first), "--preset", "ip-sdxl", "-o", str(out / "x.png")])
    assert refusal(capsys, code, out) == (
        f"'man' was encoded by the adapter 'face' recorded in '{first}', which this run does not load: give "
        "--adapter face=FILE or --subject-adapter man=ADAPTER"
    )
    assert os.listdir(out) == []


def test_real_models_share_one_encoder_and_refuse_a_misfit_before_the_base_model_loads(
    sdxl_files, sd15_files, tmp_path, monkeypatch, capsys
):
    """The non-tiny path (local folders): an added adapter without --image-encoder reads the default's
    encoder when it gives its features, loaded once; an adapter for another base model is refused from its
    keys, and official with an adapter lacking a text weight from the files' headers, before
    ``from_pretrained`` starts."""
    import mipadapter.pipeline.loading as loading
    from mipadapter.pipeline import MIPAdapterPipeline
    from mipadapter.testing import tiny_sdxl_pipeline

    tiny_sdxl_pipeline().save_pretrained(tmp_path / "base")
    real = ["generate", "--base-model", str(tmp_path / "base"), "--adapter", str(sdxl_files.mip_plus_bin),
            "--image-encoder", str(sdxl_files.plus_image_encoder), "--prompt", PROMPT, "--subject", f"man={CAT}",
            "--subject", f"cat={BACKPACK}", "--steps", "1", "--subject-adapter", "man=face"]  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    loaded = []
    original = loading._load_image_encoder
    monkeypatch.setattr(loading, "_load_image_encoder", lambda *a: loaded.append(a[0]) or original(*a))
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(MIPAdapterPipeline, "from_pretrained", lambda *a, **k: pytest.fail("the base model loaded"))
        code = main([*real, "--adapter", f"face={sd15_files.plus_bin}", "-o", str(out / "x.png")])
        assert refusal(capsys, code, out).startswith(f"--adapter face={sd15_files.plus_bin}: adapter tokens are 48 wide")
        # official with a face adapter lacking a text weight: known from the files' headers, refused before
        code = main([*real, "--adapter", f"face={sdxl_files.plus_bin}", "--rule", "official", "-o", str(out / "x.png")])
        assert refusal(capsys, code, out) == (
            "--rule official: official weighs each subject by its own adapter's text weight, and the adapter of "
            "'man' (face) has none (use --rule paper or uniform)"
        )
    first = tmp_path / "first.png"
    assert main([*real, "--adapter", f"face={sdxl_files.plus_bin}", "-o", str(first)]) == 0
    assert loaded == [str(sdxl_files.plus_image_encoder.resolve())]  # one copy for both adapters
    recipe = read_recipe(first)
    assert recipe["models"]["adapters"][0]["image_encoder"] == recipe["models"]["image_encoder"] == loaded[0]
    assert recipe["rule"] == "paper" and [s["adapter"] for s in recipe["subjects"]] == ["face", "default"]
    assert main(["generate", "--from-png", str(first), "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(pixels(first), pixels(tmp_path / "again.png"))


def test_web_takes_the_same_adapter_flags(sdxl_files):
    """``mipadapter web`` shares ``add_model_flags`` and ``load_pipeline``: its adapters are generate's."""
    import torch

    from mipadapter.cli.main import build_parser
    from mipadapter.cli.options import load_pipeline

    args = build_parser().parse_args(
        ["web", "--tiny", "--adapter", f"face={sdxl_files.plus_bin}", "--adapter", f"mip={sdxl_files.mip_plus_bin}"]
    )
    pipe, record = load_pipeline(args, torch.device("cpu"), torch.float32)
    assert pipe.adapter_names == ["default", "face", "mip"]
    assert [(a.name, a.sha256, a.image_encoder) for a in record.adapters] == [
        ("face", file_sha256(sdxl_files.plus_bin), "tiny sdxl plus (random)"),
        ("mip", file_sha256(sdxl_files.mip_plus_bin), "tiny sdxl plus (random)"),
    ]
    assert pipe.adapters["mip"].config.text_weight and not pipe.adapters["face"].config.text_weight
    flux = build_parser().parse_args(["web", "--tiny", "flux", "--adapter", f"face={sdxl_files.plus_bin}"])
    with pytest.raises(ValueError, match=r"^--adapter face=.*: adapters are added on SDXL and SD1.5; a FLUX pipeline"):
        load_pipeline(flux, torch.device("cpu"), torch.float32)


def test_an_added_adapter_named_by_a_preset_is_recorded_with_it(sdxl_files):
    """Guards what a rerun needs of a preset-named added adapter (``--adapter face=ip-sdxl-plus-face``, real
    models only, so its loading step is driven here with a local stand-in file): its record names the
    preset, whose default scale a subject added on the rerun gets."""
    from mipadapter.checkpoint import read_file
    from mipadapter.cli.options import AddedAdapter, _add_adapters
    from mipadapter.pipeline.loading import check_adapter_fits
    from mipadapter.testing.mip import tiny_mip_pipeline

    pipe = tiny_mip_pipeline("sdxl")
    path = sdxl_files.plus_bin
    checked = check_adapter_fits(read_file(path), pipe.pipe.unet, path, "the tiny model", 0.6)
    encoder = str(sdxl_files.plus_image_encoder.resolve())
    for preset in ("ip-sdxl-plus-face", None):
        added = AddedAdapter(f"face{len(pipe.adapters)}", str(path), encoder, preset=preset)
        (record,) = _add_adapters(pipe, [(added, path, file_sha256(path), checked, encoder)])
        assert record.to_dict() == {
            "name": added.name, "adapter": str(path.resolve()), "sha256": file_sha256(path), "image_encoder": encoder,
            **({"preset": preset} if preset else {}),
        }  # fmt: skip
        assert pipe.adapters[added.name].config.default_scale == 0.6
