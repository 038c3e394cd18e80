"""`mipadapter generate --tiny` and `convert` end to end, and the CLI's one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mipadapter.checkpoint import read_file
from mipadapter.cli.generate import parameters_of
from mipadapter.cli.main import main
from mipadapter.testing import tiny_checkpoint_files, tiny_sdxl_pipeline

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CAT, BACKPACK = ASSETS / "cat.jpg", ASSETS / "backpack.jpg"


def generate(tmp_path, *extra: str) -> int:
    return main(
        [
            "generate",
            "--tiny",
            "--prompt",
            "a cat wearing a backpack in Boston",
            "--subject",
            f"cat={CAT}",
            "--subject",
            f"backpack={BACKPACK}",
            "--steps",
            "2",
            "-o",
            str(tmp_path / "out.png"),
            *extra,
        ]
    )


def test_generate_tiny_writes_png_with_parameters_and_contact_sheet(tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert (
        generate(
            tmp_path, "--scale", "cat=0.5", "--region", "backpack=0,0,32,64", "--contact-sheet", str(sheet)
        )
        == 0
    )
    image = Image.open(tmp_path / "out.png")
    assert image.size == (64, 64)
    params = parameters_of(tmp_path / "out.png")
    assert params["prompt"] == "a cat wearing a backpack in Boston"
    assert params["seed"] == 420 and params["rule"] == "official"
    assert [s["name"] for s in params["subjects"]] == ["cat", "backpack"]
    assert params["subjects"][0]["scale"] == 0.5 and params["subjects"][1]["region"] == "0,0,32,64"
    assert params["subjects"][0]["photos"] == [str(CAT)]
    assert Image.open(sheet).size[1] > image.size[1]  # result row plus one row per subject
    assert str(tmp_path / "out.png") in capsys.readouterr().out


def test_generate_is_reproducible_by_seed(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    generate(first, "--seed", "7")
    generate(second, "--seed", "7")
    assert np.array_equal(np.asarray(Image.open(first / "out.png")), np.asarray(Image.open(second / "out.png")))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--subject", f"dog={CAT}"], "subject 'dog' does not occur in the prompt"),
        (["--subject", "cat=/no/such.jpg"], "photo not found: /no/such.jpg"),
        (["--subject", "cat"], "--subject takes NAME=VALUE"),
        (["--scale", "horse=0.3"], "['horse']"),
        (["--region", "cat=5,5,1,1"], "box (5.0, 5.0, 1.0, 1.0)"),
    ],
)
def test_generate_errors_are_one_readable_line(tmp_path, capsys, args, message):
    base = [
        "generate",
        "--tiny",
        "--prompt",
        "a cat on a sofa",
        "--steps",
        "1",
        "-o",
        str(tmp_path / "x.png"),
    ]
    if not any(arg.startswith("--subject") for arg in args):
        base += ["--subject", f"cat={CAT}"]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.png").exists()


def test_offline_hub_failure_names_the_model_and_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(
        [
            "generate",
            "--prompt",
            "a cat",
            "--subject",
            f"cat={CAT}",
            "--base-model",
            str(tmp_path / "nothing-here"),
            "-o",
            str(tmp_path / "x.png"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    # the adapter (the preset's, not cached here) is located first: the small things before the big ones
    assert "the adapter 'hqhQAQ/MIP-Adapter/model_sdxl.bin'" in err and "point --adapter at a local copy" in err


def test_convert_between_formats_round_trips(tmp_path):
    pipe = tiny_sdxl_pipeline()
    files = tiny_checkpoint_files(tmp_path, pipe)
    ours, authors, plain = (
        tmp_path / "ours.safetensors",
        tmp_path / "authors.bin",
        tmp_path / "plain.safetensors",
    )
    assert main(["convert", str(files.mip_basic_bin), str(ours), "--base-model", "tiny-sdxl"]) == 0
    assert main(["convert", str(ours), str(authors), "--to", "authors", "--base-model", "tiny-sdxl"]) == 0
    assert main(["convert", str(ours), str(plain), "--to", "diffusers", "--base-model", "tiny-sdxl"]) == 0
    original, back = read_file(files.mip_basic_bin).state, read_file(authors).state
    assert original.keys() == back.keys()
    assert all(
        torch.equal(original[key], back[key]) and original[key].dtype == back[key].dtype for key in original
    )
    stripped = read_file(plain).state
    assert set(stripped) == {key for key in original if not key.endswith("text_to_weight.weight")}
