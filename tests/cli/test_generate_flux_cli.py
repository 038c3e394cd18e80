"""`mipadapter generate` on FLUX (issue 11) and the flags that came with it: --tiny flux end to end on two
real photos, --true-cfg-scale, --compile (issue 14), and --from-png with --subject keeping the recorded
scales and regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_checks import pixels
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
    # the recorded order, the replaced backpack in its place, the new dog after it; the cat the new prompt
    # no longer names is left out
    backpack, dog = read_recipe(other)["subjects"]
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


# ------------------------------------------------------------------ issue 19: FLUX settings that equal diffusers'


def test_flux_settings_of_issue_19_are_recorded_and_rerun_bit_for_bit(tmp_path):
    """--scale-blocks (one value per double block), --negative-image, --prompt-2 and --max-sequence-length:
    used, recorded, and rerun by --from-png."""
    ramp = tmp_path / "ramp.json"
    ramp.write_text("[0.2, 0.9, 1.5]")
    first, again, black = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "black.png"
    extra = ["--scale-blocks", f"dog={ramp}", "--negative-prompt", "", "--true-cfg-scale", "3",
             "--negative-image", "zeros", "--prompt-2", "a dog playing with a duck toy, photo",
             "--max-sequence-length", "64"]  # fmt: skip
    assert flux(first, *extra) == 0
    recipe = read_recipe(first)
    assert recipe["subjects"][0]["scale"] == [0.2, 0.9, 1.5] and recipe["subjects"][1]["scale"] == 1.0
    assert (recipe["negative_image"], recipe["max_sequence_length"]) == ("zeros", 64)
    assert recipe["prompt_2"] == "a dog playing with a duck toy, photo"
    assert main(["generate", "--from-png", str(first), "-o", str(again)]) == 0
    assert np.array_equal(pixels(first), pixels(again)) and read_recipe(again) == recipe
    assert main(["generate", "--from-png", str(first), "--negative-image", "black", "-o", str(black)]) == 0
    assert read_recipe(black)["negative_image"] == "black" and not np.array_equal(pixels(first), pixels(black))
    default = tmp_path / "default.png"
    assert flux(default) == 0
    recipe = read_recipe(default)
    assert recipe["negative_image"] == "black" and recipe["max_sequence_length"] == 512 and "prompt_2" not in recipe


def test_sdxl_scale_blocks_take_diffusers_dict_form_and_rerun(tmp_path):
    blocks = tmp_path / "blocks.json"
    blocks.write_text('{"down": {"block_1": 0.9}, "mid": 0.4, "up": {"block_0": [0.0, 1.3]}}')
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert sdxl(first, "--scale-blocks", f"cat={blocks}") == 0
    recipe = read_recipe(first)
    assert recipe["subjects"][0]["scale"] == {"down": {"block_1": 0.9}, "mid": 0.4, "up": {"block_0": [0.0, 1.3]}}
    assert recipe["negative_image"] == "zeros"  # IP-Adapter's own on a UNet
    assert main(["generate", "--from-png", str(first), "-o", str(again)]) == 0
    assert np.array_equal(pixels(first), pixels(again))


@pytest.mark.usefixtures("no_models")
def test_issue_19_flags_fail_in_one_line_before_loading(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "one.json").write_text("0.5")
    (tmp_path / "bad.json").write_text('{"middle": 1}')
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    (tmp_path / "dict.json").write_text('{"mid": 1}')
    base = ["generate", "--prompt", PROMPT, "--subject", f"dog={DOG}", "-o", str(out / "x.png")]
    cases = [
        (["--tiny", "flux", "--rule", "official"],
         "--rule official is not offered on FLUX: it needs a text weight trained on FLUX, which no FLUX adapter "
         "has yet (use paper or uniform)"),
        (["--tiny", "--prompt-2", "x"], "--prompt-2 is FLUX's (its T5 text encoder), but --tiny sdxl is not a FLUX model"),
        (["--tiny", "sd15", "--max-sequence-length", "64"],
         "--max-sequence-length is FLUX's (its T5 text encoder), but --tiny sd15 is not a FLUX model"),
        (["--tiny", "flux", "--max-sequence-length", "513"], "--max-sequence-length must be an integer between 1 and 512, got 513"),
        (["--tiny", "flux", "--scale-blocks", f"dog={tmp_path / 'none.json'}"],
         f"--scale-blocks dog={tmp_path / 'none.json'}: no such file"),
        (["--tiny", "flux", "--scale-blocks", f"dog={tmp_path / 'text.json'}"],
         f"--scale-blocks dog={tmp_path / 'text.json'}: not a JSON file (Expecting value)"),
        (["--tiny", "flux", "--scale-blocks", f"dog={tmp_path / 'one.json'}"],
         f"--scale-blocks dog={tmp_path / 'one.json'}: the file holds a list (FLUX: one scale per double block)"),
        (["--tiny", "flux", "--scale-blocks", f"dog={tmp_path / 'bad.json'}"],
         f"--scale-blocks dog={tmp_path / 'bad.json'}: scale part 'middle' is not one of down, mid, up"),
        (["--tiny", "flux", "--scale", "dog=1", "--scale-blocks", f"dog={tmp_path / 'one.json'}"],
         "--scale and --scale-blocks both set dog: give one of them"),
        (["--tiny", "sd15", "--scale-blocks", f"dog={tmp_path / 'list.json'}"],
         "--scale-blocks dog: a list gives one scale per FLUX double block, but --tiny sd15 is not a FLUX model; "
         'a UNet takes diffusers\' dict form {"down": ..., "mid": ..., "up": ...}'),
        (["--tiny", "flux", "--scale-blocks", f"dog={tmp_path / 'dict.json'}"],
         "--scale-blocks dog: the dict form is diffusers' for UNets; on FLUX give a list, one scale per double block"),
    ]  # fmt: skip
    for args, expected in cases:
        code = main(base + args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("mipadapter generate: error: "), err
        assert expected in err, (args, err)
        assert list(out.iterdir()) == []


def test_from_png_refuses_a_negative_given_as_embeddings(tmp_path, capsys, photo):
    """A Python call with negative_prompt_embeds: the recipe says so, and the CLI will not rerun it without
    a --negative-prompt (the embeddings are not in the file)."""
    import torch

    from mipadapter.pipeline import Subject
    from mipadapter.recipe import ModelRecord, RecipeSubject, build_recipe, write_image
    from mipadapter.testing.mip import tiny_mip_pipeline

    mip = tiny_mip_pipeline("flux")
    embeds, pooled, _ = mip.pipe.encode_prompt(prompt="blurry")
    output = mip(PROMPT, [Subject("dog", Image.open(DOG))], negative_prompt_embeds=embeds,
                 negative_pooled_prompt_embeds=pooled, true_cfg_scale=2.0, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), show_progress=False)  # fmt: skip
    from mipadapter.cli.options import TINY_ADAPTER

    record = ModelRecord("tiny-flux (random)", TINY_ADAPTER, "tiny", tiny="flux")
    recipe = build_recipe(mip, output, seed=0, subjects=[RecipeSubject("dog", [DOG])], models=record)
    assert recipe["negative_prompt_embeds"] is True and recipe["negative_prompt"] is None
    image = tmp_path / "embeds.png"
    write_image(output.images[0], image, recipe)
    assert main(["generate", "--from-png", str(image), "-o", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == (
        f"mipadapter generate: error: '{image}': its negative prompt was given as embeddings "
        "(negative_prompt_embeds), which the recipe does not hold; give --negative-prompt to rerun it with a text\n"
    )
    assert not (tmp_path / "x.png").exists()
    rerun = tmp_path / "y.png"
    assert main(["generate", "--from-png", str(image), "--negative-prompt", "blurry", "-o", str(rerun)]) == 0
    assert read_recipe(rerun)["negative_prompt"] == "blurry" and "negative_prompt_embeds" not in read_recipe(rerun)
    assert np.array_equal(pixels(image), pixels(rerun))  # the embeddings were those of "blurry"


def test_an_older_flux_recipe_without_negative_image_reruns_with_the_zero_embedding(tmp_path):
    """Files written before negative_image existed used the zero embedding: --from-png reruns them so."""
    import json

    from PIL.PngImagePlugin import PngInfo

    first, older, again = tmp_path / "first.png", tmp_path / "older.png", tmp_path / "again.png"
    assert flux(first, "--negative-prompt", "blurry", "--true-cfg-scale", "3", "--negative-image", "zeros") == 0
    recipe = read_recipe(first)
    info = PngInfo()
    info.add_text("mipadapter", json.dumps({k: v for k, v in recipe.items() if k != "negative_image"}))
    with Image.open(first) as image:
        image.save(older, pnginfo=info)
    assert main(["generate", "--from-png", str(older), "-o", str(again)]) == 0
    assert read_recipe(again)["negative_image"] == "zeros" and np.array_equal(pixels(first), pixels(again))
