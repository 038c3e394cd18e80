"""``ops.routing.routed_attention`` (the processor's fast path) against a float64 loop reference.

``Σ_N weights_N⊙Attn(Q, K_N, V_N)``: one softmax per condition over its own tokens, weighted per position,
summed over conditions. The fast function runs in float32 and must agree to a relative error of 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mipadapter import ops
from mipadapter.ops.routing import routed_attention


def np64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def rel_err(fast: torch.Tensor, reference: np.ndarray) -> float:
    return float(np.linalg.norm(np64(fast) - reference) / np.linalg.norm(reference))


def ref_routed(query, keys, values, weights) -> np.ndarray:
    """query [b, h, p, d]; keys, values [b, N, h, t, d]; weights [b, N, p] → [b, h, p, d], by loops."""
    q, k, v, w = np64(query), np64(keys), np64(values), np64(weights)
    b, num_cond, h, t, d = k.shape
    out = np.zeros(q.shape)
    for bi in range(b):
        for hh in range(h):
            for pos in range(q.shape[2]):
                for c in range(num_cond):
                    logits = [float(np.dot(q[bi, hh, pos], k[bi, c, hh, j])) / math.sqrt(d) for j in range(t)]
                    top = max(logits)
                    exps = [math.exp(x - top) for x in logits]
                    probs = [e / sum(exps) for e in exps]
                    out[bi, hh, pos] += w[bi, c, pos] * sum(probs[j] * v[bi, c, hh, j] for j in range(t))
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
    weights = torch.rand(b, num_cond, p, generator=g) * 2
    return query, keys, values, weights


@pytest.mark.parametrize("shape", [(2, 1, 2, 15, 4, 8), (1, 3, 3, 16, 4, 8), (2, 5, 2, 6, 16, 4)])
def test_routed_attention_matches_loop(shape):
    query, keys, values, weights = make(*shape)
    fast = routed_attention(query, token_major(keys), token_major(values), weights)
    assert fast.shape == query.shape
    assert rel_err(fast, ref_routed(query, keys, values, weights)) <= 1e-5


def test_routed_attention_equals_subject_attention_then_merge():
    query, keys, values, weights = make(2, 4, 2, 12, 4, 8, seed=1)
    text_out = torch.randn_like(query)
    slow = ops.merge_outputs(text_out, ops.subject_attention(query, keys, values), None, weights)
    fast = text_out + routed_attention(query, token_major(keys), token_major(values), weights)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6)


def test_routed_attention_takes_a_prescaled_key_and_zero_weights():
    query, keys, values, weights = make(1, 2, 2, 9, 4, 8, seed=2)
    weights[:, 1] = 0.0  # the second condition contributes nothing
    scaled = routed_attention(query, token_major(keys) / math.sqrt(8), token_major(values), weights, scale=1.0)
    only_first = routed_attention(query, token_major(keys[:, :1]), token_major(values[:, :1]), weights[:, :1])
    assert torch.allclose(scaled, only_first, rtol=1e-5, atol=1e-6)


def test_routed_attention_gradients_match_the_slow_path():
    query, keys, values, weights = make(1, 3, 2, 10, 4, 8, seed=3)
    grads = []
    for fast in (True, False):
        leaves = [tensor.clone().requires_grad_(True) for tensor in (query, keys, values, weights)]
        q, k, v, w = leaves
        if fast:
            out = routed_attention(q, token_major(k), token_major(v), w)
        else:
            out = ops.merge_outputs(torch.zeros_like(q), ops.subject_attention(q, k, v), None, w)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for fast_grad, slow_grad in zip(*grads, strict=True):
        assert torch.allclose(fast_grad, slow_grad, rtol=1e-4, atol=1e-6)


def test_routed_attention_names_bad_shapes():
    query, keys, values, weights = make(1, 3, 2, 10, 4, 8)
    with pytest.raises(ValueError, match="t·N"):
        routed_attention(query, token_major(keys)[:, :, :-1], token_major(values)[:, :, :-1], weights)
