"""The offline FLUX factory: T5 tokenizer, tiny FLUX pipeline, XLabs-layout IP-Adapter files that diffusers loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor
from safetensors import safe_open
from transformers import CLIPTextModel, T5EncoderModel, T5Tokenizer

from mipadapter.checkpoint.xlabs import XLABS, XLabsConfig, expected_shapes
from mipadapter.testing.flux import (
    T5_MAX_LENGTH,
    TINY_FLUX,
    build_t5_tokenizer,
    fabricate_xlabs_state,
    tiny_flux_ip_files,
    tiny_flux_pipeline,
)
from mipadapter.testing.tokenizer import FALLBACK_WORDS


def _generate(pipe, prompt="a cat wearing a jacket", **kwargs) -> np.ndarray:
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(prompt, num_inference_steps=2, output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def ip_files(tmp_path_factory):
    return tiny_flux_ip_files(tmp_path_factory.mktemp("flux_ip"), seed=3)


def _with_ip_adapter(files, seed: int = 0):
    """A fresh tiny FLUX with the XLabs-layout file loaded by diffusers' own loader."""
    pipe = tiny_flux_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    _, processor = TINY_FLUX.image_encoder.build(0)
    pipe.register_modules(feature_extractor=processor)  # diffusers would make a torchvision-backed one
    pipe.load_ip_adapter(
        str(files.folder),
        weight_name=files.weight_name,
        image_encoder_pretrained_model_name_or_path=str(files.image_encoder),
        image_encoder_dtype=torch.float32,
    )
    return pipe


# --- T5 tokenizer -------------------------------------------------------------------------------------


def test_t5_tokenizer_special_ids_and_eos():
    tok = build_t5_tokenizer()
    assert isinstance(tok, T5Tokenizer)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert tok.model_max_length == T5_MAX_LENGTH
    assert tok("").input_ids == [1]  # the empty prompt is just </s>
    ids = tok("a cat", padding="max_length", max_length=6).input_ids
    assert ids[2:] == [1, 0, 0, 0]  # </s> then <pad>


def test_t5_tokenizer_words_are_single_tokens_and_anything_ascii_tokenises():
    tok = build_t5_tokenizer()
    for word in sorted(set(FALLBACK_WORDS)):
        assert tok.convert_ids_to_tokens(tok(word).input_ids) == ["▁" + word, "</s>"], word
    ids = tok("a dog, Zebra-42!").input_ids
    assert tok.unk_token_id not in ids  # unknown and capitalised words split into characters
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:2] == ["▁a", "▁dog"] and pieces[-1] == "</s>"
    assert "".join(pieces[:-1]).replace("▁", " ").strip() == "a dog, Zebra-42!"
    assert tok("Cat").input_ids != tok("cat").input_ids  # case-sensitive, like T5


def test_t5_tokenizer_other_words_and_length():
    tok = build_t5_tokenizer(["sks", "corgi"], model_max_length=16)
    assert tok.model_max_length == 16
    assert len(tok("sks corgi").input_ids) == 3
    assert len(tok("cat").input_ids) == 4  # not in this vocabulary: c, a, t, </s>


# --- the pipeline -------------------------------------------------------------------------------------


def test_structure_matches_flux():
    pipe = tiny_flux_pipeline()
    spec = TINY_FLUX
    transformer = pipe.transformer
    assert isinstance(transformer, FluxTransformer2DModel)
    assert len(transformer.transformer_blocks) == spec.num_layers >= 2
    assert len(transformer.single_transformer_blocks) == spec.num_single_layers >= 1
    config = transformer.config
    assert config.guidance_embeds  # FLUX.1-dev is guidance-distilled
    assert sum(config.axes_dims_rope) == config.attention_head_dim == 16
    assert transformer.inner_dim == spec.inner_dim == 32
    # FLUX.1's widths differ (3072, 4096, 768): so do these
    widths = {transformer.inner_dim, config.joint_attention_dim, config.pooled_projection_dim}
    assert len(widths) == 3 and spec.image_encoder.projection_dim not in widths
    assert config.in_channels == 4 * pipe.vae.config.latent_channels == 64

    assert isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert pipe.text_encoder_2.config.d_model == config.joint_attention_dim
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert pipe.text_encoder.config.hidden_size == config.pooled_projection_dim
    assert isinstance(pipe.tokenizer_2, T5Tokenizer) and pipe.tokenizer.model_max_length == 77

    vae = pipe.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    assert pipe.vae_scale_factor == 8
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.use_dynamic_shifting
    assert pipe.image_encoder is None and pipe.feature_extractor is None

    names = list(transformer.attn_processors)
    assert sum(name.startswith("transformer_blocks.") for name in names) == spec.num_layers
    assert sum(name.startswith("single_transformer_blocks.") for name in names) == spec.num_single_layers
    assert all(isinstance(p, FluxAttnProcessor) for p in transformer.attn_processors.values())
    for module in (transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        assert not module.training
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.parameters())


def test_weights_are_a_function_of_the_seed_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, again, other = tiny_flux_pipeline(0), tiny_flux_pipeline(0), tiny_flux_pipeline(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b, c = (getattr(p, name).state_dict() for p in (first, again, other))
        assert all(torch.equal(a[key], b[key]) for key in a), name
        assert any(not torch.equal(a[key], c[key]) for key in a if a[key].numel() > 1), name


def test_prompt_encoding_shapes():
    pipe = tiny_flux_pipeline()
    embeds, pooled, text_ids = pipe.encode_prompt("a cat", prompt_2=None, max_sequence_length=32)
    assert embeds.shape == (1, 32, TINY_FLUX.joint_attention_dim)
    assert pooled.shape == (1, TINY_FLUX.pooled_projection_dim)
    assert text_ids.shape == (32, 3) and not text_ids.any()  # FLUX.1 puts every text token at position 0
    other, _, _ = pipe.encode_prompt("a dog", prompt_2=None, max_sequence_length=32)
    assert not torch.allclose(embeds, other)


def test_two_step_generation_is_deterministic_square_and_not():
    first = tiny_flux_pipeline()
    first.set_progress_bar_config(disable=True)
    image = _generate(first)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    again = tiny_flux_pipeline()
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_generate(again), image)
    assert not np.array_equal(_generate(first, "a dog on a beach"), image)
    wide = _generate(first, height=64, width=96)
    assert wide.shape == (1, 64, 96, 3) and np.isfinite(wide).all()


# --- XLabs-layout files -------------------------------------------------------------------------------


def test_fabricated_state_has_xlabs_keys_and_is_seeded():
    config = XLabsConfig.for_transformer(tiny_flux_pipeline().transformer.config, 20, num_tokens=16)
    assert config == XLabsConfig(num_blocks=3, hidden_size=32, cross_attention_dim=48, image_embed_dim=20,
                                 num_tokens=16)
    state = fabricate_xlabs_state(config, seed=5)
    assert {key: tuple(value.shape) for key, value in state.items()} == expected_shapes(config, XLABS)
    assert "double_blocks.2.processor.ip_adapter_double_stream_v_proj.bias" in state
    assert state["ip_adapter_proj_model.proj.weight"].shape == (16 * 48, 20)
    again, other = fabricate_xlabs_state(config, seed=5), fabricate_xlabs_state(config, seed=6)
    assert all(torch.equal(state[key], again[key]) for key in state)
    assert not torch.equal(state["ip_adapter_proj_model.proj.weight"], other["ip_adapter_proj_model.proj.weight"])
    assert state["ip_adapter_proj_model.norm.weight"].mean() == pytest.approx(1.0, abs=0.05)


def test_ip_files_on_disk(ip_files):
    assert ip_files.weight_path.is_file() and (ip_files.image_encoder / "config.json").is_file()
    with safe_open(str(ip_files.weight_path), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    assert shapes == expected_shapes(ip_files.config, XLABS)
    assert ip_files.config.num_tokens == 4


def test_diffusers_loads_the_xlabs_file_into_the_tiny_flux(ip_files):
    pipe = _with_ip_adapter(ip_files)
    processors = pipe.transformer.attn_processors
    with safe_open(str(ip_files.weight_path), framework="pt") as handle:
        file = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    for block in range(TINY_FLUX.num_layers):
        processor = processors[f"transformer_blocks.{block}.attn.processor"]
        assert isinstance(processor, FluxIPAdapterAttnProcessor)
        prefix = f"double_blocks.{block}.processor.ip_adapter_double_stream_"
        assert torch.equal(processor.to_k_ip[0].weight, file[prefix + "k_proj.weight"])
        assert torch.equal(processor.to_v_ip[0].bias, file[prefix + "v_proj.bias"])
    for block in range(TINY_FLUX.num_single_layers):  # single-stream blocks get no IP term
        assert isinstance(processors[f"single_transformer_blocks.{block}.attn.processor"], FluxAttnProcessor)
    projection = pipe.transformer.encoder_hid_proj.image_projection_layers[0]
    assert projection.num_image_text_embeds == 4
    assert torch.equal(projection.image_embeds.weight, file["ip_adapter_proj_model.proj.weight"])
    assert torch.equal(projection.norm.bias, file["ip_adapter_proj_model.norm.bias"])
    assert pipe.image_encoder.config.projection_dim == TINY_FLUX.image_encoder.projection_dim


def test_generation_with_an_ip_adapter_image(ip_files, photo):
    pipe = _with_ip_adapter(ip_files)
    plain = tiny_flux_pipeline()
    plain.set_progress_bar_config(disable=True)
    baseline = _generate(plain)
    with_image = _generate(pipe, ip_adapter_image=photo(0))
    assert with_image.shape == (1, 64, 64, 3) and np.isfinite(with_image).all()
    assert np.abs(with_image - baseline).max() > 1e-3  # the reference image moves the result
    np.testing.assert_array_equal(_generate(_with_ip_adapter(ip_files), ip_adapter_image=photo(0)), with_image)
    assert not np.array_equal(_generate(pipe, ip_adapter_image=photo(1)), with_image)
    # true CFG: a real unconditional pass (diffusers gives it a black reference image by default)
    cfg = _generate(pipe, ip_adapter_image=photo(0), negative_prompt="", true_cfg_scale=4.0)
    assert np.isfinite(cfg).all() and not np.array_equal(cfg, with_image)
    pipe.set_ip_adapter_scale(0.0)  # scale 0: exactly the plain pipeline
    np.testing.assert_array_equal(_generate(pipe, ip_adapter_image=photo(0)), baseline)
