"""The training config: YAML and TOML map 1:1 onto TrainConfig; unknown keys and bad values are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mipadapter.training import ConfigError, TrainConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {
    "model": {"base_model": "base", "image_encoder": "enc", "adapter_init": "ip.bin"},
    "data": {"root": "data"},
    "run": {"output_dir": "out"},
}


@pytest.mark.parametrize("name", ["train_sdxl.yaml", "train_sd15.yaml"])
def test_shipped_configs_load(name):
    config = load_config(ROOT / "configs" / name)
    assert isinstance(config, TrainConfig)
    assert config.optim.learning_rate == 1e-4 and config.optim.weight_decay == 0.01
    assert (config.optim.drop_text, config.optim.drop_image, config.optim.drop_both) == (0.05, 0.05, 0.05)
    assert config.optim.rule == "official" and config.data.max_subjects == 2


def test_defaults_are_the_authors_recipe():
    config = config_from_dict(MINIMAL)
    assert config.data.resolution == 512 and config.optim.batch_size == 4
    assert config.data.filters.object_filter().min_area_frac == 0.08
    assert config.data.filters.object_filter().max_objects is None  # capped after the mask checks


def test_yaml_and_toml_give_the_same_config(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "model: {base_model: base, image_encoder: enc, adapter_init: ip.bin}\n"
        "data: {root: data, filters: {min_score: 0.5}}\nrun: {output_dir: out}\noptim: {max_steps: 7}\n"
    )
    (tmp_path / "a.toml").write_text(
        '[model]\nbase_model = "base"\nimage_encoder = "enc"\nadapter_init = "ip.bin"\n'
        '[data]\nroot = "data"\n[data.filters]\nmin_score = 0.5\n[run]\noutput_dir = "out"\n'
        "[optim]\nmax_steps = 7\n"
    )
    assert load_config(tmp_path / "a.yaml") == load_config(tmp_path / "a.toml")


def test_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "model: {base_model: base, image_encoder: enc, adapter_init: ip.bin}\ndata: {root: d}\nrun: {output_dir: o}\n"
    )
    config = load_config(tmp_path / "a.yaml", ["optim.max_steps=10", "data.filters.min_score=null"])
    assert config.optim.max_steps == 10 and config.data.filters.min_score is None
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(tmp_path / "a.yaml", ["optim.max_steps"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optim": {"learnig_rate": 1e-4}}, r"unknown key\(s\) \['optim.learnig_rate'\]"),
        ({"colour": 1}, r"unknown key\(s\) \['colour'\]"),
        ({"data": {"root": "d", "filters": {"min_scor": 0.1}}}, r"data.filters.min_scor"),
        ({"optim": {"max_steps": "ten"}}, r"optim.max_steps must be an integer, got 'ten'"),
        ({"optim": {"batch_size": 0}}, r"optim.batch_size must be in \[1, 4096\], got 0"),
        ({"optim": {"rule": "uniform"}}, r"optim.rule must be one of \('official', 'paper'\)"),
        ({"optim": {"drop_text": 0.6, "drop_image": 0.6}}, r"sum <= 1"),
        ({"data": {"root": "d", "filters": {"min_area_frac": 2.0}}}, r"min_area_frac must be in \[0, 1\]"),
        ({"export": {"formats": ["onnx"]}}, r"export.formats must be one of"),
        ({"model": {"base_model": "b", "image_encoder": "e"}}, r"set model.train_image_proj: true"),
        ({"validation": {"every": 10}}, r"validation.prompts is empty"),
        (
            {"model": {**MINIMAL["model"], "text_weight_init": "ones"}},
            r"model.text_weight_init must be one of \('pytorch', 'zeros'\), got 'ones'",
        ),
    ],
)
def test_bad_configs_name_the_key(change, message):
    data = {**MINIMAL, **change}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_missing_required_keys():
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['run'\]"):
        config_from_dict({k: v for k, v in MINIMAL.items() if k != "run"})
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['data.root'\]"):
        config_from_dict({**MINIMAL, "data": {}})


def test_entry_point_reports_a_bad_config_in_one_line(tmp_path, capsys):
    from mipadapter.train import main

    (tmp_path / "bad.yaml").write_text("model: {}\n")
    assert main(["--config", str(tmp_path / "bad.yaml")]) == 2
    assert "missing required key(s)" in capsys.readouterr().err


NUMBERS = "model: {base_model: base, image_encoder: enc, adapter_init: ip.bin}\ndata: {root: d}\n"


@pytest.mark.parametrize(
    ("yaml", "line"),
    [
        ("optim: {learning_rate: .nan}", "optim.learning_rate must be a finite number, got nan"),
        ("optim: {learning_rate: .inf}", "optim.learning_rate must be a finite number, got inf"),
        ("optim: {learning_rate: 1.0e+400}", "optim.learning_rate must be a finite number, got inf"),
        ("optim: {learning_rate: 100000000000000000000000000000000000000000000000000000000000000000000000"
         "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
         "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
         "000000000000000000000000000000000000000000000000000000000000000000000000000000000000}",
         "optim.learning_rate must be a finite number, got an integer beyond any float"),
        ("optim: {learning_rate: 5.0}", "optim.learning_rate must be in (0, 1], got 5.0"),
        ("optim: {max_steps: 1000000000000}", "optim.max_steps must be in [1, 99999999], got 1000000000000"),
        ("optim: {batch_size: 100000}", "optim.batch_size must be in [1, 4096], got 100000"),
        ("optim: {warmup_steps: 20000}", "optim.warmup_steps must be in [0, 12000], got 20000"),
        ("optim: {drop_text: 1.5}", "optim.drop_text must be in [0.0, 1.0], got 1.5"),
        ("optim: {drop_image: -0.1}", "optim.drop_image must be in [0.0, 1.0], got -0.1"),
        ("optim: {adam_beta2: 1.0}", "optim.adam_beta2 must be in [0, 1), got 1.0"),
        ("optim: {weight_decay: -1}", "optim.weight_decay must be in [0.0, 1.0], got -1.0"),
        ("optim: {seed: -3}", "optim.seed must be in [0, 4294967295], got -3"),
        ("optim: {max_grad_norm: .inf}", "optim.max_grad_norm must be a finite number, got inf"),
        ("data: {root: d, resolution: 8192}",
         "data.resolution must be a multiple of 8 in [8, 4096], got 8192"),
        ("data: {root: d, flip_prob: 2}", "data.flip_prob must be in [0, 1], got 2.0"),
        ("data: {root: d, scan_workers: 100000}", "data.scan_workers must be in [1, 256], got 100000"),
        ("data: {root: d, warn_skipped_share: 1.5}",
         "data.warn_skipped_share must be in [0.0, 1.0], got 1.5"),
        ("data: {root: d, filters: {min_score: .nan}}",
         "data.filters.min_score must be a finite number, got nan"),
        ("validation: {guidance_scale: 1.0e+308}",
         "validation.guidance_scale must be in [0.0, 30.0], got 1e+308"),
        ("validation: {num_inference_steps: 1000000000}",
         "validation.num_inference_steps must be in [1, 100], got 1000000000"),
    ],
)  # fmt: skip
def test_config_numbers_are_refused_naming_the_key_and_the_file(tmp_path, capsys, monkeypatch, yaml, line):
    from mipadapter.train import main

    monkeypatch.setattr("mipadapter.training.loop.train", lambda *a, **k: pytest.fail("training started"))
    path = tmp_path / "bad.yaml"
    out = tmp_path / "out"
    path.write_text(NUMBERS + f"run: {{output_dir: {out}}}\n" + yaml + "\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mipadapter.train: error: config file {str(path)!r}: {line}"]
    assert not out.exists()


def test_toml_infinity_and_an_override_are_named(tmp_path, capsys):
    from mipadapter.train import main

    path = tmp_path / "bad.toml"
    path.write_text(
        '[model]\nbase_model = "b"\nimage_encoder = "e"\nadapter_init = "i"\n[data]\nroot = "d"\n'
        f'[run]\noutput_dir = "{tmp_path / "out"}"\n[optim]\nnoise_offset = inf\n'
    )
    assert main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mipadapter.train: error: config file {str(path)!r}: "
        "optim.noise_offset must be a finite number, got inf"
    )
    good = tmp_path / "good.yaml"
    good.write_text(NUMBERS + f"run: {{output_dir: {tmp_path / 'out'}}}\n")
    assert main(["--config", str(good), "--set", "optim.learning_rate=.nan"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mipadapter.train: error: --set optim.learning_rate: "
        "optim.learning_rate must be a finite number, got nan"
    )
    assert not (tmp_path / "out").exists()


def test_an_unparsable_config_is_named(tmp_path, capsys):
    from mipadapter.train import main

    path = tmp_path / "bad.yaml"
    path.write_text("optim: {max_steps: " + "9" * 5000 + "}\n")  # beyond Python's int parsing limit
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mipadapter.train: error: config file {str(path)!r} cannot be read: ")
    path.write_text("optim: [unclosed\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mipadapter.train: error: config file {str(path)!r} cannot be read: ")
