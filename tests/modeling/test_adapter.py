"""``MIPAdapter``: which layers it takes over, attach/detach, initialisation, and the image projections."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from mipadapter.config import AdapterConfig
from mipadapter.modeling import (
    MIPAdapter,
    MIPAttnProcessor,
    SubjectConditioning,
    build_image_projection,
    cross_attention_layers,
)
from mipadapter.modeling.conditioning import LayerInputs, RelevanceRecorder
from mipadapter.testing import TINY_SD15, TINY_SDXL, tiny_sd15_pipeline, tiny_sdxl_pipeline

BUILDERS = {"sdxl": tiny_sdxl_pipeline, "sd15": tiny_sd15_pipeline}
SPECS = {"sdxl": TINY_SDXL, "sd15": TINY_SD15}


def basic_config(arch: str, text_weight: bool = True) -> AdapterConfig:
    spec = SPECS[arch]
    return AdapterConfig(
        "basic", spec.basic_image_encoder.projection_dim, spec.cross_attention_dim, 4, text_weight
    )


def random_adapter(unet, arch: str, seed: int = 0) -> MIPAdapter:
    adapter = MIPAdapter.for_unet(unet, basic_config(arch))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for param in adapter.parameters():
            torch.nn.init.normal_(param, std=0.1)
    return adapter


def unet_inputs(pipe, arch: str, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    cross = pipe.unet.config.cross_attention_dim
    kwargs = dict(
        sample=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, 77, cross, generator=g),
    )
    if arch == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, TINY_SDXL.text_projection_dim, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return kwargs


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_cross_attention_layers_follow_attn_processors(arch):
    unet = BUILDERS[arch]().unet
    layers = cross_attention_layers(unet)
    names = list(unet.attn_processors)
    assert len(layers) == SPECS[arch].num_cross_attention_layers
    for layer in layers:
        assert names[layer.index] == layer.name + ".processor" and layer.name.endswith("attn2")
        module = unet.get_submodule(layer.name)
        assert (layer.hidden_size, layer.cross_attention_dim) == (
            module.to_k.out_features,
            SPECS[arch].cross_attention_dim,
        )
    assert [layer.index for layer in layers] == list(range(1, 2 * len(layers), 2))


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_attach_takes_cross_attention_only_and_detach_restores_exactly(arch):
    pipe = BUILDERS[arch]()
    unet = pipe.unet
    before = dict(unet.attn_processors)
    inputs = unet_inputs(pipe, arch)
    with torch.no_grad():
        expected = unet(**inputs).sample
    adapter = random_adapter(unet, arch)
    adapter.attach(unet)
    assert adapter.is_attached
    attached = unet.attn_processors
    for key, processor in attached.items():
        if key.endswith("attn2.processor"):
            assert processor is adapter.processor(key.removesuffix(".processor"))
        else:
            assert processor is before[key]
    # with no conditioning in the call, the adapter's processors are plain cross-attention
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, expected)
    adapter.detach()
    assert not adapter.is_attached
    after = unet.attn_processors
    assert list(after) == list(before)
    assert all(after[key] is before[key] for key in before)  # the very same objects, not look-alikes
    assert {type(p) for p in after.values()} == {AttnProcessor2_0}
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, expected)
    # the adapter's weights stayed out of the UNet's parameters and state dict
    assert not any("to_k_ip" in key for key in unet.state_dict())


def test_attach_and_detach_guard_against_misuse():
    pipe = tiny_sdxl_pipeline()
    adapter = random_adapter(pipe.unet, "sdxl")
    with pytest.raises(RuntimeError, match="not attached"):
        adapter.detach()
    adapter.attach(pipe.unet)
    with pytest.raises(RuntimeError) as refused:
        adapter.attach(pipe.unet)
    assert str(refused.value) == "this adapter is already attached to a UNet; detach it first"
    adapter.detach()
    other = tiny_sd15_pipeline().unet
    with pytest.raises(ValueError) as refused:
        adapter.attach(other)
    assert str(refused.value) == "this adapter was built for a model with different attention layers"
    with pytest.raises(ValueError, match="another base model"):
        MIPAdapter.for_unet(other, basic_config("sdxl"))  # 96-wide tokens for a 48-wide UNet


def test_init_from_base_copies_to_k_to_v_and_starts_the_gate_as_the_authors():
    """The authors' gate is an nn.Linear(c, 1, bias=False) their load leaves alone: PyTorch's own init.
    Guards a gate zeroed by default (the earlier behaviour) or drawn any other way."""
    unet = tiny_sd15_pipeline().unet
    adapter = random_adapter(unet, "sd15")
    torch.manual_seed(7)
    adapter.init_from_base(unet)
    torch.manual_seed(7)
    fresh = [nn.Linear(layer.hidden_size, 1, bias=False).weight for layer in adapter.layer_specs]
    for layer, expected in zip(adapter.layer_specs, fresh, strict=True):
        attention, processor = unet.get_submodule(layer.name), adapter.processor(layer.name)
        assert torch.equal(processor.to_k_ip.weight, attention.to_k.weight)
        assert torch.equal(processor.to_v_ip.weight, attention.to_v.weight)
        assert not processor.to_k_ip.weight.data_ptr() == attention.to_k.weight.data_ptr()  # a copy
        assert torch.equal(processor.text_to_weight.weight, expected)
        assert processor.text_to_weight.weight.abs().max() <= layer.hidden_size**-0.5


def test_the_zero_gate_is_an_option_and_other_names_are_refused():
    unet = tiny_sd15_pipeline().unet
    adapter = random_adapter(unet, "sd15")
    adapter.init_from_base(unet, "zeros")
    assert all(torch.count_nonzero(p.text_to_weight.weight) == 0 for p in adapter.processors().values())
    with pytest.raises(ValueError, match=r"text weight init must be one of \('pytorch', 'zeros'\), got 'ones'"):
        adapter.init_text_weights("ones")


def test_processors_are_ordered_and_sized_per_layer():
    unet = tiny_sdxl_pipeline().unet
    adapter = MIPAdapter.for_unet(unet, basic_config("sdxl", text_weight=False))
    processors = adapter.processors()
    assert list(processors) == [layer.name for layer in cross_attention_layers(unet)]
    for layer in adapter.layer_specs:
        processor = processors[layer.name]
        assert isinstance(processor, MIPAttnProcessor) and processor.text_to_weight is None
        assert tuple(processor.to_k_ip.weight.shape) == (layer.hidden_size, TINY_SDXL.cross_attention_dim)


def test_basic_projection_is_linear_reshape_layernorm():
    """h94's ImageProjModel: Linear(D → t·c), reshape to t tokens, LayerNorm over c."""
    config = AdapterConfig("basic", 10, 12, 4)
    projection = build_image_projection(config)
    state = {key: torch.randn_like(value) for key, value in projection.state_dict().items()}
    projection.load_state_dict(state)
    features = torch.randn(3, 10)
    tokens = (features @ state["image_embeds.weight"].T + state["image_embeds.bias"]).reshape(3, 4, 12)
    mean = tokens.mean(-1, keepdim=True)
    var = tokens.var(-1, unbiased=False, keepdim=True)
    expected = (tokens - mean) / torch.sqrt(var + 1e-5) * state["norm.weight"] + state["norm.bias"]
    torch.testing.assert_close(projection(features), expected)


def test_project_checks_feature_shapes():
    unet = tiny_sdxl_pipeline().unet
    adapter = MIPAdapter.for_unet(unet, basic_config("sdxl"))
    assert adapter.project(torch.randn(3, 40)).shape == (3, 4, 96)
    with pytest.raises(ValueError, match=r"\[k, D\] with D = 40, got \(3, 41\)"):
        adapter.project(torch.randn(3, 41))
    with pytest.raises(ValueError, match=r"\[k, D\]"):
        adapter.project(torch.randn(3, 17, 40))
    plus = MIPAdapter.for_unet(
        unet,
        AdapterConfig("plus", 48, 96, 16, resampler_dim=64, resampler_depth=2, resampler_heads=2),
    )
    assert plus.project(torch.randn(2, 17, 48)).shape == (2, 16, 96)
    with pytest.raises(ValueError, match=r"\[k, L, D\]"):
        plus.project(torch.randn(2, 48))


def test_adapter_config_validates_and_round_trips_json():
    config = AdapterConfig("plus", 48, 96, 16, True, 64, 4, 2, default_scale=0.65)
    assert AdapterConfig.from_json(config.to_json()) == config
    assert config.default_rule.value == "official" and config.uses_hidden_states
    assert AdapterConfig("basic", 40, 96, 4).default_rule.value == "paper"
    with pytest.raises(ValueError, match="resampler"):
        AdapterConfig("plus", 48, 96, 16)
    with pytest.raises(ValueError, match="resampler"):
        AdapterConfig("basic", 40, 96, 4, resampler_dim=64)
    with pytest.raises(ValueError, match="projection"):
        AdapterConfig("perceiver", 40, 96, 4)
    with pytest.raises(ValueError, match="num_tokens"):
        AdapterConfig("basic", 40, 96, 0)
    with pytest.raises(ValueError, match="unknown AdapterConfig fields"):
        AdapterConfig.from_json('{"projection": "basic", "image_embed_dim": 4, "cross_attention_dim": 8, '
                                '"num_tokens": 4, "colour": "red"}')  # fmt: skip


def test_flux_layers_refuse_what_is_not_a_flux_transformer():
    """A model named like FLUX but without double-stream blocks (none, an empty list, or blocks without
    FLUX's ``joint_attention_dim``) is refused with one line naming its class."""
    from types import SimpleNamespace

    from mipadapter.modeling.adapter import flux_layers

    def fake(**attributes):
        model = type("FluxLookalike", (torch.nn.Module,), {})()
        model.config = SimpleNamespace(**attributes.pop("config", {}))
        for name, value in attributes.items():
            setattr(model, name, value)
        return model

    block = torch.nn.Module()
    cases = [
        fake(config={"joint_attention_dim": 8}),
        fake(transformer_blocks=torch.nn.ModuleList(), config={"joint_attention_dim": 8}),
        fake(transformer_blocks=torch.nn.ModuleList([block])),
    ]
    message = r"^FluxLookalike is not a FLUX transformer with double-stream blocks$"
    for model in cases:
        with pytest.raises(ValueError, match=message):
            flux_layers(model)


def test_detaching_from_a_deleted_unet_is_refused_with_one_line():
    import gc

    unet = tiny_sd15_pipeline().unet
    adapter = random_adapter(unet, "sd15")
    adapter.attach(unet)
    del unet
    gc.collect()
    with pytest.raises(RuntimeError, match=r"^the UNet this adapter was attached to no longer exists$"):
        adapter.detach()


def test_an_unattached_adapter_refuses_to_prepare_or_detach_in_one_line():
    """Guards the two misuse lines of an adapter never attached (or detached already), word for word."""
    unet = tiny_sd15_pipeline().unet
    adapter = random_adapter(unet, "sd15")
    with pytest.raises(RuntimeError) as refused:
        adapter.prepare(object())  # refused before the conditioning is read
    assert str(refused.value) == "attach the adapter to a UNet before preparing a conditioning"
    adapter.attach(unet)
    adapter.detach()
    with pytest.raises(RuntimeError) as refused:
        adapter.detach()
    assert str(refused.value) == "this adapter is not attached"


def test_project_names_the_shape_it_takes_and_casts_features_to_the_adapters_dtype():
    """Guards MIPAdapter.project: features of the wrong rank are refused naming the shape the projection
    takes ([k, D] basic); float32 features reach a bfloat16 adapter in its dtype, as its own bfloat16
    features would (diffusers' basic projection casts them itself, the Plus resampler does not)."""
    unet = tiny_sd15_pipeline().unet
    basic = random_adapter(unet, "sd15")
    dim = basic.config.image_embed_dim
    with pytest.raises(ValueError) as refused:
        basic.project(torch.randn(2, 3, dim))
    assert str(refused.value) == f"basic projection takes features shaped [k, D] with D = {dim}, got (2, 3, {dim})"
    plus = MIPAdapter.for_unet(unet, AdapterConfig("plus", 24, TINY_SD15.cross_attention_dim, 4, True,
                                                   resampler_dim=32, resampler_depth=1, resampler_heads=1))  # fmt: skip
    with pytest.raises(ValueError) as refused:  # the right rank, a width other than the encoder's
        plus.project(torch.randn(2, 5, 20))
    assert str(refused.value) == "plus projection takes features shaped [k, L, D] with D = 24, got (2, 5, 20)"
    for adapter, features in ((basic, torch.randn(2, dim)), (plus, torch.randn(2, 5, 24))):
        adapter.to(torch.bfloat16)
        tokens = adapter.project(features)
        assert tokens.dtype == torch.bfloat16
        assert torch.equal(tokens, adapter.project(features.bfloat16()))


def one_subject_conditioning(adapter: MIPAdapter, dtype=torch.float32, **extra) -> SubjectConditioning:
    """One subject, one photo, two name tokens, on two batch rows, in ``dtype``."""
    cross, tokens = adapter.config.cross_attention_dim, adapter.config.num_tokens
    g = torch.Generator().manual_seed(4)
    return SubjectConditioning(
        image_tokens=torch.randn(2, 1, tokens, cross, generator=g).to(dtype),
        owner=torch.tensor([0]),
        share=torch.ones(1),
        scales=torch.ones(2, 1),
        name_embeds=torch.randn(2, 1, 2, cross, generator=g).to(dtype),
        name_mask=torch.ones(2, 1, 2, dtype=torch.bool),
        **({"rule": "paper", "use_text_weight": False} | extra),
    )


def test_preparing_for_a_deleted_unet_is_refused_with_one_line():
    """Guards prepare's own line for an adapter whose UNet was deleted while it was attached: nothing is
    prepared."""
    import gc

    unet = tiny_sd15_pipeline().unet
    adapter = random_adapter(unet, "sd15")
    adapter.attach(unet)
    cond = one_subject_conditioning(adapter)
    del unet
    gc.collect()
    with pytest.raises(RuntimeError) as refused:
        adapter.prepare(cond)
    assert str(refused.value) == "the UNet this adapter was attached to no longer exists"
    assert cond.layer_inputs == {}


@pytest.mark.parametrize("dtype, working", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
def test_the_layers_of_one_call_share_their_weight_matrices_in_the_working_dtype(dtype, working):
    """``prepare`` makes the relevance and image-attention weight matrices once per head count and hands
    the same tensors to every layer of that count, in the dtype the maps are computed in (at least
    float32; float64 for a float64 model)."""
    unet = tiny_sd15_pipeline().unet.to(dtype)
    adapter = random_adapter(unet, "sd15").to(dtype)
    adapter.attach(unet)
    cond = one_subject_conditioning(adapter, dtype, image_attention=RelevanceRecorder((8, 8), keep_last=1))
    adapter.prepare(cond)
    first_of_heads: dict[int, LayerInputs] = {}
    for layer in adapter.layer_specs:
        inputs = cond.layer_inputs[layer.name]
        first = first_of_heads.setdefault(unet.get_submodule(layer.name).heads, inputs)
        assert inputs.name_weights is first.name_weights and inputs.image_weights is first.image_weights
        assert inputs.name_weights.dtype == inputs.image_weights.dtype == working
    assert len(first_of_heads) < len(adapter.layer_specs)  # some layers did share


def test_a_model_of_another_architecture_is_refused_naming_both():
    from mipadapter.testing.flux import tiny_flux_pipeline

    flux = AdapterConfig("basic", 20, TINY_SD15.cross_attention_dim, 4, architecture="flux")
    with pytest.raises(ValueError) as refused:
        MIPAdapter.for_model(tiny_sd15_pipeline().unet, flux)
    assert str(refused.value) == (
        "this is a flux adapter but the model is a UNet2DConditionModel (unet): use an adapter made for this "
        "base model"
    )
    with pytest.raises(ValueError) as refused:  # FLUX's attention modules say nothing of cross-attention
        cross_attention_layers(tiny_flux_pipeline().transformer)
    assert str(refused.value) == "FluxTransformer2DModel has no cross-attention layers to attach an adapter to"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_only_the_mid_block_layers_report_routed_shares(arch):
    """The starved-subject diagnostic reads the mid block's layers (the lowest resolution); built by the
    adapter itself, not by a shared fixture, so that a change in how it picks them reaches this test."""
    adapter = random_adapter(BUILDERS[arch]().unet, arch)
    flags = {layer.name: adapter.processor(layer.name).diagnose for layer in adapter.layer_specs}
    assert flags == {name: name.startswith("mid_block.") for name in flags}
    assert any(flags.values()) and not all(flags.values())


def test_without_a_mid_block_every_layer_reports_and_a_flux_adapter_s_blocks_all_do():
    from mipadapter.modeling.adapter import CrossAttentionLayer, diagnostic_layers
    from mipadapter.testing.flux import tiny_flux_pipeline

    layers = [CrossAttentionLayer(name, index, 8, 8) for index, name in enumerate(["down.a", "up.b"])]
    assert diagnostic_layers(layers) == {"down.a", "up.b"}
    transformer = tiny_flux_pipeline().transformer
    config = AdapterConfig("basic", 20, transformer.config.joint_attention_dim, 4, architecture="flux")
    adapter = MIPAdapter.for_model(transformer, config)
    assert [processor.diagnose for processor in adapter.processors().values()] == [True] * len(adapter.layer_specs)


def test_a_processor_s_defaults_are_no_text_weight_no_name_and_diagnosing():
    processor = MIPAttnProcessor(16, 12)
    assert (processor.hidden_size, processor.cross_attention_dim) == (16, 12)
    assert (processor.text_to_weight, processor.layer_name, processor.diagnose) == (None, "", True)
    assert processor.to_k_ip.bias is None and processor.to_v_ip.bias is None


@pytest.mark.parametrize("depth", [1, 3])
def test_a_plus_projection_has_the_configured_number_of_resampler_blocks(depth):
    config = AdapterConfig("plus", 20, 48, 4, resampler_dim=32, resampler_depth=depth, resampler_heads=2)
    assert len(build_image_projection(config).layers) == depth
