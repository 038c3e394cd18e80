"""Issue 18 through the CLI: every number and every image bounded before it costs anything.

Each refusal is exit status 2 and one exact line naming the value, where it came from (a flag or the
recipe of a ``--from-png`` image) and, when one allows more, the flag; no model is loaded (the loaders
are replaced by a spy that fails the test) and nothing is written.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import pytest
from cli_checks import refusal
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from mipadapter.cli.main import main
from mipadapter.recipe import read_recipe

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CAT, BACKPACK = ASSETS / "cat.jpg", ASSETS / "backpack.jpg"
MAX_SEED = 2**64 - 1


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """One real tiny generation whose recipe the tests edit."""
    folder = tmp_path_factory.mktemp("made")
    path = folder / "made.png"
    argv = ["generate", "--tiny", "--prompt", "a cat wearing a backpack", "--subject", f"cat={CAT}",
            "--subject", f"backpack={BACKPACK}", "--steps", "1", "-o", str(path)]  # fmt: skip
    assert main(argv) == 0
    return path


def with_text(made: Path, target: Path, text: str) -> Path:
    """``made``'s pixels with ``text`` as its recipe chunk (written raw: no validation on the way)."""
    info = PngInfo()
    info.add_text("mipadapter", text)
    with Image.open(made) as image:
        image.save(target, pnginfo=info)
    return target


def edited(made: Path, target: Path, change) -> Path:
    recipe = read_recipe(made)
    change(recipe)
    return with_text(made, target, json.dumps(recipe))


def refused(capsys, code: int, out: Path, expected: str) -> None:
    assert refusal(capsys, code, out) == expected


def generate_argv(out: Path, *args: str) -> list[str]:
    return ["generate", "--tiny", "--prompt", "a cat wearing a backpack", "--subject", f"cat={CAT}",
            "--subject", f"backpack={BACKPACK}", "--steps", "1", "-o", str(out / "x.png"), *args]  # fmt: skip


FLAG_CAPS = [
    (["--steps", "101"], "--steps must be an integer between 1 and 100, got 101 (--allow-large allows up to 10000)"),
    (["--steps", "1000000000"], "--steps must be an integer between 1 and 100, got 1000000000"),
    (["--num-images", "5"], "--num-images must be an integer between 1 and 4, got 5 (--allow-large allows up to 64)"),
    (["--height", "8192"], "--height must be a multiple of 8 between 8 and 1536 pixels, got 8192 "
                           "(--allow-large allows up to 8192)"),
    (["--width", "1544"], "--width must be a multiple of 8 between 8 and 1536 pixels, got 1544 "
                          "(--allow-large allows up to 8192)"),
    (["--guidance", "31"], "--guidance must be a finite number between 0 and 30, got 31.0 "
                           "(--allow-large allows up to 1000)"),
    (["--guidance", "1e308"], "--guidance must be a finite number between 0 and 30, got 1e+308"),
    (["--scale", "cat=1e39"], "--scale cat must be a finite number between 0 and 1.5, got 1e+39"),
    (["--scale", "cat=2"], "--scale cat must be a finite number between 0 and 1.5, got 2.0 "
                           "(--allow-large allows up to 100)"),
    (["--seed", "-1"], f"--seed must be an integer between 0 and {MAX_SEED}, got -1"),
    (["--max-photo-mp", "inf"], "--max-photo-mp must be > 0 and finite, got inf"),
    # with --allow-large the ceilings still hold: numbers stay finite in float16
    (["--allow-large", "--steps", "10001"], "--steps must be an integer between 1 and 10000, got 10001"),
    (["--allow-large", "--guidance", "1e308"], "--guidance must be a finite number between 0 and 1000, got 1e+308"),
    (["--allow-large", "--height", "8192", "--width", "4096"],
     "the output size 4096×8192 is 33.6 MP, above the limit of 16.8 MP"),
    (["--allow-large", "--scale", "backpack=1e39"],
     "--scale backpack must be a finite number between 0 and 100, got 1e+39"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "expected"), FLAG_CAPS, ids=[" ".join(a) for a, _ in FLAG_CAPS])
def test_a_flag_above_its_cap_is_refused_before_any_model_loads(out, capsys, no_models, args, expected):
    refused(capsys, main(generate_argv(out, *args)), out, expected)
    assert no_models == []


def test_allow_large_lets_a_value_above_the_cap_through(out):
    import argparse

    from mipadapter.cli import generate

    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers())
    argv = generate_argv(out, "--allow-large", "--steps", "150", "--num-images", "8", "--height", "2048",
                         "--guidance", "40", "--scale", "cat=3")  # fmt: skip
    plan = generate.make_plan(parser.parse_args(argv))
    assert (plan.steps, plan.num_images, plan.height, plan.guidance) == (150, 8, 2048, 40.0)
    assert plan.subjects[0].scale == 3.0


RECORDED = [
    ("height", 8192, "height recorded in '{png}' must be a multiple of 8 between 8 and 1536 pixels, got 8192 "
                     "(--allow-large allows up to 8192)"),
    ("steps", 1000, "steps recorded in '{png}' must be an integer between 1 and 100, got 1000 "
                    "(--allow-large allows up to 10000)"),
    ("guidance", 31.5, "guidance recorded in '{png}' must be a finite number between 0 and 30, got 31.5 "
                       "(--allow-large allows up to 1000)"),
    ("num_images", 8, None),  # image_index 0 of 8 images
    # beyond the ceilings: the recipe itself is malformed
    ("steps", 10**9, "'{png}': recipe field 'steps' must be an integer in 1..10000, got 1000000000"),
    ("guidance", 1e308, "'{png}': recipe field 'guidance' must be a finite number in 0..1000, got 1e+308"),
    ("height", 2**40, "'{png}': recipe field 'height' must be an integer in 1..8192, got 1099511627776"),
    ("seed", 2**64, f"'{{png}}': recipe field 'seed' must be an integer in 0..2**64-1, got {2**64}"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "value", "expected"), RECORDED, ids=[f"{k}={v}" for k, v, _ in RECORDED])
def test_recorded_values_are_held_to_the_same_caps(made, tmp_path, out, capsys, no_models, key, value, expected):
    png = edited(made, tmp_path / "edited.png", lambda recipe: recipe.update({key: value}))
    code = main(["generate", "--from-png", str(png), "-o", str(out / "x.png")])
    if expected is None:
        expected = (f"num_images recorded in '{png}' must be an integer between 1 and 4, got {value} "
                    "(--allow-large allows up to 64)")  # fmt: skip
    refused(capsys, code, out, expected.format(png=png))
    assert no_models == []


@pytest.mark.parametrize(
    ("scale", "expected"),
    [
        (2.0, "the scale of 'cat' recorded in '{png}' must be a finite number between 0 and 1.5, got 2.0 "
              "(--allow-large allows up to 100)"),
        (-5, "'{png}' subject #1: recipe field 'scale' must be a finite number in 0..100, a list of them, or diffusers' dict form {{down, mid, up}}, got -5"),
        ("big", "'{png}' subject #1: recipe field 'scale' must be a finite number in 0..100, a list of them, or diffusers' dict form {{down, mid, up}}, got 'big'"),
    ],
)  # fmt: skip
def test_a_recorded_scale_is_checked_and_named(made, tmp_path, out, capsys, no_models, scale, expected):
    png = edited(made, tmp_path / "scaled.png", lambda recipe: recipe["subjects"][0].update(scale=scale))
    refused(capsys, main(["generate", "--from-png", str(png), "-o", str(out / "x.png")]), out,
            expected.format(png=png))  # fmt: skip


def test_nan_in_a_recipe_is_refused(made, tmp_path, out, capsys, no_models):
    recipe = read_recipe(made)
    text = json.dumps({**recipe, "guidance": float("nan")})  # json writes NaN, and reads it back
    png = with_text(made, tmp_path / "nan.png", text)
    refused(capsys, main(["generate", "--from-png", str(png), "-o", str(out / "x.png")]), out,
            f"'{png}': recipe field 'guidance' must be a finite number in 0..1000, got nan")  # fmt: skip


FIELDS = [
    (lambda r: r.update(device="meta"),
     "'{png}': recipe field 'device' must be a device such as cpu, cuda, cuda:1, mps, got 'meta'"),
    (lambda r: r.update(dtype="int8"),
     "'{png}': recipe field 'dtype' must be one of ('float32', 'float16', 'bfloat16', 'float64'), got 'int8'"),
    (lambda r: r["models"].update(tiny="banana"),
     "'{png}' models: recipe field 'models.tiny' must be null or one of sdxl, sd15, flux, got 'banana'"),
    (lambda r: r["subjects"][0].update(region={"png_base64": "!!not base64!!"}),
     "'{png}' subject #1: recipe field 'png_base64' is not base64 text"),
    (lambda r: r["subjects"][0].update(region={"png_base64": base64.b64encode(b"GIF89a junk").decode()}),
     "'{png}' subject #1: recipe field 'png_base64': the embedded mask is not an image file Pillow can read"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "expected"), FIELDS, ids=["device", "dtype", "models.tiny", "base64", "not png"])
def test_every_recipe_field_is_validated_with_its_name(made, tmp_path, out, capsys, no_models, change, expected):
    png = edited(made, tmp_path / "field.png", change)
    refused(capsys, main(["generate", "--from-png", str(png), "-o", str(out / "x.png")]), out,
            expected.format(png=png))  # fmt: skip


def test_deep_or_huge_recipe_json_is_refused_naming_the_file(made, tmp_path, out, capsys, no_models):
    deep = with_text(made, tmp_path / "deep.png", "[" * 200_000 + "]" * 200_000)
    refused(capsys, main(["generate", "--from-png", str(deep), "-o", str(out / "x.png")]), out,
            f"'{deep}': its mipadapter recipe is nested too deeply to be a recipe")  # fmt: skip
    recipe = read_recipe(made)
    huge = with_text(made, tmp_path / "huge.png", json.dumps({**recipe, "prompt": "a cat " * 200_000}))
    code = main(["generate", "--from-png", str(huge), "-o", str(out / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"mipadapter generate: error: '{huge}'"), err
    assert list(out.iterdir()) == []


def bomb_png(width: int, height: int) -> bytes:
    """A real greyscale PNG of ``width`` × ``height`` black pixels, a few hundred KB on disk, built
    row by row (never holding the pixels)."""
    squeeze = zlib.compressobj(9)
    row = bytes(1 + width)  # filter byte 0, then black
    body = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_an_embedded_mask_bomb_is_refused_by_its_header_within_a_memory_bound(made, tmp_path, out):
    """A ~140 KB embedded mask of 12000×12000 pixels (144 MB decoded) is refused from its header: the
    run's peak memory stays within 25 MB of a run refused for a bad flag at the same stage."""
    data = bomb_png(12000, 12000)
    assert len(data) < 400_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:  # a real PNG: Pillow reads its header
            assert image.size == (12000, 12000)
    encoded = base64.b64encode(data).decode()
    png = edited(made, tmp_path / "bomb.png", lambda r: r["subjects"][0].update(region={"png_base64": encoded}))
    small = edited(made, tmp_path / "small.png", lambda r: r.update(steps=1000))
    script = textwrap.dedent(
        """
        import resource, sys
        from mipadapter.cli.main import main
        code = main(["generate", "--from-png", sys.argv[1], "-o", sys.argv[2]])
        print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def peak(path: Path) -> tuple[int, int, str]:
        done = subprocess.run([sys.executable, "-c", script, str(path), str(out / "x.png")], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        code, kilobytes = done.stdout.split()
        return int(code), int(kilobytes), done.stderr

    code, bomb_kb, err = peak(png)
    baseline_code, baseline_kb, _ = peak(small)
    assert baseline_code == 2
    assert bomb_kb - baseline_kb < 25_000, (bomb_kb, baseline_kb)
    assert code == 2 and err == (
        f"mipadapter generate: error: '{png}' subject #1: recipe field 'png_base64': the embedded mask is "
        "12000×12000 (144.0 MP), above the 16.8 MP limit: downscale it, or raise the limit\n"
    )
    assert list(out.iterdir()) == []


def test_photos_from_a_recipe_are_named_as_recorded_and_a_fifo_is_never_opened(
    made, tmp_path, out, capsys, no_models
):
    from mipadapter.recipe import file_sha256

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it would block the test forever
    big = tmp_path / "big.jpg"
    big.write_bytes(CAT.read_bytes())
    width, height = Image.open(big).size
    record = {"path": str(big), "sha256": file_sha256(big)}
    png = edited(made, tmp_path / "big.png", lambda r: r["subjects"][0].update(photos=[record]))
    code = main(["generate", "--from-png", str(png), "--max-photo-mp", "0.01", "-o", str(out / "x.png")])
    refused(capsys, code, out, f"recorded photo 1 of 'cat' '{big}' is {width}×{height} "
            f"({width * height / 1e6:.1f} MP), above the 0.01 MP limit: downscale it, or raise the limit")  # fmt: skip
    fifo_record = {"path": str(fifo), "sha256": "0" * 64}
    png = edited(made, tmp_path / "fifo.png", lambda r: r["subjects"][0].update(photos=[fifo_record]))
    refused(capsys, main(["generate", "--from-png", str(png), "-o", str(out / "x.png")]), out,
            f"recorded photo 1 of 'cat' '{fifo}', recorded in '{png}', is a named pipe (FIFO), not a file")  # fmt: skip
    argv = generate_argv(out)
    argv[argv.index(f"cat={CAT}")] = f"cat={fifo}"
    refused(capsys, main(argv), out, f"--subject cat '{fifo}' is a named pipe (FIFO), not a photo")
    refused(capsys, main(generate_argv(out, "--region", f"cat={fifo}")), out,
            f"--region cat mask '{fifo}' is a named pipe (FIFO), not a photo")  # fmt: skip
    refused(capsys, main(generate_argv(out, "--region", f"cat={tmp_path}")), out,
            f"--region cat mask '{tmp_path}' is a folder, not a photo")  # fmt: skip
    refused(capsys, main(["generate", "--from-png", str(fifo), "-o", str(out / "x.png")]), out,
            f"'{fifo}' is a named pipe (FIFO), not an image")  # fmt: skip
