"""Routing math of MIP-Adapter: per-subject image attention, relevance maps, merge rules.

Shapes follow the notation in ``mipadapter.ops``. Everything is batched over subjects: no Python loop
over subjects or batch items.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mipadapter.config import MergeRule, RegionMode


def subject_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention of the latent queries to each condition's image tokens, one softmax per condition.

    query [b, h, p, d]; keys, values [b, N, h, t, d] → [b, N, h, p, d].
    Conditions ride in SDPA's batch dimensions so all of them run in one call.
    """
    b, num_cond = keys.shape[:2]
    expanded = query.unsqueeze(1).expand(b, num_cond, *query.shape[1:])  # [b, N, h, p, d], a view
    return F.scaled_dot_product_attention(expanded, keys, values)


def check_name_mask(name_mask: torch.Tensor) -> None:
    """Raise unless every subject has at least one name token; name_mask [b, n, m] (bool).

    It reads a device value back (a host sync, and a graph break under ``torch.compile``), so callers in a
    hot loop check once per call, not once per layer and step.
    """
    if not bool(name_mask.any(dim=-1).all()):
        raise ValueError("every subject needs at least one name token in name_mask")


def relevance_maps(
    query: torch.Tensor, name_keys: torch.Tensor, name_mask: torch.Tensor, *, check: bool = True
) -> torch.Tensor:
    """Object relevance ``A_i``: how much each position attends from each subject's name tokens.

    ``softmax_p(K_name Q^T / sqrt(d))`` averaged over the name's valid tokens and over heads.
    query [b, h, p, d]; name_keys [b, n, h, m, d]; name_mask [b, n, m] (bool, True = a name token)
    → [b, n, p] in the query's dtype; each map sums to 1 over p. No gradient flows through it.
    check: run ``check_name_mask`` here; False when the caller already did for this mask.
    """
    b, n, h, m, d = name_keys.shape
    if check:
        check_name_mask(name_mask)
    with torch.no_grad():
        keys = name_keys.permute(0, 2, 1, 3, 4).reshape(b, h, n * m, d)  # [b, h, n·m, d]
        logits = torch.matmul(keys, query.transpose(-1, -2)) / math.sqrt(d)  # [b, h, n·m, p]
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        probs = probs.mean(dim=1).reshape(b, n, m, -1)  # [b, n, m, p], averaged over heads
        weights = name_mask.to(probs.dtype)
        maps = (probs * weights.unsqueeze(-1)).sum(dim=2) / weights.sum(dim=2, keepdim=True)  # [b, n, p]
    return maps.to(query.dtype)


def text_gate(text_logits: torch.Tensor) -> torch.Tensor:
    """The learned text weight normalised to mean 1: ``g = f / mean_p f`` with ``f = sigmoid(logits)``.

    text_logits [b, p] (the output of ``text_to_weight``, squeezed) → [b, p].
    """
    f = torch.sigmoid(text_logits)
    return f / f.mean(dim=-1, keepdim=True)


def resize_regions(regions: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bring region masks to a layer's latent grid by area averaging (a small region never vanishes).

    regions [b, n, H, W] with values in [0, 1]; size (h, w) → [b, n, h·w].
    """
    b, n = regions.shape[:2]
    resized = F.interpolate(regions.reshape(b * n, 1, *regions.shape[2:]), size=size, mode="area")
    return resized.reshape(b, n, size[0] * size[1])


def apply_regions(
    relevance: torch.Tensor, regions: torch.Tensor, has_region: torch.Tensor, mode: RegionMode
) -> torch.Tensor:
    """Override relevance maps with user regions for the subjects that have one.

    relevance, regions [b, n, p]; has_region [n] (bool); mode replace or multiply → [b, n, p].
    """
    overridden = regions if RegionMode(mode) == RegionMode.REPLACE else relevance * regions
    return torch.where(has_region.view(1, -1, 1), overridden.to(relevance.dtype), relevance)


def merge_weights(
    rule: MergeRule,
    scales: torch.Tensor,
    relevance: torch.Tensor | None,
    gate: torch.Tensor | None,
    positions: int,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-position factors of each merge rule (DESIGN.md §1).

    scales [b, n]; relevance [b, n, p]: the relevance maps for ``paper`` and ``official`` (required),
    for ``uniform`` an optional spatial mask (None means 1 everywhere); gate [b, p] or None: the
    normalised text weight ``g``; positions: ``p``.
    Returns (text_factor [b, p] or None meaning 1, subject_weights [b, n, p]) such that the merged
    output is ``text_factor⊙Z_text + Σ_i subject_weights_i⊙Z_img_i``.
    """
    rule = MergeRule(rule)
    scales = scales.unsqueeze(-1)  # [b, n, 1]
    if rule == MergeRule.UNIFORM:
        if relevance is None:
            return None, scales.expand(-1, -1, positions)
        return None, scales * relevance
    if relevance is None:
        raise ValueError(f"merge rule {rule.value!r} needs relevance maps")
    if rule == MergeRule.PAPER:
        mean = relevance.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(relevance.dtype).tiny)
        return gate, scales * (relevance / mean)  # a zeroed map (a padding subject) stays zero
    total = relevance.sum(dim=1, keepdim=True)  # [b, 1, p]
    # Positions no subject claims (possible only with user regions) get no image contribution.
    shares = torch.where(total > 0, relevance / total.clamp_min(torch.finfo(relevance.dtype).tiny), 0.0)
    weights = scales * shares
    return None, weights if gate is None else weights * gate.unsqueeze(1)


def expand_to_conditions(weights: torch.Tensor, owner: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """Give each condition (photo) its subject's weights times its share of the subject.

    weights [b, n, p]; owner [N] (subject index of each condition); share [N] → [b, N, p].
    """
    return weights.index_select(1, owner) * share.to(weights.dtype).view(1, -1, 1)


def merge_outputs(
    text_out: torch.Tensor, image_out: torch.Tensor, text_factor: torch.Tensor | None, weights: torch.Tensor
) -> torch.Tensor:
    """``text_factor⊙Z_text + Σ_N weights_N⊙Z_img_N`` in head layout.

    text_out [b, h, p, d]; image_out [b, N, h, p, d]; text_factor [b, p] or None; weights [b, N, p]
    → [b, h, p, d].
    """
    weights = weights.to(image_out.dtype)
    merged = torch.einsum("bnp,bnhpd->bhpd", weights, image_out)
    if text_factor is None:
        return text_out + merged
    return text_out * text_factor.to(text_out.dtype)[:, None, :, None] + merged


def routed_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """``Σ_N weights_N⊙Attn(Q, K_N, V_N)`` without materialising any condition's own output.

    The fast path of ``subject_attention`` followed by the image part of ``merge_outputs``: one matmul of
    the queries with every condition's keys, a softmax within each condition, the weights folded into
    those probabilities, one matmul with every condition's values. Memory and time grow with ``N·t``
    (a few tokens per condition), not with ``N·p·d`` as ``[b, N, h, p, d]`` outputs would.

    query [b, h, p, d]; keys, values [b, h, t·N, d] in token-major order (row ``j`` holds token ``j // N``
    of condition ``j % N``; the reshape of ``[b, t, N, c]`` tokens); weights [b, N, p]; scale: the logit
    scale, ``1/sqrt(d)`` when None (as in SDPA) → [b, h, p, d].
    """
    b, h, p, d = query.shape
    num_cond = weights.shape[1]
    if keys.shape[2] % num_cond or keys.shape[:2] != (b, h) or values.shape != keys.shape:
        raise ValueError(
            f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must be [b, h, t·N, d] with "
            f"b={b}, h={h}, N={num_cond} (from weights {tuple(weights.shape)})"
        )
    tokens = keys.shape[2] // num_cond
    logits = torch.matmul(query, keys.transpose(-1, -2))  # [b, h, p, t·N]
    if scale is None or scale != 1.0:
        logits = logits * (1.0 / math.sqrt(d) if scale is None else scale)
    # Softmax over each condition's t tokens; token-major columns put t on dim -2, which CPUs reduce faster.
    probs = torch.softmax(logits.view(b, h, p, tokens, num_cond), dim=-2)  # [b, h, p, t, N]
    probs = probs * weights.to(probs.dtype).transpose(1, 2)[:, None, :, None, :]  # × weights [b, 1, p, 1, N]
    return torch.matmul(probs.view(b, h, p, tokens * num_cond), values)  # [b, h, p, d]
