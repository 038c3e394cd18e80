"""``MIPAttnProcessor`` on a real diffusers ``Attention`` module against a loop reference of docs/method.md.

The reference below recomputes the whole layer by hand in float64: text attention, each condition's
image attention with ``to_k_ip``/``to_v_ip``, the subjects' relevance maps from their name tokens keyed
with the layer's ``to_k``, user regions, the learned text gate, the merge rule, then ``to_out``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from mipadapter import ops
from mipadapter.modeling import MIPAttnProcessor, SubjectConditioning
from mipadapter.modeling.conditioning import RelevanceRecorder, ShareMeter, layer_grid, layer_grids

HIDDEN, HEADS, CROSS, TEXT_TOKENS, IMAGE_TOKENS, NAME_TOKENS, BATCH = 16, 2, 12, 5, 4, 2, 2
LATENT = (6, 10)  # UNet input; the layer under test runs at half resolution: 3x5 = 15 positions
GRID = (3, 5)


def np64(tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def softmax(logits):
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    return [e / sum(exps) for e in exps]


def area_resize(region: np.ndarray, size) -> np.ndarray:
    """[H, W] → [h·w] by adaptive average pooling."""
    big_h, big_w = region.shape
    h, w = size
    out = []
    for y in range(h):
        y0, y1 = (y * big_h) // h, -((-(y + 1) * big_h) // h)
        for x in range(w):
            x0, x1 = (x * big_w) // w, -((-(x + 1) * big_w) // w)
            out.append(region[y0:y1, x0:x1].mean())
    return np.array(out)


def attend(queries, keys, values, head, d):
    """One head of attention, position by position: queries [p, c], keys/values [s, c] → [p, d]."""
    cols = slice(head * d, (head + 1) * d)
    out = []
    for q in queries:
        probs = softmax([float(np.dot(q[cols], k[cols])) / math.sqrt(d) for k in keys])
        out.append(sum(prob * v[cols] for prob, v in zip(probs, values, strict=True)))
    return np.array(out)


def reference_layer(
    attn: Attention, proc: MIPAttnProcessor, hidden, text, cond: SubjectConditioning | None, text_factor=1.0
):
    """hidden [b, p, c], text [b, s, c_kv] → [b, p, c], the formula of docs/method.md (the three merge rules) written out.

    text_factor scales Z_text before the merge (what a ``text_perturbation`` may do)."""
    heads = attn.heads
    wq, wk, wv = np64(attn.to_q.weight), np64(attn.to_k.weight), np64(attn.to_v.weight)
    wo, bo = np64(attn.to_out[0].weight), np64(attn.to_out[0].bias)
    x, e = np64(hidden), np64(text)
    b, p, c = x.shape
    d = c // heads
    out = np.zeros((b, p, c))
    for bi in range(b):
        q, k, v = x[bi] @ wq.T, e[bi] @ wk.T, e[bi] @ wv.T
        z_text = text_factor * np.concatenate(
            [attend(q, k, v, hh, d) for hh in range(heads)], axis=1
        )  # [p, c]
        merged = z_text
        if cond is not None:
            merged = route_one_row(attn, proc, cond, bi, q, z_text)
        out[bi] = merged @ wo.T + bo
    return out


def routing_one_row(attn, cond: SubjectConditioning, bi: int, q: np.ndarray) -> np.ndarray:
    """[n, p]: what row ``bi`` routes each subject by: its relevance (ones under ``uniform``), the user's
    regions applied."""
    heads, p = attn.heads, q.shape[0]
    d = q.shape[1] // heads
    n = cond.scales.shape[1]
    wk = np64(attn.to_k.weight)
    # relevance A_i [p]: softmax over positions per name token and head, averaged
    relevance = np.zeros((n, p))
    names, mask = np64(cond.name_embeds[bi]), cond.name_mask[bi].numpy()
    for i in range(n):
        rows = [names[i, j] @ wk.T for j in range(names.shape[1]) if mask[i, j]]
        for key in rows:
            for hh in range(heads):
                cols = slice(hh * d, (hh + 1) * d)
                relevance[i] += softmax(
                    [float(np.dot(key[cols], q[pos, cols])) / math.sqrt(d) for pos in range(p)]
                )
        relevance[i] /= len(rows) * heads
    routing = np.ones((n, p)) if cond.rule.value == "uniform" else relevance
    if cond.regions is not None:
        for i in range(n):
            if bool(cond.has_region[i]):
                region = area_resize(np64(cond.regions[bi, i]), GRID)
                routing[i] = region if cond.region_mode.value == "replace" else routing[i] * region
    return routing


def route_one_row(attn, proc, cond: SubjectConditioning, bi: int, q: np.ndarray, z_text: np.ndarray):
    heads, (p, c) = attn.heads, z_text.shape
    d = c // heads
    n = cond.scales.shape[1]
    rule = cond.rule.value
    wk_ip, wv_ip = np64(proc.to_k_ip.weight), np64(proc.to_v_ip.weight)
    # each condition's image attention [p, c]
    z_img = []
    for tokens in np64(cond.image_tokens[bi]):
        k_ip, v_ip = tokens @ wk_ip.T, tokens @ wv_ip.T
        z_img.append(np.concatenate([attend(q, k_ip, v_ip, hh, d) for hh in range(heads)], axis=1))
    routing = routing_one_row(attn, cond, bi, q)
    gate = np.ones(p)
    if cond.use_text_weight:
        w = np64(proc.text_to_weight.weight)[0]
        f = np.array([1 / (1 + math.exp(-float(np.dot(z_text[pos], w)))) for pos in range(p)])
        gate = f / f.mean()
    scales = np64(cond.scales[bi])
    merged = np.zeros((p, c))
    for pos in range(p):
        weights = []
        for i in range(n):
            if rule == "uniform":
                weights.append(scales[i] * routing[i, pos])
            elif rule == "paper":
                weights.append(scales[i] * routing[i, pos] / routing[i].mean())
            else:
                total = routing[:, pos].sum()
                weights.append(scales[i] * (routing[i, pos] / total if total > 0 else 0.0) * gate[pos])
        merged[pos] = (gate[pos] if rule == "paper" else 1.0) * z_text[pos]
        for cnd, (owner, share) in enumerate(zip(cond.owner.tolist(), cond.share.tolist(), strict=True)):
            merged[pos] += weights[owner] * share * z_img[cnd][pos]
    return merged


# ----------------------------------------------------------------------------------------- set-up


def make_layer(text_weight: bool = True, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        attn = Attention(query_dim=HIDDEN, cross_attention_dim=CROSS, heads=HEADS, dim_head=HIDDEN // HEADS)
        proc = MIPAttnProcessor(HIDDEN, CROSS, text_weight=text_weight, layer_name="layer")
        for param in proc.parameters():  # larger than the default init, so every term matters
            torch.nn.init.normal_(param, std=0.5)
    attn.eval()
    attn.set_processor(proc)
    return attn, proc


def make_conditioning(
    rule: str,
    text_weight: bool,
    region_mode: str | None = None,
    photos: str = "one",
    n: int = 3,
    seed: int = 0,
    **extra,
) -> SubjectConditioning:
    g = torch.Generator().manual_seed(seed)
    counts = [1] * n if photos == "one" else [1 + (i + 1) % 3 for i in range(n)]  # 2, 3, 1, ...
    owner = torch.tensor([i for i, k in enumerate(counts) for _ in range(k)])
    share = torch.tensor([1.0 / k for k in counts for _ in range(k)])
    lengths = torch.randint(1, NAME_TOKENS + 1, (BATCH, n), generator=g)
    regions = has_region = None
    if region_mode is not None:
        regions = torch.rand(BATCH, n, *LATENT, generator=g)
        has_region = torch.arange(n) % 2 == 0  # subjects 0, 2, ... have a region
    return SubjectConditioning(
        image_tokens=torch.randn(BATCH, len(owner), IMAGE_TOKENS, CROSS, generator=g),
        owner=owner,
        share=share,
        scales=torch.rand(BATCH, n, generator=g) + 0.2,
        name_embeds=torch.randn(BATCH, n, NAME_TOKENS, CROSS, generator=g) * 2,
        name_mask=torch.arange(NAME_TOKENS)[None, None] < lengths[..., None],
        rule=rule,
        use_text_weight=text_weight,
        latent_size=LATENT,
        regions=regions,
        has_region=has_region,
        region_mode=region_mode or "replace",
        **extra,
    )


def run(attn: Attention, hidden, text, cond: SubjectConditioning):
    """One call: the layer's per-call inputs prepared (as ``MIPAdapter.prepare`` does), then the layer."""
    proc = attn.processor
    cond.layer_inputs[proc.layer_name] = proc.prepare(attn, cond)
    return attn(hidden, text, ip_hidden_states=cond)


def inputs(seed: int = 1, positions: int = GRID[0] * GRID[1]):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, positions, HIDDEN, generator=g), torch.randn(
        BATCH, TEXT_TOKENS, CROSS, generator=g
    )


def fields_of(cond: SubjectConditioning) -> dict:
    """The constructor arguments of ``cond`` (a copy starts unprepared)."""
    return {
        field.name: getattr(cond, field.name)
        for field in dataclasses.fields(cond)
        if field.init and not field.name.startswith("_") and field.name != "layer_inputs"
    }


def rel_err(fast: torch.Tensor, reference: np.ndarray) -> float:
    fast = np64(fast)
    return float(np.linalg.norm(fast - reference) / np.linalg.norm(reference))


# ----------------------------------------------------------------------------------------- the formula


@pytest.mark.parametrize("photos", ["one", "each"])
@pytest.mark.parametrize("region_mode", [None, "replace", "multiply"])
@pytest.mark.parametrize("text_weight", [False, True])
@pytest.mark.parametrize("rule", ["uniform", "paper", "official"])
def test_processor_matches_the_formula(rule, text_weight, region_mode, photos):
    attn, proc = make_layer()
    cond = make_conditioning(rule, text_weight, region_mode, photos)
    hidden, text = inputs()
    with torch.no_grad():
        out = run(attn, hidden, text, cond)
    assert out.shape == hidden.shape
    assert rel_err(out, reference_layer(attn, proc, hidden, text, cond)) <= 1e-5


@pytest.mark.parametrize("rule", ["uniform", "paper", "official"])
def test_processor_on_4d_input_with_one_subject(rule):
    """A [b, c, h, w] input takes its grid from its own shape (here 3x5 of a 6x10 latent)."""
    attn, proc = make_layer(seed=3)
    cond = make_conditioning(rule, True, "replace", n=1, seed=4)
    hidden, text = inputs(seed=5)
    spatial = hidden.transpose(1, 2).reshape(BATCH, HIDDEN, *GRID)
    with torch.no_grad():
        out = run(attn, spatial, text, cond)
    assert out.shape == spatial.shape
    flat = out.reshape(BATCH, HIDDEN, -1).transpose(1, 2)
    assert rel_err(flat, reference_layer(attn, proc, hidden, text, cond)) <= 1e-5


def test_uniform_with_one_subject_is_decoupled_cross_attention():
    """With one subject, uniform is IP-Adapter: Z_text + s·Z_img, whatever the name says."""
    attn, proc = make_layer(text_weight=False)
    cond = make_conditioning("uniform", False, n=1)
    other = make_conditioning("uniform", False, n=1)
    other.image_tokens, other.scales = cond.image_tokens, cond.scales  # only names and masks differ
    hidden, text = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            run(attn, hidden, text, cond), run(attn, hidden, text, other)
        )


def test_official_with_one_subject_is_a_gated_ip_adapter():
    """w_1 = A_1 / A_1 = 1: official with one subject is Z_text + s·g⊙Z_img (no relevance involved)."""
    attn, proc = make_layer(text_weight=True)
    cond = make_conditioning("official", True, n=1)
    hidden, text = inputs()
    shuffled = make_conditioning("official", True, n=1, seed=9)
    shuffled.image_tokens, shuffled.scales = cond.image_tokens, cond.scales
    with torch.no_grad():
        torch.testing.assert_close(
            run(attn, hidden, text, cond), run(attn, hidden, text, shuffled)
        )


def test_processor_hands_relevance_to_recorder_and_perturbation():
    attn, proc = make_layer()
    seen = {}

    def perturb(z_text, relevance):
        seen["shapes"] = (tuple(z_text.shape), tuple(relevance.shape))
        return z_text * 0.5

    recorder = RelevanceRecorder(LATENT, keep_last=1)
    cond = make_conditioning("official", True, recorder=recorder, text_perturbation=perturb)
    hidden, text = inputs()
    with torch.no_grad():
        out = run(attn, hidden, text, cond)
    assert seen["shapes"] == ((BATCH, HEADS, 15, HIDDEN // HEADS), (BATCH, 3, 15))
    assert rel_err(out, reference_layer(attn, proc, hidden, text, cond, text_factor=0.5)) <= 1e-5
    maps = recorder.average()  # the last row only, at the latent size, each map peaking at 1
    assert maps.shape == (1, 3, *LATENT)
    torch.testing.assert_close(maps.flatten(2).amax(-1), torch.ones(1, 3))


@pytest.mark.parametrize("region_mode", [None, "multiply"])
def test_uniform_ignores_relevance_computed_for_a_recorder(region_mode):
    """Recording relevance under uniform reports the maps without routing by them."""
    attn, _ = make_layer()
    hidden, text = inputs()
    plain = make_conditioning("uniform", False, region_mode)
    recorded = make_conditioning("uniform", False, region_mode, recorder=RelevanceRecorder(LATENT, keep_last=1))
    with torch.no_grad():
        torch.testing.assert_close(run(attn, hidden, text, recorded), run(attn, hidden, text, plain))
    assert recorded.recorder.counts


# ----------------------------------------------------------------------------------------- plain mode


@pytest.mark.parametrize("cross", [True, False])
@pytest.mark.parametrize("four_d", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_without_conditioning_equals_attn_processor_2_0(cross, four_d, masked):
    torch.manual_seed(0)
    attn = Attention(
        query_dim=HIDDEN, cross_attention_dim=CROSS if cross else None, heads=HEADS, dim_head=HIDDEN // HEADS
    ).eval()
    hidden, text = inputs()
    context = text if cross else None
    if four_d:
        hidden = hidden.transpose(1, 2).reshape(BATCH, HIDDEN, *GRID)
    mask = None
    if masked:  # an additive key mask, as a UNet passes encoder_attention_mask
        keys = TEXT_TOKENS if cross else GRID[0] * GRID[1]
        mask = torch.zeros(BATCH, 1, keys)
        mask[0, :, keys - 2 :] = -10000.0
    attn.set_processor(AttnProcessor2_0())
    with torch.no_grad():
        expected = attn(hidden, context, attention_mask=mask)
        attn.set_processor(MIPAttnProcessor(HIDDEN, CROSS if cross else HIDDEN, text_weight=True))
        got = attn(hidden, context, attention_mask=mask)
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------- per-call inputs


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_image_and_name_keys_computed_once_per_call():
    attn, proc = make_layer()
    ip_calls, k_calls = count_calls(proc.to_k_ip), count_calls(attn.to_k)
    cond = make_conditioning("official", True)
    hidden, text = inputs()
    with torch.no_grad():
        cond.layer_inputs[proc.layer_name] = proc.prepare(attn, cond)
        assert (ip_calls[0], k_calls[0]) == (1, 1)  # image keys and name keys: once for the call
        first = attn(hidden, text, ip_hidden_states=cond)
        second = attn(hidden, text, ip_hidden_states=cond)  # a second denoising step
    assert torch.equal(first, second)
    assert ip_calls[0] == 1
    assert k_calls[0] == 1 + 2  # then the text keys every step


def test_an_unprepared_conditioning_is_an_error_naming_the_layer():
    attn, _ = make_layer()
    hidden, text = inputs()
    with pytest.raises(ValueError, match="not prepared for layer 'layer': call MIPAdapter.prepare"):
        attn(hidden, text, ip_hidden_states=make_conditioning("official", True))


def test_training_prepares_each_step_and_trains_the_adapter_weights():
    attn, proc = make_layer()
    ip_calls = count_calls(proc.to_k_ip)
    cond = make_conditioning("official", True)
    hidden, text = inputs()
    for _ in range(2):
        run(attn, hidden, text, cond).square().mean().backward()
    assert ip_calls[0] == 2  # with gradients on, the keys are rebuilt every step from the current weights
    for param in (proc.to_k_ip.weight, proc.to_v_ip.weight, proc.text_to_weight.weight):
        assert param.grad is not None and float(param.grad.abs().sum()) > 0


@pytest.mark.parametrize("rule", ["paper", "official"])
def test_no_gradient_flows_through_the_relevance_maps(rule, monkeypatch):
    """Training: the gradient of the layer is the one with A_i held constant (computed from a detached
    query), as in the authors' processor; only the merge and the image/text branches carry gradients."""
    from mipadapter.modeling import routing

    attn, proc = make_layer()
    text = inputs()[1]

    def gradient():
        hidden = inputs()[0].requires_grad_(True)
        out = run(attn, hidden, text, make_conditioning(rule, True))
        return torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), hidden)[0]

    got = gradient()
    plain = routing.ops.position_maps
    monkeypatch.setattr(routing.ops, "position_maps", lambda query, *rest: plain(query.detach(), *rest))
    torch.testing.assert_close(got, gradient(), rtol=0, atol=0)
    assert float(got.abs().max()) > 0


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("rule", ["paper", "official"])
@pytest.mark.parametrize("region_mode", [None, "replace", "multiply"])
def test_the_share_meter_gets_each_condition_s_share_of_every_position(rule, region_mode):
    """A layer adds, per row and condition, the mean over positions of its subject's routing share
    ``A_i / Σ_k A_k``; where every subject's region leaves a position out, each share there is 0, not
    NaN (the top row of the grid here). Against the loop reference of the routing maps."""
    attn, proc = make_layer(text_weight=False)
    hidden, text = inputs(seed=5)
    cond = make_conditioning(rule, False, region_mode=region_mode, photos="several", seed=2)
    if region_mode is not None:  # every subject has a region, none on the grid's top row
        regions = cond.regions.clone()
        regions[..., : LATENT[0] // GRID[0], :] = 0.0
        cond = SubjectConditioning(
            **{**fields_of(cond), "regions": regions, "has_region": torch.ones(3, dtype=torch.bool)}
        )
    cond.share_meter = ShareMeter(BATCH, cond.num_conditions, torch.device("cpu"))
    with torch.no_grad():
        run(attn, hidden, text, cond)
    wq = np64(attn.to_q.weight)
    for bi in range(BATCH):
        routing = routing_one_row(attn, cond, bi, np64(hidden[bi]) @ wq.T)  # [n, p]
        total = routing.sum(axis=0)
        shares = np.where(total > 0, routing / np.where(total > 0, total, 1.0), 0.0).mean(axis=1)  # [n]
        if region_mode is not None:
            assert (total[: GRID[1]] == 0).all() and (total[GRID[1] :] > 0).all()
        expected = shares[cond.owner.numpy()]  # each condition: its subject's share
        np.testing.assert_allclose(cond.share_meter.sums[bi].double().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_processor_errors_are_explicit():
    """Each misuse of a layer is one line, word for word."""
    attn, proc = make_layer(text_weight=False)
    hidden, text = inputs()
    refusals = [
        (
            lambda: attn(hidden, text, ip_hidden_states=torch.zeros(BATCH, 4, CROSS)),
            TypeError,
            "MIPAttnProcessor takes a SubjectConditioning as ip_hidden_states, got Tensor",
        ),
        (
            lambda: run(attn, hidden, text, make_conditioning("official", True)),
            ValueError,
            "use_text_weight is set but this adapter has no text_to_weight layers",
        ),
        (
            lambda: run(attn, hidden[:1], text[:1], make_conditioning("official", False)),
            ValueError,
            f"subject conditioning was built for {BATCH} batch rows but the model runs 1 (check "
            "classifier-free guidance and num_images_per_prompt)",
        ),
    ]
    for call, kind, message in refusals:
        with pytest.raises(kind) as refused:
            call()
        assert str(refused.value) == message


def test_a_layer_given_image_projections_of_another_count_is_refused():
    """``prepare`` with sources that do not match the conditioning's adapters (MIPAdapter.prepare checks
    this first; a direct call of the layer's own is checked again)."""
    attn, proc = make_layer(text_weight=False)
    cond = make_conditioning("paper", False)
    with pytest.raises(ValueError) as refused:
        proc.prepare(attn, cond, sources=[proc, proc])
    assert str(refused.value) == "the conditioning mixes 1 adapters but 2 were given"


def test_a_4d_input_routes_and_records_as_its_flattened_form():
    """A UNet layer may get [b, c, h, w]: the output is the 3-D call's reshaped back, and the maps are
    recorded on the layer's own (h, w)."""
    attn, proc = make_layer(text_weight=False)
    hidden, text = inputs(seed=6)
    four_d = hidden.transpose(1, 2).reshape(BATCH, HIDDEN, *GRID)
    outputs, maps = {}, {}
    for label, x in {"3d": hidden, "4d": four_d}.items():
        cond = make_conditioning("paper", False, recorder=RelevanceRecorder(LATENT, keep_last=BATCH))
        with torch.no_grad():
            outputs[label] = run(attn, x, text, cond)
        maps[label] = cond.recorder.average()
    torch.testing.assert_close(outputs["4d"].reshape(BATCH, HIDDEN, -1).transpose(1, 2), outputs["3d"])
    torch.testing.assert_close(maps["4d"], maps["3d"])


@pytest.mark.parametrize("rule", ["paper", "official"])
def test_a_bfloat16_layer_returns_bfloat16(rule):
    """The merge's factors are computed in float32; the text branch scaled by them stays in the layer's
    dtype (a float32 factor would promote the whole output)."""
    attn, _ = make_layer(text_weight=True, seed=3)
    attn.to(torch.bfloat16)
    fields = fields_of(make_conditioning(rule, True, seed=4))
    for key in ("image_tokens", "name_embeds", "scales"):
        fields[key] = fields[key].to(torch.bfloat16)
    hidden, text = inputs(seed=5)
    with torch.no_grad():
        out = run(attn, hidden.to(torch.bfloat16), text.to(torch.bfloat16), SubjectConditioning(**fields))
    assert out.dtype == torch.bfloat16
    attn.float()  # a float32 layer under autocast (mixed-precision training): the gate follows the text branch
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(attn, hidden, text, make_conditioning(rule, True, seed=4))
    assert out.dtype == torch.bfloat16


def test_conditioning_checks_its_shapes():
    good = make_conditioning("paper", False)
    fields = {
        name: getattr(good, name) for name in ("image_tokens", "owner", "share", "scales", "name_embeds")
    }
    fields |= dict(name_mask=good.name_mask, rule="paper", use_text_weight=False, latent_size=LATENT)
    with pytest.raises(ValueError, match=r"scales has shape \(1, 3\), expected \(2, 3\)"):
        SubjectConditioning(**{**fields, "scales": good.scales[:1]})
    with pytest.raises(ValueError, match="share has shape"):
        SubjectConditioning(**{**fields, "share": good.share[:2]})
    with pytest.raises(ValueError, match="owner indices"):
        SubjectConditioning(**{**fields, "owner": torch.tensor([0, 1, 3])})
    with pytest.raises(ValueError, match="unknown merge rule"):
        SubjectConditioning(**{**fields, "rule": "average"})
    with pytest.raises(ValueError, match="regions has shape"):
        SubjectConditioning(
            **fields, regions=torch.ones(BATCH, 3, 4, 4), has_region=torch.ones(3, dtype=torch.bool)
        )


@pytest.mark.parametrize(
    "spoiled, detail",
    [
        ({"owner": torch.tensor([0, 1])}, "owner has shape (2,), expected (3,)"),
        ({"share": torch.ones(2)}, "share has shape (2,), expected (3,)"),
        ({"scales": torch.ones(1, 3)}, "scales has shape (1, 3), expected (2, 3)"),
        (  # the mask then disagrees too: every bad field is named, in order
            {"name_embeds": torch.zeros(BATCH, 2, NAME_TOKENS, CROSS)},
            f"name_embeds has shape (2, 2), expected (2, 3); name_mask has shape (2, 3, {NAME_TOKENS}), "
            f"expected (2, 2, {NAME_TOKENS})",
        ),
        ({"name_mask": torch.ones(BATCH, 3, 1, dtype=torch.bool)}, f"name_mask has shape (2, 3, 1), expected (2, 3, {NAME_TOKENS})"),
        ({"present": torch.ones(BATCH, 2, dtype=torch.bool)}, "present has shape (2, 2), expected (2, 3)"),
        (
            {"layer_scales": {"up.0": torch.ones(BATCH, 3), "down.1": torch.ones(1, 3)}},
            "layer_scales['down.1'] has shape (1, 3), expected (2, 3)",
        ),
        (
            {"regions": torch.ones(BATCH, 2, *LATENT), "has_region": torch.ones(2, dtype=torch.bool)},
            "regions has shape (2, 2), expected (2, 3); has_region has shape (2,), expected (3,)",
        ),
    ],
)
def test_each_inconsistent_field_is_named_with_its_shape_and_the_expected_one(spoiled, detail):
    with pytest.raises(ValueError) as refused:
        SubjectConditioning(**{**fields_of(make_conditioning("paper", False)), **spoiled})
    assert str(refused.value) == f"inconsistent subject conditioning: {detail}"


def test_owner_indices_outside_the_subjects_are_refused_with_them():
    for owner in ([0, 1, 3], [-1, 0, 1]):
        with pytest.raises(ValueError) as refused:
            SubjectConditioning(**{**fields_of(make_conditioning("paper", False)), "owner": torch.tensor(owner)})
        assert str(refused.value) == f"owner indices {owner} must lie in [0, 3)"


def test_regions_given_with_a_new_latent_size_replace_the_kept_ones():
    """``set_latent_size(size, regions)`` is how the pipeline hands over regions at the latents' size: they
    replace the ones the conditioning was built with, on every grid."""
    cond = make_conditioning("paper", False, region_mode="replace")
    g = torch.Generator().manual_seed(3)
    for size in [(4, 6), (5, 3)]:
        regions = torch.rand(BATCH, 3, *size, generator=g)
        cond.set_latent_size(size, regions)
        assert cond.regions is regions and cond.latent_size == size
        for h, w in layer_grids(size):
            expected = ops.resize_regions(regions, (h, w)).index_select(1, cond.owner).transpose(1, 2)
            torch.testing.assert_close(cond.regions_at(h * w), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "latent, grids",
    [
        ((8, 8), [(8, 8), (4, 4), (2, 2), (1, 1)]),
        ((5, 7), [(5, 7), (3, 4), (2, 2), (1, 1)]),
        ((2, 4), [(2, 4), (1, 2), (1, 1)]),  # 1×2 still halves to 1×1
        ((1, 1), [(1, 1)]),
    ],
)
def test_layer_grids_halve_rounding_up_down_to_one_cell(latent, grids):
    assert layer_grids(latent) == grids


def test_a_padding_subject_has_no_region_on_any_grid():
    """``present`` False (a padding subject of an uneven batch) zeroes its conditions' regions on every
    grid, whatever region it was given."""
    present = torch.tensor([[True, False, True], [True, True, False]])
    cond = make_conditioning("paper", False, region_mode="replace", photos="several", present=present)
    for h, w in layer_grids(LATENT):
        regions = cond.regions_at(h * w)  # [b, p, N]
        expected = ops.resize_regions(cond.regions, (h, w)).index_select(1, cond.owner).transpose(1, 2)
        kept = present.index_select(1, cond.owner)[:, None, :]  # [b, 1, N]
        torch.testing.assert_close(regions, expected * kept, rtol=0, atol=0)
        assert bool((expected[~kept.expand_as(expected)] > 0).any())  # there was something to zero


@pytest.mark.parametrize(
    "latent, positions, grid",
    [
        ((8, 8), 64, (8, 8)),
        ((8, 8), 16, (4, 4)),
        ((6, 10), 15, (3, 5)),
        ((5, 7), 12, (3, 4)),
        ((5, 7), 4, (2, 2)),
    ],
)
def test_layer_grid(latent, positions, grid):
    assert layer_grid(latent, positions) == grid


def test_layer_grid_rejects_a_foreign_size():
    with pytest.raises(ValueError, match="does not fit"):
        layer_grid((8, 8), 15)


@pytest.mark.parametrize("rule", ["uniform", "paper", "official"])
@pytest.mark.parametrize("region_mode", [None, "multiply"])
def test_padding_subjects_marked_absent_change_nothing(rule, region_mode):
    """A row padded with an extra subject marked absent computes what the unpadded row computes."""
    attn, _ = make_layer(text_weight=True)
    hidden, text = inputs()
    full = make_conditioning(rule, True, region_mode, n=3)
    kept = [0, 1]
    alone = SubjectConditioning(
        image_tokens=full.image_tokens[:, kept],
        owner=torch.arange(2),
        share=torch.ones(2),
        scales=full.scales[:, kept],
        name_embeds=full.name_embeds[:, kept],
        name_mask=full.name_mask[:, kept],
        rule=rule,
        use_text_weight=True,
        latent_size=LATENT,
        regions=None if full.regions is None else full.regions[:, kept],
        has_region=None if full.has_region is None else full.has_region[kept],
        region_mode=full.region_mode,
    )
    present = torch.tensor([[True, True, False]] * BATCH)
    padded = SubjectConditioning(**{**fields_of(full), "present": present})
    with torch.no_grad():
        expected = run(attn, hidden, text, alone)
        got = run(attn, hidden, text, padded)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    without_mask = SubjectConditioning(**fields_of(full))
    with torch.no_grad():
        assert not torch.allclose(run(attn, hidden, text, without_mask), expected, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_name_keys_follow_a_cross_attention_norm_and_the_layers_dtype(dtype):
    """A layer with a cross-attention LayerNorm (diffusers' ``cross_attention_norm``) normalises the
    names' rows before ``to_k``, as it does the prompt's; float32 names meet the layer's dtype. The
    reference writes the LayerNorm out."""
    from mipadapter.modeling.processor import name_keys

    torch.manual_seed(0)
    attn = Attention(
        query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, cross_attention_norm="layer_norm"
    )
    with torch.no_grad():
        attn.norm_cross.weight.uniform_(0.5, 1.5)
        attn.norm_cross.bias.uniform_(-0.5, 0.5)
    attn.to(dtype)
    names = torch.randn(2, 3, 4, 24)
    keys = name_keys(attn, names)
    assert keys.shape == (2, 2, 12, 16) and keys.dtype == dtype
    rows = names.double()
    variance = rows.var(-1, unbiased=False, keepdim=True)
    normed = (rows - rows.mean(-1, keepdim=True)) / torch.sqrt(variance + 1e-5)
    normed = normed * attn.norm_cross.weight.double() + attn.norm_cross.bias.double()
    expected = (normed @ attn.to_k.weight.double().T).view(2, 3, 4, 2, 16).permute(0, 3, 1, 2, 4)
    expected = expected.reshape(2, 2, 12, 16) / 4.0  # 1/sqrt(16)
    torch.testing.assert_close(keys.double(), expected, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 2, 5)])
def test_name_keys_follow_a_key_norm(shape):
    """A layer with ``qk_norm`` (an RMSNorm per head on the keys, as diffusers' ``Attention`` builds it)
    normalises the names' keys as it does the prompt's, after ``to_k`` and before the 1/sqrt(d) scaling.
    The reference writes the RMSNorm out with a non-trivial weight. Guards the norm skipped or fed
    nothing (the ``norm_k`` branch, which the UNets of SDXL and SD1.5 never take)."""
    from mipadapter.modeling.processor import name_keys

    b, n, m = shape
    torch.manual_seed(b + n + m)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, qk_norm="rms_norm")
    with torch.no_grad():
        attn.norm_k.weight.uniform_(0.5, 1.5)
    names = torch.randn(b, n, m, 24) * 3.0  # far from unit RMS, so a skipped norm shows
    keys = name_keys(attn, names)
    assert keys.shape == (b, 2, n * m, 16)
    raw = (names.double() @ attn.to_k.weight.double().T).view(b, n, m, 2, 16)
    normed = raw / torch.sqrt(raw.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.norm_k.weight.double()
    expected = normed.permute(0, 3, 1, 2, 4).reshape(b, 2, n * m, 16) / 4.0  # 1/sqrt(16)
    torch.testing.assert_close(keys.double(), expected, rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("photos", ["one", "several"])
def test_image_attention_maps_match_the_loop(photos):
    """Where each subject's image tokens attend: per position, the softmax over positions of every
    image token's key against the queries, averaged over heads and tokens and over the subject's photos
    by their shares (a layer at the latent size, so the recorder's resize is the identity)."""
    attn, proc = make_layer(seed=3)
    recorder = RelevanceRecorder(LATENT, keep_last=BATCH)
    cond = make_conditioning("uniform", False, photos=photos, seed=4, image_attention=recorder)
    hidden, text = inputs(seed=5, positions=LATENT[0] * LATENT[1])
    with torch.no_grad():
        run(attn, hidden, text, cond)
    d = HIDDEN // HEADS
    q = np64(attn.to_q(hidden)).reshape(BATCH, -1, HEADS, d)  # [b, p, h, d]
    tokens = cond.image_tokens
    with torch.no_grad():
        k = np64(proc.to_k_ip(tokens)).reshape(*tokens.shape[:3], HEADS, d)  # [b, N, t, h, d]
    owner, share = cond.owner.tolist(), cond.share.tolist()
    n = cond.scales.shape[1]
    expected = np.zeros((BATCH, n, LATENT[0] * LATENT[1]))
    for bi in range(BATCH):
        for c, (subject, part) in enumerate(zip(owner, share, strict=True)):
            for hh in range(HEADS):
                for t in range(IMAGE_TOKENS):
                    key = k[bi, c, t, hh]
                    logits = [float(q[bi, pos, hh] @ key) / math.sqrt(d) for pos in range(q.shape[1])]
                    expected[bi, subject] += part / (HEADS * IMAGE_TOKENS) * np.array(softmax(logits))
    expected /= expected.max(axis=-1, keepdims=True)
    maps = recorder.average()  # [b, n, H, W], each map peaking at 1
    assert maps.shape == (BATCH, n, *LATENT)
    np.testing.assert_allclose(maps.double().numpy().reshape(BATCH, n, -1), expected, atol=1e-5)


@pytest.mark.parametrize("photos", ["one", "several"])
def test_image_attention_maps_in_bfloat16_follow_the_float32_ones(photos):
    """The image-attention maps of a layer and conditioning in bfloat16 (a half-precision run records
    them too) are recorded, and close to the float32 maps of the same layer and inputs."""
    maps = {}
    for dtype in (torch.float32, torch.bfloat16):
        attn, _ = make_layer(seed=3)
        attn.to(dtype)
        recorder = RelevanceRecorder(LATENT, keep_last=BATCH)
        cond = make_conditioning("uniform", False, photos=photos, seed=4, image_attention=recorder)
        fields = fields_of(cond)
        for key in ("image_tokens", "name_embeds", "scales"):
            fields[key] = fields[key].to(dtype)
        cond = SubjectConditioning(**fields)
        hidden, text = inputs(seed=5, positions=LATENT[0] * LATENT[1])
        with torch.no_grad():
            run(attn, hidden.to(dtype), text.to(dtype), cond)
        maps[dtype] = recorder.average().float()
    torch.testing.assert_close(maps[torch.bfloat16], maps[torch.float32], atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    "options",
    [
        {"residual_connection": True},
        {"rescale_output_factor": 2.0},
        {"residual_connection": True, "rescale_output_factor": 0.5, "norm_num_groups": 4},
        {"spatial_norm_dim": 6},
        {"qk_norm": "layer_norm"},
        {"cross_attention_dim": CROSS, "cross_attention_norm": "layer_norm"},
    ],
    ids=["residual", "rescaled", "residual-rescaled-group-norm", "spatial-norm", "qk-norm", "cross-norm"],
)
def test_without_conditioning_equals_attn_processor_2_0_on_every_attention_option(options):
    """The options of diffusers' Attention that no UNet of ours sets (a residual connection, an output
    rescale, a group norm, a spatial norm fed ``temb``, query/key norms, a norm of the context), on a
    4-D input: the processor without
    conditioning is still exactly AttnProcessor2_0 (guards the branches copied from it)."""
    torch.manual_seed(1)
    channels = 64  # a spatial norm's GroupNorm takes 32 groups
    attn = Attention(query_dim=channels, heads=HEADS, dim_head=channels // HEADS, **options).eval()
    hidden = torch.randn(BATCH, channels, *GRID)
    temb = torch.randn(BATCH, options["spatial_norm_dim"], *GRID) if "spatial_norm_dim" in options else None
    cross = options.get("cross_attention_dim")
    context = None if cross is None else torch.randn(BATCH, TEXT_TOKENS, cross)
    attn.set_processor(AttnProcessor2_0())
    with torch.no_grad():
        expected = attn(hidden, context, temb=temb)
        attn.set_processor(MIPAttnProcessor(channels, cross or channels, text_weight=True))
        got = attn(hidden, context, temb=temb)
    assert torch.equal(got, expected)


def test_a_layer_routes_with_its_own_layer_scales():
    """A subject's per-layer image scale (``layer_scales`` under the processor's layer name) is what the
    layer uses: the output equals that of a conditioning whose plain scales are those, and differs from
    the plain scales' own (guards the layer name reaching the image values)."""
    attn, _ = make_layer(seed=2)
    hidden, text = inputs(seed=3)
    base = make_conditioning("paper", True, seed=6)
    own = base.scales * torch.tensor([0.2, 1.6, 0.9])
    outputs = {}
    for label, changes in {"layer": {"layer_scales": {"layer": own}}, "plain": {"scales": own}, "base": {}}.items():
        with torch.no_grad():
            outputs[label] = run(attn, hidden, text, SubjectConditioning(**(fields_of(base) | changes)))
    torch.testing.assert_close(outputs["layer"], outputs["plain"], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(outputs["layer"], outputs["base"], atol=1e-4)


def test_image_features_in_place_of_a_conditioning_are_refused_naming_the_processor():
    """Guards the UNet processor's misuse line: ip_hidden_states that is not a SubjectConditioning (the
    image embeddings diffusers' IP-Adapter takes there) is refused naming this processor and the type."""
    attn, _ = make_layer(seed=1)
    hidden, text = inputs(seed=2)
    with pytest.raises(TypeError) as refused:
        attn(hidden, text, ip_hidden_states=[torch.randn(BATCH, IMAGE_TOKENS, CROSS)])
    assert str(refused.value) == "MIPAttnProcessor takes a SubjectConditioning as ip_hidden_states, got list"


def test_without_conditioning_a_mask_per_query_equals_attn_processor_2_0():
    """An attention mask with a row per query ([b, queries, keys], not the UNet's single row): reshaped
    per head as diffusers reshapes it (guards the view's inferred query axis)."""
    torch.manual_seed(2)
    attn = Attention(query_dim=HIDDEN, cross_attention_dim=CROSS, heads=HEADS, dim_head=HIDDEN // HEADS).eval()
    hidden, text = inputs(seed=4)
    mask = torch.zeros(BATCH, hidden.shape[1], TEXT_TOKENS)
    mask[:, ::2, -2:] = -10000.0  # every other query is kept from the last two text tokens
    attn.set_processor(AttnProcessor2_0())
    with torch.no_grad():
        expected = attn(hidden, text, attention_mask=mask)
        attn.set_processor(MIPAttnProcessor(HIDDEN, CROSS, text_weight=True))
        got = attn(hidden, text, attention_mask=mask)
    assert torch.equal(got, expected)
