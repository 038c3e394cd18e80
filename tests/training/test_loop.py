"""The accelerate loop: resume equals an uninterrupted run; checkpoints and exports load back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from synthetic_data import write_authors_layout, write_manifest_layout

from mipadapter.checkpoint import load_adapter, read_file
from mipadapter.testing import TINY_SDXL, tiny_checkpoint_files, tiny_sdxl_pipeline
from mipadapter.training import checkpointing as ckpt
from mipadapter.training import config_from_dict
from mipadapter.training.components import components_from_pipeline
from mipadapter.training.loop import train
from mipadapter.training.metrics import read_metrics


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    write_authors_layout(tmp / "data", 6)
    pipe = tiny_sdxl_pipeline()
    encoder, _ = TINY_SDXL.basic_image_encoder.build()
    files = tiny_checkpoint_files(tmp / "ckpt", pipe, dtype=None)
    return tmp, pipe, encoder, files


def make_config(setup, out, validation=None, **optim):
    tmp, _, _, files = setup
    return config_from_dict(
        {
            "validation": validation or {},
            "model": {
                "base_model": "-", "image_encoder": "-", "adapter_init": str(files.basic_bin),
            },
            "data": {"root": str(tmp / "data"), "resolution": 64, "max_subjects": 3, "num_workers": 0,
                     "scan_workers": 2},
            "optim": {"batch_size": 2, "max_steps": 4, "learning_rate": 1e-3, "drop_text": 0.3,
                      "drop_image": 0.2, "drop_both": 0.1, **optim},
            "run": {"output_dir": str(out), "checkpoint_every": 2, "keep_last": 2, "log_every": 1,
                    "progress_bar": False},
        }
    )  # fmt: skip


def components(setup):
    _, pipe, encoder, _ = setup
    return components_from_pipeline(pipe, encoder)


def checkpoint_tensors(folder):
    adapter = read_file(folder / ckpt.ADAPTER_FILE).state
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    return adapter, optimizer


def assert_same_optimizer(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert torch.equal(value, b["state"][key][name]), (key, name)


def test_resume_after_a_kill_equals_an_uninterrupted_run(setup, tmp_path):
    straight = train(make_config(setup, tmp_path / "straight"), components=components(setup))
    assert straight.finished and straight.step == 4 and len(straight.losses) == 4

    def kill_at_4(step, loss):
        if step == 4:
            raise Killed

    interrupted = make_config(setup, tmp_path / "resumed")
    with pytest.raises(Killed):
        train(interrupted, components=components(setup), on_step=kill_at_4)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed")] == ["step-00000002"]
    assert [m["step"] for m in read_metrics(tmp_path / "resumed")] == [1, 2, 3]  # step 3 after the checkpoint
    resumed = train(interrupted, components=components(setup))  # the same command again
    assert resumed.finished and resumed.step == 4
    assert resumed.losses == straight.losses[2:]

    adapter_a, optimizer_a = checkpoint_tensors(tmp_path / "straight" / "checkpoints" / "step-00000004")
    adapter_b, optimizer_b = checkpoint_tensors(tmp_path / "resumed" / "checkpoints" / "step-00000004")
    assert adapter_a.keys() == adapter_b.keys()
    assert all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
    assert_same_optimizer(optimizer_a, optimizer_b)
    metrics = read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # the first run's step 3 was dropped, not repeated
    assert [m["loss"] for m in metrics] == [m["loss"] for m in read_metrics(tmp_path / "straight")]
    assert {"loss", "lr", "samples_per_s", "skipped_samples", "epoch"} <= metrics[-1].keys()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed")] == ["step-00000002", "step-00000004"]


def test_stop_after_then_continue_and_keep_last(setup, tmp_path):
    config = make_config(setup, tmp_path / "run", max_steps=6, gradient_accumulation_steps=2)
    first = train(config, components=components(setup), stop_after=3)
    assert not first.finished and first.step == 3 and first.last_checkpoint.name == "step-00000003"
    assert not (tmp_path / "run" / "export").exists()
    second = train(config, components=components(setup))
    assert second.finished and second.step == 6
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-00000004", "step-00000006"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000006" / ckpt.STATE_FILE).read_text())
    assert state["batches"] == 12  # 6 steps × 2 accumulated batches: the data position
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_exports_load_back_and_validation_images(setup, tmp_path):
    tmp, pipe, _, _ = setup
    validation = {
        "every": 1, "num_inference_steps": 2,
        "prompts": [{"prompt": "a photo of a cat and a dog", "subjects": [
            {"name": "cat", "image": str(tmp / "data" / "images" / "sa_0.png")},
            {"name": "dog", "image": str(tmp / "data" / "images" / "sa_0.png")},
        ]}],
    }  # fmt: skip
    config = make_config(setup, tmp_path / "run", validation, max_steps=1, gradient_checkpointing=True)
    result = train(config, components=components(setup))
    image = tmp_path / "run" / "validation" / "step-00000001" / "00.png"
    assert image.is_file()
    exports = result.exports
    assert set(exports) == {"mipadapter", "authors", "diffusers"}
    trained = load_adapter(result.last_checkpoint / ckpt.ADAPTER_FILE, pipe.unet)
    expected = {k: v.half() for k, v in trained.state_dict().items()}

    ours = load_adapter(exports["mipadapter"], pipe.unet)
    assert ours.config.text_weight
    assert all(torch.equal(v, expected[k]) for k, v in ours.state_dict().items())

    authors = read_file(exports["authors"])
    assert authors.layout == "h94" and any(k.endswith("text_to_weight.weight") for k in authors.state)
    theirs = load_adapter(exports["authors"], pipe.unet)
    assert all(torch.equal(v, expected[k]) for k, v in theirs.state_dict().items())

    plain = read_file(exports["diffusers"]).state
    assert not any("text_to_weight" in k for k in plain)
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    pipe.load_ip_adapter(str(exports["diffusers"].parent), subfolder="", weight_name=exports["diffusers"].name,
                         image_encoder_folder=None)  # fmt: skip
    try:
        loaded = [p for p in pipe.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
        assert len(loaded) == TINY_SDXL.num_cross_attention_layers
        first = trained.processors()[trained.layer_specs[0].name]
        assert torch.equal(loaded[0].to_k_ip[0].weight.half(), first.to_k_ip.weight.half())
    finally:
        pipe.unload_ip_adapter()


def test_manifest_data_and_the_cli_entry_point(setup, tmp_path):
    """``python -m mipadapter.train`` with models loaded from folders and data from a manifest."""
    from mipadapter.train import main

    tmp, pipe, encoder, files = setup
    pipe.save_pretrained(tmp_path / "base")
    encoder.save_pretrained(tmp_path / "encoder")
    manifest = write_manifest_layout(tmp_path / "m", 4)
    config = tmp_path / "train.yaml"
    config.write_text(
        f"""
model:
  base_model: {tmp_path / "base"}
  image_encoder: {tmp_path / "encoder"}
  adapter_init: {files.mip_basic_bin}
data:
  format: manifest
  root: {manifest}
  resolution: 64
  num_workers: 0
optim:
  batch_size: 2
  max_steps: 1
  rule: paper
run:
  output_dir: {tmp_path / "out"}
  progress_bar: false
export:
  formats: [mipadapter]
"""
    )
    assert main(["--config", str(config), "--set", "optim.max_steps=2"]) == 0
    assert (tmp_path / "out" / "export" / "mip_adapter.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoints" / "step-00000002").is_dir()
    report = json.loads((tmp_path / "out" / "data" / "report.json").read_text())
    assert report["kept"] == 3  # the one-object image is skipped: two subjects per sample by default


def test_bad_samples_never_stop_a_run(setup, tmp_path, capsys):
    from synthetic_data import plant_bad_authors_samples

    tmp, _, _, files = setup
    root = tmp_path / "bad"
    ids = write_authors_layout(root, 15)
    (root / "ids.txt").write_text("\n".join(ids) + "\n")
    expected = plant_bad_authors_samples(root)
    config = make_config(setup, tmp_path / "run", max_steps=2)
    data = {**config.to_dict()["data"], "root": str(root), "ids_file": str(root / "ids.txt")}
    data["min_subjects"] = 1
    config = config_from_dict({**config.to_dict(), "data": data})
    result = train(config, components=components(setup))
    assert result.finished and result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    err = capsys.readouterr().err.splitlines()
    assert "training data: 3 of 15 images usable" in err
    for reason, skipped in expected.items():
        assert any(line.startswith(f"  skipped {len(skipped)}: {reason} (e.g. ") for line in err), reason
    assert any(line.startswith("warning: 12 of 15 training images (80%) were skipped") for line in err)
    lines = (tmp_path / "run" / "data" / "index.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["sa_12", "sa_13", "sa_14"]


def _killed_while_writing(path):
    """Leave what a process killed inside ``atomic_write`` leaves: a half-written temporary beside
    ``path`` (a child process that dies mid-write, so the temporary's name is whatever ``atomic_write``
    gives it). Returns the leftover."""
    import os
    import subprocess
    import sys

    import mipadapter

    before = set(path.parent.iterdir())
    code = (
        "import os, sys; from mipadapter.fileio import atomic_write; "
        "atomic_write(sys.argv[1], lambda tmp: (tmp.write_bytes(b'half a file'), os._exit(3)))"
    )
    src = str(Path(mipadapter.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    assert subprocess.run([sys.executable, "-c", code, str(path)], env=env).returncode == 3
    (left,) = set(path.parent.iterdir()) - before
    return left


def test_a_resumed_run_removes_what_interrupted_writes_left(setup, tmp_path):
    out = tmp_path / "run"
    config = make_config(setup, out, max_steps=2)
    first = train(config, components=components(setup), stop_after=1)
    assert not first.finished
    (out / "export").mkdir()
    left = [
        _killed_while_writing(out / "export" / "mip_adapter.safetensors"),
        _killed_while_writing(out / "export" / "model.bin"),
        _killed_while_writing(out / "data" / "index.jsonl"),
        _killed_while_writing(out / "logs" / "metrics.jsonl"),
        _killed_while_writing(out / "config.json"),
        _killed_while_writing(out / "checkpoints" / "step-00000001" / ckpt.STATE_FILE),
    ]
    unfinished = out / "checkpoints" / ".tmp-step-00000007"  # a save cut short
    unfinished.mkdir()
    (unfinished / "optimizer.pt").write_bytes(b"half")
    kept = [out / "export" / "notes.txt", out / "export" / ".hidden", out / "export" / ".a.tmp.bin"]
    for path in kept:
        path.write_bytes(b"the user's")
    folder = out / "export" / left[0].name.replace("mip_adapter", "folder")
    folder.mkdir()  # a folder is never ours

    second = train(config, components=components(setup))
    assert second.finished and second.step == 2
    assert not any(path.exists() for path in left) and not unfinished.exists()
    assert all(path.read_bytes() == b"the user's" for path in kept) and folder.is_dir()
    assert {p.name for p in (out / "export").iterdir()} == {
        "mip_adapter.safetensors", "model.bin", "ip_adapter.bin", "notes.txt", ".hidden", ".a.tmp.bin",
        folder.name,
    }  # fmt: skip
