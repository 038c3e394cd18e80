"""Issue 18 items 4 and 6 through the CLI: an adapter file whose tensors are not floating point, hold NaN
or infinite values, or whose stored scale is not a finite number in range is refused when it is read,
in one line naming the file (and the first bad key), by ``generate`` and ``convert`` alike; nothing is
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mipadapter.cli.main import main

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CAT, BACKPACK = ASSETS / "cat.jpg", ASSETS / "backpack.jpg"


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Path:
    """An adapter in our format, saved from the tiny SDXL MIP pipeline (what --tiny --adapter loads)."""
    from mipadapter import save_adapter
    from mipadapter.testing.mip import tiny_mip_pipeline

    return save_adapter(tiny_mip_pipeline("sdxl", "basic", text_weight=True).adapter,
                        tmp_path_factory.mktemp("ours") / "ours.safetensors")  # fmt: skip


def rewritten(source: Path, target: Path, tensors=None, config=None) -> Path:
    """``source`` with some tensors replaced (``tensors(state)`` edits the dict) or its stored config
    edited (``config(dict)``), written without any check."""
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    if tensors is not None:
        tensors(state)
    if config is not None:
        stored = json.loads(metadata["config"])
        config(stored)
        metadata["config"] = json.dumps(stored)
    save_file(state, str(target), metadata=metadata)
    return target


def first_key(path: Path) -> str:
    with safe_open(str(path), framework="pt") as handle:
        return sorted(handle.keys())[0]


def poison(kind: str):
    def edit(state):
        key = sorted(state)[0]
        if kind == "int8":
            state[key] = state[key].to(torch.int8)
        elif kind == "bool":
            state[key] = state[key] > 0
        else:
            state[key] = state[key].clone()
            state[key].view(-1)[3] = float(kind)

    return edit


BAD_TENSORS = [
    ("int8", "tensor {key} is int8; adapter weights are floating point (float32, float16, bfloat16)"),
    ("bool", "tensor {key} is bool; adapter weights are floating point (float32, float16, bfloat16)"),
    ("nan", "tensor {key} holds NaN or infinite values (the first such key)"),
    ("inf", "tensor {key} holds NaN or infinite values (the first such key)"),
]
BAD_SCALES = [
    (float("nan"), "default_scale must be a finite number between 0 and 100, got nan"),
    (-5, "default_scale must be a finite number between 0 and 100, got -5"),
    ("big", "default_scale must be a finite number between 0 and 100, got big"),
    (1e39, "default_scale must be a finite number between 0 and 100, got 1e+39"),
]


def bad_files(ours: Path, folder: Path) -> list[tuple[Path, str]]:
    files = []
    for kind, message in BAD_TENSORS:
        path = rewritten(ours, folder / f"{kind}.safetensors", tensors=poison(kind))
        files.append((path, f"{path}: {message.format(key=first_key(ours))}"))
    for number, (scale, message) in enumerate(BAD_SCALES):
        path = rewritten(ours, folder / f"scale{number}.safetensors", config=lambda c, s=scale: c.update(default_scale=s))
        files.append((path, f"{path}: its adapter config metadata is unreadable ({message})"))
    return files


def test_generate_refuses_a_bad_adapter_naming_the_file(ours, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for path, message in bad_files(ours, tmp_path):
        argv = ["generate", "--tiny", "--adapter", str(path), "--prompt", "a cat wearing a backpack",
                "--subject", f"cat={CAT}", "--subject", f"backpack={BACKPACK}", "--steps", "1",
                "-o", str(out / "x.png")]  # fmt: skip
        code = main(argv)
        err = capsys.readouterr().err
        assert (code, err) == (2, f"mipadapter generate: error: {message}\n"), path.name
        assert list(out.iterdir()) == []


def test_convert_refuses_a_bad_adapter_naming_the_file(ours, tmp_path, capsys):
    for path, message in bad_files(ours, tmp_path):
        target = tmp_path / "converted.bin"
        code = main(["convert", str(path), str(target), "--to", "authors", "--base-model", "tiny-sdxl"])
        err = capsys.readouterr().err
        assert (code, err) == (2, f"mipadapter convert: error: {message}\n"), path.name
        assert not target.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_pickled_file_with_integer_weights_is_refused_too(tmp_path, capsys):
    from mipadapter.testing import tiny_checkpoint_files, tiny_sdxl_pipeline

    files = tiny_checkpoint_files(tmp_path / "files", tiny_sdxl_pipeline())
    capsys.readouterr()  # the writer's progress bars
    nested = torch.load(files.mip_basic_bin, weights_only=True)
    key = sorted(nested["image_proj"])[0]
    nested["image_proj"][key] = nested["image_proj"][key].to(torch.int8)
    bad = tmp_path / "int8.bin"
    torch.save(nested, bad)
    target = tmp_path / "out.safetensors"
    code = main(["convert", str(bad), str(target), "--base-model", "tiny-sdxl"])
    assert (code, capsys.readouterr().err) == (
        2,
        f"mipadapter convert: error: {bad}: tensor image_proj.{key} is int8; adapter weights are floating "
        "point (float32, float16, bfloat16)\n",
    )
    assert not target.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_finiteness_check_has_no_false_alarm_and_misses_nothing(dtype):
    from mipadapter.checkpoint import CheckpointError
    from mipadapter.checkpoint.io import check_weights

    top = torch.finfo(dtype).max
    huge = torch.full((64,), top, dtype=dtype)  # every value finite, their sum overflows
    check_weights("f.safetensors", {"a": huge, "b": -huge, "c": torch.zeros(0, dtype=dtype)})
    for bad in (float("nan"), float("inf"), -float("inf")):
        values = torch.randn(5, 7).to(dtype)
        values[4, 6] = bad
        with pytest.raises(CheckpointError, match=r"^f\.safetensors: tensor b holds NaN or infinite values"):
            check_weights("f.safetensors", {"a": huge, "b": values, "c": values})
