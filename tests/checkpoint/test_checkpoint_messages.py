"""The exact wording of the checkpoint code's refusals, and the small helpers that build them.

Each test here was written against a mutant that survived the rest of the suite (issue 23): a listing
that stops cutting long key lists, a refusal that loses torch's informative line, a registration error
that names the wrong record. A user reads these lines to find the bad key or file, so their content is
behaviour."""

from __future__ import annotations

import pytest
import torch

from mipadapter.checkpoint import layouts
from mipadapter.checkpoint.convert import CheckpointError, _listing, check_keys
from mipadapter.checkpoint.io import _first_line, _unpickler_detail
from mipadapter.checkpoint.xlabs import XLabsConfig


def _keys(count: int) -> list[str]:
    return [f"k{index:02d}" for index in range(count)]


@pytest.mark.parametrize("count", [1, 11, 12])
def test_a_listing_of_up_to_twelve_keys_shows_them_all_without_a_count(count):
    assert _listing("missing", _keys(count)) == "missing: " + ", ".join(_keys(count))


@pytest.mark.parametrize("count", [13, 40])
def test_a_longer_listing_shows_the_first_twelve_and_the_count(count):
    assert _listing("unexpected", _keys(count)) == (
        "unexpected: " + ", ".join(_keys(12)) + f", … ({count} in all)"
    )


def test_a_listing_honours_its_limit():
    assert _listing("wrong shape", _keys(4), limit=3) == "wrong shape: k00, k01, k02, … (4 in all)"
    assert _listing("wrong shape", _keys(3), limit=3) == "wrong shape: k00, k01, k02"


def test_check_keys_lists_thirteen_missing_keys_cut_at_twelve():
    expected = {key: (1,) for key in _keys(13)}
    with pytest.raises(CheckpointError) as error:
        check_keys("a.safetensors", {}, expected)
    assert str(error.value) == (
        "a.safetensors does not fit this adapter — missing: " + ", ".join(_keys(12)) + ", … (13 in all)"
    )


def test_the_first_line_of_an_error_is_its_first_non_blank_line_else_its_type():
    assert _first_line(ValueError("\n  \n  header too large  \nsecond line")) == "header too large"
    assert _first_line(EOFError()) == "EOFError"
    assert _first_line(KeyError("")) == "''"  # str(KeyError('')) is "''": one line, kept
    assert _first_line(RuntimeError("   \n")) == "RuntimeError"


def test_the_unpickler_detail_drops_torch_advice_and_keeps_the_first_informative_line():
    """The shape of torch 2.6+'s refusal of an unsupported opcode: advice lines around the one that says why."""
    text = (
        "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument "
        "in `torch.load` from `False` to `True`.\n"
        "Please file an issue with the following so that we can make `weights_only=True` compatible with your "
        "use case: WeightsUnpickler error: \n\n"
        "  Unsupported operand 149  \n"
        "second informative line\n\n"
        "Check the documentation of torch.load to learn more about types accepted by default with weights_only"
    )
    assert _unpickler_detail(text) == "Unsupported operand 149"
    assert _unpickler_detail("bad opcode\nuse weights_only=False") == "bad opcode"


def test_the_unpickler_detail_of_nothing_but_advice_is_a_fixed_phrase():
    assert _unpickler_detail("") == "unsupported pickle content"
    assert _unpickler_detail("use weights_only=False\nCheck the documentation\n") == "unsupported pickle content"


def test_registering_something_that_is_not_a_record_names_it():
    with pytest.raises(TypeError) as error:
        layouts.register("xlabs")
    assert str(error.value) == "not a layout record: 'xlabs'"


def test_a_second_registration_names_the_kind_of_record_and_its_key():
    with pytest.raises(ValueError) as error:
        layouts.register(layouts.Layout("xlabs", description="again", recognise=lambda metadata, keys: False))
    assert str(error.value) == "Layout 'xlabs' is registered already"


def test_unregistering_a_layout_never_registered_does_nothing():
    before = (dict(layouts._LAYOUTS), dict(layouts._KEY_TABLES), dict(layouts._SAVE_FORMATS))
    layouts.unregister("never-registered")
    assert (layouts._LAYOUTS, layouts._KEY_TABLES, layouts._SAVE_FORMATS) == before


def test_an_xlabs_config_for_a_transformer_has_16_image_tokens_unless_told():
    transformer = {"num_attention_heads": 3, "attention_head_dim": 8, "num_layers": 2, "joint_attention_dim": 32}
    assert XLabsConfig.for_transformer(transformer, 20) == XLabsConfig(
        num_blocks=2, hidden_size=24, cross_attention_dim=32, image_embed_dim=20, num_tokens=16
    )
    assert XLabsConfig.for_transformer(transformer, 20, num_tokens=4).num_tokens == 4


def test_xlabs_conversions_name_the_source_in_every_refusal():
    """``to_neutral`` and ``convert_state`` pass the file's name to the layout and size readers (or
    "checkpoint" when given none), so the error names the file the user gave."""
    from mipadapter.checkpoint.xlabs import convert_state, to_neutral
    from mipadapter.testing.flux import fabricate_xlabs_state

    not_xlabs = {"lora.down.weight": torch.zeros(1)}
    for convert in (lambda state, **kw: to_neutral(state, **kw), lambda state, **kw: convert_state(state, "xlabs", **kw)):
        for kwargs, name in (({"source": "lora.safetensors"}, "lora.safetensors"), ({}, "checkpoint")):
            with pytest.raises(CheckpointError) as error:
                convert(not_xlabs, **kwargs)
            assert str(error.value).startswith(f"{name} is not an XLabs FLUX IP-Adapter checkpoint"), error.value
    sizes = XLabsConfig(num_blocks=2, hidden_size=8, cross_attention_dim=12, image_embed_dim=5, num_tokens=2)
    state = fabricate_xlabs_state(sizes)
    del state["ip_adapter_proj_model.norm.weight"]
    with pytest.raises(CheckpointError) as error:
        to_neutral(state, source="cut.safetensors")
    assert str(error.value) == (
        "cut.safetensors lacks ip_adapter_proj_model.norm.weight: cannot tell the adapter's sizes"
    )


@pytest.mark.parametrize(("architecture", "name"), [("unet", "a.safetensors"), ("flux", "a.bin")])
def test_the_xlabs_format_refuses_other_models_and_bin_files_in_one_line(architecture, name, tmp_path):
    from mipadapter.config import AdapterConfig

    config = AdapterConfig("basic", 20, 32, 4, architecture=architecture)
    with pytest.raises(ValueError) as error:
        layouts._SAVE_FORMATS["xlabs"].check(config, tmp_path / name)
    assert str(error.value) == "the xlabs layout is for FLUX adapters, as a .safetensors file"


def test_the_authors_format_refuses_an_adapter_without_text_weight_in_one_line(tmp_path):
    from mipadapter.config import AdapterConfig

    config = AdapterConfig("basic", 20, 32, 4, text_weight=False)
    with pytest.raises(ValueError) as error:
        layouts._SAVE_FORMATS["authors"].check(config, tmp_path / "a.bin")
    assert str(error.value) == "the authors' layout carries text_to_weight, which this adapter does not have"
    layouts._SAVE_FORMATS["authors"].check(AdapterConfig("basic", 20, 32, 4, text_weight=True), tmp_path / "a.bin")


def test_a_file_mixing_the_two_flux_layouts_names_the_first_key_of_each():
    from mipadapter.checkpoint.xlabs import detect_layout

    keys = ["double_blocks.0.a", "double_blocks.1.b", "image_proj.c", "ip_adapter.0.d"]
    with pytest.raises(CheckpointError) as error:
        detect_layout(keys, "mixed.safetensors")
    assert str(error.value) == (
        "mixed.safetensors mixes XLabs keys (double_blocks.0.a, …) and diffusers keys (image_proj.c, …); "
        "an XLabs FLUX IP-Adapter file holds one layout"
    )


def test_a_file_of_neither_flux_layout_shows_its_first_six_keys_sorted():
    from mipadapter.checkpoint.xlabs import detect_layout, infer_flux_config

    keys = [f"lora.{letter}" for letter in "hgfedcba"]
    with pytest.raises(CheckpointError) as error:
        detect_layout(keys)
    assert str(error.value) == (
        "checkpoint is not an XLabs FLUX IP-Adapter checkpoint: no ip_adapter_proj_model./double_blocks. "
        "or image_proj./ip_adapter. keys (found lora.a, lora.b, lora.c, lora.d, lora.e, lora.f)"
    )
    with pytest.raises(CheckpointError, match=r"keys \(found no keys\)$"):
        detect_layout([], "empty.safetensors")
    for call, name in ((lambda: infer_flux_config({}), "checkpoint"), (lambda: infer_flux_config({}, "e.bin"), "e.bin")):
        with pytest.raises(CheckpointError) as error:
            call()
        assert str(error.value).startswith(f"{name} is not an XLabs FLUX IP-Adapter checkpoint:")


def _small_xlabs_state() -> dict:
    from mipadapter.testing.flux import fabricate_xlabs_state

    sizes = XLabsConfig(num_blocks=2, hidden_size=8, cross_attention_dim=12, image_embed_dim=5, num_tokens=2)
    return fabricate_xlabs_state(sizes)


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("ip_adapter_proj_model.proj.weight", (24,)),
        ("ip_adapter_proj_model.norm.weight", (12, 1)),
        ("double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight", (8,)),
    ],
)
def test_a_size_tensor_of_the_wrong_rank_is_named_with_every_shape(key, shape):
    from mipadapter.checkpoint.xlabs import infer_config

    state = _small_xlabs_state()
    state[key] = torch.zeros(shape)
    shapes = {
        name: tuple(state[name].shape)
        for name in (
            "ip_adapter_proj_model.proj.weight",
            "ip_adapter_proj_model.norm.weight",
            "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight",
        )
    }
    proj, norm, block = shapes.items()
    with pytest.raises(CheckpointError) as error:
        infer_config(state, "odd.safetensors")
    assert str(error.value) == (
        f"odd.safetensors: {proj[0]} {proj[1]}, {norm[0]} {norm[1]} and {block[0]} {block[1]} "
        "must be 2-D, 1-D and 2-D"
    )


def test_a_norm_of_width_zero_is_refused_not_divided_by():
    from mipadapter.checkpoint.xlabs import infer_config

    state = _small_xlabs_state()
    state["ip_adapter_proj_model.norm.weight"] = torch.zeros(0)
    with pytest.raises(CheckpointError) as error:
        infer_config(state, "zero.safetensors")
    assert str(error.value) == (
        "zero.safetensors: ip_adapter_proj_model.proj.weight has 24 rows, not a multiple of the token width 0"
    )


def test_unreadable_config_metadata_is_named_with_the_file(tmp_path):
    from safetensors.torch import save_file

    from mipadapter.checkpoint import read_file

    path = tmp_path / "ours.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "mipadapter", "format_version": "1", "config": "{"})
    with pytest.raises(CheckpointError) as error:
        read_file(path)
    assert str(error.value).startswith(f"{path}: its adapter config metadata is unreadable (")


def test_an_adapter_source_that_cannot_be_found_is_named_by_where(tmp_path):
    from mipadapter.checkpoint import load_adapter
    from mipadapter.hub import ModelNotFoundError

    with pytest.raises(ModelNotFoundError) as error:
        load_adapter(tmp_path, None)
    assert str(error.value) == f"adapter {str(tmp_path)!r} is a folder; name the checkpoint file inside it"
    for kwargs, named in (({}, "adapter"), ({"where": "--adapter face"}, "--adapter face")):
        with pytest.raises(ModelNotFoundError) as error:
            load_adapter("owner/repo/missing.bin", None, **kwargs)
        assert str(error.value).startswith("could not fetch the adapter 'owner/repo/missing.bin' from the Hugging Face Hub")
        assert str(error.value).endswith(f"point {named} at a local copy")


def test_safetensors_in_the_h94_layouts_carry_torchs_format_tag(shared_unet, tmp_path):
    """Files written in the h94 layouts carry ``{"format": "pt"}``, the tag safetensors' torch writer and
    the Hub's IP-Adapter files carry; ours add our own fields over it."""
    from safetensors import safe_open

    from mipadapter.checkpoint import save_adapter
    from mipadapter.config import AdapterConfig
    from mipadapter.modeling import MIPAdapter

    adapter = MIPAdapter.for_unet(shared_unet("sd15"), AdapterConfig("basic", 20, 48, 4, text_weight=True))
    for fmt in ("diffusers", "authors", "mipadapter"):
        path = save_adapter(adapter, tmp_path / f"{fmt}.safetensors", fmt)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        assert metadata["format"] == ("mipadapter" if fmt == "mipadapter" else "pt"), fmt
        if fmt != "mipadapter":
            assert metadata == {"format": "pt"}


def test_a_conversion_source_that_cannot_be_found_is_named_by_where(shared_unet, tmp_path):
    from mipadapter.checkpoint import convert_checkpoint
    from mipadapter.hub import ModelNotFoundError

    unet = shared_unet("sd15")
    with pytest.raises(ModelNotFoundError) as error:
        convert_checkpoint(tmp_path, tmp_path / "out.safetensors", unet)
    assert str(error.value) == f"checkpoint {str(tmp_path)!r} is a folder; name the checkpoint file inside it"
    for kwargs, named in (({}, "source"), ({"where": "input"}, "input")):
        with pytest.raises(ModelNotFoundError) as error:
            convert_checkpoint("owner/repo/missing.bin", tmp_path / "out.safetensors", unet, **kwargs)
        assert str(error.value).startswith("could not fetch the checkpoint 'owner/repo/missing.bin' from")
        assert str(error.value).endswith(f"point {named} at a local copy")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_conversion_given_the_read_file_does_not_read_it_again(checkpoint_files, shared_unet, tmp_path):
    """``loaded``: the CLI has read the source already (a real checkpoint is gigabytes); what it read is
    what is converted, even when the file has changed since."""
    import shutil

    from safetensors.torch import load_file

    from mipadapter.checkpoint import convert_checkpoint, read_file

    source = tmp_path / "source.bin"
    shutil.copyfile(checkpoint_files("sd15").basic_bin, source)
    loaded = read_file(source)
    source.write_bytes(b"not a checkpoint any more")
    out = convert_checkpoint(source, tmp_path / "out.safetensors", shared_unet("sd15"), "diffusers", loaded=loaded)
    converted = load_file(str(out))
    assert set(converted) == set(loaded.state) and all(torch.equal(converted[k], loaded.state[k]) for k in converted)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        convert_checkpoint(source, tmp_path / "again.safetensors", shared_unet("sd15"), "diffusers")


def _h94_flat(path) -> dict:
    from mipadapter.checkpoint import read_file

    return dict(read_file(path).state)


def test_a_basic_projection_needs_both_its_tensors_to_be_read_as_basic(checkpoint_files):
    from mipadapter.checkpoint import infer_h94_config

    state = _h94_flat(checkpoint_files("sd15").basic_bin)
    del state["image_proj.norm.weight"]
    with pytest.raises(CheckpointError) as error:
        infer_h94_config(state)
    assert str(error.value) == (
        "unrecognised image_proj layout (keys ['norm.bias', 'proj.bias', 'proj.weight']): neither basic nor plus "
        "IP-Adapter"
    )


def test_a_plus_projection_missing_a_block_tensor_names_it(checkpoint_files):
    from mipadapter.checkpoint.h94 import _infer_config

    state = _h94_flat(checkpoint_files("sd15").plus_bin)
    del state["image_proj.layers.0.0.to_q.weight"]
    with pytest.raises(CheckpointError) as error:
        _infer_config(state, "plus.bin")
    assert str(error.value) == "plus.bin: image_proj lacks layers.0.0.to_q.weight"


def test_an_unrecognised_projection_shows_its_first_eight_keys_sorted():
    from mipadapter.checkpoint import infer_h94_config

    state = {f"image_proj.k{index}": torch.zeros(1) for index in range(9, 0, -1)}
    with pytest.raises(CheckpointError) as error:
        infer_h94_config(state)
    assert str(error.value) == (
        "unrecognised image_proj layout (keys ['k1', 'k2', 'k3', 'k4', 'k5', 'k6', 'k7', 'k8']): neither basic "
        "nor plus IP-Adapter"
    )


def test_a_nested_checkpoint_of_other_groups_names_them_sorted():
    from mipadapter.checkpoint.convert import flatten_nested

    with pytest.raises(CheckpointError) as error:
        flatten_nested({"ip_adapter": {}, "state_dict": {}, "image_proj": {}})
    assert str(error.value) == (
        "an IP-Adapter checkpoint holds exactly ['image_proj', 'ip_adapter'], found ['image_proj', 'ip_adapter', "
        "'state_dict']"
    )
    with pytest.raises(CheckpointError, match=r"found list$"):
        flatten_nested([])


def test_unreadable_bin_files_name_torchs_error_type_and_first_line(tmp_path):
    from mipadapter.checkpoint.io import _torch_load

    torch.save({"a": torch.zeros(3)}, tmp_path / "good.bin")
    whole = (tmp_path / "good.bin").read_bytes()
    cases = {
        "empty.bin": (b"", "(EOFError: EOFError)"),
        "cut.bin": (whole[: len(whole) // 2], "(RuntimeError: PytorchStreamReader failed reading zip archive: "),
        "garbage.bin": (b"not a zip, not a pickle", "(Unsupported operand 110)"),
    }
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as error:
            _torch_load(path)
        assert str(error.value).startswith(f"{path} is not a readable PyTorch checkpoint {words}"), error.value


def test_our_file_of_a_flux_adapter_is_refused_on_a_unet_naming_the_file(shared_unet, tmp_path):
    from mipadapter.checkpoint import check_adapter_file, save_adapter
    from mipadapter.config import AdapterConfig
    from mipadapter.modeling import MIPAdapter
    from mipadapter.testing.flux import tiny_flux_pipeline

    transformer = tiny_flux_pipeline().transformer
    config = AdapterConfig("basic", 20, transformer.config.joint_attention_dim, 4, architecture="flux")
    path = save_adapter(MIPAdapter.for_model(transformer, config), tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError) as error:
        check_adapter_file(path, shared_unet("sd15"))
    assert str(error.value) == (
        f"{path}: this is a flux adapter but the model is a UNet2DConditionModel (unet): use an adapter made for "
        "this base model"
    )


def test_weights_that_are_not_floating_point_tensors_are_named_with_their_type():
    from mipadapter.checkpoint.io import check_weights

    good = torch.zeros(2)
    with pytest.raises(CheckpointError) as error:
        check_weights("a.bin", {"b": good, "a": [1.0, 2.0], "c": "x"})
    assert str(error.value) == "a.bin: a is a list, not a tensor"
    with pytest.raises(CheckpointError) as error:
        check_weights("a.bin", {"b": good, "w": torch.zeros(2, dtype=torch.int8)})
    assert str(error.value) == (
        "a.bin: tensor w is int8; adapter weights are floating point (float32, float16, bfloat16)"
    )
    with pytest.raises(CheckpointError) as error:
        check_weights("a.bin", {"z": torch.tensor([1.0, float("nan")]), "y": torch.tensor([float("inf")])})
    assert str(error.value) == "a.bin: tensor y holds NaN or infinite values (the first such key)"
    check_weights("a.bin", {"b": good, "h": torch.ones(3, dtype=torch.bfloat16)})


def test_infer_config_lists_every_absent_size_tensor_and_names_checkpoint_by_default():
    from mipadapter.checkpoint.xlabs import infer_config

    state = _small_xlabs_state()
    del state["ip_adapter_proj_model.norm.weight"], state["ip_adapter_proj_model.proj.weight"]
    with pytest.raises(CheckpointError) as error:
        infer_config(state)
    assert str(error.value) == (
        "checkpoint lacks ip_adapter_proj_model.proj.weight, ip_adapter_proj_model.norm.weight: cannot tell the "
        "adapter's sizes"
    )


def test_check_keys_joins_each_kind_of_problem_with_a_semicolon():
    with pytest.raises(CheckpointError) as error:
        check_keys("a.bin", {"k00": torch.zeros(1), "extra": torch.zeros(1)}, {"k00": (1,), "k01": (1,)})
    assert str(error.value) == "a.bin does not fit this adapter — missing: k01; unexpected: extra"


def test_weights_whose_sum_overflows_are_finite_all_the_same():
    """The check sums first (fast) and only looks value by value when the sum is not finite: finite
    values near the dtype's largest, whose sum overflows, are accepted; one infinity among them is not."""
    from mipadapter.checkpoint.io import check_weights

    for dtype in (torch.float32, torch.float16, torch.float64):
        big = torch.full((4,), torch.finfo(dtype).max / 2, dtype=dtype)
        check_weights("a.bin", {"w": big})
        big[2] = float("inf")
        with pytest.raises(CheckpointError, match=r"^a\.bin: tensor w holds NaN or infinite values"):
            check_weights("a.bin", {"w": big})


def test_a_missing_checkpoint_file_is_named_exactly(tmp_path):
    from mipadapter.checkpoint import read_file

    path = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError) as error:
        read_file(path)
    assert str(error.value) == f"checkpoint {str(path)!r} not found"


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".PTH"])
def test_every_pickled_suffix_is_read_as_the_bin_file(checkpoint_files, tmp_path, suffix):
    import shutil

    from mipadapter.checkpoint import read_file

    source = checkpoint_files("sd15").basic_bin
    copy = tmp_path / f"adapter{suffix}"
    shutil.copyfile(source, copy)
    read, expected = read_file(copy), read_file(source)
    assert read.layout == expected.layout and set(read.state) == set(expected.state)
    assert all(torch.equal(read.state[key], expected.state[key]) for key in read.state)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_without_a_layout_for_unclaimed_files_a_file_no_layout_claims_is_named(tmp_path, monkeypatch, suffix):
    """h94's layout reads every file no other layout claims; were it not registered (a plugin set-up),
    such a file is refused naming it and the layouts there are."""
    from safetensors.torch import save_file

    from mipadapter.checkpoint import read_file

    claiming = {name: layout for name, layout in layouts._LAYOUTS.items() if layout.recognise is not None}
    assert claiming and len(claiming) < len(layouts._LAYOUTS)
    monkeypatch.setattr(layouts, "_LAYOUTS", claiming)
    path = tmp_path / f"odd{suffix}"
    state = {"image_proj": {"proj.weight": torch.zeros(2)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(2)}}
    if suffix == ".bin":
        torch.save(state, path)
    else:
        save_file({f"{group}.{key}": value for group in state for key, value in state[group].items()}, str(path))
    with pytest.raises(CheckpointError) as error:
        read_file(path)
    assert str(error.value) == f"{path} is in no known checkpoint layout (the layouts are {sorted(claiming)})"


def test_a_checkpoint_file_with_a_nan_names_the_file_and_the_tensor(checkpoint_files, tmp_path):
    from mipadapter.checkpoint import read_file

    nested = torch.load(checkpoint_files("sd15").basic_bin, weights_only=True)
    group, key = "ip_adapter", sorted(nested["ip_adapter"])[0]
    nested[group][key] = torch.full_like(nested[group][key], float("nan"))
    path = tmp_path / "nan.bin"
    torch.save(nested, path)
    with pytest.raises(CheckpointError) as error:
        read_file(path)
    assert str(error.value) == f"{path}: tensor {group}.{key} holds NaN or infinite values (the first such key)"
