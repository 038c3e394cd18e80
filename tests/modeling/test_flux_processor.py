"""``MIPFluxAttnProcessor`` on the tiny FLUX transformer against the float64 loop reference (docs/flux.md).

One double-stream block, random inputs: the routed image term equals the reference's merge of each
condition's image attention (queries before RoPE, as diffusers' FLUX IP-Adapter), weighted under ``paper``
by the relevance of the names (keys from the block's own text path, against the queries after RoPE);
the joint attention's outputs equal diffusers' ``FluxAttnProcessor``'s.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from flux_reference import (
    flux_ids,
    image_attention,
    name_keys_unmodulated,
    np64,
    relevance,
    rotary_table,
    rotate_rows,
)

from mipadapter.modeling import SubjectConditioning
from mipadapter.testing.flux import TINY_FLUX, tiny_flux_pipeline
from mipadapter.testing.mip import tiny_flux_adapter

BATCH, TEXT_TOKENS, IMAGE_TOKENS, NAME_TOKENS = 2, 5, 4, 3
GRIDS = {"square": (4, 4), "non_square": (3, 5)}


@pytest.fixture(scope="module")
def flux():
    pipe = tiny_flux_pipeline()
    adapter = tiny_flux_adapter(pipe.transformer, TINY_FLUX.image_encoder.projection_dim, seed=3)
    adapter.attach(pipe.transformer)
    return pipe.transformer, adapter


def conditioning(n: int, photos: str, rule: str, grid, seed: int) -> SubjectConditioning:
    g = torch.Generator().manual_seed(seed)
    counts = [1] * n if photos == "one" else [1 + (i + 1) % 3 for i in range(n)]
    owner = torch.tensor([i for i, k in enumerate(counts) for _ in range(k)])
    share = torch.tensor([1.0 / k for k in counts for _ in range(k)])
    lengths = torch.randint(1, NAME_TOKENS + 1, (BATCH, n), generator=g)
    return SubjectConditioning(
        image_tokens=torch.randn(BATCH, len(owner), IMAGE_TOKENS, TINY_FLUX.joint_attention_dim, generator=g),
        owner=owner,
        share=share,
        scales=torch.rand(BATCH, n, generator=g) + 0.3,
        name_embeds=torch.randn(BATCH, n, NAME_TOKENS, TINY_FLUX.joint_attention_dim, generator=g),
        name_mask=torch.arange(NAME_TOKENS)[None, None] < lengths[..., None],
        rule=rule,
        use_text_weight=False,
        latent_size=grid,
    )


def block_inputs(grid, seed: int):
    g = torch.Generator().manual_seed(seed)
    positions = grid[0] * grid[1]
    hidden = torch.randn(BATCH, positions, TINY_FLUX.inner_dim, generator=g)
    context = torch.randn(BATCH, TEXT_TOKENS, TINY_FLUX.inner_dim, generator=g)
    text_ids, image_ids = flux_ids(TEXT_TOKENS, grid)
    ids = torch.from_numpy(np.concatenate([text_ids, image_ids])).float()
    return hidden, context, ids


def reference(transformer, block, cond: SubjectConditioning, hidden, context, ids) -> np.ndarray:
    """The routed term [b, p, C], written out: per condition its image attention, weighted by the rule."""
    attn = block.attn
    cos, sin = rotary_table(ids.numpy(), TINY_FLUX.axes_dims_rope)
    from flux_reference import _heads  # the reference's Linear → heads → RMSNorm

    weight, bias = np64(attn.to_q.weight), np64(attn.to_q.bias)
    queries = np.stack([_heads(rows, weight, bias, attn.norm_q, attn.heads) for rows in np64(hidden)])  # [b,p,h,d]
    rotated = rotate_rows(queries, cos, sin, list(range(TEXT_TOKENS, TEXT_TOKENS + queries.shape[1])))
    name_cos, name_sin = rotary_table(np.zeros((NAME_TOKENS, 3)), TINY_FLUX.axes_dims_rope)
    processor = transformer.attn_processors["transformer_blocks.0.attn.processor"]
    n = cond.scales.shape[1]
    maps = []
    for i in range(n):
        with torch.no_grad():
            rows = transformer.context_embedder(cond.name_embeds[:, i])  # [b, m, C]
        keys = rotate_rows(name_keys_unmodulated(block, rows), name_cos, name_sin, list(range(NAME_TOKENS)))
        maps.append(relevance(rotated, keys, cond.name_mask[:, i].tolist()))  # [b, p]
    out = np.zeros((BATCH, queries.shape[1], TINY_FLUX.inner_dim))
    for c, (subject, part) in enumerate(zip(cond.owner.tolist(), cond.share.tolist(), strict=True)):
        z = image_attention(queries, np64(cond.image_tokens[:, c]), processor.to_k_ip, processor.to_v_ip)
        for b in range(BATCH):
            a = maps[subject][b]
            weight = np.ones_like(a) if cond.rule.value == "uniform" else a / a.mean()
            out[b] += float(cond.scales[b, subject]) * part * weight[:, None] * z[b]
    return out


@pytest.mark.parametrize("shape", GRIDS)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("photos", ["one", "several"])
@pytest.mark.parametrize("rule", ["uniform", "paper"])
def test_routed_term_matches_the_loop_reference(flux, rule, photos, n, shape):
    transformer, adapter = flux
    grid = GRIDS[shape]
    block = transformer.transformer_blocks[0]
    cond = conditioning(n, photos, rule, grid, seed=n + len(shape))
    adapter.prepare(cond)
    hidden, context, ids = block_inputs(grid, seed=n)
    rotary = transformer.pos_embed(ids)
    with torch.no_grad():
        image, text, routed = block.attn(hidden, context, image_rotary_emb=rotary, ip_hidden_states=cond)
        plain_image, plain_text = FluxAttnProcessor()(block.attn, hidden, context, None, rotary)
    expected = reference(transformer, block, cond, hidden, context, ids)
    assert routed.shape == expected.shape
    error = float(np.linalg.norm(np64(routed) - expected) / np.linalg.norm(expected))
    assert error <= 1e-5, error
    torch.testing.assert_close(image, plain_image, rtol=1e-6, atol=1e-6)  # the joint attention is diffusers'
    torch.testing.assert_close(text, plain_text, rtol=1e-6, atol=1e-6)


def test_without_conditioning_the_block_is_diffusers(flux):
    transformer, _ = flux
    block = transformer.transformer_blocks[1]
    hidden, context, ids = block_inputs((4, 4), seed=9)
    rotary = transformer.pos_embed(ids)
    with torch.no_grad():
        ours = block.attn(hidden, context, image_rotary_emb=rotary)
        theirs = FluxAttnProcessor()(block.attn, hidden, context, None, rotary)
    assert len(ours) == 2
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_flux_adapter_has_no_text_weight_and_single_blocks_keep_theirs(flux):
    transformer, adapter = flux
    processors = transformer.attn_processors
    assert {type(p).__name__ for key, p in processors.items() if key.startswith("single_")} == {"FluxAttnProcessor"}
    assert len(adapter.layer_specs) == TINY_FLUX.num_layers
    cond = conditioning(2, "one", "official", (4, 4), seed=1)
    cond.use_text_weight = True
    adapter.prepare(cond)
    block = transformer.transformer_blocks[0]
    hidden, context, ids = block_inputs((4, 4), seed=2)
    with pytest.raises(ValueError, match="no text_to_weight"):
        block.attn(hidden, context, image_rotary_emb=transformer.pos_embed(ids), ip_hidden_states=cond)


def test_a_new_processor_records_its_sizes_and_is_diffusers_without_conditioning(flux):
    """A processor made here (not by the fixture) with its defaults: the sizes it was given, no layer
    name, diagnosing; XLabs' projections with biases; without a conditioning diffusers' processor."""
    from mipadapter.modeling.flux import MIPFluxAttnProcessor

    transformer, _ = flux
    processor = MIPFluxAttnProcessor(TINY_FLUX.inner_dim, TINY_FLUX.joint_attention_dim)
    assert processor.hidden_size == TINY_FLUX.inner_dim
    assert processor.cross_attention_dim == TINY_FLUX.joint_attention_dim
    assert processor.layer_name == "" and processor.diagnose is True
    assert processor.to_k_ip.bias is not None and processor.to_v_ip.bias is not None
    block = transformer.transformer_blocks[0]
    hidden, context, ids = block_inputs((3, 5), seed=4)
    rotary = transformer.pos_embed(ids)
    with torch.no_grad():
        ours = processor(block.attn, hidden, context, None, rotary)
        theirs = FluxAttnProcessor()(block.attn, hidden, context, None, rotary)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_a_float64_transformer_takes_float32_conditioning_at_float64_accuracy():
    """Names and image tokens in float32, the transformer and adapter in float64: the names' rows are
    converted to the transformer's dtype and the routed term comes out in float64, agreeing with the
    float64 loop reference to 1e-6 (diffusers' rotary tables are float32). Fails when the names' rows
    keep their dtype, or when the prepared weights are not in the working dtype."""
    pipe = tiny_flux_pipeline()
    adapter = tiny_flux_adapter(pipe.transformer, TINY_FLUX.image_encoder.projection_dim, seed=3)
    adapter.attach(pipe.transformer)
    transformer = pipe.transformer.double()
    block = transformer.transformer_blocks[0]
    cond = conditioning(2, "several", "paper", (3, 5), seed=6)
    adapter.prepare(cond)
    prepared = cond.layer_inputs["transformer_blocks.0.attn"]  # the per-call constants, in float64
    assert {prepared.ip_keys.dtype, prepared.name_keys.dtype, prepared.name_weights.dtype} == {torch.float64}
    hidden, context, ids = block_inputs((3, 5), seed=6)
    with torch.no_grad():
        _, _, routed = block.attn(
            hidden.double(), context.double(), image_rotary_emb=transformer.pos_embed(ids.double()),
            ip_hidden_states=cond,
        )  # fmt: skip
    assert routed.dtype == torch.float64
    exact = conditioning(2, "several", "paper", (3, 5), seed=6)  # the same, for the float64 reference
    exact.name_embeds, exact.image_tokens = exact.name_embeds.double(), exact.image_tokens.double()
    expected = reference(transformer, block, exact, hidden.double(), context.double(), ids)
    error = float(np.linalg.norm(np64(routed) - expected) / np.linalg.norm(expected))
    assert error <= 1e-6, error


def test_the_conditioning_names_what_it_cannot_place():
    cond = conditioning(1, "one", "paper", None, seed=1)
    with pytest.raises(ValueError) as error:
        cond.grid(16)
    assert str(error.value) == (
        "the conditioning does not know the latent size yet (set latent_size, or run it through "
        "MIPAdapterPipeline, which takes it from the latents)"
    )
    cond = conditioning(1, "one", "paper", (4, 4), seed=1)
    with pytest.raises(ValueError, match=r"^a layer with 15 positions does not fit a latent of \(4, 4\)$"):
        cond.grid(15)


def joint_mask(grid, seed: int) -> torch.Tensor:
    """A boolean attention mask [b, 1, 1, s + p] hiding some text rows (never all of them) from every query."""
    g = torch.Generator().manual_seed(seed)
    text = torch.rand(BATCH, TEXT_TOKENS, generator=g) < 0.5
    text[:, 0] = True
    image = torch.ones(BATCH, grid[0] * grid[1], dtype=torch.bool)
    return torch.cat([text, image], dim=1)[:, None, None, :]


@pytest.mark.parametrize("conditioned", [False, True])
@pytest.mark.parametrize("shape", GRIDS)
def test_the_attention_mask_reaches_the_joint_attention(flux, shape, conditioned):
    """With an attention mask (diffusers passes one for padded T5 prompts), the image and text outputs
    are those of diffusers' ``FluxAttnProcessor`` with that mask, with or without a conditioning in the
    call, and differ from the unmasked ones. Guards the mask dropped on either path."""
    transformer, adapter = flux
    grid = GRIDS[shape]
    block = transformer.transformer_blocks[0]
    hidden, context, ids = block_inputs(grid, seed=11)
    rotary = transformer.pos_embed(ids)
    mask = joint_mask(grid, seed=len(shape))
    extra = {}
    if conditioned:
        extra["ip_hidden_states"] = adapter.prepare(conditioning(2, "several", "paper", grid, seed=12))
    with torch.no_grad():
        ours = block.attn(hidden, context, attention_mask=mask, image_rotary_emb=rotary, **extra)
        theirs = FluxAttnProcessor()(block.attn, hidden, context, mask, rotary)
        unmasked = FluxAttnProcessor()(block.attn, hidden, context, None, rotary)
    assert len(ours) == (3 if conditioned else 2)
    for a, b, c in zip(ours[:2], theirs, unmasked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(a, c, atol=1e-4)  # the mask matters here


def test_misuse_of_the_block_is_refused_with_one_line(flux):
    """Something else than a SubjectConditioning as ``ip_hidden_states``, and a call without a text
    stream (a single-stream block's): one line each, naming the processor."""
    transformer, adapter = flux
    block = transformer.transformer_blocks[0]
    hidden, context, ids = block_inputs((4, 4), seed=13)
    rotary = transformer.pos_embed(ids)
    message = r"^MIPFluxAttnProcessor takes a SubjectConditioning as ip_hidden_states, got Tensor$"
    with pytest.raises(TypeError, match=message):
        block.attn(hidden, context, image_rotary_emb=rotary, ip_hidden_states=torch.zeros(BATCH, 4, 8))
    cond = adapter.prepare(conditioning(1, "one", "uniform", (4, 4), seed=13))
    message = r"^MIPFluxAttnProcessor runs in double-stream blocks, which have a text stream$"
    with pytest.raises(ValueError, match=message):
        block.attn.processor(block.attn, hidden, None, None, rotary, ip_hidden_states=cond)


def test_a_diagnosing_block_reports_its_shares_and_a_quiet_one_does_not(flux):
    """A FLUX adapter's blocks all diagnose (there is no mid block): one call adds the block's routed
    shares to the conditioning's meter (every condition a positive one). The same block
    with ``diagnose=False`` gives the same outputs and leaves the meter alone. Guards the flag not
    passed on to the routing."""
    from mipadapter.modeling.conditioning import ShareMeter
    from mipadapter.modeling.flux import MIPFluxAttnProcessor

    transformer, adapter = flux
    block = transformer.transformer_blocks[0]
    hidden, context, ids = block_inputs((3, 5), seed=14)
    rotary = transformer.pos_embed(ids)
    cond = adapter.prepare(conditioning(3, "several", "paper", (3, 5), seed=14))
    assert block.attn.processor.diagnose is True
    cond.share_meter = ShareMeter(BATCH, cond.num_conditions, torch.device("cpu"))
    with torch.no_grad():
        reported = block.attn(hidden, context, image_rotary_emb=rotary, ip_hidden_states=cond)
    assert (cond.share_meter.sums > 0).all()  # every condition gets a share of the image
    quiet = MIPFluxAttnProcessor(
        TINY_FLUX.inner_dim, TINY_FLUX.joint_attention_dim, block.attn.processor.layer_name, diagnose=False
    )
    quiet.load_state_dict(block.attn.processor.state_dict())
    cond.share_meter = ShareMeter(BATCH, cond.num_conditions, torch.device("cpu"))
    with torch.no_grad():
        silent = quiet(block.attn, hidden, context, None, rotary, ip_hidden_states=cond)
    assert not cond.share_meter.sums.any()
    for a, b in zip(reported, silent, strict=True):
        assert torch.equal(a, b)


def test_a_text_perturbation_is_refused_on_a_flux_block(flux):
    """FLUX adds the routed image term to its image stream itself: there is no text branch to perturb."""
    transformer, adapter = flux
    block = transformer.transformer_blocks[0]
    hidden, context, ids = block_inputs((3, 5), seed=15)
    cond = adapter.prepare(conditioning(2, "one", "paper", (3, 5), seed=15))
    cond.text_perturbation = lambda base, relevance: base
    with pytest.raises(ValueError) as refused, torch.no_grad():
        block.attn(hidden, context, image_rotary_emb=transformer.pos_embed(ids), ip_hidden_states=cond)
    assert str(refused.value) == f"layer {block.attn.processor.layer_name!r} has no text branch to perturb"


def test_a_bfloat16_transformer_gets_its_routed_term_in_bfloat16():
    """A bfloat16 transformer and adapter run the conditioned block in bfloat16 end to end (the routing
    maps are made in float32, ``ops.working_dtype``): all three outputs are bfloat16 and agree with the
    float32 model's to bfloat16 accuracy. Guards a float32 routed term leaking out to meet the bfloat16
    image stream."""
    pipe = tiny_flux_pipeline()
    adapter = tiny_flux_adapter(pipe.transformer, TINY_FLUX.image_encoder.projection_dim, seed=3)
    adapter.attach(pipe.transformer)
    block = pipe.transformer.transformer_blocks[0]
    hidden, context, ids = block_inputs((3, 5), seed=15)
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe.transformer.to(dtype)
        adapter.to(dtype)
        cond = adapter.prepare(conditioning(2, "several", "paper", (3, 5), seed=15))
        with torch.no_grad():
            outputs[dtype] = block.attn(
                hidden.to(dtype), context.to(dtype), image_rotary_emb=pipe.transformer.pos_embed(ids),
                ip_hidden_states=cond,
            )  # fmt: skip
    assert [t.dtype for t in outputs[torch.bfloat16]] == [torch.bfloat16] * 3
    for low, full in zip(outputs[torch.bfloat16], outputs[torch.float32], strict=True):
        torch.testing.assert_close(low.float(), full, rtol=0.05, atol=0.05)


def test_a_block_routes_with_its_own_layer_scales():
    """A subject's per-block image scale (``layer_scales`` under the block's layer name) is what the block
    uses: the routed term equals that of a conditioning whose plain scales are those, and differs from
    the plain scales' own (guards the block's layer name reaching the image values)."""
    from test_processor import fields_of

    transformer = tiny_flux_pipeline().transformer  # its own: the layer names are read, nothing shared
    adapter = tiny_flux_adapter(transformer, TINY_FLUX.image_encoder.projection_dim, seed=3)
    adapter.attach(transformer)
    block = transformer.transformer_blocks[0]
    name = block.attn.processor.layer_name
    grid = GRIDS["non_square"]
    hidden, context, ids = block_inputs(grid, seed=2)
    rotary = transformer.pos_embed(ids)
    base = conditioning(2, "one", "uniform", grid, seed=7)
    own = base.scales * torch.tensor([0.25, 1.75])
    routed = {}
    for label, changes in {"layer": {"layer_scales": {name: own}}, "plain": {"scales": own}, "base": {}}.items():
        cond = SubjectConditioning(**(fields_of(base) | changes))
        adapter.prepare(cond)
        with torch.no_grad():
            routed[label] = block.attn(hidden, context, image_rotary_emb=rotary, ip_hidden_states=cond)[2]
    torch.testing.assert_close(routed["layer"], routed["plain"], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(routed["layer"], routed["base"], atol=1e-4)


def test_the_names_rows_and_their_rotary_table_are_made_where_the_transformer_is():
    """Guards name_rows' device: the rotary table of the names' positions is built on the rows' device
    (the meta device standing in for a GPU; built on the CPU it would meet the GPU keys)."""
    from mipadapter.modeling.flux import name_rows

    transformer = tiny_flux_pipeline().transformer.to("meta")
    cond = conditioning(2, "one", "uniform", GRIDS["square"], seed=1)
    cond.name_embeds = cond.name_embeds.to("meta")
    rows, (cos, sin) = name_rows(transformer, cond)
    assert rows.device.type == cos.device.type == sin.device.type == "meta"
    assert rows.shape[:3] == cond.name_embeds.shape[:3] and cos.shape[0] == cond.name_embeds.shape[2]
