"""``mipadapter.ops.routing`` against slow, obviously-correct loop references (docs/method.md).

Every reference below loops over batch, subject/condition, head and position, and writes softmax and
attention out by hand, in float64 numpy. The fast functions run in float32 and must agree to a
relative error of 1e-5 (norm of the difference over norm of the reference).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from mipadapter import ops
from mipadapter.config import RegionMode

RULES = ("uniform", "paper", "official")
# latent size of the UNet input → grid of the layer under test (p = 16 and p = 15, one non-square)
SHAPES = {"square": ((8, 8), (4, 4)), "non_square": ((6, 10), (3, 5))}
HEADS, HEAD_DIM, IMAGE_TOKENS, NAME_TOKENS, BATCH = 2, 4, 3, 3, 2


def rel_err(fast: torch.Tensor, reference: np.ndarray) -> float:
    fast = fast.detach().double().numpy()
    return float(np.linalg.norm(fast - reference) / np.linalg.norm(reference))


def np64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


# ----------------------------------------------------------------------------------------- references


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def ref_subject_attention(query, keys, values) -> np.ndarray:
    """query [b, h, p, d]; keys, values [b, N, h, t, d] → [b, N, h, p, d]."""
    q, k, v = np64(query), np64(keys), np64(values)
    b, num_cond, h, t, d = k.shape
    p = q.shape[2]
    out = np.zeros((b, num_cond, h, p, d))
    for bi in range(b):
        for c in range(num_cond):
            for hh in range(h):
                for pos in range(p):
                    logits = [float(np.dot(q[bi, hh, pos], k[bi, c, hh, j])) / math.sqrt(d) for j in range(t)]
                    probs = softmax(logits)
                    out[bi, c, hh, pos] = sum(probs[j] * v[bi, c, hh, j] for j in range(t))
    return out


def ref_relevance(query, name_keys, name_mask) -> np.ndarray:
    """softmax over positions of each name token's key against the queries, averaged over the name's
    valid tokens and the heads: [b, n, p]."""
    q, k, mask = np64(query), np64(name_keys), name_mask.numpy()
    b, n, h, m, d = k.shape
    p = q.shape[2]
    out = np.zeros((b, n, p))
    for bi in range(b):
        for i in range(n):
            tokens = [j for j in range(m) if mask[bi, i, j]]
            total = np.zeros(p)
            for j in tokens:
                for hh in range(h):
                    logits = [
                        float(np.dot(k[bi, i, hh, j], q[bi, hh, pos])) / math.sqrt(d) for pos in range(p)
                    ]
                    total += np.array(softmax(logits))
            out[bi, i] = total / (len(tokens) * h)
    return out


def ref_text_gate(logits) -> np.ndarray:
    x = np64(logits)
    out = np.zeros_like(x)
    for bi in range(x.shape[0]):
        f = [1.0 / (1.0 + math.exp(-v)) for v in x[bi]]
        mean = sum(f) / len(f)
        out[bi] = [v / mean for v in f]
    return out


def ref_area_resize(regions, size) -> np.ndarray:
    """Adaptive average pooling (what "area" interpolation is): [b, n, H, W] → [b, n, h·w]."""
    r = np64(regions)
    b, n, big_h, big_w = r.shape
    h, w = size
    out = np.zeros((b, n, h * w))
    for bi in range(b):
        for i in range(n):
            for y in range(h):
                y0, y1 = (y * big_h) // h, -((-(y + 1) * big_h) // h)
                for x in range(w):
                    x0, x1 = (x * big_w) // w, -((-(x + 1) * big_w) // w)
                    cells = [r[bi, i, yy, xx] for yy in range(y0, y1) for xx in range(x0, x1)]
                    out[bi, i, y * w + x] = sum(cells) / len(cells)
    return out


def ref_merge(rule, text_out, image_out, scales, relevance, gate, regions, has_region, mode, owner, share):
    """The whole merge of docs/method.md (the three merge rules), position by position.

    text_out [b, h, p, d]; image_out [b, N, h, p, d]; scales [b, n]; relevance [b, n, p] (float64);
    gate [b, p] or None; regions [b, n, p] (already on the layer grid) or None; owner, share [N].
    """
    z_text, z_img, s = np64(text_out), np64(image_out), np64(scales)
    b, h, p, d = z_text.shape
    n = s.shape[1]
    owner, share = owner.tolist(), share.double().tolist()
    # routing maps R_i: relevance (ones under uniform), overridden by regions where a subject has one
    routing = np.ones((b, n, p)) if rule == "uniform" else relevance.copy()
    if regions is not None:
        for bi in range(b):
            for i in range(n):
                if has_region[i]:
                    for pos in range(p):
                        region = regions[bi, i, pos]
                        routing[bi, i, pos] = region if mode == "replace" else routing[bi, i, pos] * region
    out = np.zeros((b, h, p, d))
    for bi in range(b):
        means = [sum(routing[bi, i]) / p for i in range(n)]
        for pos in range(p):
            g = 1.0 if gate is None else gate[bi, pos]
            weight = []
            for i in range(n):
                if rule == "uniform":
                    weight.append(s[bi, i] * routing[bi, i, pos])
                elif rule == "paper":
                    weight.append(s[bi, i] * routing[bi, i, pos] / means[i])
                else:
                    total = sum(routing[bi, k, pos] for k in range(n))
                    share_i = routing[bi, i, pos] / total if total > 0 else 0.0
                    weight.append(s[bi, i] * share_i * g)
            text_factor = g if rule == "paper" else 1.0
            for hh in range(h):
                value = text_factor * z_text[bi, hh, pos]
                for c in range(len(owner)):
                    value = value + weight[owner[c]] * share[c] * z_img[bi, c, hh, pos]
                out[bi, hh, pos] = value
    return out


# ----------------------------------------------------------------------------------------- inputs


def conditions_of(n: int, photos: str) -> tuple[torch.Tensor, torch.Tensor]:
    """owner, share for ``n`` subjects: one condition each, or 1-3 photos each routed separately."""
    if photos == "one":
        return torch.arange(n), torch.ones(n)
    counts = [1 + (i * 2 + 1) % 3 for i in range(n)]  # 2, 1, 3, 2, 1 ...
    owner = torch.tensor([i for i, k in enumerate(counts) for _ in range(k)])
    share = torch.tensor([1.0 / k for k in counts for _ in range(k)])
    return owner, share


def random_inputs(n: int, num_cond: int, positions: int, latent: tuple[int, int], seed: int):
    g = torch.Generator().manual_seed(seed)
    b, h, d, t, m = BATCH, HEADS, HEAD_DIM, IMAGE_TOKENS, NAME_TOKENS
    query = torch.randn(b, h, positions, d, generator=g)
    keys = torch.randn(b, num_cond, h, t, d, generator=g)
    values = torch.randn(b, num_cond, h, t, d, generator=g)
    name_keys = torch.randn(b, n, h, m, d, generator=g) * 2
    lengths = torch.randint(1, m + 1, (b, n), generator=g)
    name_mask = torch.arange(m)[None, None, :] < lengths[..., None]  # [b, n, m], 1..m tokens each
    text_out = torch.randn(b, h, positions, d, generator=g)
    text_logits = torch.randn(b, positions, generator=g) * 2
    scales = torch.rand(b, n, generator=g) + 0.25  # differ per row and per subject
    # soft regions with holes; every subject keeps some mass at every layer grid
    regions = torch.rand(b, n, *latent, generator=g) * (torch.rand(b, n, *latent, generator=g) > 0.4)
    regions[..., 0, 0] = 1.0
    has_region = torch.rand(n, generator=g) > 0.4
    has_region[0] = True
    return dict(
        query=query,
        keys=keys,
        values=values,
        name_keys=name_keys,
        name_mask=name_mask,
        text_out=text_out,
        text_logits=text_logits,
        scales=scales,
        regions=regions,
        has_region=has_region,
    )


# ----------------------------------------------------------------------------------------- functions


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_relevance_maps_match_loop(shape, n):
    latent, grid = SHAPES[shape]
    x = random_inputs(n, n, grid[0] * grid[1], latent, seed=10 + n)
    query = x["query"].clone().requires_grad_(True)
    fast = ops.relevance_maps(query, x["name_keys"], x["name_mask"])
    assert fast.shape == (BATCH, n, grid[0] * grid[1]) and fast.dtype == query.dtype
    assert rel_err(fast, ref_relevance(x["query"], x["name_keys"], x["name_mask"])) <= 1e-5
    torch.testing.assert_close(fast.sum(-1), torch.ones(BATCH, n))  # each map is a distribution over p
    assert not fast.requires_grad  # a routing signal: no gradient flows through it


def name_keys_flat(name_keys: torch.Tensor) -> torch.Tensor:
    """[b, n, h, m, d] → [b, h, n·m, d] scaled by 1/sqrt(d), the layout the processor prepares."""
    b, n, h, m, d = name_keys.shape
    return name_keys.permute(0, 2, 1, 3, 4).reshape(b, h, n * m, d) / math.sqrt(d)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("photos", ["one", "several"])
@pytest.mark.parametrize("absent", [False, True])
def test_relevance_columns_match_loop(shape, n, photos, absent):
    """position_maps with relevance_weights: column j is condition j's subject's map, the last column
    their sum over the present subjects; an absent (padding) subject's map is zero."""
    latent, grid = SHAPES[shape]
    owner, share = conditions_of(n, photos)
    x = random_inputs(n, len(owner), grid[0] * grid[1], latent, seed=20 + n)
    present = torch.ones(BATCH, n, dtype=torch.bool)
    if absent:
        present[0, n - 1] = False
    weights = ops.relevance_weights(x["name_mask"], HEADS, owner, present if absent else None)
    assert weights.shape == (BATCH, HEADS * n * NAME_TOKENS, len(owner) + 1)
    columns = ops.position_maps(x["query"], name_keys_flat(x["name_keys"]), weights)
    reference = ref_relevance(x["query"], x["name_keys"], x["name_mask"]) * present.double().numpy()[..., None]
    expected = np.concatenate(
        [reference[:, owner.tolist()], reference.sum(axis=1, keepdims=True)], axis=1
    ).transpose(0, 2, 1)  # [b, p, N + 1]
    assert columns.shape == expected.shape
    assert rel_err(columns, expected) <= 1e-5


def test_relevance_maps_use_only_valid_name_tokens():
    x = random_inputs(2, 2, 16, (8, 8), seed=3)
    mask = torch.zeros(BATCH, 2, NAME_TOKENS, dtype=torch.bool)
    mask[..., 0] = True
    garbage = x["name_keys"].clone()
    garbage[:, :, :, 1:] = 1e3 * torch.randn_like(garbage[:, :, :, 1:])  # padded rows must not matter
    torch.testing.assert_close(
        ops.relevance_maps(x["query"], garbage, mask), ops.relevance_maps(x["query"], x["name_keys"], mask)
    )


def test_relevance_maps_reject_a_subject_without_name_tokens():
    x = random_inputs(2, 2, 16, (8, 8), seed=4)
    mask = x["name_mask"].clone()
    mask[1, 1] = False
    with pytest.raises(ValueError, match=r"^every subject needs at least one name token in name_mask$"):
        ops.relevance_maps(x["query"], x["name_keys"], mask)


def test_text_gate_matches_loop():
    logits = torch.randn(3, 15, generator=torch.Generator().manual_seed(0)) * 3
    fast = ops.text_gate(logits)
    assert rel_err(fast, ref_text_gate(logits)) <= 1e-6
    torch.testing.assert_close(fast.mean(-1), torch.ones(3))


@pytest.mark.parametrize(
    "latent, grid", [((8, 8), (4, 4)), ((6, 10), (3, 5)), ((5, 7), (3, 4)), ((8, 12), (8, 12))]
)
def test_resize_regions_match_area_loop(latent, grid):
    regions = torch.rand(2, 3, *latent, generator=torch.Generator().manual_seed(1))
    fast = ops.resize_regions(regions, grid)
    assert fast.shape == (2, 3, grid[0] * grid[1])
    assert rel_err(fast, ref_area_resize(regions, grid)) <= 1e-6


def test_resize_regions_keep_a_one_cell_region():
    regions = torch.zeros(1, 1, 8, 12)
    regions[0, 0, 5, 7] = 1.0
    resized = ops.resize_regions(regions, (2, 3))
    assert float(resized.max()) > 0 and int((resized > 0).sum()) == 1


@pytest.mark.parametrize("mode", ["replace", "multiply"])
@pytest.mark.parametrize("with_maps", [True, False])
def test_override_regions_matches_loop(mode, with_maps):
    g = torch.Generator().manual_seed(2)
    owner, first = torch.tensor([0, 1, 1, 2]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    maps = torch.rand(2, 15, 3, generator=g).index_select(-1, owner)  # conditions of a subject share a map
    regions = torch.rand(2, 15, 3, generator=g).index_select(-1, owner)
    has_region = torch.tensor([True, False, False, True])  # subject 0 and 2 have a region
    routed, total = ops.override_regions(maps if with_maps else None, regions, has_region, RegionMode(mode), first)
    for bi in range(2):
        for pos in range(15):
            subject_sum = 0.0
            for c in range(4):
                old = float(maps[bi, pos, c]) if with_maps else 1.0
                region = float(regions[bi, pos, c])
                want = old if not has_region[c] else (region if mode == "replace" else old * region)
                assert float(routed[bi, pos, c]) == pytest.approx(want, rel=1e-6)
                subject_sum += want * float(first[c])
            assert float(total[bi, pos, 0]) == pytest.approx(subject_sum, rel=1e-6)


def test_uniform_routes_by_regions_only_even_when_relevance_is_computed():
    """Under uniform the relevance (computed for a recorder) is reported but never weights the merge."""
    columns = torch.rand(1, 6, 3)
    relevance, routing, total = ops.routing_maps("uniform", columns, None, None, RegionMode.REPLACE, torch.ones(2))
    assert torch.equal(relevance, columns[..., :2]) and routing is None and total is None
    regions = torch.rand(1, 6, 2)
    _, routing, _ = ops.routing_maps(
        "uniform", columns, regions, torch.tensor([True, False]), RegionMode.MULTIPLY, torch.ones(2)
    )
    torch.testing.assert_close(routing, torch.stack([regions[..., 0], torch.ones(1, 6)], dim=-1))


def test_merge_factors_official_shares_sum_to_the_gate():
    g = torch.Generator().manual_seed(4)
    maps = torch.rand(2, 15, 3, generator=g) + 0.01
    gate = ops.text_gate(torch.randn(2, 15, generator=g))
    text_factor, weights, alpha = ops.merge_factors("official", maps, maps.sum(-1, keepdim=True), gate, normalized=True)
    assert text_factor is None and alpha == 1.0  # official leaves Z_text as it is
    torch.testing.assert_close(weights.sum(-1), gate)


def test_merge_factors_uniform_and_paper_edge_cases():
    text_factor, weights, alpha = ops.merge_factors("uniform", None, None, None, normalized=True)
    assert (text_factor, weights, alpha) == (None, None, 1.0)
    with pytest.raises(ValueError, match="relevance"):
        ops.merge_factors("paper", None, None, None, normalized=True)
    with pytest.raises(ValueError):
        ops.merge_factors("bogus", torch.rand(1, 6, 2), None, None, normalized=True)
    # paper divides by the map's mean: a constant map gives weight 1; a softmax map's mean is 1/p
    _, weights, alpha = ops.merge_factors("paper", torch.full((1, 6, 2), 0.2), None, None, normalized=False)
    torch.testing.assert_close(weights * alpha, torch.ones(1, 6, 2))
    softmaxes = torch.softmax(torch.randn(1, 6, 2), dim=1)
    _, weights, alpha = ops.merge_factors("paper", softmaxes, None, None, normalized=True)
    torch.testing.assert_close(weights * alpha, softmaxes / softmaxes.mean(dim=1, keepdim=True))


def test_merge_factors_official_without_the_total_is_refused():
    message = r"^the official merge rule needs the total of the maps over subjects$"
    with pytest.raises(ValueError, match=message):
        ops.merge_factors("official", torch.rand(1, 6, 2), None, None, normalized=True)


def test_official_weights_take_the_maps_dtype_whatever_the_gate_dtype():
    """A float64 gate on float32 maps (or the reverse) gives weights in the maps' dtype, the gate rounded
    to it; fails when the gate is not converted (the weights would come out float64)."""
    g = torch.Generator().manual_seed(6)
    maps = torch.rand(2, 15, 3, generator=g, dtype=torch.float64) + 0.01
    gate = ops.text_gate(torch.randn(2, 15, generator=g, dtype=torch.float64))
    for maps_dtype, gate_dtype in ((torch.float32, torch.float64), (torch.float64, torch.float32)):
        m, total = maps.to(maps_dtype), maps.to(maps_dtype).sum(-1, keepdim=True)
        _, weights, _ = ops.merge_factors("official", m, total, gate.to(gate_dtype), normalized=True)
        assert weights.dtype == maps_dtype
        torch.testing.assert_close(weights, m * (gate.to(gate_dtype).to(maps_dtype).unsqueeze(-1) / total))


@pytest.mark.parametrize("mode", ["replace", "multiply"])
def test_override_regions_keep_the_maps_dtype(mode):
    """float64 regions on float32 maps give float32 maps and total; fails when the regions are not
    converted to the maps' dtype."""
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(1, 6, 2, generator=g)
    regions = torch.rand(1, 6, 2, generator=g, dtype=torch.float64)
    has_region = torch.tensor([True, False])
    routed, total = ops.override_regions(maps, regions, has_region, RegionMode(mode), torch.ones(2))
    assert routed.dtype == total.dtype == torch.float32
    expected = regions[..., 0].float() if mode == "replace" else maps[..., 0] * regions[..., 0].float()
    torch.testing.assert_close(routed[..., 0], expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_relevance_weights_are_made_in_the_dtype_asked_for(dtype):
    x = random_inputs(3, 3, 16, (8, 8), seed=8)
    owner = torch.tensor([0, 1, 1, 2])
    weights = ops.relevance_weights(x["name_mask"], HEADS, owner, dtype=dtype)
    assert weights.dtype == dtype
    torch.testing.assert_close(weights, ops.relevance_weights(x["name_mask"], HEADS, owner).to(dtype))


def test_relevance_weights_stay_on_the_masks_device():
    """No device is chosen inside: on the meta device (a stand-in for a GPU) the weights stay there."""
    mask = torch.ones(2, 3, 4, dtype=torch.bool, device="meta")
    weights = ops.relevance_weights(mask, HEADS, torch.arange(3, device="meta"))
    assert weights.device.type == "meta" and weights.shape == (2, HEADS * 3 * 4, 4)


def test_a_subject_without_conditions_feeds_only_the_total():
    """Subject 2 of 3 owns no condition (owner [0, 1]): the N = 2 condition columns read subjects 0 and
    1, the total reads all three."""
    x = random_inputs(3, 2, 16, (8, 8), seed=9)
    owner = torch.tensor([0, 1])
    weights = ops.relevance_weights(x["name_mask"], HEADS, owner)
    assert weights.shape == (BATCH, HEADS * 3 * NAME_TOKENS, 3)
    columns = ops.position_maps(x["query"], name_keys_flat(x["name_keys"]), weights)
    reference = ref_relevance(x["query"], x["name_keys"], x["name_mask"])  # [b, 3, p]
    expected = np.concatenate([reference[:, :2], reference.sum(axis=1, keepdims=True)], axis=1)
    assert rel_err(columns, expected.transpose(0, 2, 1)) <= 1e-5


def test_relevance_maps_of_float64_inputs_have_float64_accuracy():
    x = random_inputs(3, 3, 15, (6, 10), seed=12)
    query, name_keys = x["query"].double(), x["name_keys"].double()
    fast = ops.relevance_maps(query, name_keys, x["name_mask"])
    assert fast.dtype == torch.float64
    assert rel_err(fast, ref_relevance(query, name_keys, x["name_mask"])) <= 1e-12


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_relevance_maps_of_half_inputs_are_computed_in_float32(dtype, tolerance):
    """Half-precision queries and keys: the softmax over positions runs in float32 (working_dtype) and
    only the result is rounded to the input dtype. Fails when the softmax runs in the input dtype, or
    when the maps come back in float32."""
    x = random_inputs(2, 2, 16, (8, 8), seed=13)
    query, name_keys = x["query"].to(dtype), x["name_keys"].to(dtype)
    fast = ops.relevance_maps(query, name_keys, x["name_mask"])
    assert fast.dtype == dtype
    exact = ref_relevance(query, name_keys, x["name_mask"])  # float64 math on the same rounded inputs
    assert rel_err(fast, exact) <= tolerance  # the logits' matmul runs in the input dtype


def test_official_positions_no_subject_claims_get_no_image():
    """With every subject confined to a region (replace), positions outside all regions keep Z_text."""
    x = random_inputs(2, 2, 16, (4, 4), seed=5)
    owner = torch.arange(2)
    regions = torch.zeros(BATCH, 16, 2)
    regions[:, :4, 0], regions[:, 4:8, 1] = 1.0, 1.0  # rows 0 and 1 of the 4x4 grid
    columns = ops.position_maps(
        x["query"], name_keys_flat(x["name_keys"]), ops.relevance_weights(x["name_mask"], HEADS, owner)
    )
    _, routing, total = ops.routing_maps(
        "official", columns, regions, torch.tensor([True, True]), RegionMode.REPLACE, torch.ones(2)
    )
    _, weights, alpha = ops.merge_factors("official", routing, total, None, normalized=False)
    merged = ops.routed_attention(
        x["query"], token_major(x["keys"]), token_major(x["values"]), weights, x["text_out"], num_conditions=2
    )
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged[:, :, 8:], x["text_out"][:, :, 8:], rtol=0, atol=0)
    assert not torch.allclose(merged[:, :, :8], x["text_out"][:, :, :8])


# ----------------------------------------------------------------------------------------- composed


def token_major(tokens: torch.Tensor) -> torch.Tensor:
    """[b, N, h, t, d] → [b, h, t·N, d], row j = token j // N of condition j % N."""
    b, num_cond, h, t, d = tokens.shape
    return tokens.permute(0, 2, 3, 1, 4).reshape(b, h, t * num_cond, d)


def first_of_subject(owner: torch.Tensor) -> torch.Tensor:
    """[N]: 1 on the first condition of each subject."""
    seen, first = set(), []
    for subject in owner.tolist():
        first.append(0.0 if subject in seen else 1.0)
        seen.add(subject)
    return torch.tensor(first)


def run_fast(rule, text_weight, region_mode, x, owner, share, latent, grid):
    """The ops in the order the processor composes them (per-call constants folded as it prepares them)."""
    num_cond, d = len(owner), x["query"].shape[-1]
    weights = ops.relevance_weights(x["name_mask"], HEADS, owner, dtype=ops.working_dtype(x["query"].dtype))
    columns = ops.position_maps(x["query"], name_keys_flat(x["name_keys"]), weights)  # [b, p, N + 1]
    regions = None
    if region_mode is not None:
        regions = ops.resize_regions(x["regions"], grid).index_select(1, owner).transpose(1, 2)  # [b, p, N]
    _, routing, total = ops.routing_maps(
        rule, columns, regions, x["has_region"].index_select(0, owner), RegionMode(region_mode or "replace"),
        first_of_subject(owner),
    )
    gate = ops.text_gate(x["text_logits"]) if text_weight else None
    text_factor, weights, alpha = ops.merge_factors(rule, routing, total, gate, normalized=regions is None)
    base = x["text_out"] if text_factor is None else x["text_out"] * text_factor[:, None, :, None]
    factor = x["scales"].index_select(1, owner) * share.to(x["scales"].dtype)  # [b, N]: folded into values
    values = x["values"] * factor[:, :, None, None, None]
    return ops.routed_attention(
        x["query"], token_major(x["keys"]) / math.sqrt(d), token_major(values), weights, base,
        num_conditions=num_cond, alpha=alpha,
    )  # fmt: skip


def run_reference(rule, text_weight, region_mode, x, owner, share, latent, grid, cached=None):
    relevance, image_out = cached or (
        ref_relevance(x["query"], x["name_keys"], x["name_mask"]),
        ref_subject_attention(x["query"], x["keys"], x["values"]),
    )
    gate = ref_text_gate(x["text_logits"]) if text_weight else None
    regions = ref_area_resize(x["regions"], grid) if region_mode is not None else None
    return ref_merge(
        rule, x["text_out"], torch.from_numpy(image_out), x["scales"], relevance, gate, regions,
        x["has_region"].tolist(), region_mode, owner, share,
    )  # fmt: skip


@functools.cache
def case(n: int, photos: str, shape: str):
    """Inputs and the rule-independent loop references (attention, relevance), shared by the rules."""
    latent, grid = SHAPES[shape]
    owner, share = conditions_of(n, photos)
    x = random_inputs(n, len(owner), grid[0] * grid[1], latent, seed=10 * n + len(owner) + len(shape))
    references = (
        ref_relevance(x["query"], x["name_keys"], x["name_mask"]),
        ref_subject_attention(x["query"], x["keys"], x["values"]),
    )
    return x, owner, share, references


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("photos", ["one", "several"])
@pytest.mark.parametrize("region_mode", [None, "replace", "multiply"])
@pytest.mark.parametrize("text_weight", [False, True])
@pytest.mark.parametrize("rule", RULES)
def test_merge_matches_loop_reference(rule, text_weight, region_mode, photos, n, shape):
    latent, grid = SHAPES[shape]
    x, owner, share, references = case(n, photos, shape)
    fast = run_fast(rule, text_weight, region_mode, x, owner, share, latent, grid)
    assert fast.shape == x["text_out"].shape and fast.dtype == torch.float32
    reference = run_reference(rule, text_weight, region_mode, x, owner, share, latent, grid, references)
    assert rel_err(fast, reference) <= 1e-5


@pytest.mark.parametrize("rule", RULES)
def test_ops_follow_float64_inputs(rule):
    """No hidden float32: float64 inputs give float64 results at float64 accuracy."""
    latent, grid = SHAPES["non_square"]
    owner, share = conditions_of(3, "several")
    x = {
        k: (v.double() if v.is_floating_point() else v) for k, v in random_inputs(3, 6, 15, latent, 7).items()
    }
    fast = run_fast(rule, True, "multiply", x, owner, share, latent, grid)
    assert fast.dtype == torch.float64
    assert rel_err(fast, run_reference(rule, True, "multiply", x, owner, share, latent, grid)) <= 1e-12


# ----------------------------------------------------------------------------------------- mixed adapters


def ref_padded_routed_attention(query, keys, values, counts, weights, base, alpha) -> np.ndarray:
    """query [b, h, p, d]; keys, values [b, N, h, t, d] (unscaled); counts [N]: condition c attends only to
    its own first counts[c] tokens (the rest is padding); weights [b, p, N]; base [b, h, p, d] →
    base + alpha·Σ_c w_c·Attn(q, K_c[:t_c], V_c[:t_c]), position by position in float64."""
    q, k, v, w, out = np64(query), np64(keys), np64(values), np64(weights), np64(base).copy()
    b, num_cond, h, _, d = k.shape
    for bi in range(b):
        for hh in range(h):
            for pos in range(q.shape[2]):
                for c in range(num_cond):
                    real = range(counts[c])
                    probs = softmax([float(np.dot(q[bi, hh, pos], k[bi, c, hh, j])) / math.sqrt(d) for j in real])
                    attended = sum(probs[j] * v[bi, c, hh, j] for j in real)
                    out[bi, hh, pos] += alpha * w[bi, pos, c] * attended
    return out


def padding_bias(counts: list[int], tokens: int) -> torch.Tensor:
    """[t·N] token-major: -inf on the rows past each condition's count (what SubjectConditioning builds)."""
    bias = torch.zeros(tokens, len(counts))
    for c, count in enumerate(counts):
        bias[count:, c] = -math.inf
    return bias.reshape(-1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("counts", [[2, 5, 3], [5, 1]])
def test_routed_attention_key_bias_keeps_each_condition_to_its_own_tokens(shape, counts):
    """Conditions of different token counts (adapters with 4 and 16 tokens in one call), zero-padded to the
    most: with the key bias each condition's softmax runs over its real tokens only. The padding keys and
    values are garbage, so a bias that let any padding row in (or masked a real one) fails."""
    _, grid = SHAPES[shape]
    g = torch.Generator().manual_seed(31 + len(counts) + len(shape))
    t, num_cond, p = max(counts), len(counts), grid[0] * grid[1]
    query = torch.randn(BATCH, HEADS, p, HEAD_DIM, generator=g)
    keys = torch.randn(BATCH, num_cond, HEADS, t, HEAD_DIM, generator=g)
    values = torch.randn(BATCH, num_cond, HEADS, t, HEAD_DIM, generator=g)
    for c, count in enumerate(counts):  # padding: large garbage, never to be attended to
        keys[:, c, :, count:] = 50 * torch.randn(BATCH, HEADS, t - count, HEAD_DIM, generator=g)
        values[:, c, :, count:] = 1e3
    weights = torch.rand(BATCH, p, num_cond, generator=g) + 0.1
    base = torch.randn(BATCH, HEADS, p, HEAD_DIM, generator=g)
    fast = ops.routed_attention(
        query, token_major(keys) / math.sqrt(HEAD_DIM), token_major(values), weights, base,
        num_conditions=num_cond, alpha=1.7, key_bias=padding_bias(counts, t),
    )  # fmt: skip
    assert fast.shape == base.shape and torch.isfinite(fast).all()
    assert rel_err(fast, ref_padded_routed_attention(query, keys, values, counts, weights, base, 1.7)) <= 1e-5
    unbiased = ops.routed_attention(
        query, token_major(keys) / math.sqrt(HEAD_DIM), token_major(values), weights, base,
        num_conditions=num_cond, alpha=1.7,
    )  # fmt: skip
    assert rel_err(unbiased, np64(fast)) > 1e-2  # without the bias the padding is attended to


def test_a_float32_key_bias_keeps_a_bfloat16_attention_in_bfloat16():
    """The conditioning builds its key bias in float32; in a bfloat16 run it is cast to the logits' dtype
    (left float32 it would promote the logits and the output); the result stays close to float32's."""
    counts, t, p = [2, 5, 3], 5, 15
    g = torch.Generator().manual_seed(35)
    query = torch.randn(BATCH, HEADS, p, HEAD_DIM, generator=g)
    keys = torch.randn(BATCH, len(counts), HEADS, t, HEAD_DIM, generator=g)
    values = torch.randn(BATCH, len(counts), HEADS, t, HEAD_DIM, generator=g)
    weights = torch.rand(BATCH, p, len(counts), generator=g) + 0.1
    base = torch.randn(BATCH, HEADS, p, HEAD_DIM, generator=g)
    inputs = (query, token_major(keys) / math.sqrt(HEAD_DIM), token_major(values), weights, base)
    common = dict(num_conditions=len(counts), alpha=1.7, key_bias=padding_bias(counts, t))
    full = ops.routed_attention(*inputs, **common)
    half = ops.routed_attention(*(x.bfloat16() for x in inputs), **common)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=0.05, rtol=0.05)


def test_routed_attention_s_alpha_is_one_unless_given():
    x = random_inputs(3, 3, 15, (6, 10), seed=34)
    args = (x["query"], token_major(x["keys"]) / math.sqrt(HEAD_DIM), token_major(x["values"]))
    weights = torch.rand(BATCH, 15, 3, generator=torch.Generator().manual_seed(2))
    given = ops.routed_attention(*args, weights, x["text_out"], num_conditions=3, alpha=1.0)
    assert torch.equal(ops.routed_attention(*args, weights, x["text_out"], num_conditions=3), given)


def test_routed_attention_with_a_zero_key_bias_is_the_unbiased_attention():
    """A key bias of zeros (no condition padded) changes nothing, bit for bit."""
    x = random_inputs(3, 3, 15, (6, 10), seed=33)
    keys, values = token_major(x["keys"]) / math.sqrt(HEAD_DIM), token_major(x["values"])
    weights = torch.rand(BATCH, 15, 3, generator=torch.Generator().manual_seed(1))
    common = dict(num_conditions=3, alpha=2.0)
    plain = ops.routed_attention(x["query"], keys, values, weights, x["text_out"], **common)
    zero = torch.zeros(IMAGE_TOKENS * 3)
    assert torch.equal(ops.routed_attention(x["query"], keys, values, weights, x["text_out"], key_bias=zero, **common), plain)


def ref_official_per_condition_gate(maps, total, gate) -> np.ndarray:
    """weights[b, p, c] = g[b, p, c]·A[b, p, c] / Σ_k A_k[b, p] (0 where nothing claims the position)."""
    m, tot, g = np64(maps), np64(total), np64(gate)
    b, p, num_cond = m.shape
    out = np.zeros((b, p, num_cond))
    for bi in range(b):
        for pos in range(p):
            for c in range(num_cond):
                out[bi, pos, c] = g[bi, pos, c] * m[bi, pos, c] / tot[bi, pos, 0] if tot[bi, pos, 0] > 0 else 0.0
    return out


@pytest.mark.parametrize("normalized", [True, False])
def test_merge_factors_official_takes_one_gate_per_condition(normalized):
    """Under official a call mixing adapters gates each condition by its own adapter's g [b, p, N]; fails
    when the gate is broadcast over conditions the wrong way (e.g. [b, p, N] unsqueezed to [b, p, N, 1])."""
    g = torch.Generator().manual_seed(34)
    maps = torch.rand(2, 15, 3, generator=g) + 0.01
    total = maps.sum(-1, keepdim=True)
    if not normalized:  # user regions may leave positions unclaimed
        maps[:, :4] = 0.0
        total = maps.sum(-1, keepdim=True)
    gate = torch.stack([ops.text_gate(torch.randn(2, 15, generator=g) * 2) for _ in range(3)], dim=-1)
    text_factor, weights, alpha = ops.merge_factors("official", maps, total, gate, normalized=normalized)
    assert text_factor is None and alpha == 1.0 and weights.shape == (2, 15, 3)
    assert rel_err(weights, ref_official_per_condition_gate(maps, total, gate)) <= 1e-6
    # one gate shared by all conditions is the [b, p] form
    _, shared, _ = ops.merge_factors("official", maps, total, gate[..., :1].expand(-1, -1, 3), normalized=normalized)
    _, flat, _ = ops.merge_factors("official", maps, total, gate[..., 0], normalized=normalized)
    torch.testing.assert_close(shared, flat)


def test_merge_factors_paper_refuses_a_gate_per_condition():
    maps = torch.rand(1, 6, 2)
    with pytest.raises(ValueError, match=r"^the paper rule's text gate is one map per image \[b, p\], got \(1, 6, 2\)$"):
        ops.merge_factors("paper", maps, None, torch.ones(1, 6, 2), normalized=True)
