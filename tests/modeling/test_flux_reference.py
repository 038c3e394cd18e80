"""The FLUX loop reference (``flux_reference``) against diffusers' own FLUX attention on the tiny transformer.

What the reference computes by hand must be what diffusers computes inside the joint attention: the
rotary table, the image queries and the text keys after RoPE (captured at ``dispatch_attention_fn``), and
each reference image's attention term (``FluxIPAdapterAttnProcessor``'s third output, captured at the
block's attention module), on random inputs, square and non-square latents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.models.transformers import transformer_flux
from flux_reference import (
    flux_ids,
    image_attention,
    image_queries,
    merge,
    np64,
    relevance,
    rotary_table,
    rotate_rows,
    text_keys,
)

from mipadapter.testing.flux import TINY_FLUX, tiny_flux_ip_files, tiny_flux_pipeline

GRIDS = [(4, 4), (3, 5)]  # packed latent grids (a 64x64 and a 48x80 image)
TEXT_TOKENS = 7
BATCH = 2


def _inputs(grid: tuple[int, int], seed: int = 0, embeds: list[torch.Tensor] | None = None) -> dict:
    """Random inputs of one transformer call (what FluxPipeline passes at one step)."""
    gen = torch.Generator().manual_seed(seed)
    positions = grid[0] * grid[1]
    kwargs = {
        "hidden_states": torch.randn(BATCH, positions, TINY_FLUX.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(BATCH, TEXT_TOKENS, TINY_FLUX.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(BATCH, TINY_FLUX.pooled_projection_dim, generator=gen),
        "timestep": torch.rand(BATCH, generator=gen),
        "guidance": torch.full((BATCH,), 3.5),
        "img_ids": FluxPipeline._prepare_latent_image_ids(BATCH, *grid, "cpu", torch.float32),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "return_dict": False,
    }
    if embeds is not None:
        kwargs["joint_attention_kwargs"] = {"ip_adapter_image_embeds": embeds}
    return kwargs


class Capture:
    """Per double-stream block: its inputs, and the first ``dispatch_attention_fn`` call inside it (the joint
    attention: post-RoPE query and key, text rows first), and its attention module's kwargs and outputs."""

    def __init__(self, transformer, monkeypatch) -> None:
        self.blocks: dict[int, dict] = {}
        self.current: int | None = None
        original = transformer_flux.dispatch_attention_fn

        def dispatch(query, key, value, *args, **kwargs):
            record = self.blocks.get(self.current)
            if record is not None and "query" not in record:
                record["query"], record["key"] = query.detach().clone(), key.detach().clone()
            return original(query, key, value, *args, **kwargs)

        monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", dispatch)
        self.handles = []
        for index, block in enumerate(transformer.transformer_blocks):
            self.handles.append(block.register_forward_pre_hook(self._enter(index), with_kwargs=True))
            self.handles.append(block.attn.register_forward_hook(self._attention(index), with_kwargs=True))
        for block in transformer.single_transformer_blocks:
            self.handles.append(block.register_forward_pre_hook(self._enter(None), with_kwargs=True))

    def _enter(self, index):
        def hook(module, args, kwargs):
            self.current = index
            if index is not None:
                self.blocks[index] = {"inputs": dict(kwargs)}

        return hook

    def _attention(self, index):
        def hook(module, args, kwargs, output):
            self.blocks[index]["attn_kwargs"], self.blocks[index]["attn_output"] = dict(kwargs), output

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _run(pipe, monkeypatch, grid, seed=0, embeds=None) -> Capture:
    capture = Capture(pipe.transformer, monkeypatch)
    try:
        with torch.no_grad():
            pipe.transformer(**_inputs(grid, seed, embeds))
    finally:
        capture.remove()
    return capture


def _close(ours: np.ndarray, theirs: torch.Tensor, what: str) -> None:
    theirs = np64(theirs)
    assert ours.shape == theirs.shape, what
    scale = np.abs(theirs).max()
    assert scale > 1e-3, what  # not a comparison of zeros
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5 * scale, err_msg=what)


@pytest.fixture(scope="module")
def ip_files(tmp_path_factory):
    return tiny_flux_ip_files(tmp_path_factory.mktemp("flux_ip"), seed=11, std=0.3)


def _with_adapters(files, count: int):
    pipe = tiny_flux_pipeline()
    pipe.load_ip_adapter([str(files.folder)] * count, weight_name=[files.weight_name] * count,
                         image_encoder_pretrained_model_name_or_path=None)
    return pipe


def _embeds(count: int, images: int = 1, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, images, TINY_FLUX.image_encoder.projection_dim, generator=gen) for _ in range(count)]


# --- positions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS)
def test_rotary_table_and_ids_match_diffusers(grid):
    text_ids, image_ids = flux_ids(TEXT_TOKENS, grid)
    np.testing.assert_array_equal(image_ids, np64(FluxPipeline._prepare_latent_image_ids(1, *grid, "cpu", torch.float32)))
    ids = np.concatenate([text_ids, image_ids])
    cos, sin = rotary_table(ids, TINY_FLUX.axes_dims_rope)
    their_cos, their_sin = tiny_flux_pipeline().transformer.pos_embed(torch.from_numpy(ids).float())
    np.testing.assert_allclose(cos, np64(their_cos), atol=1e-6)
    np.testing.assert_allclose(sin, np64(their_sin), atol=1e-6)
    # FLUX.1 puts every text token at position 0: RoPE leaves text keys as they are
    assert np.all(cos[:TEXT_TOKENS] == 1.0) and np.all(sin[:TEXT_TOKENS] == 0.0)


# --- the joint attention's queries and keys -----------------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS)
def test_queries_and_text_keys_are_the_joint_attentions(grid, monkeypatch):
    pipe = tiny_flux_pipeline(seed=2)
    capture = _run(pipe, monkeypatch, grid, seed=3)
    positions = grid[0] * grid[1]
    cos, sin = rotary_table(np.concatenate(flux_ids(TEXT_TOKENS, grid)), TINY_FLUX.axes_dims_rope)
    assert sorted(capture.blocks) == list(range(TINY_FLUX.num_layers))
    for index, block in enumerate(pipe.transformer.transformer_blocks):
        record = capture.blocks[index]
        inputs = record["inputs"]
        temb = inputs["temb"]
        queries = rotate_rows(image_queries(block, inputs["hidden_states"], temb), cos, sin,
                              range(TEXT_TOKENS, TEXT_TOKENS + positions))
        keys = rotate_rows(text_keys(block, inputs["encoder_hidden_states"], temb), cos, sin, range(TEXT_TOKENS))
        # diffusers' joint attention: [b, s + p, h, d], text rows first
        assert record["query"].shape == (BATCH, TEXT_TOKENS + positions, TINY_FLUX.num_attention_heads,
                                         TINY_FLUX.attention_head_dim)
        _close(queries, record["query"][:, TEXT_TOKENS:], f"block {index} image queries")
        _close(keys, record["key"][:, :TEXT_TOKENS], f"block {index} text keys")


# --- relevance ----------------------------------------------------------------------------------------


def _random_qk(seed: int, positions: int = 15, heads: int = 2, d: int = 8, tokens: int = 3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(BATCH, positions, heads, d)), rng.normal(size=(BATCH, tokens, heads, d))


def test_relevance_is_a_distribution_over_positions_averaged_over_heads_and_name_tokens():
    queries, keys = _random_qk(0)
    mask = [[True, True, False], [True, False, False]]
    maps = relevance(queries, keys, mask)
    np.testing.assert_allclose(maps.sum(axis=1), 1.0, atol=1e-12)
    # the same with a formula written another way: per token and head, softmax over p, then the masked mean
    logits = np.einsum("bmhd,bphd->bhmp", keys, queries) / np.sqrt(queries.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    weights = np.array(mask, dtype=float)
    expected = np.einsum("bhmp,bm->bp", probs, weights) / (probs.shape[1] * weights.sum(1, keepdims=True))
    np.testing.assert_allclose(maps, expected, atol=1e-12)
    # tokens outside the name change nothing
    other = keys.copy()
    other[:, 2] = 100.0
    np.testing.assert_array_equal(relevance(queries, other, mask), maps)


@pytest.mark.parametrize("grid", GRIDS)
def test_name_relevance_in_the_tiny_flux_prefers_where_the_name_points(grid, monkeypatch):
    """A name key equal to the (rotated) query of one position makes that position the most relevant."""
    pipe = tiny_flux_pipeline(seed=4)
    capture = _run(pipe, monkeypatch, grid, seed=6)
    block = pipe.transformer.transformer_blocks[1]
    inputs = capture.blocks[1]["inputs"]
    positions = grid[0] * grid[1]
    cos, sin = rotary_table(np.concatenate(flux_ids(TEXT_TOKENS, grid)), TINY_FLUX.axes_dims_rope)
    queries = rotate_rows(image_queries(block, inputs["hidden_states"], inputs["temb"]), cos, sin,
                          range(TEXT_TOKENS, TEXT_TOKENS + positions))
    target = positions - 2
    names = 4.0 * queries[:, target : target + 1] / np.linalg.norm(queries[:, target : target + 1], axis=-1,
                                                                     keepdims=True)
    maps = relevance(queries, names, [[True]] * BATCH)
    assert maps.shape == (BATCH, positions)
    assert (maps.argmax(axis=1) == target).all()
    np.testing.assert_allclose(maps.sum(axis=1), 1.0, atol=1e-12)


# --- the image term: diffusers' FluxIPAdapterAttnProcessor ---------------------------------------------


@pytest.mark.parametrize("grid", GRIDS)
def test_one_subject_uniform_is_diffusers_ip_adapter(grid, ip_files, monkeypatch):
    pipe = _with_adapters(ip_files, 1)
    pipe.set_ip_adapter_scale(0.8)
    capture = _run(pipe, monkeypatch, grid, seed=7, embeds=_embeds(1))
    for index, block in enumerate(pipe.transformer.transformer_blocks):
        record = capture.blocks[index]
        processor = block.attn.processor
        tokens = np64(record["attn_kwargs"]["ip_hidden_states"][0][:, 0])  # [b, t, J] of the one image
        queries = image_queries(block, record["inputs"]["hidden_states"], record["inputs"]["temb"])
        z = image_attention(queries, tokens, processor.to_k_ip[0], processor.to_v_ip[0])
        ours = merge("uniform", [z], [np.ones(z.shape[:2])], [0.8])
        _close(ours, record["attn_output"][2], f"block {index} image term")


def test_two_subjects_uniform_is_diffusers_with_two_adapters(ip_files, monkeypatch):
    """diffusers' ``uniform``: one IP-Adapter per reference (the same file loaded twice), each its own softmax."""
    pipe = _with_adapters(ip_files, 2)
    pipe.set_ip_adapter_scale([0.7, 1.3])
    capture = _run(pipe, monkeypatch, (3, 5), seed=8, embeds=_embeds(2))
    block = pipe.transformer.transformer_blocks[2]
    record = capture.blocks[2]
    processor = block.attn.processor
    queries = image_queries(block, record["inputs"]["hidden_states"], record["inputs"]["temb"])
    outputs = [image_attention(queries, np64(tokens[:, 0]), processor.to_k_ip[i], processor.to_v_ip[i])
               for i, tokens in enumerate(record["attn_kwargs"]["ip_hidden_states"])]
    ours = merge("uniform", outputs, [np.ones(outputs[0].shape[:2])] * 2, [0.7, 1.3])
    _close(ours, record["attn_output"][2], "two adapters")


def test_several_images_in_one_adapter_share_one_softmax(ip_files, monkeypatch):
    """diffusers with one IP-Adapter and a list of images concatenates their tokens: not ``uniform``."""
    pipe = _with_adapters(ip_files, 1)
    capture = _run(pipe, monkeypatch, (4, 4), seed=9, embeds=_embeds(1, images=2))
    block = pipe.transformer.transformer_blocks[0]
    record = capture.blocks[0]
    processor = block.attn.processor
    tokens = np64(record["attn_kwargs"]["ip_hidden_states"][0])  # [b, 2 images, t, J]
    queries = image_queries(block, record["inputs"]["hidden_states"], record["inputs"]["temb"])
    joint = image_attention(queries, tokens.reshape(BATCH, -1, tokens.shape[-1]), processor.to_k_ip[0],
                            processor.to_v_ip[0])
    _close(joint, record["attn_output"][2], "concatenated tokens")
    separate = [image_attention(queries, tokens[:, i], processor.to_k_ip[0], processor.to_v_ip[0]) for i in range(2)]
    summed = merge("uniform", separate, [np.ones(joint.shape[:2])] * 2, [1.0, 1.0])
    assert np.abs(summed - joint).max() > 1e-2 * np.abs(joint).max()


# --- merges -------------------------------------------------------------------------------------------


def test_paper_merge_weights_by_relative_relevance():
    rng = np.random.default_rng(1)
    outputs = [rng.normal(size=(BATCH, 6, 4)) for _ in range(3)]
    flat = [np.full((BATCH, 6), 1 / 6)] * 3
    scales = [0.5, 1.0, 2.0]
    np.testing.assert_allclose(merge("paper", outputs, flat, scales), merge("uniform", outputs, flat, scales))
    maps = [rng.dirichlet(np.ones(6), size=BATCH) for _ in range(3)]
    paper = merge("paper", outputs, maps, scales)
    by_hand = sum(s * (a / a.mean(axis=1, keepdims=True))[..., None] * z
                  for z, a, s in zip(outputs, maps, scales, strict=True))
    np.testing.assert_allclose(paper, by_hand, atol=1e-12)
    np.testing.assert_allclose(merge("paper", outputs, [4.0 * a for a in maps], scales), paper, atol=1e-12)
    order = [2, 0, 1]  # the subjects' order does not matter
    np.testing.assert_allclose(merge("paper", [outputs[i] for i in order], [maps[i] for i in order],
                                     [scales[i] for i in order]), paper, atol=1e-12)
    with pytest.raises(ValueError, match="not 'official'"):
        merge("official", outputs, maps, scales)
