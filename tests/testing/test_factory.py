"""The offline factory: tokenizers, tiny pipelines and image encoders, fabricated checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import CLIPTokenizer

from mipadapter.testing import (
    CLIP_VOCAB_SIZE,
    TINY_SD15,
    TINY_SDXL,
    TINY_VIT_BIGG,
    TINY_VIT_H,
    build_clip_tokenizer,
    clip_vocab_files,
    cross_attention_layers,
    fabricate_ip_adapter_state,
    flatten_state,
    has_real_clip_vocab,
    save_checkpoint,
    tiny_checkpoint_files,
    tiny_image_encoder,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)
from mipadapter.testing.tokenizer import FALLBACK_WORDS

BUILDERS = {"sdxl": tiny_sdxl_pipeline, "sd15": tiny_sd15_pipeline}
SPECS = {"sdxl": TINY_SDXL, "sd15": TINY_SD15}
FILES = ("basic_bin", "basic_safetensors", "plus_bin", "mip_basic_bin", "mip_plus_bin")

needs_clip_vocab = pytest.mark.skipif(
    not has_real_clip_vocab(), reason="open_clip (its BPE file) not installed"
)


def _generate(pipe, **kwargs) -> np.ndarray:
    return pipe(
        "a cat wearing a jacket",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


# --- tokenizers ---------------------------------------------------------------------------------------


@needs_clip_vocab
def test_real_clip_tokenizer_matches_openai_ids():
    tok = build_clip_tokenizer()
    assert len(tok) == CLIP_VOCAB_SIZE == 49408
    assert tok.model_max_length == 77
    # Ids of the OpenAI CLIP tokenizer: bos, "a", "cat", "wearing", "a", "jacket", eos.
    assert tok("a cat wearing a jacket").input_ids == [49406, 320, 2368, 3309, 320, 6164, 49407]
    assert tok("A Cat,").input_ids == [49406, 320, 2368, 267, 49407]  # lowercased, punctuation split
    padded = tok("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[4:] == [49407] * 73


@needs_clip_vocab
def test_real_clip_tokenizer_sdxl_pad_and_cached_files(tmp_path):
    tok_2 = build_clip_tokenizer("!")
    assert (tok_2.pad_token, tok_2.pad_token_id, len(tok_2)) == ("!", 0, 49408)
    assert tok_2("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]
    vocab_path, merges_path = clip_vocab_files()
    assert clip_vocab_files() == (vocab_path, merges_path)  # cached
    # The written files are a standard HF tokenizer folder.
    from_files = CLIPTokenizer.from_pretrained(vocab_path.parent)
    assert len(from_files) == 49408
    assert (
        from_files("a cat wearing a jacket").input_ids
        == build_clip_tokenizer()("a cat wearing a jacket").input_ids
    )
    vocab_copy, _ = clip_vocab_files(tmp_path)
    assert vocab_copy.read_bytes() == vocab_path.read_bytes()


def test_fallback_tokenizer_is_clip_like():
    tok = build_clip_tokenizer(vocab="fallback")
    assert isinstance(tok, CLIPTokenizer) and tok.model_max_length == 77
    size = len(tok)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (size - 2, size - 1, size - 1)
    for word in FALLBACK_WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert tok("A Cat, wearing").input_ids == tok("a cat , wearing").input_ids
    ids = tok("a xylophone").input_ids  # unknown words split into pieces, never the unknown token
    assert len(ids) > 4 and tok.unk_token_id not in ids[1:-1]
    assert build_clip_tokenizer("!", vocab="fallback").pad_token_id == 0


def test_auto_falls_back_without_open_clip(monkeypatch):
    import mipadapter.testing.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "clip_bpe_path", lambda: None)
    assert not has_real_clip_vocab()
    assert len(build_clip_tokenizer()) == len(build_clip_tokenizer(vocab="fallback")) < 5000
    with pytest.raises(FileNotFoundError, match="open_clip"):
        build_clip_tokenizer(vocab="clip")


def test_tokenizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pad_token"):
        build_clip_tokenizer("<not-a-token>", vocab="fallback")
    with pytest.raises(ValueError, match="vocab"):
        build_clip_tokenizer(vocab="bpe")  # type: ignore[arg-type]


# --- tiny models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_tiny_pipeline_generates_and_is_seeded(arch):
    state = torch.random.get_rng_state()
    pipe = BUILDERS[arch](seed=0)
    assert torch.equal(torch.random.get_rng_state(), state), "building must not consume the global RNG"
    spec = SPECS[arch]
    assert pipe.unet.config.cross_attention_dim == spec.cross_attention_dim
    assert pipe.image_encoder is None and pipe.feature_extractor is None
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in pipe.unet.parameters())
    assert not pipe.unet.training and not pipe.text_encoder.training

    image = _generate(pipe)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    again = BUILDERS[arch](seed=0)
    other = BUILDERS[arch](seed=1)
    assert all(
        torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), again.unet.parameters(), strict=True)
    )
    assert not torch.equal(pipe.unet.conv_in.weight, other.unet.conv_in.weight)


def test_tiny_sdxl_structure():
    pipe = tiny_sdxl_pipeline()
    hidden = (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size)
    assert hidden == TINY_SDXL.text_hidden_sizes and sum(hidden) == pipe.unet.config.cross_attention_dim
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.tokenizer_2.pad_token == "!"
    assert pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    layers = cross_attention_layers(pipe.unet)
    assert len(layers) == TINY_SDXL.num_cross_attention_layers == 11
    assert [k for k, *_ in layers] == list(range(1, 22, 2))
    assert {c for _, _, c, _ in layers} == {32, 64}
    names = [name for _, name, *_ in layers]  # down blocks, then up blocks, then the mid block
    assert names[0].startswith("down_blocks") and names[-1].startswith("mid_block")


def test_tiny_sd15_structure():
    pipe = tiny_sd15_pipeline()
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 48
    layers = cross_attention_layers(pipe.unet)
    assert len(layers) == TINY_SD15.num_cross_attention_layers == 7
    assert [k for k, *_ in layers] == list(range(1, 14, 2))


def test_tiny_pipeline_with_fallback_vocab():
    pipe = tiny_sd15_pipeline(vocab="fallback")
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) < 5000
    assert np.isfinite(_generate(pipe)).all()


def test_tiny_image_encoder_shapes():
    model, processor = tiny_image_encoder(40, hidden_size=56)
    pixels = processor(Image.new("RGB", (50, 70), (200, 10, 10)), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)
    out = model(pixels, output_hidden_states=True)
    assert out.image_embeds.shape == (1, 40)
    assert out.hidden_states[-2].shape == (1, 17, 56)  # the Plus input: penultimate hidden states
    assert TINY_VIT_H.tokens == 17 and TINY_VIT_BIGG.build()[0].config.projection_dim == 40


# --- fabricated checkpoints -----------------------------------------------------------------------------


def test_basic_layout_shapes():
    unet = tiny_sdxl_pipeline().unet
    state = fabricate_ip_adapter_state(unet, 40, "basic", text_weight=True)
    proj = state["image_proj"]
    assert {k: tuple(v.shape) for k, v in proj.items()} == {
        "proj.weight": (4 * 96, 40),
        "proj.bias": (4 * 96,),
        "norm.weight": (96,),
        "norm.bias": (96,),
    }
    expected = {}
    for k, _name, channels, cross in cross_attention_layers(unet):
        expected[f"{k}.to_k_ip.weight"] = (channels, cross)
        expected[f"{k}.to_v_ip.weight"] = (channels, cross)
        expected[f"{k}.text_to_weight.weight"] = (1, channels)
    assert {k: tuple(v.shape) for k, v in state["ip_adapter"].items()} == expected
    assert "21.to_k_ip.weight" in state["ip_adapter"] and "0.to_k_ip.weight" not in state["ip_adapter"]
    without = fabricate_ip_adapter_state(unet, 40, "basic")
    assert not any("text_to_weight" in key for key in without["ip_adapter"])
    # Deterministic in the seed.
    again = fabricate_ip_adapter_state(unet, 40, "basic", text_weight=True)
    assert all(torch.equal(again["ip_adapter"][k], v) for k, v in state["ip_adapter"].items())


def test_plus_layout_shapes():
    unet = tiny_sd15_pipeline().unet
    state = fabricate_ip_adapter_state(unet, 48, "plus", plus_hidden_dim=64, plus_heads=3, plus_depth=2)
    shapes = {k: tuple(v.shape) for k, v in state["image_proj"].items()}
    hidden, inner, cross = 64, 3 * 64, 48
    expected = {
        "latents": (1, 16, hidden),
        "proj_in.weight": (hidden, 48),
        "proj_in.bias": (hidden,),
        "proj_out.weight": (cross, hidden),
        "proj_out.bias": (cross,),
        "norm_out.weight": (cross,),
        "norm_out.bias": (cross,),
    }
    for layer in range(2):
        expected |= {
            f"layers.{layer}.0.norm1.weight": (hidden,),
            f"layers.{layer}.0.norm1.bias": (hidden,),
            f"layers.{layer}.0.norm2.weight": (hidden,),
            f"layers.{layer}.0.norm2.bias": (hidden,),
            f"layers.{layer}.0.to_q.weight": (inner, hidden),
            f"layers.{layer}.0.to_kv.weight": (2 * inner, hidden),
            f"layers.{layer}.0.to_out.weight": (hidden, inner),
            f"layers.{layer}.1.0.weight": (hidden,),
            f"layers.{layer}.1.0.bias": (hidden,),
            f"layers.{layer}.1.1.weight": (4 * hidden, hidden),
            f"layers.{layer}.1.3.weight": (hidden, 4 * hidden),
        }
    assert shapes == expected


@pytest.mark.parametrize("kind", ["basic", "plus"])
def test_image_proj_loads_strictly_in_diffusers_converter(kind):
    unet = tiny_sdxl_pipeline().unet
    embed = TINY_VIT_BIGG.projection_dim if kind == "basic" else TINY_VIT_H.hidden_size
    state = fabricate_ip_adapter_state(unet, embed, kind)
    # low_cpu_mem_usage=False makes diffusers call load_state_dict(strict=True).
    projection = unet._convert_ip_adapter_image_proj_to_diffusers(
        state["image_proj"], low_cpu_mem_usage=False
    )
    assert type(projection).__name__ == (
        "ImageProjection" if kind == "basic" else "IPAdapterPlusImageProjection"
    )
    total = sum(t.numel() for t in state["image_proj"].values())
    assert sum(p.numel() for p in projection.parameters()) == total
    if kind == "basic":
        tokens = projection(torch.randn(2, embed))
        assert tokens.shape == (2, 4, 96)
    else:
        tokens = projection(torch.randn(2, TINY_VIT_H.tokens, embed))
        assert tokens.shape == (2, 16, 96)
        to_kv = state["image_proj"]["layers.1.0.to_kv.weight"]
        assert torch.equal(projection.layers[1].attn.to_k.weight, to_kv[:128])
        assert torch.equal(projection.layers[1].attn.to_v.weight, to_kv[128:])


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def checkpoint_set(request, tmp_path_factory):
    arch = request.param
    files = tiny_checkpoint_files(tmp_path_factory.mktemp(f"ckpt_{arch}"), BUILDERS[arch]())
    return arch, files


def test_checkpoint_set_layout(checkpoint_set):
    arch, files = checkpoint_set
    assert files.arch == arch
    for name in FILES:
        assert getattr(files, name).is_file(), name
    assert (files.basic_image_encoder / "config.json").is_file()
    assert (files.plus_image_encoder / "config.json").is_file()
    states = files.states
    # MIP checkpoints keep h94's image projection and add text_to_weight.
    for kind in ("basic", "plus"):
        mip, h94 = states[f"mip_{kind}"], states[kind]
        assert all(torch.equal(mip["image_proj"][k], v) for k, v in h94["image_proj"].items())
        assert set(mip["ip_adapter"]) - set(h94["ip_adapter"]) == {
            key.replace("to_k_ip", "text_to_weight") for key in h94["ip_adapter"] if "to_k_ip" in key
        }


def test_bin_files_load_with_weights_only(checkpoint_set):
    _, files = checkpoint_set
    for name, key in (("basic_bin", "basic"), ("plus_bin", "plus"), ("mip_basic_bin", "mip_basic")):
        loaded = torch.load(getattr(files, name), weights_only=True, map_location="cpu")
        assert set(loaded) == {"image_proj", "ip_adapter"}
        expected = files.states[key]
        for group in ("image_proj", "ip_adapter"):
            assert list(loaded[group]) == list(expected[group])
            for k, tensor in loaded[group].items():
                assert tensor.dtype == torch.float16 and torch.equal(tensor, expected[group][k])


def test_safetensors_keys_are_flat_and_prefixed(checkpoint_set):
    _, files = checkpoint_set
    with safe_open(files.basic_safetensors, framework="pt") as handle:
        keys = set(handle.keys())
        flat = flatten_state(files.states["basic"])
        assert keys == set(flat)
        assert all(k.startswith(("image_proj.", "ip_adapter.")) for k in keys)
        assert "image_proj.proj.weight" in keys and "ip_adapter.1.to_k_ip.weight" in keys
        assert all(torch.equal(handle.get_tensor(k), flat[k]) for k in keys)


def test_save_checkpoint_round_trips_float32(tmp_path):
    unet = tiny_sd15_pipeline().unet
    state = fabricate_ip_adapter_state(unet, 24, "basic", text_weight=True)
    loaded = torch.load(save_checkpoint(state, tmp_path / "a.bin"), weights_only=True)
    assert all(torch.equal(loaded["ip_adapter"][k], v) for k, v in state["ip_adapter"].items())
    with safe_open(save_checkpoint(state, tmp_path / "a.safetensors", dtype=torch.float16), "pt") as handle:
        assert handle.get_tensor("ip_adapter.1.to_k_ip.weight").dtype == torch.float16
    with pytest.raises(ValueError, match=r"\.bin or \.safetensors"):
        save_checkpoint(state, tmp_path / "a.pt")


@pytest.mark.parametrize("name", FILES)
def test_files_load_through_diffusers(checkpoint_set, name):
    arch, files = checkpoint_set
    pipe = BUILDERS[arch]()
    plain = _generate(pipe)
    pipe.load_ip_adapter(**files.load_ip_adapter_kwargs(name))
    encoder = pipe.image_encoder.config
    expected_encoder = SPECS[arch].plus_image_encoder if "plus" in name else SPECS[arch].basic_image_encoder
    assert (encoder.projection_dim, encoder.hidden_size) == (
        expected_encoder.projection_dim,
        expected_encoder.hidden_size,
    )
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())

    # diffusers put the file's k-th weights into the k-th processor (and ignored text_to_weight).
    state = files.states[name.removesuffix("_bin").removesuffix("_safetensors")]
    processors = pipe.unet.attn_processors
    for k, processor_name, _channels, _cross in cross_attention_layers(pipe.unet):
        processor = processors[processor_name]
        expected = state["ip_adapter"][f"{k}.to_k_ip.weight"].float()
        assert torch.equal(processor.to_k_ip[0].weight, expected)

    pipe.set_ip_adapter_scale(1.0)
    reference = Image.new("RGB", (40, 40), (30, 200, 90))
    image = _generate(pipe, ip_adapter_image=reference)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert not np.array_equal(image, plain)
