"""``ops.routing.routed_attention`` (the processor's fast path) against a float64 loop reference.

``base + alpha·Σ_N weights_N⊙Attn(Q, K_N, V_N)``: one softmax per condition over its own tokens,
weighted per position, summed over conditions. The fast function runs in float32 and must agree to a
relative error of 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mipadapter.ops.routing import routed_attention


def np64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def rel_err(fast: torch.Tensor, reference: np.ndarray) -> float:
    return float(np.linalg.norm(np64(fast) - reference) / np.linalg.norm(reference))


def ref_routed(query, keys, values, weights, base, alpha) -> np.ndarray:
    """query, base [b, h, p, d]; keys, values [b, N, h, t, d]; weights [b, p, N] or None → [b, h, p, d]."""
    q, k, v = np64(query), np64(keys), np64(values)
    b, num_cond, h, t, d = k.shape
    out = np64(base).copy()
    for bi in range(b):
        for hh in range(h):
            for pos in range(q.shape[2]):
                for c in range(num_cond):
                    logits = [float(np.dot(q[bi, hh, pos], k[bi, c, hh, j])) / math.sqrt(d) for j in range(t)]
                    top = max(logits)
                    exps = [math.exp(x - top) for x in logits]
                    probs = [e / sum(exps) for e in exps]
                    weight = 1.0 if weights is None else float(weights[bi, pos, c])
                    out[bi, hh, pos] += alpha * weight * sum(probs[j] * v[bi, c, hh, j] for j in range(t))
    return out


def token_major(tokens: torch.Tensor) -> torch.Tensor:
    """[b, N, h, t, d] → [b, h, t·N, d], row j = token j // N of condition j % N."""
    b, num_cond, h, t, d = tokens.shape
    return tokens.permute(0, 2, 3, 1, 4).reshape(b, h, t * num_cond, d)


def make(b, num_cond, h, p, t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, h, p, d, generator=g)
    keys = torch.randn(b, num_cond, h, t, d, generator=g) * 2  # peaked softmaxes
    values = torch.randn(b, num_cond, h, t, d, generator=g)
    weights = torch.rand(b, p, num_cond, generator=g) * 2
    base = torch.randn(b, h, p, d, generator=g)
    return query, keys, values, weights, base


def fast(query, keys, values, weights, base, alpha=1.0):
    d = query.shape[-1]
    return routed_attention(
        query, token_major(keys) / math.sqrt(d), token_major(values), weights, base,
        num_conditions=keys.shape[1], alpha=alpha,
    )  # fmt: skip


@pytest.mark.parametrize("shape", [(2, 1, 2, 15, 4, 8), (1, 3, 3, 16, 4, 8), (2, 5, 2, 6, 16, 4)])
@pytest.mark.parametrize("alpha", [1.0, 15.0])
def test_routed_attention_matches_loop(shape, alpha):
    query, keys, values, weights, base = make(*shape)
    out = fast(query, keys, values, weights, base, alpha)
    assert out.shape == query.shape
    assert rel_err(out, ref_routed(query, keys, values, weights, base, alpha)) <= 1e-5


def test_without_weights_every_condition_counts_once():
    query, keys, values, _, base = make(2, 3, 2, 10, 4, 8, seed=1)
    out = fast(query, keys, values, None, base)
    assert rel_err(out, ref_routed(query, keys, values, None, base, 1.0)) <= 1e-5


def test_zero_weight_removes_a_condition():
    query, keys, values, weights, base = make(1, 2, 2, 9, 4, 8, seed=2)
    weights[..., 1] = 0.0  # the second condition contributes nothing
    both = fast(query, keys, values, weights, base)
    only_first = fast(query, keys[:, :1], values[:, :1], weights[..., :1], base)
    assert torch.allclose(both, only_first, rtol=1e-5, atol=1e-6)


def test_routed_attention_gradients_match_per_condition_sdpa():
    query, keys, values, weights, base = make(1, 3, 2, 10, 4, 8, seed=3)
    grads = []
    for use_fast in (True, False):
        leaves = [tensor.clone().requires_grad_(True) for tensor in (query, keys, values, weights, base)]
        q, k, v, w, z = leaves
        if use_fast:
            out = fast(q, k, v, w, z)
        else:  # each condition through SDPA, weighted and summed
            out = z + sum(
                w[..., c][:, None, :, None] * F.scaled_dot_product_attention(q, k[:, c], v[:, c])
                for c in range(k.shape[1])
            )
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for fast_grad, slow_grad in zip(*grads, strict=True):
        assert torch.allclose(fast_grad, slow_grad, rtol=1e-4, atol=1e-6)


def test_routed_attention_names_bad_shapes():
    query, keys, values, weights, base = make(1, 3, 2, 10, 4, 8)
    with pytest.raises(ValueError, match="t·N"):
        routed_attention(
            query, token_major(keys)[:, :, :-1], token_major(values)[:, :, :-1], weights, base, num_conditions=3
        )


def test_weights_of_another_dtype_are_converted_to_the_attentions():
    """float64 weights on a float32 attention give the float32 result of the float32-rounded weights
    (fails when the weights are not converted: the matmul with float32 values then refuses float64)."""
    query, keys, values, weights, base = make(2, 3, 2, 6, 4, 8, seed=4)
    out = fast(query, keys, values, weights.double(), base)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fast(query, keys, values, weights.double().float(), base), rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
def test_the_image_term_alone_is_scaled_by_alpha(alpha):
    """With no base (the image term alone) the result is alpha times the weighted attention."""
    query, keys, values, weights, base = make(2, 2, 2, 6, 4, 8, seed=5)
    out = fast(query, keys, values, weights, None, alpha)
    assert rel_err(out, ref_routed(query, keys, values, weights, torch.zeros_like(base), alpha)) <= 1e-5


def test_each_bad_shape_is_refused_naming_every_shape():
    """Each check alone refuses: keys of another batch or head count, values unlike the keys, a base
    unlike the query, keys not a multiple of N, a key bias not one value per key; the message names
    base's and the bias's shapes, or None without them."""
    query, keys, values, weights, base = make(1, 3, 2, 10, 4, 8)
    k, v = token_major(keys), token_major(values)  # [1, 2, 12, 8]
    bias = torch.zeros(12)
    cases = [
        (k[:, :1], v[:, :1], base, None, "keys (1, 1, 12, 8), values (1, 1, 12, 8), base (1, 2, 10, 8) and key_bias None"),
        (k, v[..., :4], base, None, "keys (1, 2, 12, 8), values (1, 2, 12, 4), base (1, 2, 10, 8) and key_bias None"),
        (k, v, base[:, :, :9], None, "keys (1, 2, 12, 8), values (1, 2, 12, 8), base (1, 2, 9, 8) and key_bias None"),
        (k[:, :, :-1], v[:, :, :-1], None, None, "keys (1, 2, 11, 8), values (1, 2, 11, 8), base None and key_bias None"),
        (k, v[..., :4], None, None, "keys (1, 2, 12, 8), values (1, 2, 12, 4), base None and key_bias None"),
        (k, v, base, bias[:9], "keys (1, 2, 12, 8), values (1, 2, 12, 8), base (1, 2, 10, 8) and key_bias (9,)"),
        (k, v, base, bias.view(3, 4), "keys (1, 2, 12, 8), values (1, 2, 12, 8), base (1, 2, 10, 8) and key_bias (3, 4)"),
    ]
    for bad_keys, bad_values, bad_base, bad_bias, names in cases:
        message = (
            f"{names} must be [b, h, t·N, d] with N=3, [b, h, p, d] and [t·N] for a query of (1, 2, 10, 8)"
        )
        with pytest.raises(ValueError) as error:
            routed_attention(query, bad_keys, bad_values, weights, bad_base, num_conditions=3, key_bias=bad_bias)
        assert str(error.value) == message
    routed_attention(query, k, v, weights, base, num_conditions=3, key_bias=bias)  # the right shape runs
