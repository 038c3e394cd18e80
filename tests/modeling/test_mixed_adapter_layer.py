"""A call mixing adapters (issue 21) on one real cross-attention layer against a float64 loop reference.

Two adapters of one UNet with different projections: adapter A (4 image tokens) and adapter B (16), their
conditions zero-padded to 16 in one ``SubjectConditioning`` (``adapter_of`` / ``token_counts``), prepared
by ``MIPAdapter.prepare(cond, [A, B])``. The reference sums the conditions one by one, each attended with
its own adapter's ``to_k_ip``/``to_v_ip`` over its own real tokens, and under ``official`` gated by its own
adapter's text weight.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_processor import attend, fields_of, np64, rel_err, softmax

from mipadapter.config import AdapterConfig
from mipadapter.modeling import MIPAdapter, SubjectConditioning
from mipadapter.modeling.conditioning import RelevanceRecorder
from mipadapter.testing import TINY_SD15, tiny_sd15_pipeline

COUNTS = (4, 16)  # basic and Plus token counts
OWNER = [0, 1, 1, 2]  # subject 1 has two photos routed separately
ADAPTER_OF = [0, 1, 1, 0]  # subjects 0 and 2 on adapter A, subject 1 on adapter B
SHARE = [1.0, 0.5, 0.5, 1.0]
NAME_TOKENS, TEXT_TOKENS, BATCH = 2, 5, 2
LATENT = (4, 6)  # the layer under test runs at the latent size: 24 positions


def random_adapter(unet, tokens: int, seed: int) -> MIPAdapter:
    config = AdapterConfig("basic", TINY_SD15.basic_image_encoder.projection_dim, TINY_SD15.cross_attention_dim,
                           tokens, text_weight=True)  # fmt: skip
    adapter = MIPAdapter.for_unet(unet, config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for processor in adapter.processors().values():  # large enough that every term matters
            for param in processor.parameters():
                torch.nn.init.normal_(param, std=0.3)
    return adapter


@pytest.fixture(scope="module")
def mixed():
    """(unet, adapter A attached, adapter B, the layer's attention, its name) on a tiny SD1.5 UNet."""
    unet = tiny_sd15_pipeline().unet
    first, second = random_adapter(unet, COUNTS[0], seed=1), random_adapter(unet, COUNTS[1], seed=2)
    first.attach(unet)
    layer = first.layer_specs[0].name
    return unet, first, second, unet.get_submodule(layer), layer


def conditioning(
    rule: str, text_weight: bool, seed: int = 0, adapter_of=ADAPTER_OF, **extra
) -> SubjectConditioning:
    """Three subjects, four conditions on the adapters ``adapter_of`` names; each condition's tokens past
    its adapter's count are zero."""
    g = torch.Generator().manual_seed(seed)
    t, cross = max(COUNTS), TINY_SD15.cross_attention_dim
    tokens = torch.randn(BATCH, len(OWNER), t, cross, generator=g)
    for c, adapter in enumerate(adapter_of):
        tokens[:, c, COUNTS[adapter] :] = 0.0
    lengths = torch.randint(1, NAME_TOKENS + 1, (BATCH, 3), generator=g)
    return SubjectConditioning(
        image_tokens=tokens,
        owner=torch.tensor(OWNER),
        share=torch.tensor(SHARE),
        scales=torch.rand(BATCH, 3, generator=g) + 0.3,
        name_embeds=torch.randn(BATCH, 3, NAME_TOKENS, cross, generator=g) * 2,
        name_mask=torch.arange(NAME_TOKENS)[None, None] < lengths[..., None],
        rule=rule,
        use_text_weight=text_weight,
        latent_size=LATENT,
        adapter_of=torch.tensor(adapter_of),
        token_counts=COUNTS,
        **extra,
    )


def layer_inputs(attn, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, LATENT[0] * LATENT[1], attn.to_q.in_features, generator=g)
    return hidden, torch.randn(BATCH, TEXT_TOKENS, TINY_SD15.cross_attention_dim, generator=g)


def reference(attn, processors, hidden, text, cond: SubjectConditioning) -> np.ndarray:
    """The layer in float64, condition by condition: processors[a] are adapter a's for this layer."""
    heads, rule = attn.heads, cond.rule.value
    wq, wk, wv = np64(attn.to_q.weight), np64(attn.to_k.weight), np64(attn.to_v.weight)
    wo, bo = np64(attn.to_out[0].weight), np64(attn.to_out[0].bias)
    x, e = np64(hidden), np64(text)
    b, p, c = x.shape[0], x.shape[1], wq.shape[0]
    d = c // heads
    n = cond.scales.shape[1]
    out = np.zeros((b, p, c))
    for bi in range(b):
        q, k, v = x[bi] @ wq.T, e[bi] @ wk.T, e[bi] @ wv.T
        z_text = np.concatenate([attend(q, k, v, hh, d) for hh in range(heads)], axis=1)  # [p, c]
        relevance = np.zeros((n, p))
        names, mask = np64(cond.name_embeds[bi]), cond.name_mask[bi].numpy()
        for i in range(n):
            rows = [names[i, j] @ wk.T for j in range(NAME_TOKENS) if mask[i, j]]
            for key in rows:
                for hh in range(heads):
                    cols = slice(hh * d, (hh + 1) * d)
                    relevance[i] += softmax([float(np.dot(key[cols], q[pos, cols])) / math.sqrt(d) for pos in range(p)])
            relevance[i] /= len(rows) * heads
        gates = []  # each adapter's normalised text gate g_a [p]
        for proc in processors:
            f = 1 / (1 + np.exp(-(z_text @ np64(proc.text_to_weight.weight)[0])))
            gates.append(f / f.mean() if cond.use_text_weight else np.ones(p))
        merged = z_text.copy()
        scales = np64(cond.scales[bi])
        adapters = cond.adapter_of.tolist()
        for cnd, (owner, adapter, share) in enumerate(zip(OWNER, adapters, SHARE, strict=True)):
            proc = processors[adapter]
            real = np64(cond.image_tokens[bi, cnd, : COUNTS[adapter]])  # its own tokens, no padding
            k_ip, v_ip = real @ np64(proc.to_k_ip.weight).T, real @ np64(proc.to_v_ip.weight).T
            z_img = np.concatenate([attend(q, k_ip, v_ip, hh, d) for hh in range(heads)], axis=1)
            for pos in range(p):
                if rule == "uniform":
                    weight = 1.0
                elif rule == "paper":
                    weight = relevance[owner, pos] / relevance[owner].mean()
                else:
                    weight = relevance[owner, pos] / relevance[:, pos].sum() * gates[adapter][pos]
                merged[pos] += scales[owner] * share * weight * z_img[pos]
        out[bi] = merged @ wo.T + bo
    return out


@pytest.mark.parametrize(
    "rule, text_weight", [("uniform", False), ("paper", False), ("official", False), ("official", True)]
)
def test_a_mixed_call_is_the_sum_of_each_condition_through_its_own_adapter(rule, text_weight, mixed):
    """Fails when a condition is projected by the other adapter's to_k_ip/to_v_ip, when padding tokens are
    attended to, or (official with text weights) when a condition is gated by the other adapter's g."""
    unet, first, second, attn, layer = mixed
    cond = first.prepare(conditioning(rule, text_weight), [first, second])
    hidden, text = layer_inputs(attn)
    with torch.no_grad():
        out = attn(hidden, text, ip_hidden_states=cond)
    processors = [first.processor(layer), second.processor(layer)]
    expected = reference(attn, processors, hidden, text, cond)
    assert rel_err(out, expected) <= 1e-5
    # the same tokens all through adapter A's projections are a clearly different layer output
    swapped = first.prepare(conditioning(rule, text_weight), [first, first])
    with torch.no_grad():
        assert rel_err(attn(hidden, text, ip_hidden_states=swapped), expected) > 1e-3


@pytest.mark.parametrize("adapter_of", [[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], ids=["one-on-A", "A-unused", "B-unused"])
def test_a_mixed_call_with_an_adapter_holding_one_condition_or_none_is_the_same_sum(adapter_of, mixed):
    """The sum of each condition through its own adapter when one adapter holds a single condition, or
    none (loaded, given as a source, used by no subject of this call, before or after the used one).
    Fails when an adapter with one condition is skipped, or an unused adapter ends the loop over them."""
    unet, first, second, attn, layer = mixed
    cond = first.prepare(conditioning("paper", False, seed=5, adapter_of=adapter_of), [first, second])
    hidden, text = layer_inputs(attn, seed=6)
    with torch.no_grad():
        out = attn(hidden, text, ip_hidden_states=cond)
    expected = reference(attn, [first.processor(layer), second.processor(layer)], hidden, text, cond)
    assert rel_err(out, expected) <= 1e-5


def test_official_gates_differ_per_adapter(mixed):
    """With each adapter's text weight the mixed official call differs from the ungated one: the gates
    really act (the reference above gates each condition by its own adapter's g)."""
    unet, first, second, attn, _ = mixed
    hidden, text = layer_inputs(attn)
    with torch.no_grad():
        gated = attn(hidden, text, ip_hidden_states=first.prepare(conditioning("official", True), [first, second]))
        plain = attn(hidden, text, ip_hidden_states=first.prepare(conditioning("official", False), [first, second]))
    assert rel_err(gated, np64(plain)) > 1e-3


def test_image_attention_maps_of_a_mixed_call_ignore_padding_tokens(mixed):
    """Each subject's image-attention map averages the softmax over positions of its own adapter's real
    tokens only (by photo shares). A padding token's key is zero, its map flat: counting it flattens the
    maps of adapter A's subjects, which this loop reference catches."""
    unet, first, second, attn, layer = mixed
    recorder = RelevanceRecorder(LATENT, keep_last=BATCH)
    cond = first.prepare(conditioning("uniform", False, seed=4, image_attention=recorder), [first, second])
    hidden, text = layer_inputs(attn, seed=5)
    with torch.no_grad():
        attn(hidden, text, ip_hidden_states=cond)
    heads, d = attn.heads, attn.to_q.out_features // attn.heads
    q = np64(attn.to_q(hidden)).reshape(BATCH, -1, heads, d)  # [b, p, h, d]
    processors = [first.processor(layer), second.processor(layer)]
    expected = np.zeros((BATCH, 3, q.shape[1]))
    for bi in range(BATCH):
        for cnd, (owner, adapter, share) in enumerate(zip(OWNER, ADAPTER_OF, SHARE, strict=True)):
            real = np64(cond.image_tokens[bi, cnd, : COUNTS[adapter]])
            keys = (real @ np64(processors[adapter].to_k_ip.weight).T).reshape(-1, heads, d)
            for hh in range(heads):
                for key in keys[:, hh]:
                    logits = [float(q[bi, pos, hh] @ key) / math.sqrt(d) for pos in range(q.shape[1])]
                    expected[bi, owner] += share / (heads * len(keys)) * np.array(softmax(logits))
    expected /= expected.max(axis=-1, keepdims=True)
    maps = recorder.average()  # [b, n, H, W], each map peaking at 1
    np.testing.assert_allclose(maps.double().numpy().reshape(BATCH, 3, -1), expected, atol=1e-5)


def test_one_adapter_as_the_only_source_equals_that_adapter_attached(mixed):
    """An unmixed call whose tokens come from adapter B while A is attached (sources [B]) is what B
    attached would compute, bit for bit: the names' keys come from the base model either way."""
    unet, first, second, attn, layer = mixed
    cond = conditioning("official", True, seed=6)
    single = SubjectConditioning(
        image_tokens=cond.image_tokens, owner=cond.owner, share=cond.share, scales=cond.scales,
        name_embeds=cond.name_embeds, name_mask=cond.name_mask, rule="official", use_text_weight=True,
        latent_size=LATENT,
    )  # fmt: skip
    hidden, text = layer_inputs(attn, seed=7)
    with torch.no_grad():
        borrowed = attn(hidden, text, ip_hidden_states=first.prepare(single, [second]))
        first.detach()
        second.attach(unet)
        try:
            single.layer_inputs.clear()
            own = attn(hidden, text, ip_hidden_states=second.prepare(single))
        finally:
            second.detach()
            first.attach(unet)
    assert torch.equal(borrowed, own)


# ----------------------------------------------------------------------------------------- bad inputs


def test_adapter_of_without_token_counts_is_refused():
    with pytest.raises(ValueError, match=r"^inconsistent subject conditioning: give adapter_of and token_counts together$"):
        SubjectConditioning(**{**fields_of(conditioning("uniform", False)), "token_counts": None})


@pytest.mark.parametrize(
    "counts, adapter_of, message",
    [
        ((4, 8), ADAPTER_OF, r"^token_counts \(4, 8\) must be ≥ 1 each, the largest equal to the 16 image tokens per condition$"),
        ((0, 16), ADAPTER_OF, r"^token_counts \(0, 16\) must be ≥ 1 each"),
        (COUNTS, [0, 1, 2, 0], r"^adapter_of \[0, 1, 2, 0\] must lie in \[0, 2\)$"),
        (COUNTS, [0, 1, 1], r"^inconsistent subject conditioning: adapter_of has shape \(3,\), expected \(4,\)$"),
    ],
)
def test_token_counts_and_adapter_of_that_do_not_fit_are_refused(counts, adapter_of, message):
    fields = {**fields_of(conditioning("uniform", False)), "token_counts": counts, "adapter_of": torch.tensor(adapter_of)}
    with pytest.raises(ValueError, match=message):
        SubjectConditioning(**fields)


def test_the_token_mask_and_key_bias_mark_each_condition_s_padding():
    """An adapter of one image token is allowed; each condition's tokens past its adapter's count are
    padding: masked, and ``-inf`` in the key bias (0 on real tokens, token-major); no padding, no bias."""
    cond = SubjectConditioning(**{**fields_of(conditioning("uniform", False)), "token_counts": (1, 16)})
    real = torch.tensor([1, 16, 16, 1])  # ADAPTER_OF's adapters' counts
    assert torch.equal(cond.token_mask, torch.arange(16)[None, :] < real[:, None])
    bias = torch.zeros(16, len(OWNER)).masked_fill(~cond.token_mask.T, -math.inf).reshape(-1)
    assert torch.equal(cond.key_bias, bias)
    one_adapter = conditioning("uniform", False, adapter_of=[1, 1, 1, 1])  # only the 16-token adapter
    assert one_adapter.key_bias is None and bool(one_adapter.token_mask.all())


@pytest.mark.parametrize("sources", [1, 3])
def test_a_wrong_number_of_sources_is_refused_before_anything_is_prepared(sources, mixed):
    unet, first, second, *_ = mixed
    cond = conditioning("uniform", False)
    message = rf"^the conditioning mixes 2 adapters' image tokens but {sources} adapters were given$"
    with pytest.raises(ValueError, match=message):
        first.prepare(cond, [first, second, second][:sources])
    assert cond.layer_inputs == {}
    with pytest.raises(ValueError, match=r"^the conditioning mixes 2 adapters' image tokens but 1 adapters were given$"):
        first.prepare(cond)  # no sources: this adapter alone
    assert cond.layer_inputs == {}


def test_a_source_built_for_other_layers_is_refused(mixed):
    unet, first, *_ = mixed
    from mipadapter.testing import tiny_sdxl_pipeline

    other = MIPAdapter.for_unet(tiny_sdxl_pipeline().unet, AdapterConfig("basic", 8, 96, 4, text_weight=True))
    cond = conditioning("uniform", False)
    with pytest.raises(ValueError, match=r"^adapter #2 of the call was built for a model with different layers$"):
        first.prepare(cond, [first, other])
    assert cond.layer_inputs == {}

