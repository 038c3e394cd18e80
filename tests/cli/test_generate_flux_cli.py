"""`mipadapter generate` on FLUX (issue 11) and the flags that came with it: --tiny flux end to end on two
real photos, --true-cfg-scale, --compile (issue 14), and --from-png with --subject keeping the recorded
scales and regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mipadapter.cli.main import main
from mipadapter.recipe import read_recipe

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DOG, TOY = ASSETS / "dreambooth" / "dog" / "00.jpg", ASSETS / "dreambooth" / "teapot" / "00.jpg"
CAT, BACKPACK = ASSETS / "cat.jpg", ASSETS / "backpack.jpg"
PROMPT = "a dog playing with a duck toy"


def flux(out: Path, *extra: str, dog: Path = DOG, toy: Path = TOY) -> int:
    argv = ["generate", "--tiny", "flux", "--prompt", PROMPT, "--steps", "2", "-o", str(out)]
    argv += ["--subject", f"dog={dog}", "--subject", f"duck toy={toy}"]
    return main(argv + list(extra))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_tiny_flux_end_to_end_names_flux_and_reruns_bit_for_bit(tmp_path, capsys):
    out, again, swapped = tmp_path / "out.png", tmp_path / "again.png", tmp_path / "swapped.png"
    assert flux(out) == 0
    assert capsys.readouterr().out.split() == [str(out)]
    recipe = read_recipe(out)
    models = recipe["models"]
    assert (recipe["model_family"], models["tiny"], models["base_model"]) == ("FLUX", "flux", "tiny-flux (random)")
    assert recipe["guidance"] == 3.5  # FLUX.1's distilled guidance by default
    assert recipe["true_cfg_scale"] == 1.0  # true CFG off
    assert recipe["rule"] == "paper" and recipe["text_weight"] is False  # XLabs files have no text weight
    assert (recipe["height"], recipe["width"]) == (64, 64) and recipe["negative_prompt"] is None
    assert [s["name"] for s in recipe["subjects"]] == ["dog", "duck toy"]
    assert recipe["subjects"][1]["photos"][0]["path"] == str(TOY.resolve())
    assert main(["generate", "--from-png", str(out), "-o", str(again)]) == 0
    assert np.array_equal(pixels(out), pixels(again)) and read_recipe(again) == recipe
    assert flux(swapped, dog=TOY, toy=DOG) == 0  # the photos reach the image, each through its subject
    assert not np.array_equal(pixels(out), pixels(swapped))


def test_true_cfg_scale_is_used_recorded_and_rerun(tmp_path):
    plain, guided, again, off = (tmp_path / f"{n}.png" for n in ("plain", "guided", "again", "off"))
    assert flux(plain, "--negative-prompt", "blurry") == 0
    assert flux(guided, "--negative-prompt", "blurry", "--true-cfg-scale", "3") == 0
    recipe = read_recipe(guided)
    assert recipe["true_cfg_scale"] == 3.0 and recipe["negative_prompt"] == "blurry"
    assert not np.array_equal(pixels(plain), pixels(guided))
    assert main(["generate", "--from-png", str(guided), "-o", str(again)]) == 0
    assert np.array_equal(pixels(guided), pixels(again)) and read_recipe(again)["true_cfg_scale"] == 3.0
    assert main(["generate", "--from-png", str(guided), "--true-cfg-scale", "1", "-o", str(off)]) == 0
    assert np.array_equal(pixels(off), pixels(plain))  # 1 is off: the distilled guidance alone
    empty, empty_again = tmp_path / "empty.png", tmp_path / "empty_again.png"
    assert flux(empty, "--negative-prompt", "", "--true-cfg-scale", "3") == 0  # "" is a negative prompt here
    assert read_recipe(empty)["negative_prompt"] == "" and not np.array_equal(pixels(empty), pixels(plain))
    assert main(["generate", "--from-png", str(empty), "-o", str(empty_again)]) == 0
    assert np.array_equal(pixels(empty), pixels(empty_again))


def test_flux_models_from_local_folders_through_the_cli_and_rerun(tmp_path, monkeypatch):
    """The non-tiny path: a saved FLUX, an XLabs-layout file and its encoder as local paths with the
    ip-flux preset; true CFG recorded and rerun (the base model is looked up to know it is FLUX)."""
    from mipadapter.testing.flux import tiny_flux_ip_files, tiny_flux_pipeline

    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    files = tiny_flux_ip_files(tmp_path / "xlabs", seed=2, std=0.3)
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--preset", "ip-flux", "--base-model", "flux", "--adapter", str(files.weight_path),
            "--image-encoder", str(files.image_encoder), "--prompt", PROMPT, "--subject", f"dog={DOG}",
            "--subject", f"duck toy={TOY}", "--steps", "2", "--height", "64", "--width", "80",
            "--negative-prompt", "blurry", "--true-cfg-scale", "2", "-o", "first.png"]  # fmt: skip
    assert main(argv) == 0
    recipe = read_recipe(tmp_path / "first.png")
    assert recipe["model_family"] == "FLUX" and recipe["models"]["preset"] == "ip-flux"
    assert recipe["models"]["base_model"] == str(tmp_path / "flux") and recipe["true_cfg_scale"] == 2.0
    assert (recipe["height"], recipe["width"]) == (64, 80) and recipe["subjects"][0]["scale"] == 1.0
    assert main(["generate", "--from-png", "first.png", "-o", "again.png"]) == 0
    assert np.array_equal(pixels(tmp_path / "first.png"), pixels(tmp_path / "again.png"))
    assert read_recipe(tmp_path / "again.png")["true_cfg_scale"] == 2.0


@pytest.fixture
def no_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    import mipadapter.cli.options as options

    monkeypatch.setattr(options, "load_pipeline", refuse)
    monkeypatch.setattr(options, "load_tiny", refuse)


def _sdxl_folder(tmp_path: Path) -> Path:
    """A base model folder whose model_index.json says SDXL (nothing else is read before loading)."""
    folder = tmp_path / "sdxl"
    folder.mkdir()
    index = '{"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    (folder / "model_index.json").write_text(index)
    return folder


@pytest.mark.usefixtures("no_models")
def test_flux_only_and_flux_sized_flags_fail_in_one_line_before_loading(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    sdxl = _sdxl_folder(tmp_path)
    base = ["generate", "--prompt", "a cat wearing a backpack", "--subject", f"cat={CAT}", "--subject",
            f"backpack={BACKPACK}", "-o", str(out / "x.png")]  # fmt: skip
    cases = [
        (["--tiny", "--true-cfg-scale", "4", "--negative-prompt", "x"],
         "--true-cfg-scale is FLUX's classifier-free guidance, but --tiny sdxl is not a FLUX model (use --guidance)"),
        (["--tiny", "sd15", "--true-cfg-scale", "4"], "but --tiny sd15 is not a FLUX model"),
        (["--preset", "ip-sdxl", "--true-cfg-scale", "2"], "but the ip-sdxl preset's base model is not FLUX"),
        (["--base-model", str(sdxl), "--true-cfg-scale", "2"], f"but the base model '{sdxl}' is not a FLUX model"),
        (["--tiny", "flux", "--true-cfg-scale", "0.5"], "--true-cfg-scale must be a finite number ≥ 1 (1 is off), got 0.5"),
        (["--tiny", "flux", "--true-cfg-scale", "nan"], "--true-cfg-scale must be a finite number ≥ 1"),
        (["--tiny", "flux", "--true-cfg-scale", "4"], "--true-cfg-scale 4 needs a --negative-prompt"),
        (["--tiny", "flux", "--height", "72"],
         "--height must be a positive multiple of 16 (one latent cell: FLUX packs 2×2 VAE latents), got 72"),
        (["--tiny", "flux", "--region", "cat=0,0,80,10"], "the box reaches beyond the 64×64 output"),
    ]  # fmt: skip
    for args, expected in cases:
        code = main(base + args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("mipadapter generate: error: "), err
        assert expected in err, (args, err)
        assert list(out.iterdir()) == []


def test_true_cfg_scale_of_the_flux_preset_is_checked_without_the_hub(tmp_path, capsys, monkeypatch):
    """--preset ip-flux is known to be FLUX without fetching anything: the missing negative prompt is
    reported first, and with one the run goes on to look for the (here absent) adapter."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    argv = ["generate", "--preset", "ip-flux", "--prompt", PROMPT, "--subject", f"dog={DOG}", "-o",
            str(tmp_path / "x.png"), "--true-cfg-scale", "4"]  # fmt: skip
    assert main(argv) == 2
    assert "--true-cfg-scale 4 needs a --negative-prompt" in capsys.readouterr().err
    assert main(argv + ["--negative-prompt", "blurry"]) == 2
    err = capsys.readouterr().err
    assert "could not fetch the adapter 'XLabs-AI/flux-ip-adapter-v2/ip_adapter.safetensors'" in err, err


@pytest.mark.parametrize("arch", ["flux", "sdxl"])
def test_compile_compiles_the_denoisers_forward_once_and_every_step_runs_it(tmp_path, monkeypatch, arch):
    """--compile hands the UNet's (FLUX: the transformer's) forward to torch.compile; the compiled callable
    replaces it, so every denoising step goes through it. torch.compile is replaced by a recorder here
    (a real inductor compile takes minutes), which returns a pass-through: the image must not change."""
    import torch

    compiled, runs = [], []

    def fake_compile(function, **kwargs):
        compiled.append(function)

        def run(*args, **kw):
            runs.append(1)
            return function(*args, **kw)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    argv = ["generate", "--tiny", arch, "--prompt", "a dog and a cat", "--subject", f"dog={DOG}",
            "--subject", f"cat={CAT}", "--steps", "3"]  # fmt: skip
    assert main(argv + ["-o", str(tmp_path / "eager.png")]) == 0
    assert compiled == [] and runs == []
    assert main(argv + ["--compile", "-o", str(tmp_path / "compiled.png")]) == 0
    assert len(compiled) == 1
    model = compiled[0].__self__  # the bound forward of the model the adapter sits in
    assert type(model).__name__ == ("FluxTransformer2DModel" if arch == "flux" else "UNet2DConditionModel")
    assert len(runs) == 3  # one call per step (SDXL: its CFG halves are one batch)
    eager, fast = pixels(tmp_path / "eager.png").astype(int), pixels(tmp_path / "compiled.png").astype(int)
    assert np.abs(eager - fast).max() <= 1  # names padded to the compile window: the same image
    recorded = [read_recipe(tmp_path / name)["subjects"] for name in ("eager.png", "compiled.png")]
    assert recorded[0] == recorded[1]


def sdxl(out: Path, *extra: str, subjects=(f"cat={CAT}", f"backpack={BACKPACK}")) -> int:
    argv = ["generate", "--tiny", "--prompt", "a cat wearing a backpack", "--steps", "2", "-o", str(out)]
    for subject in subjects:
        argv += ["--subject", subject]
    return main(argv + list(extra))


def test_from_png_with_new_photos_keeps_each_recorded_subjects_scale_and_region(tmp_path):
    mask = tmp_path / "mask.png"
    shape = Image.new("L", (64, 64), 0)
    shape.paste(255, (0, 0, 40, 64))
    shape.save(mask)
    first = tmp_path / "first.png"
    assert sdxl(first, "--scale", "cat=0.4", "--region", "backpack=8,8,60,60", "--region", f"cat={mask}") == 0
    cat_copy = tmp_path / "my_cat.jpg"
    cat_copy.write_bytes(CAT.read_bytes())
    # the same photos under other paths: the scale and both regions are kept, so the image is the same
    same = tmp_path / "same.png"
    argv = ["generate", "--from-png", str(first), "--subject", f"cat={cat_copy}"]
    argv += ["--subject", f"backpack={BACKPACK}"]
    assert main(argv + ["-o", str(same)]) == 0
    assert np.array_equal(pixels(first), pixels(same))
    cat, backpack = read_recipe(same)["subjects"]
    recorded_scale = read_recipe(first)["subjects"][0]["scale"]
    assert cat["scale"] == recorded_scale == pytest.approx(0.4)  # resolved in float32
    assert cat["region"]["path"] == str(mask.resolve()) and backpack["region"] == [8.0, 8.0, 60.0, 60.0]
    assert cat["photos"][0]["path"] == str(cat_copy.resolve())
    # a flag still wins; a subject under a name the recipe does not have starts from the defaults
    override = tmp_path / "override.png"
    assert main(argv + ["--scale", "cat=0.9", "--region", "cat=0,0,20,20", "-o", str(override)]) == 0
    cat, _ = read_recipe(override)["subjects"]
    assert cat["scale"] == pytest.approx(0.9) and cat["region"] == [0.0, 0.0, 20.0, 20.0]
    other = tmp_path / "other.png"
    assert main(["generate", "--from-png", str(first), "--prompt", "a dog wearing a backpack", "--subject",
                 f"dog={DOG}", "--subject", f"backpack={BACKPACK}", "-o", str(other)]) == 0  # fmt: skip
    dog, backpack = read_recipe(other)["subjects"]
    assert dog["scale"] == 1.0 and dog["region"] is None and backpack["region"] == [8.0, 8.0, 60.0, 60.0]


def test_a_kept_mask_file_that_changed_is_named(tmp_path, capsys):
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    first = tmp_path / "first.png"
    assert sdxl(first, "--region", f"cat={mask}") == 0
    Image.new("L", (64, 64), 0).save(mask)
    capsys.readouterr()
    code = main(["generate", "--from-png", str(first), "--subject", f"cat={CAT}", "--subject",
                 f"backpack={BACKPACK}", "-o", str(tmp_path / "x.png")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err == (
        f"mipadapter generate: error: cat's region mask '{mask.resolve()}' has changed since '{first}' was made "
        "(its SHA-256 differs)\n"
    )
    mask.unlink()
    argv = ["generate", "--from-png", str(first), "--subject", f"cat={CAT}", "-o", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cat's region mask '{mask.resolve()}', recorded in '{first}', is missing" in err
    assert not (tmp_path / "x.png").exists()
