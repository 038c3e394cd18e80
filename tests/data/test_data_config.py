"""DataConfig: one frozen dataclass, YAML/TOML loading, unknown keys and wrong types are errors."""

from __future__ import annotations

import dataclasses

import pytest

from mipadapter.data.config import DataConfig, data_config_from_dict, load_data_config


def test_defaults_name_the_papers_models():
    config = DataConfig()
    assert config.caption_model == "Salesforce/blip2-opt-2.7b"
    assert config.grounding_model == "IDEA-Research/grounding-dino-base"
    assert config.segment_model == "facebook/sam-vit-huge"
    assert config.clip_model == "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
    assert config.top_k == 100_000 and config.min_objects == 2
    assert DataConfig(mode="single").min_objects == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 1


def test_yaml_and_toml_load_the_same(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "top_k: 10\nbox_threshold: 1\nfilters:\n  min_score: null\n  max_objects: 3\n"
    )
    (tmp_path / "c.toml").write_text(
        "top_k = 10\nbox_threshold = 1.0\n[filters]\nmax_objects = 3\nmin_score = 0.3\n"
    )
    from_yaml, from_toml = load_data_config(tmp_path / "c.yaml"), load_data_config(tmp_path / "c.toml")
    assert from_yaml.top_k == from_toml.top_k == 10 and from_yaml.box_threshold == 1.0
    assert from_yaml.filters.min_score is None and from_yaml.filters.max_objects == 3
    assert from_toml.filters.min_score == 0.3


@pytest.mark.parametrize(
    "data,message",
    [
        ({"topk": 1}, r"unknown key\(s\) in DataConfig: \['topk'\]"),
        ({"filters": {"min_area": 0.1}}, r"unknown key\(s\) in DataConfig.filters: \['min_area'\]"),
        ({"top_k": "ten"}, "DataConfig.top_k must be int, got 'ten'"),
        ({"copy_images": 1}, "DataConfig.copy_images must be bool, got 1"),
        ({"top_k": True}, "DataConfig.top_k must be int, got True"),
        ({"top_k": None}, "DataConfig.top_k must not be null"),
        ({"mode": "pairs"}, "DataConfig.mode must be one of"),
        ({"clip_text_template": "a photo"}, r"must contain '\{name\}'"),
        ({"batch_size": 0}, "DataConfig.batch_size must be >= 1, got 0"),
        ({"filters": 3}, "DataConfig.filters must be a mapping"),
    ],
)
def test_bad_config_is_named(data, message):
    with pytest.raises(ValueError, match=message):
        data_config_from_dict(data)


def test_file_errors_name_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("unknown: 1\n")
    with pytest.raises(ValueError, match=r"c\.yaml: unknown key"):
        load_data_config(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match=r"must end in \.yaml, \.yml or \.toml"):
        load_data_config(tmp_path / "c.json")
