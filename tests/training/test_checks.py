"""`mipadapter.train` refuses bad paths and model files in one line naming the config key, before any
model loads, and writes nothing."""

from __future__ import annotations

import pytest
from synthetic_data import write_authors_layout

from mipadapter.testing import TINY_SDXL, tiny_checkpoint_files, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp / "base")
    encoder, _ = TINY_SDXL.basic_image_encoder.build()
    encoder.save_pretrained(tmp / "encoder")
    plus_encoder, _ = TINY_SDXL.plus_image_encoder.build()
    plus_encoder.save_pretrained(tmp / "plus_encoder")
    files = tiny_checkpoint_files(tmp / "ckpt", pipe, dtype=None)
    write_authors_layout(tmp / "data", 3)
    return tmp, files


def _config(tmp_path, models, **changes):
    tmp, files = models
    model = {
        "base_model": str(tmp / "base"),
        "image_encoder": str(tmp / "encoder"),
        "adapter_init": str(files.basic_bin),
    }
    data = {"root": str(tmp / "data"), "resolution": 64, "num_workers": 0}
    for key, value in changes.items():
        section, name = key.split(".")
        {"model": model, "data": data}[section][name] = value
    lines = ["model:"] + [f"  {k}: {v}" for k, v in model.items()]
    lines += ["data:"] + [f"  {k}: {v}" for k, v in data.items()]
    lines += [
        "optim: {max_steps: 1, batch_size: 1}",
        f"run: {{output_dir: {tmp_path / 'out'}, progress_bar: false}}",
    ]
    path = tmp_path / "train.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data.root": "/no/such/folder"}, "data.root '/no/such/folder' is not a folder"),
        ({"data.ids_file": "/no/ids.txt"}, "data.ids_file '/no/ids.txt' does not exist"),
        ({"model.adapter_init": "/no/adapter.bin"}, "model.adapter_init"),
        ({"model.image_encoder": "plus_encoder"}, "model.image_encoder"),
        ({"model.base_model": "nobody/no-such-model"}, "model.base_model"),
    ],
)
def test_bad_inputs_fail_in_one_line_before_loading(monkeypatch, tmp_path, capsys, models, change, message):
    from mipadapter.train import main

    if change.get("model.image_encoder") == "plus_encoder":  # a real encoder of the wrong width
        change = {"model.image_encoder": str(models[0] / "plus_encoder")}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        "mipadapter.training.loop.load_components", lambda *a, **k: pytest.fail("models were loaded")
    )
    code = main(["--config", str(_config(tmp_path, models, **change))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mipadapter.train: error: ")
    assert message in err[0]
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "logs").exists()


def test_a_corrupt_adapter_file_is_named(tmp_path, capsys, models, monkeypatch):
    from mipadapter.train import main

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00\x01 not a safetensors file")
    monkeypatch.setattr(
        "mipadapter.training.loop.load_components", lambda *a, **k: pytest.fail("models were loaded")
    )
    assert main(["--config", str(_config(tmp_path, models, **{"model.adapter_init": str(bad)}))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.safetensors" in err[0]
