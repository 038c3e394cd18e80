"""XLabs FLUX IP-Adapter checkpoints: key tables, strict checking, bit-exact round trips, diffusers agreement."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from mipadapter.checkpoint.convert import CheckpointError, nest_flat
from mipadapter.checkpoint.xlabs import (
    DIFFUSERS,
    XLABS,
    XLabsConfig,
    convert_state,
    detect_layout,
    expected_shapes,
    from_neutral,
    infer_config,
    key_rules,
    neutral_blocks,
    neutral_shapes,
    to_neutral,
)
from mipadapter.testing.flux import TINY_FLUX, fabricate_xlabs_state, save_xlabs_file, tiny_flux_pipeline

# FLUX.1 with XLabs' files (docs/flux.md): 19 double-stream blocks, inner 3072, T5 width 4096, CLIP ViT-L 768
FLUX1_V1 = XLabsConfig(num_blocks=19, hidden_size=3072, cross_attention_dim=4096, image_embed_dim=768, num_tokens=4)
FLUX1_V2 = XLabsConfig(num_blocks=19, hidden_size=3072, cross_attention_dim=4096, image_embed_dim=768, num_tokens=16)
SMALL = XLabsConfig(num_blocks=3, hidden_size=8, cross_attention_dim=12, image_embed_dim=5, num_tokens=2)


def _state(config: XLabsConfig = SMALL, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    return {key: value.to(dtype) for key, value in fabricate_xlabs_state(config, seed=seed, std=0.5).items()}


def _diffusers_state(config: XLabsConfig = SMALL, seed: int = 0) -> dict:
    return convert_state(_state(config, seed), DIFFUSERS)


# --- key tables ---------------------------------------------------------------------------------------


def test_xlabs_key_names_are_the_published_ones():
    keys = set(expected_shapes(FLUX1_V2, XLABS))
    assert len(keys) == 19 * 4 + 4
    assert {
        "ip_adapter_proj_model.proj.weight",
        "ip_adapter_proj_model.proj.bias",
        "ip_adapter_proj_model.norm.weight",
        "ip_adapter_proj_model.norm.bias",
        "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight",
        "double_blocks.0.processor.ip_adapter_double_stream_k_proj.bias",
        "double_blocks.18.processor.ip_adapter_double_stream_v_proj.weight",
        "double_blocks.18.processor.ip_adapter_double_stream_v_proj.bias",
    } <= keys
    assert not any(key.startswith("double_blocks.19.") for key in keys)
    shapes = expected_shapes(FLUX1_V2, XLABS)
    assert shapes["ip_adapter_proj_model.proj.weight"] == (16 * 4096, 768)  # 65,536 rows: diffusers' 16-token test
    assert shapes["double_blocks.3.processor.ip_adapter_double_stream_k_proj.weight"] == (3072, 4096)
    assert shapes["ip_adapter_proj_model.norm.weight"] == (4096,)


def test_diffusers_key_names_follow_diffusers_loader():
    shapes = expected_shapes(FLUX1_V1, DIFFUSERS)
    assert shapes["image_proj.proj.weight"] == (4 * 4096, 768)
    assert shapes["ip_adapter.18.to_v_ip.bias"] == (3072,)
    # diffusers' rename of an XLabs key: drop the first part, "processor." and the projection names
    for rule in key_rules(XLABS, 19):
        renamed = ".".join(rule.external.split(".")[1:]).replace("ip_adapter_double_stream_k_proj", "to_k_ip")
        renamed = renamed.replace("ip_adapter_double_stream_v_proj", "to_v_ip").replace("processor.", "")
        group = "image_proj" if rule.external.startswith("ip_adapter_proj_model.") else "ip_adapter"
        assert f"{group}.{renamed}" in shapes


def test_tables_match_the_published_file_sizes():
    """XLabs' v1 file is 982 MB and v2 1.06 GB, 16-bit: v2 differs only by 16 image tokens instead of 4."""
    v1 = sum(torch.Size(shape).numel() for shape in neutral_shapes(FLUX1_V1).values()) * 2
    v2 = sum(torch.Size(shape).numel() for shape in neutral_shapes(FLUX1_V2).values()) * 2
    assert v1 == pytest.approx(982e6, rel=0.005)
    assert v2 == pytest.approx(1.06e9, rel=0.005)


def test_config_for_a_transformer():
    config = XLabsConfig.for_transformer(tiny_flux_pipeline().transformer.config, 20, num_tokens=4)
    assert config == XLabsConfig(TINY_FLUX.num_layers, TINY_FLUX.inner_dim, TINY_FLUX.joint_attention_dim, 20, 4)


# --- layouts and config inference ---------------------------------------------------------------------


@pytest.mark.parametrize("config", [SMALL, XLabsConfig(2, 6, 4, 3, 16)])
def test_infer_config_from_either_layout(config):
    assert infer_config(_state(config)) == config
    assert infer_config(_diffusers_state(config)) == config


def test_detect_layout():
    assert detect_layout(_state()) == XLABS
    assert detect_layout(_diffusers_state()) == DIFFUSERS
    mixed = {**_state(), "ip_adapter.0.to_k_ip.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"mixes XLabs keys .* and diffusers keys"):
        detect_layout(mixed, "mixed.safetensors")
    with pytest.raises(CheckpointError, match=r"not.*XLabs FLUX IP-Adapter checkpoint.*found lora\.down\.weight"):
        detect_layout({"lora.down.weight": torch.zeros(1)})


def test_infer_config_errors_name_the_key():
    state = _state()
    del state["ip_adapter_proj_model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"bad\.safetensors lacks ip_adapter_proj_model\.norm\.weight"):
        infer_config(state, "bad.safetensors")
    state = _state()
    state["ip_adapter_proj_model.norm.weight"] = torch.ones(SMALL.cross_attention_dim + 1)
    with pytest.raises(CheckpointError, match=r"has 24 rows, not a multiple of the token width 13"):
        infer_config(state)


# --- strict checking ----------------------------------------------------------------------------------


def test_missing_unexpected_and_misshaped_keys_are_all_listed():
    state = _state()
    del state["double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias"]
    state["double_blocks.0.processor.lora1.down.weight"] = torch.zeros(2, 2)
    key = "double_blocks.2.processor.ip_adapter_double_stream_k_proj.weight"
    state[key] = state[key].T.contiguous()
    with pytest.raises(CheckpointError) as error:
        to_neutral(state, source="ip_adapter.safetensors")
    message = str(error.value)
    assert message.startswith("ip_adapter.safetensors does not fit this adapter")
    assert "missing: double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias" in message
    assert "unexpected: double_blocks.0.processor.lora1.down.weight" in message
    assert f"wrong shape: {key} (12, 8) (expected (8, 12))" in message
    assert "\n" not in message


def test_a_gap_in_the_blocks_is_missing_keys():
    state = {key: value for key, value in _state().items() if not key.startswith("double_blocks.1.")}
    with pytest.raises(CheckpointError, match=r"missing: double_blocks\.1\.processor\.ip_adapter_double_stream_k_proj\.bias"):
        to_neutral(state)


def test_a_file_for_another_transformer_is_refused_with_its_shapes():
    expected = XLabsConfig(num_blocks=3, hidden_size=8, cross_attention_dim=12, image_embed_dim=5, num_tokens=4)
    with pytest.raises(CheckpointError) as error:
        to_neutral(_diffusers_state(SMALL), config=expected, source="other.safetensors")
    assert re.search(r"wrong shape: image_proj\.proj\.bias \(24,\) \(expected \(48,\)\), "
                     r"image_proj\.proj\.weight \(24, 5\) \(expected \(48, 5\)\)", str(error.value))
    fewer_blocks = XLabsConfig(2, 8, 12, 5, 2)
    with pytest.raises(CheckpointError, match=r"unexpected: ip_adapter\.2\.to_k_ip\.bias"):
        to_neutral(_diffusers_state(SMALL), config=fewer_blocks)


def test_bad_file_is_listed_and_left_as_it_was(tmp_path):
    state = _state()
    del state["ip_adapter_proj_model.proj.bias"]
    path = save_xlabs_file(state, tmp_path / "broken.safetensors")
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"broken\.safetensors does not fit .* missing: ip_adapter_proj_model\.proj\.bias"):
        convert_state(load_file(str(path)), DIFFUSERS, source=str(path))
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


def test_from_neutral_checks_too():
    neutral, config = to_neutral(_state())
    del neutral["blocks.0.to_k_ip.weight"]
    with pytest.raises(CheckpointError, match=r"neutral XLabs state .* missing: blocks\.0\.to_k_ip\.weight"):
        from_neutral(neutral, config, XLABS)
    with pytest.raises(ValueError, match=r"layout must be one of \('xlabs', 'diffusers'\), got 'h94'"):
        convert_state(_state(), "h94")


# --- round trips --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trips_are_bit_exact(dtype):
    original = _state(dtype=dtype)
    diffusers_layout = convert_state(original, DIFFUSERS)
    assert set(diffusers_layout) == set(expected_shapes(SMALL, DIFFUSERS))
    back = convert_state(diffusers_layout, XLABS)
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert back[key].dtype == dtype and back[key].shape == value.shape
        assert torch.equal(back[key].view(torch.uint8), value.view(torch.uint8)), key  # bit for bit
    neutral, config = to_neutral(original)
    assert config == SMALL
    assert all(value.dtype == dtype for value in neutral.values())
    again = from_neutral(neutral, config, XLABS)
    assert all(torch.equal(again[key], original[key]) for key in original)


def test_round_trip_through_files(tmp_path):
    original = _state(seed=4)
    xlabs_path = save_xlabs_file(original, tmp_path / "ip_adapter.safetensors")
    converted = convert_state(load_file(str(xlabs_path)), DIFFUSERS)
    save_file(converted, str(tmp_path / "converted.safetensors"))
    back = convert_state(load_file(str(tmp_path / "converted.safetensors")), XLABS)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], original[key]) for key in original)


def test_neutral_blocks_are_in_block_order():
    neutral, config = to_neutral(_state())
    blocks = neutral_blocks(neutral, config)
    assert len(blocks) == 3
    state = _state()
    assert torch.equal(blocks[2]["to_v_ip.weight"],
                       state["double_blocks.2.processor.ip_adapter_double_stream_v_proj.weight"])


# --- agreement with diffusers' own loader -------------------------------------------------------------


def _tiny_xlabs_file(tmp_path, seed: int = 7):
    config = XLabsConfig.for_transformer(tiny_flux_pipeline().transformer.config, TINY_FLUX.image_encoder.projection_dim,
                                         num_tokens=4)
    state = fabricate_xlabs_state(config, seed=seed)
    return state, save_xlabs_file(state, tmp_path / "ip_adapter.safetensors")


def _loaded_by_diffusers(path, monkeypatch=None):
    """(state dicts diffusers' loader hands to the transformer, the pipeline) for a file loaded by diffusers."""
    pipe = tiny_flux_pipeline()
    captured = []
    if monkeypatch is not None:
        original = pipe.transformer._load_ip_adapter_weights

        def capture(state_dicts, **kwargs):
            captured.extend(state_dicts)
            return original(state_dicts, **kwargs)

        monkeypatch.setattr(pipe.transformer, "_load_ip_adapter_weights", capture)
    pipe.load_ip_adapter(str(path.parent), weight_name=path.name, image_encoder_pretrained_model_name_or_path=None)
    return captured, pipe


def test_diffusers_layout_is_what_diffusers_makes_of_an_xlabs_file(tmp_path, monkeypatch):
    state, path = _tiny_xlabs_file(tmp_path)
    captured, _ = _loaded_by_diffusers(path, monkeypatch)
    assert len(captured) == 1
    ours = nest_flat(convert_state(state, DIFFUSERS))
    theirs = captured[0]
    assert list(theirs) == ["image_proj", "ip_adapter"]
    for group in ("image_proj", "ip_adapter"):
        assert set(theirs[group]) == set(ours[group]), group
        assert all(torch.equal(theirs[group][key], ours[group][key]) for key in ours[group])


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_diffusers_loads_our_converted_files(tmp_path, suffix):
    state, xlabs_path = _tiny_xlabs_file(tmp_path)
    converted = convert_state(state, DIFFUSERS)
    path = tmp_path / f"converted{suffix}"
    if suffix == ".safetensors":
        save_file(converted, str(path))
    else:
        torch.save(nest_flat(converted), str(path))
    _, from_xlabs = _loaded_by_diffusers(xlabs_path)
    _, from_ours = _loaded_by_diffusers(path)
    a = from_xlabs.transformer.state_dict()
    b = from_ours.transformer.state_dict()
    assert a.keys() == b.keys() and any("to_k_ip" in key for key in a)
    assert all(torch.equal(a[key], b[key]) for key in a)
