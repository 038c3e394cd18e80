"""Checkpoints: key maps of docs/formats.md, strict loading, round trips, conversions, safe unpickling."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mipadapter.checkpoint import (
    AdapterFile,
    CheckpointError,
    check_adapter_file,
    convert_checkpoint,
    infer_h94_config,
    load_adapter,
    read_file,
    save_adapter,
)
from mipadapter.checkpoint.io import load_state
from mipadapter.checkpoint.keymaps import LAYER_PARAMS, TEXT_WEIGHT_PARAM
from mipadapter.config import AdapterConfig
from mipadapter.modeling import MIPAdapter
from mipadapter.pipeline import MIPAdapterPipeline, Subject
from mipadapter.testing import (
    TINY_SD15,
    TINY_SDXL,
    flatten_state,
    save_checkpoint,
    tiny_sdxl_pipeline,
)

SPECS = {"sdxl": TINY_SDXL, "sd15": TINY_SD15}
# file attribute of TinyCheckpointFiles → key of its ``states``
FILES = {
    "basic_bin": "basic",
    "basic_safetensors": "basic",
    "plus_bin": "plus",
    "mip_basic_bin": "mip_basic",
    "mip_plus_bin": "mip_plus",
}


def file_path(files, name, tmp_path):
    """The tiny set has no plus .safetensors; write one from the same state."""
    if name == "plus_safetensors":
        return save_checkpoint(files.states["plus"], tmp_path / "ip-adapter-plus.safetensors")
    return getattr(files, name)


def flat_state_of(files, name) -> dict[str, torch.Tensor]:
    return flatten_state(files.states[FILES.get(name, "plus")])


def randomized(adapter: MIPAdapter, seed: int = 0) -> MIPAdapter:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for param in adapter.parameters():
            param.data.normal_()
    return adapter


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------- key maps


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
@pytest.mark.parametrize("name", [*FILES, "plus_safetensors"])
def test_published_layouts_load_with_keys_where_design_says(
    arch, name, checkpoint_files, shared_unet, tmp_path
):
    files = checkpoint_files(arch)
    unet = shared_unet(arch)
    adapter = load_adapter(file_path(files, name, tmp_path), unet)
    state = flat_state_of(files, name)
    config = adapter.config
    assert config.projection == ("plus" if "plus" in name else "basic")
    assert config.text_weight == name.startswith("mip")
    assert config.cross_attention_dim == SPECS[arch].cross_attention_dim
    assert config.num_tokens == (16 if config.projection == "plus" else 4)

    # ip_adapter.{k}.* goes to the processor of the k-th entry of unet.attn_processors
    processor_names = list(unet.attn_processors)
    layer_keys = {key.split(".")[1] for key in state if key.startswith("ip_adapter.")}
    assert len(layer_keys) == SPECS[arch].num_cross_attention_layers
    for k in sorted(layer_keys, key=int):
        layer = processor_names[int(k)].removesuffix(".processor")
        processor = adapter.processor(layer)
        assert torch.equal(processor.to_k_ip.weight, state[f"ip_adapter.{k}.to_k_ip.weight"].float())
        assert torch.equal(processor.to_v_ip.weight, state[f"ip_adapter.{k}.to_v_ip.weight"].float())
        if config.text_weight:
            assert torch.equal(
                processor.text_to_weight.weight, state[f"ip_adapter.{k}.text_to_weight.weight"].float()
            )
        else:
            assert processor.text_to_weight is None

    # the projection equals what diffusers' own converter builds from the same tensors
    image_proj = {
        key.removeprefix("image_proj."): v for key, v in state.items() if key.startswith("image_proj.")
    }
    theirs = unet._convert_ip_adapter_image_proj_to_diffusers(
        image_proj, low_cpu_mem_usage=False
    ).state_dict()
    ours = adapter.image_proj.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key].float()), key
    if config.projection == "plus":  # to_kv holds K rows then V rows
        inner = config.resampler_heads * 64
        for block in range(config.resampler_depth):
            to_kv = state[f"image_proj.layers.{block}.0.to_kv.weight"].float()
            attention = adapter.image_proj.layers[block].attn
            assert torch.equal(attention.to_k.weight, to_kv[:inner])
            assert torch.equal(attention.to_v.weight, to_kv[inner:])


def test_infer_config_reads_the_shapes(checkpoint_files):
    files = checkpoint_files("sdxl")
    plus = infer_h94_config(flatten_state(files.states["mip_plus"]))
    assert plus == AdapterConfig(
        "plus",
        TINY_SDXL.plus_image_encoder.hidden_size,
        96,
        16,
        True,
        resampler_dim=64,
        resampler_depth=4,
        resampler_heads=2,
    )
    bad = flatten_state(files.states["basic"])
    bad["image_proj.proj.weight"] = bad["image_proj.proj.weight"][:-1]
    with pytest.raises(CheckpointError, match="not a multiple"):
        infer_h94_config(bad)
    with pytest.raises(CheckpointError, match="unrecognised image_proj"):
        infer_h94_config({"image_proj.weird": torch.zeros(1)})


# ----------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("projection", ["basic", "plus"])
@pytest.mark.parametrize("text_weight", [False, True])
def test_our_format_round_trips_bit_exactly(projection, text_weight, shared_unet, tmp_path):
    unet = shared_unet("sdxl")
    if projection == "basic":
        config = AdapterConfig("basic", 40, 96, 4, text_weight, default_scale=0.75)
    else:
        config = AdapterConfig("plus", 48, 96, 16, text_weight, 64, 2, 2, default_scale=0.65)
    adapter = randomized(MIPAdapter.for_unet(unet, config))
    path = save_adapter(adapter, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert (
        metadata["format"] == "mipadapter"
        and json.loads(metadata["config"])["default_scale"] == config.default_scale
    )
    params = LAYER_PARAMS + ((TEXT_WEIGHT_PARAM,) if text_weight else ())
    assert {key for key in keys if key.startswith("layers.")} == {
        f"layers.{layer.name}.{param}" for layer in adapter.layer_specs for param in params
    }  # the documented names, e.g. layers.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k_ip.weight
    loaded = load_adapter(path, unet)
    assert loaded.config == config
    assert_same_state(loaded.state_dict(), adapter.state_dict())


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
@pytest.mark.parametrize("projection", ["basic", "plus"])
def test_authors_layout_round_trips(projection, suffix, checkpoint_files, shared_unet, tmp_path):
    files = checkpoint_files("sd15")
    unet = shared_unet("sd15")
    adapter = randomized(
        load_adapter(files.mip_basic_bin if projection == "basic" else files.mip_plus_bin, unet)
    )
    path = save_adapter(adapter, tmp_path / f"model{suffix}", format="authors")
    reread = read_file(path)
    assert reread.layout == "h94" and reread.config is None
    # exactly the published key set (h94 layout + text_to_weight)
    assert set(reread.state) == set(flatten_state(files.states[f"mip_{projection}"]))
    loaded = load_adapter(path, unet)
    assert loaded.config == adapter.config
    assert_same_state(loaded.state_dict(), adapter.state_dict())


SOURCES = ["basic_bin", "basic_safetensors", "plus_bin", "mip_basic_bin", "mip_plus_bin"]
TARGETS = [
    ("mipadapter", ".safetensors"),
    ("authors", ".bin"),
    ("authors", ".safetensors"),
    ("diffusers", ".bin"),
    ("diffusers", ".safetensors"),
]


@pytest.mark.parametrize("target", TARGETS, ids=["-".join(t) for t in TARGETS])
@pytest.mark.parametrize("source", SOURCES)
def test_convert_checkpoint_keeps_every_value(source, target, checkpoint_files, shared_unet, tmp_path):
    files = checkpoint_files("sdxl")
    unet = shared_unet("sdxl")
    fmt, suffix = target
    destination = tmp_path / f"converted{suffix}"
    if fmt == "authors" and not source.startswith("mip"):
        with pytest.raises(ValueError, match="text_to_weight"):
            convert_checkpoint(getattr(files, source), destination, unet, format=fmt)
        return
    convert_checkpoint(getattr(files, source), destination, unet, format=fmt)
    converted = read_file(destination)
    assert {t.dtype for t in converted.state.values()} == {torch.float16}  # the file's dtype is kept
    original = flatten_state(files.states[FILES[source]])
    if fmt == "mipadapter":  # and back again: the published layout, bit for bit
        back = tmp_path / "back.bin"
        convert_checkpoint(
            destination, back, unet, format="authors" if source.startswith("mip") else "diffusers"
        )
        assert_same_state(flatten_state(torch.load(back, weights_only=True)), original)
    else:
        expected = {k: v for k, v in original.items() if fmt == "authors" or "text_to_weight" not in k}
        assert set(converted.state) == set(expected)
        for key, value in expected.items():
            assert converted.state[key].dtype == value.dtype and torch.equal(converted.state[key], value), key
    # and the adapters built from both files agree (the text weight is dropped by a diffusers export)
    before, after = (
        load_adapter(getattr(files, source), unet).state_dict(),
        load_adapter(destination, unet).state_dict(),
    )
    assert set(after) <= set(before)
    for key in after:
        assert torch.equal(after[key], before[key]), key


def test_save_adapter_rejects_bad_targets(shared_unet, tmp_path):
    adapter = MIPAdapter.for_unet(shared_unet("sd15"), AdapterConfig("basic", 24, 48, 4))
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        save_adapter(adapter, tmp_path / "a.safetensors", format="kohya")
    with pytest.raises(ValueError, match="safetensors"):
        save_adapter(adapter, tmp_path / "a.bin")  # our format is safetensors only
    with pytest.raises(ValueError, match=r"\.safetensors or \.bin"):
        save_adapter(adapter, tmp_path / "a.pt", format="diffusers")
    with pytest.raises(ValueError, match="text_to_weight"):
        save_adapter(adapter, tmp_path / "a.bin", format="authors")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_the_previous_file_intact(shared_unet, tmp_path, monkeypatch):
    import safetensors.torch

    adapter = randomized(MIPAdapter.for_unet(shared_unet("sd15"), AdapterConfig("basic", 24, 48, 4)))
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(randomized(adapter, seed=1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


# ----------------------------------------------------------------------------------------- strictness


def _variants(state: dict[str, torch.Tensor]):
    key = "ip_adapter.3.to_v_ip.weight"
    missing = {k: v for k, v in state.items() if k != key}
    unexpected = {**state, "ip_adapter.3.to_q_ip.weight": state[key].clone()}
    misshaped = {**state, key: state[key].T.contiguous()}
    return {
        "missing": (missing, rf"missing: {key}"),
        "unexpected": (unexpected, r"unexpected: ip_adapter\.3\.to_q_ip\.weight"),
        "wrong shape": (misshaped, rf"wrong shape: {key} \(96, 64\) \(expected \(64, 96\)\)"),
    }


@pytest.mark.parametrize("problem", ["missing", "unexpected", "wrong shape"])
def test_strict_loading_names_the_key_and_loses_nothing(problem, checkpoint_files, shared_unet, tmp_path):
    files = checkpoint_files("sdxl")
    unet = shared_unet("sdxl")
    state, pattern = _variants(flatten_state(files.states["basic"]))[problem]
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=pattern):
        load_adapter(path, unet)
    # loading into a live adapter fails before any weight is touched
    adapter = load_adapter(files.basic_bin, unet)
    snapshot = copy.deepcopy(adapter.state_dict())
    with pytest.raises(CheckpointError, match=pattern) as error:
        load_state(adapter, AdapterFile("h94", state, None), "a live load of bad.safetensors")
    assert str(error.value).startswith("a live load of bad.safetensors does not fit this adapter — ")
    assert_same_state(adapter.state_dict(), snapshot)


def test_strict_loading_of_our_format(shared_unet, tmp_path):
    unet = shared_unet("sd15")
    adapter = randomized(MIPAdapter.for_unet(unet, AdapterConfig("basic", 24, 48, 4, True)))
    path = save_adapter(adapter, tmp_path / "ours.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(path))
    victim = next(key for key in state if key.endswith("text_to_weight.weight"))
    save_file({k: v for k, v in state.items() if k != victim}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=f"missing: {victim}"):
        load_adapter(path, unet)
    save_file(state, str(path), metadata={**metadata, "format_version": "99"})
    with pytest.raises(CheckpointError, match="v99"):
        load_adapter(path, unet)


def test_errors_report_every_problem_at_once(checkpoint_files, shared_unet, tmp_path):
    files = checkpoint_files("sdxl")
    state = flatten_state(files.states["basic"])
    del state["ip_adapter.1.to_k_ip.weight"]
    state["ip_adapter.1.bogus"] = torch.zeros(1)
    state["image_proj.norm.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as error:
        load_adapter(tmp_path / "bad.safetensors", shared_unet("sdxl"))
    message = str(error.value)
    assert "ip_adapter.1.to_k_ip.weight" in message and "ip_adapter.1.bogus" in message
    assert "image_proj.norm.bias (3,)" in message


def test_an_adapter_for_another_base_model_is_refused(checkpoint_files, shared_unet):
    with pytest.raises(ValueError, match="another base model"):
        load_adapter(checkpoint_files("sdxl").basic_bin, shared_unet("sd15"))


# ----------------------------------------------------------------------------------------- pickles

SIDE_EFFECTS: list[str] = []


def _record(tag: str):
    SIDE_EFFECTS.append(tag)
    return tag


class Payload:
    """Unpickling this calls ``_record``: a stand-in for code a malicious pickle would run."""

    def __reduce__(self):
        return (_record, ("code ran while unpickling",))


@pytest.mark.parametrize("environment", [{}, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}])
def test_bin_files_never_unpickle_code(environment, checkpoint_files, shared_unet, tmp_path, monkeypatch):
    """Not even where the environment asks torch to unpickle fully: that variable only changes a
    ``torch.load`` that does not say ``weights_only=True`` itself."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    files = checkpoint_files("sd15")
    state = copy.deepcopy(files.states["basic"])
    state["ip_adapter"]["1.to_k_ip.weight"] = Payload()
    path = tmp_path / "evil.bin"
    torch.save(state, path)
    SIDE_EFFECTS.clear()
    with pytest.raises(
        CheckpointError, match=r"refused unread \(it would import test_checkpoints\._record\)"
    ):
        load_adapter(path, shared_unet("sd15"))
    assert SIDE_EFFECTS == []


def test_unreadable_files_raise_checkpoint_errors(shared_unet, tmp_path):
    unet = shared_unet("sd15")
    torch.save({"state_dict": {}}, tmp_path / "other.bin")
    with pytest.raises(CheckpointError, match="image_proj"):
        load_adapter(tmp_path / "other.bin", unet)
    (tmp_path / "weights.onnx").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="unsupported checkpoint extension"):
        load_adapter(tmp_path / "weights.onnx", unet)
    (tmp_path / "garbage.bin").write_bytes(b"not a zip, not a pickle")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_adapter(tmp_path / "garbage.bin", unet)


def _bad_checkpoints(tmp_path, files) -> dict[str, tuple[str, str]]:
    """name → (file contents written by a writer, the words the one-line error must contain)."""
    good_st = files.basic_safetensors.read_bytes()
    good_bin = files.mip_basic_bin.read_bytes()
    evil = copy.deepcopy(files.states["basic"])
    evil["ip_adapter"]["1.to_k_ip.weight"] = Payload()
    torch.save(evil, tmp_path / "evil.bin")
    torch.save(torch.zeros(3), tmp_path / "tensor.bin")
    torch.save({"image_proj": {"odd": torch.zeros(1)}, "ip_adapter": {}}, tmp_path / "layout.bin")
    (tmp_path / "header.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "cut.safetensors").write_bytes(good_st[:-16])
    (tmp_path / "cut.bin").write_bytes(good_bin[: len(good_bin) // 2])
    (tmp_path / "empty.bin").write_bytes(b"")
    return {
        "evil.bin": "holds pickled Python objects, not just tensors, and is refused unread",
        "tensor.bin": "holds exactly ['image_proj', 'ip_adapter'], found Tensor",
        "layout.bin": "unrecognised image_proj layout",
        "header.safetensors": "is not a readable safetensors file (Error while deserializing header",
        "cut.safetensors": "is not a readable safetensors file",
        "cut.bin": "is not a readable PyTorch checkpoint",
        "empty.bin": "is not a readable PyTorch checkpoint",
    }


def test_bad_files_are_one_line_naming_the_file_without_unpickling_advice(
    checkpoint_files, shared_unet, tmp_path
):
    for name, words in _bad_checkpoints(tmp_path, checkpoint_files("sdxl")).items():
        SIDE_EFFECTS.clear()
        with pytest.raises(CheckpointError) as error:
            check_adapter_file(tmp_path / name, shared_unet("sdxl"))
        message = str(error.value)
        assert str(tmp_path / name) in message and words in message, (name, message)
        assert "\n" not in message and "weights_only" not in message and "trust" not in message, message
        assert SIDE_EFFECTS == []


def test_checking_needs_only_the_unet_config(checkpoint_files, shared_unet, tmp_path):
    """A UNet built on the meta device from its config is enough to accept or refuse a file."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        skeleton = UNet2DConditionModel.from_config(shared_unet("sdxl").config)
    files = checkpoint_files("sdxl")
    checked = check_adapter_file(files.mip_plus_bin, skeleton, default_scale=0.65)
    assert checked.config.projection == "plus" and checked.config.default_scale == 0.65
    with torch.device("meta"):
        other = UNet2DConditionModel.from_config(shared_unet("sd15").config)
    with pytest.raises(ValueError, match="another base model"):
        check_adapter_file(files.mip_basic_bin, other)


# ----------------------------------------------------------------------------------------- diffusers export


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_diffusers_export_loads_in_diffusers_with_the_same_uniform_output(
    suffix, checkpoint_files, tmp_path, photo
):
    """A MIP checkpoint exported as "diffusers" runs in diffusers' IP-Adapter exactly like our uniform rule."""
    from transformers import CLIPVisionModelWithProjection

    files = checkpoint_files("sdxl")
    encoder = CLIPVisionModelWithProjection.from_pretrained(files.basic_image_encoder).eval()
    _, processor = TINY_SDXL.basic_image_encoder.build()

    ours_pipe = tiny_sdxl_pipeline()
    adapter = load_adapter(files.mip_basic_bin, ours_pipe.unet)
    export = save_adapter(adapter, tmp_path / f"export{suffix}", format="diffusers")
    assert not any("text_to_weight" in key for key in read_file(export).state)

    theirs = tiny_sdxl_pipeline()
    theirs.register_modules(image_encoder=encoder, feature_extractor=processor)
    theirs.load_ip_adapter(str(tmp_path), subfolder="", weight_name=export.name, image_encoder_folder=None)
    theirs.set_ip_adapter_scale(0.8)
    reference = photo(1)
    common = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="np")
    expected = theirs(
        "a photo of a cat", ip_adapter_image=reference, generator=torch.Generator().manual_seed(0), **common
    ).images
    ours = MIPAdapterPipeline(ours_pipe, adapter, encoder, processor)
    got = ours(
        "a photo of a cat",
        [Subject("cat", images=[reference], scale=0.8)],
        rule="uniform",
        use_text_weight=False,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
        **common,
    ).images
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-5


@pytest.mark.parametrize("default_scale", [None, 0.6])
def test_load_adapter_gives_a_file_without_a_config_the_default_scale_asked_for(
    default_scale, checkpoint_files, shared_unet
):
    """h94 files carry no scale: load_adapter passes the caller's (a preset's 0.6), else 1.0."""
    files = checkpoint_files("sdxl")
    loaded = load_adapter(files.basic_safetensors, shared_unet("sdxl"), default_scale)
    assert loaded.config.default_scale == (1.0 if default_scale is None else default_scale)
