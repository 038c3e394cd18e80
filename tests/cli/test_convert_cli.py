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


def test_the_default_scale_of_a_file_without_one_is_given_with_scale_or_noted(tmp_path, files, capsys):
    """The authors' files carry no scale (their presets use 0.75): --scale stores one; without it, 1.0 is
    stored and a note on stderr says so; our own files keep theirs (--scale is then an error)."""
    scaled, plain = tmp_path / "scaled.safetensors", tmp_path / "plain.safetensors"
    assert main(["convert", str(files.mip_basic_bin), str(scaled), "--base-model", "tiny-sdxl", "--scale", "0.75"]) == 0
    assert read_file(scaled).config.default_scale == 0.75 and "note:" not in capsys.readouterr().err
    assert main(["convert", str(files.mip_basic_bin), str(plain), "--base-model", "tiny-sdxl"]) == 0
    assert read_file(plain).config.default_scale == 1.0
    assert capsys.readouterr().err == (
        f"note: {files.mip_basic_bin} carries no default image scale; 1.0 was stored (pass --scale, e.g. 0.75 "
        "for the authors' model_sdxl.bin)\n"
    )
    again = tmp_path / "again.safetensors"
    assert main(["convert", str(scaled), str(again), "--base-model", "tiny-sdxl", "--scale", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--scale: " in err and "carries its own default scale" in err and not again.exists()
    assert main(["convert", str(files.mip_basic_bin), str(again), "--base-model", "tiny-sdxl", "--scale", "nan"]) == 2
    assert "--scale must be a finite number between 0 and 100, got nan" in capsys.readouterr().err and not again.exists()


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


# ----------------------------------------------------------------------------------------------- FLUX
@pytest.fixture(scope="module")
def xlabs(tmp_path_factory):
    """An XLabs-layout file for the tiny FLUX in bfloat16 (bits and dtype must survive every conversion)."""
    from mipadapter.testing.flux import fabricate_xlabs_state, save_xlabs_file, tiny_flux_ip_files

    folder = tmp_path_factory.mktemp("xlabs")
    config = tiny_flux_ip_files(folder, seed=5).config
    state = {key: value.to(torch.bfloat16) for key, value in fabricate_xlabs_state(config, seed=5).items()}
    return save_xlabs_file(state, folder / "ip_adapter_bf16.safetensors")


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_xlabs_to_ours_to_xlabs_round_trips_bit_exactly(tmp_path, xlabs, capsys):
    from mipadapter.checkpoint.xlabs import convert_state

    ours, back, plain = tmp_path / "ours.safetensors", tmp_path / "back.safetensors", tmp_path / "plain.bin"
    assert main(["convert", str(xlabs), str(ours), "--base-model", "tiny-flux"]) == 0
    # a FLUX file is not told about the authors' SDXL scale: 1.0 is the ip-flux preset's already
    assert capsys.readouterr().err == (
        f"note: {xlabs} carries no default image scale; 1.0 was stored (1.0 is the ip-flux preset's scale "
        "too; pass --scale to store another)\n"
    )
    read = read_file(ours)
    assert read.layout == "mipadapter" and read.config.architecture == "flux" and read.config.num_tokens == 4
    assert main(["convert", str(ours), str(back), "--to", "xlabs", "--base-model", "tiny-flux"]) == 0
    assert main(["convert", str(back), str(plain), "--to", "diffusers", "--base-model", "tiny-flux"]) == 0
    original = read_file(xlabs).state
    assert read_file(back).layout == "xlabs" and _same_tensors(read_file(back).state, original)
    assert all(value.dtype == torch.bfloat16 for value in read.state.values())
    # diffusers' keys (image_proj.*, ip_adapter.{i}.to_k_ip.*): the same tensors under their names
    assert _same_tensors(read_file(plain).state, convert_state(original, "diffusers"))


def test_convert_reads_only_a_flux_models_transformer_config(tmp_path, xlabs):
    from mipadapter.testing.flux import tiny_flux_pipeline

    transformer = tiny_flux_pipeline().transformer
    transformer.save_config(tmp_path / "bare" / "transformer")  # no weights, no model_index.json
    transformer.save_config(tmp_path / "full" / "transformer")
    index = '{"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}'
    (tmp_path / "full" / "model_index.json").write_text(index)
    for base in ("bare", "full"):
        out = tmp_path / f"{base}.safetensors"
        assert main(["convert", str(xlabs), str(out), "--to", "xlabs", "--base-model", str(tmp_path / base)]) == 0
        assert _same_tensors(read_file(out).state, read_file(xlabs).state)


def test_bad_xlabs_files_and_mismatches_are_one_line_and_leave_nothing(tmp_path, xlabs, files, capsys):
    from mipadapter.testing.flux import save_xlabs_file

    out = tmp_path / "out"
    out.mkdir()
    state = dict(read_file(xlabs).state)
    missing = "double_blocks.1.processor.ip_adapter_double_stream_k_proj.weight"
    misshaped = "double_blocks.2.processor.ip_adapter_double_stream_v_proj.bias"
    del state[missing]
    state["double_blocks.0.processor.ip_adapter_double_stream_q_proj.weight"] = torch.zeros(2, 2)
    state[misshaped] = torch.zeros(5)
    bad = save_xlabs_file(state, tmp_path / "bad.safetensors")
    cases = [
        ([str(bad), str(out / "x.safetensors"), "--base-model", "tiny-flux"],
         [f"{bad} does not fit this adapter", f"missing: {missing}",
          "unexpected: double_blocks.0.processor.ip_adapter_double_stream_q_proj.weight",
          f"wrong shape: {misshaped} (5,) (expected (32,))"]),
        ([str(xlabs), str(out / "x.safetensors"), "--base-model", "tiny-sdxl"],
         [f"{xlabs} is an XLabs FLUX IP-Adapter, but --base-model 'tiny-sdxl' is a UNet2DConditionModel"]),
        ([str(files.mip_basic_bin), str(out / "x.safetensors"), "--to", "xlabs", "--base-model", "tiny-sdxl"],
         ["the xlabs layout is for FLUX adapters, as a .safetensors file"]),
        ([str(xlabs), str(out / "x.bin"), "--to", "xlabs", "--base-model", "tiny-flux"],
         ["output", "the extension must be one of .safetensors"]),
        ([str(xlabs), str(out / "x.bin"), "--to", "authors", "--base-model", "tiny-flux"],
         ["the authors' layout carries text_to_weight, which this adapter does not have"]),
    ]  # fmt: skip
    for args, expected in cases:
        code = main(["convert", *args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("mipadapter convert: error: "), err
        assert all(part in err for part in expected), err
        assert list(out.iterdir()) == []
