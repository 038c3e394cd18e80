"""A slow, obviously-correct loop reference of the method on one FLUX double-stream block (docs/flux.md).

Everything is recomputed by hand in float64 numpy, position by position, head by head, token by token,
from the block's own weights: the rotary table from the position ids, the image queries the joint
attention uses (``norm1`` → ``to_q`` → ``norm_q`` → RoPE at the image positions), the subjects' name keys
(``norm1_context`` → ``add_k_proj`` → ``norm_added_k`` → RoPE at text positions), the relevance maps
``A_i`` (softmax over the image positions, mean over heads and the name's tokens), each subject's image
attention exactly as diffusers' ``FluxIPAdapterAttnProcessor`` does it (queries *before* RoPE), and the
``uniform`` and ``paper`` merges of the term added to the image stream.

Only the block's adaptive LayerNorms (``norm1``, ``norm1_context``: LayerNorm, then shift and scale from
``temb``) are called as modules; everything after them is written out here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def np64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().cpu().numpy()


def softmax(logits: Sequence[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


# --- positions ----------------------------------------------------------------------------------------


def flux_ids(text_tokens: int, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """FLUX.1's position ids: text [s, 3] all zero; image [h·w, 3] = (0, row, column), row-major."""
    height, width = grid
    image = [(0, row, column) for row in range(height) for column in range(width)]
    return np.zeros((text_tokens, 3)), np.array(image, dtype=np.float64)


def rotary_table(ids: np.ndarray, axes_dims: Sequence[int], theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) [S, d] for position ids [S, n_axes]: axis ``a`` owns ``axes_dims[a]`` channels, in pairs;
    pair ``j`` of axis ``a`` turns by ``pos_a · theta^(-2j / axes_dims[a])``, both channels of a pair alike."""
    cos = np.zeros((len(ids), sum(axes_dims)))
    sin = np.zeros_like(cos)
    for row, position in enumerate(ids):
        channel = 0
        for axis, dim in enumerate(axes_dims):
            for pair in range(dim // 2):
                angle = position[axis] * theta ** (-2.0 * pair / dim)
                for _ in range(2):
                    cos[row, channel], sin[row, channel] = math.cos(angle), math.sin(angle)
                    channel += 1
    return cos, sin


def rotate(vector: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE of one head vector [d]: channels (2k, 2k+1) form a pair turned by the pair's angle."""
    out = np.zeros_like(vector)
    for k in range(len(vector) // 2):
        a, b = vector[2 * k], vector[2 * k + 1]
        out[2 * k] = a * cos[2 * k] - b * sin[2 * k]
        out[2 * k + 1] = b * cos[2 * k + 1] + a * sin[2 * k + 1]
    return out


# --- queries and keys ---------------------------------------------------------------------------------


def rms_norm(vector: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return vector / math.sqrt(float(np.mean(vector**2)) + eps) * weight


def _heads(rows: np.ndarray, weight: np.ndarray, bias: np.ndarray, norm: torch.nn.RMSNorm, heads: int) -> np.ndarray:
    """rows [n, C_in] → [n, h, d]: Linear, split into heads, RMS-normalise each head."""
    d = weight.shape[0] // heads
    norm_weight = np64(norm.weight) if norm.weight is not None else np.ones(d)
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
    out = np.zeros((len(rows), heads, d))
    for i, row in enumerate(rows):
        projected = weight @ row + bias
        for head in range(heads):
            out[i, head] = rms_norm(projected[head * d : (head + 1) * d], norm_weight, eps)
    return out


def image_queries(block, hidden_states: torch.Tensor, temb: torch.Tensor) -> np.ndarray:
    """The image stream's queries before RoPE (diffusers' ``ip_query``): [b, p, h, d].

    hidden_states [b, p, C] (the image stream entering the block); temb [b, C].
    """
    attn = block.attn
    with torch.no_grad():
        normed = np64(block.norm1(hidden_states, emb=temb)[0])
    weight, bias = np64(attn.to_q.weight), np64(attn.to_q.bias)
    return np.stack([_heads(rows, weight, bias, attn.norm_q, attn.heads) for rows in normed])


def text_keys(block, text_states: torch.Tensor, temb: torch.Tensor) -> np.ndarray:
    """Keys of text-stream rows before RoPE: [b, m, h, d] (``norm1_context`` → ``add_k_proj`` → ``norm_added_k``).

    text_states [b, m, C]: rows of the text stream as they enter the block (for a subject's name encoded
    alone: its rows, e.g. the ``context_embedder`` output of the T5 encoding of the name).
    """
    attn = block.attn
    with torch.no_grad():
        normed = np64(block.norm1_context(text_states, emb=temb)[0])
    weight, bias = np64(attn.add_k_proj.weight), np64(attn.add_k_proj.bias)
    return np.stack([_heads(rows, weight, bias, attn.norm_added_k, attn.heads) for rows in normed])


def name_keys_unmodulated(block, rows: torch.Tensor) -> np.ndarray:
    """Keys of names' rows before RoPE as our processor keys them: [b, m, h, d].

    rows [b, m, C]: the names' rows entering the block (``context_embedder`` of their T5 rows). They go
    through the block's LayerNorm of the text stream without its timestep modulation (the processor never
    sees the timestep), then ``add_k_proj`` → ``norm_added_k``, written out here.
    """
    attn = block.attn
    with torch.no_grad():
        normed = np64(block.norm1_context.norm(rows))
    weight, bias = np64(attn.add_k_proj.weight), np64(attn.add_k_proj.bias)
    return np.stack([_heads(r, weight, bias, attn.norm_added_k, attn.heads) for r in normed])


def rotate_rows(vectors: np.ndarray, cos: np.ndarray, sin: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """RoPE of [b, n, h, d] vectors, vector ``j`` at rotary row ``rows[j]``."""
    out = np.zeros_like(vectors)
    for b in range(vectors.shape[0]):
        for j, row in enumerate(rows):
            for head in range(vectors.shape[2]):
                out[b, j, head] = rotate(vectors[b, j, head], cos[row], sin[row])
    return out


# --- relevance, image attention, merges ---------------------------------------------------------------


def relevance(queries: np.ndarray, name_keys: np.ndarray, name_mask: Sequence[Sequence[bool]]) -> np.ndarray:
    """``A`` [b, p] of one subject: for each head and name token, softmax over the image positions of
    ``k·q / sqrt(d)``; then the mean over heads and the name's tokens (``name_mask[b][j]`` True).

    queries [b, p, h, d] (rotated: what the joint attention uses); name_keys [b, m, h, d] (rotated).
    """
    batch, positions, heads, d = queries.shape
    out = np.zeros((batch, positions))
    for b in range(batch):
        tokens = [j for j in range(name_keys.shape[1]) if name_mask[b][j]]
        for head in range(heads):
            for j in tokens:
                logits = [float(np.dot(name_keys[b, j, head], queries[b, p, head])) / math.sqrt(d)
                          for p in range(positions)]
                for p, prob in enumerate(softmax(logits)):
                    out[b, p] += prob / (heads * len(tokens))
    return out


def image_attention(queries: np.ndarray, image_tokens: np.ndarray, to_k_ip, to_v_ip) -> np.ndarray:
    """One subject's image attention [b, p, C]: each head's softmax over that subject's image tokens.

    queries [b, p, h, d] before RoPE (as diffusers' FLUX IP-Adapter uses them); image_tokens [b, t, J].
    """
    batch, positions, heads, d = queries.shape
    k_weight, k_bias = np64(to_k_ip.weight), np64(to_k_ip.bias)
    v_weight, v_bias = np64(to_v_ip.weight), np64(to_v_ip.bias)
    out = np.zeros((batch, positions, heads * d))
    for b in range(batch):
        keys = [k_weight @ token + k_bias for token in image_tokens[b]]
        values = [v_weight @ token + v_bias for token in image_tokens[b]]
        for p in range(positions):
            for head in range(heads):
                cols = slice(head * d, (head + 1) * d)
                probs = softmax([float(np.dot(queries[b, p, head], key[cols])) / math.sqrt(d) for key in keys])
                out[b, p, cols] = sum(prob * value[cols] for prob, value in zip(probs, values, strict=True))
    return out


def merge(rule: str, outputs: Sequence[np.ndarray], maps: Sequence[np.ndarray], scales: Sequence[float]) -> np.ndarray:
    """The term added to the image stream: ``uniform`` Σ s_i·Z_i; ``paper`` Σ s_i·(A_i / mean_p A_i)·Z_i.

    outputs: Z_i [b, p, C]; maps: A_i [b, p]; scales: s_i.
    """
    total = np.zeros_like(outputs[0])
    for z, a, s in zip(outputs, maps, scales, strict=True):
        batch, positions, _ = z.shape
        for b in range(batch):
            mean = sum(a[b]) / positions
            for p in range(positions):
                weight = 1.0 if rule == "uniform" else a[b, p] / mean
                if rule not in ("uniform", "paper"):
                    raise ValueError(f"the reference knows 'uniform' and 'paper', not {rule!r}")
                total[b, p] += s * weight * z[b, p]
    return total
