"""Issue 10 through the CLI: every mistake is exit status 2, one line on stderr naming the flag or file,
found before any model loads, and nothing is left in the output folder."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cli_checks import refusal
from PIL import Image

from mipadapter.cli.main import main

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CAT, BACKPACK = ASSETS / "cat.jpg", ASSETS / "backpack.jpg"


def run_generate(out: Path, args: list[str], *, tiny: bool = True, subjects: bool = True) -> list[str]:
    argv = ["generate", "--prompt", "a cat wearing a backpack", "--steps", "1"]
    argv += ["--tiny"] if tiny else []
    if subjects and "--subject" not in args:
        argv += ["--subject", f"cat={CAT}", "--subject", f"backpack={BACKPACK}"]
    if "-o" not in args:
        argv += ["-o", str(out / "x.png")]
    return argv + args


def assert_one_line(capsys, code: int, expected: str, out: Path) -> str:
    """The refusal's whole line (``refusal``'s checks), which must contain ``expected``."""
    message = refusal(capsys, code, out)
    assert expected in message, message
    return message


ARGUMENT_MISTAKES = [
    # item 1: --tiny picks the base model and the image encoder
    (["--base-model", "./sdxl"], "--base-model cannot be used with --tiny"),
    (
        ["--image-encoder", "h94/IP-Adapter/sdxl_models/image_encoder"],
        "--image-encoder cannot be used with --tiny",
    ),
    (["--preset", "ip-sdxl"], "--preset cannot be used with --tiny"),
    # item 2: numbers, checked up front, naming the flag
    (["--steps", "0"], "--steps must be an integer between 1 and 100, got 0"),
    (["--steps", "-1"], "--steps must be an integer between 1 and 100, got -1"),
    (["--height", "0"], "--height must be a positive multiple of 8 (the VAE's factor), got 0"),
    (["--height", "-64"], "--height must be a positive multiple of 8 (the VAE's factor), got -64"),
    (["--width", "50"], "--width must be a positive multiple of 8 (the VAE's factor), got 50"),
    (["--seed", str(2**64)], f"--seed must be an integer between 0 and {2**64 - 1}, got {2**64}"),
    (["--seed", "-1"], f"--seed must be an integer between 0 and {2**64 - 1}, got -1"),
    (["--num-images", "0"], "--num-images must be an integer between 1 and 4, got 0"),
    (["--scale", "cat=abc"], "--scale cat=abc: the scale must be a number"),
    (["--scale", "cat=inf"], "--scale cat must be a finite number between 0 and 1.5, got inf"),
    (["--scale", "cat=-0.5"], "--scale cat must be a finite number between 0 and 1.5, got -0.5"),
    (["--guidance", "-1"], "--guidance must be a finite number between 0 and 30, got -1.0"),
    (["--guidance", "nan"], "--guidance must be a finite number between 0 and 30, got nan"),
    (["--max-photo-mp", "0"], "--max-photo-mp must be > 0"),
    (["--scale", "horse=0.3"], "--scale horse: no --subject is called 'horse'"),
    (["--scale", "cat#2=0.3"], "--scale cat#2: there is only 1 subject called 'cat'"),
    (["--scale", "cat"], "--scale takes NAME=VALUE or NAME#K=VALUE, got 'cat'"),
    (["--region", "cat=5,5,1,1"], "--region cat=5,5,1,1: a box is x0,y0,x1,y1 in pixels with 0 ≤ x0 < x1"),
    (["--region", "cat=0,0,65,10"], "--region cat=0,0,65,10: the box reaches beyond the 64×64 output"),
    (["--region", "cat=0,0,32,10", "--width", "16"], "the box reaches beyond the 16×64 output"),
    (
        ["--region", "cat=nomask.png"],
        "--region cat=nomask.png: neither x0,y0,x1,y1 nor an existing mask image",
    ),
    (["--subject", "cat"], "--subject takes NAME=VALUE, got 'cat'"),
    (["--subject", "cat=,"], "--subject cat: give at least one photo"),
    (["--subject", "cat=/no/such.jpg"], "--subject cat '/no/such.jpg' not found"),
    (["--multi-image", "each", "--prompt", " "], "--prompt is required"),
]


@pytest.mark.usefixtures("no_models")
@pytest.mark.parametrize(
    ("args", "expected"), ARGUMENT_MISTAKES, ids=[" ".join(a) for a, _ in ARGUMENT_MISTAKES]
)
def test_argument_mistakes(out, capsys, args, expected):
    assert_one_line(capsys, main(run_generate(out, args)), expected, out)


def test_the_same_subject_addressed_twice(out, capsys):
    argv = run_generate(out, ["--scale", "dog=0.5", "--scale", "dog#2=0.3"], subjects=False)
    argv += ["--subject", f"dog={CAT}", "--subject", f"dog={BACKPACK}"]
    assert refusal(capsys, main(argv), out) == "--scale gives subject #2 'dog' twice (dog and dog#2)"


def test_no_subject_and_no_recipe(out, capsys):
    code = main(["generate", "--tiny", "--prompt", "a cat", "-o", str(out / "x.png")])
    assert_one_line(capsys, code, "give at least one --subject NAME=PHOTO (or --from-png IMAGE)", out)


@pytest.mark.usefixtures("no_models")
def test_output_paths_are_checked_before_anything_runs(tmp_path, out, capsys):
    (out / "adir.png").mkdir()
    cases = [
        (["--contact-sheet", str(out / "missing_dir" / "s.png")], "--contact-sheet", "does not exist"),
        (["--contact-sheet", str(out / "adir.png")], "--contact-sheet", "is a folder; give a file name"),
        (["-o", str(out / "adir.png")], "-o", "is a folder; give a file name"),
        (["-o", str(out / "x.gif")], "-o", "the extension must be one of .png, .jpg, .jpeg"),
        (
            ["-o", str(out / "x.png"), "--contact-sheet", str(out / "x.png")],
            "--contact-sheet",
            "also written by -o",
        ),
        (
            ["-o", str(out / "x.png"), "--num-images", "2", "--contact-sheet", str(out / "x_2.png")],
            "",
            "also written",
        ),
        (["-o", str(tmp_path / "cat.jpg")], "-o", "would overwrite a photo of --subject cat"),
    ]
    (tmp_path / "cat.jpg").write_bytes(CAT.read_bytes())
    for args, flag, words in cases:
        argv = run_generate(out, args, subjects=False) + ["--subject", f"cat={tmp_path / 'cat.jpg'}"]
        argv[argv.index("a cat wearing a backpack")] = "a cat"
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and flag in err and words in err, (args, err)
        assert sorted(p.name for p in out.iterdir()) == ["adir.png"], args
    assert (tmp_path / "cat.jpg").read_bytes() == CAT.read_bytes()


@pytest.mark.usefixtures("no_models")
def test_photos_are_checked_by_header_and_named(tmp_path, out, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    truncated = tmp_path / "cut.jpg"
    data = CAT.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000)).save(big)
    cases = [
        (folder, f"--subject cat '{folder}' is a folder, not a photo"),
        (truncated, f"--subject cat '{truncated}' cannot be decoded"),
        (big, f"--subject cat '{big}' is 3000×2000 (6.0 MP), above the 5 MP limit"),
    ]
    for photo, expected in cases:
        code = main(run_generate(out, ["--subject", f"cat={photo}", "--max-photo-mp", "5"], subjects=False))
        assert_one_line(capsys, code, expected, out)


def test_bad_adapter_files_with_tiny_are_one_line_naming_the_file(tmp_path, out, capsys):
    from mipadapter import save_adapter
    from mipadapter.testing.mip import tiny_mip_pipeline

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 64)
    sd15 = save_adapter(tiny_mip_pipeline("sd15").adapter, tmp_path / "sd15.safetensors")
    cases = [
        (["--adapter", "/does/not/exist.bin"], "adapter '/does/not/exist.bin' does not exist"),
        (
            ["--adapter", str(corrupt)],
            f"{corrupt} is not a readable safetensors file (Error while deserializing",
        ),
        (["--adapter", str(sd15)], "this adapter belongs to another base model"),
    ]
    for args, expected in cases:
        assert_one_line(capsys, main(run_generate(out, args)), expected, out)


def test_offline_missing_models_fail_at_once_naming_flag_and_purpose(tmp_path, out, capsys, monkeypatch):
    """No route to the Hub, nothing cached: one line at once for each model, smallest first."""
    import huggingface_hub.constants as constants

    from mipadapter.testing import tiny_checkpoint_files, tiny_sdxl_pipeline

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    base = tiny_sdxl_pipeline()
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "files").mkdir()
    files = tiny_checkpoint_files(tmp_path / "files", base)
    capsys.readouterr()  # save_pretrained's progress bars
    cases = [
        ([], "could not fetch the adapter 'hqhQAQ/MIP-Adapter/model_sdxl.bin'", "point --adapter at"),
        (["--adapter", str(files.mip_basic_bin), "--base-model", "nobody/no-base"], "base model 'nobody/no-base'",
         "point --base-model at"),
        (["--adapter", str(files.mip_basic_bin), "--base-model", str(tmp_path / "base"), "--image-encoder",
          "nobody/no-encoder/image_encoder"], "image encoder 'nobody/no-encoder/image_encoder'", "point --image-encoder at"),
    ]  # fmt: skip
    for args, model, flag in cases:
        start = time.monotonic()
        code = main(run_generate(out, args, tiny=False))
        elapsed = time.monotonic() - start
        err = assert_one_line(capsys, code, model, out)
        assert flag in err and "not in the local cache and HF_HUB_OFFLINE is set" in err, err
        assert elapsed < 5, f"{elapsed:.1f} s before failing"


def test_checking_the_arguments_imports_no_torch(tmp_path):
    """Mistakes in flags, paths and photos are found before torch or diffusers are even imported."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import argparse, sys
        from mipadapter.cli import generate
        parser = argparse.ArgumentParser()
        generate.register(parser.add_subparsers())
        args = parser.parse_args(["generate", "--tiny", "--prompt", "a cat", "--subject", "cat={CAT}",
                                  "-o", "{tmp_path / "x.png"}", "--region", "cat=0,0,32,32"])
        generate.make_plan(args)
        try:
            generate.make_plan(parser.parse_args(["generate", "--tiny", "--prompt", "a cat", "--subject",
                                                  "cat={CAT}", "--steps", "0"]))
        except ValueError as error:
            print(error)
        print(sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["--steps must be an integer between 1 and 100, got 0", "[]"]
    assert list(tmp_path.iterdir()) == []
