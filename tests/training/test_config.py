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
