"""`mipadapter convert`: lossless round trips, files that follow the umask, one-line errors that leave nothing."""

from __future__ import annotations

import os
import stat
import time

import pytest
import torch

from mipadapter.checkpoint import read_file
from mipadapter.cli.main import main
from mipadapter.testing import tiny_checkpoint_files, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_checkpoint_files(tmp_path_factory.mktemp("files"), tiny_sdxl_pipeline())


def test_convert_between_formats_round_trips(tmp_path, files):
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


def test_convert_reads_only_the_unet_config_of_a_base_model_folder(tmp_path, files):
    tiny_sdxl_pipeline().unet.save_config(tmp_path / "base" / "unet")  # no weights at all
    out = tmp_path / "ours.safetensors"
    assert main(["convert", str(files.mip_plus_bin), str(out), "--base-model", str(tmp_path / "base")]) == 0
    assert read_file(out).config.projection == "plus"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_converted_files_follow_the_umask(tmp_path, files, umask):
    old = os.umask(umask)
    try:
        for target in ("ours.safetensors", "authors.bin"):
            fmt = "mipadapter" if target.endswith(".safetensors") else "authors"
            args = ["convert", str(files.mip_basic_bin), str(tmp_path / target), "--to", fmt]
            assert main(args + ["--base-model", "tiny-sdxl"]) == 0
            assert stat.S_IMODE((tmp_path / target).stat().st_mode) == 0o666 & ~umask
    finally:
        os.umask(old)


def test_convert_mistakes_are_one_line_and_leave_nothing(tmp_path, files, capsys, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "out"
    out.mkdir()
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"garbage")
    good = str(files.mip_basic_bin)
    cases = [
        ([good, str(out / "x.bin")], "output", "the extension must be one of .safetensors"),
        ([good, str(out / "no" / "x.safetensors")], "output", "does not exist"),
        ([good, good, "--to", "authors"], "output", "is the input file"),
        ([str(tmp_path / "nothing.bin"), str(out / "x.safetensors")], "checkpoint", "does not exist"),
        ([str(corrupt), str(out / "x.safetensors"), "--base-model", "nobody/no-base"], str(corrupt),
         "is not a readable PyTorch checkpoint"),  # the small file first, before the base model is looked for
        ([good, str(out / "x.safetensors"), "--base-model", "nobody/no-base"], "base model 'nobody/no-base'",
         "not in the local cache and HF_HUB_OFFLINE is set); download it where you have network and point "
         "--base-model at a local copy"),
        ([good, str(out / "x.safetensors"), "--base-model", str(tmp_path)], "has no unet/config.json", ""),
    ]  # fmt: skip
    for args, first, second in cases:
        start = time.monotonic()
        code = main(["convert", *args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("mipadapter convert: error: "), err
        assert first in err and second in err, err
        assert time.monotonic() - start < 5 and list(out.iterdir()) == []
    assert files.mip_basic_bin.stat().st_size > 0
