"""Routing math of MIP-Adapter: relevance maps, merge factors, routed image attention.

Shapes follow the notation in ``mipadapter.ops``; ``R`` counts the columns of a map tensor (the ``N``
conditions, plus one column holding ``Σ_i A_i`` over subjects where asked for). Everything is batched:
no Python loop over subjects, conditions or batch rows.

Per-call constants (which name token belongs to which condition, the mean over heads and tokens,
absent padding subjects) are folded once per call into a weight matrix (``relevance_weights``), so
that at each layer and step a relevance map costs two matmuls and a softmax (``position_maps``).
Maps are kept position-major, ``[b, p, R]``, the layout the routed attention multiplies with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mipadapter.config import MergeRule, RegionMode


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` without a dispatch when it is one already (this runs per layer and step)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def check_name_mask(name_mask: torch.Tensor) -> None:
    """Raise unless every subject has at least one name token; name_mask [b, n, m] (bool).

    It reads a device value back (a host sync, and a graph break under ``torch.compile``), so callers
    check once per call, not once per layer and step.
    """
    if not bool(name_mask.any(dim=-1).all()):
        raise ValueError("every subject needs at least one name token in name_mask")


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype maps are computed in: at least float32 (a softmax over thousands of positions in fp16
    loses the small values routing depends on), float64 when the model runs in float64."""
    return torch.promote_types(dtype, torch.float32)


def relevance_weights(
    name_mask: torch.Tensor,
    heads: int,
    owner: torch.Tensor,
    present: torch.Tensor | None = None,
    *,
    with_total: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The matrix that turns per-(head, name token) softmaxes into per-condition relevance maps.

    name_mask [b, n, m] (bool); heads ``h``; owner [N] (the subject of each condition); present [b, n]
    (bool, False = a padding subject, whose map becomes zero and leaves the total) or None.
    Returns W [b, h·n·m, R] with ``R = N + with_total``: column ``j < N`` averages the rows of condition
    ``j``'s subject over its valid name tokens and the heads; the last column (``with_total``) sums those
    averages over the present subjects (``Σ_i A_i``). Rows are ordered (head, subject, token), the order
    of ``name_keys [b, h, n·m, d]``.
    """
    b, n, m = name_mask.shape
    per_token = name_mask.to(dtype)
    per_token = per_token / (per_token.sum(dim=-1, keepdim=True).clamp_min(1.0) * heads)  # [b, n, m]
    if present is not None:
        per_token = per_token * present.to(dtype).unsqueeze(-1)
    columns = F.one_hot(owner, n).to(dtype).T  # [n, N]: subject i feeds the conditions it owns
    if with_total:
        columns = torch.cat([columns, torch.ones(n, 1, dtype=dtype, device=columns.device)], dim=1)
    weights = per_token.unsqueeze(-1) * columns[None, :, None, :]  # [b, n, m, R]
    weights = weights.unsqueeze(1).expand(b, heads, n, m, weights.shape[-1])  # the same for every head
    return weights.reshape(b, heads * n * m, -1)


def position_maps(query: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sums of ``softmax_p(K Q^T)``: for each key, where over the positions it is attended from.

    query [b, h, p, d]; keys [b, h, K, d], already scaled by ``1/sqrt(d)``; weights [b, h·K, R] (see
    ``relevance_weights``) → maps [b, p, R] in the weights' dtype. The softmax runs over positions.
    """
    b, h, p, _ = query.shape
    logits = torch.matmul(keys, query.transpose(-1, -2))  # [b, h, K, p]
    probs = torch.softmax(logits, dim=-1, dtype=weights.dtype)
    return torch.matmul(probs.view(b, -1, p).transpose(1, 2), weights)  # [b, p, R]


def relevance_maps(query: torch.Tensor, name_keys: torch.Tensor, name_mask: torch.Tensor) -> torch.Tensor:
    """Object relevance ``A_i``: how much each position attends from each subject's name tokens.

    ``softmax_p(K_name Q^T / sqrt(d))`` averaged over the name's valid tokens and over heads; no gradient
    flows through it. query [b, h, p, d]; name_keys [b, n, h, m, d]; name_mask [b, n, m] (bool)
    → [b, n, p] in the query's dtype; each map sums to 1 over p. (The processor uses the same math
    with its per-call constants folded; this is the stand-alone form.)
    """
    b, n, h, m, d = name_keys.shape
    check_name_mask(name_mask)
    with torch.no_grad():
        keys = name_keys.permute(0, 2, 1, 3, 4).reshape(b, h, n * m, d) / math.sqrt(d)  # [b, h, n·m, d]
        owner = torch.arange(n, device=query.device)
        weights = relevance_weights(name_mask, h, owner, with_total=False, dtype=working_dtype(query.dtype))
        maps = position_maps(query, keys, weights)  # [b, p, n]
    return maps.transpose(1, 2).to(query.dtype)


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


def override_regions(
    maps: torch.Tensor | None,
    regions: torch.Tensor,
    has_region: torch.Tensor,
    mode: RegionMode,
    first: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace (or multiply) the maps of the conditions whose subject has a user region.

    maps [b, p, N] (None: ones, i.e. no relevance, as under ``uniform``); regions [b, p, N] on the
    layer grid, one column per condition (its subject's region); has_region [N] (bool); first [N]: 1 on
    the first condition of each subject, 0 on the others (the conditions of one subject carry the same
    map, so the sum over subjects reads one column each). Returns (maps [b, p, N], total [b, p, 1])
    with ``total = Σ_i A_i`` over subjects.
    """
    regions = regions.to(maps.dtype if maps is not None else regions.dtype)
    base = maps if maps is not None else torch.ones_like(regions)
    overridden = regions if RegionMode(mode) == RegionMode.REPLACE else base * regions
    routed = torch.where(has_region, overridden, base)  # has_region broadcasts over [b, p, N]
    total = torch.matmul(routed, first.to(routed.dtype).unsqueeze(-1))  # [b, p, 1]
    return routed, total


def routing_maps(
    rule: MergeRule,
    columns: torch.Tensor | None,
    regions: torch.Tensor | None,
    has_region: torch.Tensor | None,
    mode: RegionMode,
    first: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The maps a layer routes by, from its relevance columns and the user's regions.

    columns [b, p, N + 1] (``position_maps`` with ``relevance_weights``: the N condition maps, then
    ``Σ_i A_i``) or None when no relevance is computed; regions [b, p, N] on the layer grid or None;
    has_region [N]; first [N] (see ``override_regions``). Returns (relevance [b, p, N] with regions applied, or None; routing
    [b, p, N] or None meaning 1: what the merge rule weights by — the relevance, or under ``uniform``
    the regions alone; total [b, p, 1]: ``Σ_i`` of the routing maps over subjects, or None).
    """
    num_cond = first.shape[0]
    relevance = total = None
    if columns is not None:
        relevance, total = columns[..., :num_cond], columns[..., num_cond:]
    if regions is not None and relevance is not None:
        relevance, total = override_regions(relevance, regions, has_region, mode, first)
    if MergeRule(rule) != MergeRule.UNIFORM:
        return relevance, relevance, total
    if regions is None:
        return relevance, None, None
    routing, routing_total = override_regions(None, regions, has_region, mode, first)
    return relevance, routing, routing_total


def merge_factors(
    rule: MergeRule,
    maps: torch.Tensor | None,
    total: torch.Tensor | None,
    gate: torch.Tensor | None,
    *,
    normalized: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """Per-position factors of each merge rule (the image scales are folded into the values).

    maps [b, p, N]: each condition's routing map (relevance, or a user region); total [b, p, 1]: ``Σ_i``
    of the maps over subjects (``official`` only); gate [b, p] or None: the normalised text weight
    ``g`` — under ``official`` also [b, p, N], one gate per condition (each from its own adapter's text
    weight); normalized: every map is a softmax over positions (no region overrides), so ``mean_p A = 1/p``.
    Returns (text_factor [b, p] or None meaning 1, weights [b, p, N] or None meaning 1, alpha) such that
    the merged output is ``text_factor⊙Z_text + alpha·Σ_N weights_N⊙s_N·Z_img_N``:

    * ``uniform``: weights = the maps (user regions) or None;
    * ``paper``: weights = ``A/mean_p A``, written ``A`` with ``alpha = p`` when the maps are softmaxes;
      text_factor = ``g``;
    * ``official``: weights = ``g·A/Σ_k A_k``; positions no subject claims (possible only with user
      regions) get no image contribution.
    """
    rule = MergeRule(rule)
    if rule == MergeRule.UNIFORM:
        return None, maps, 1.0
    if maps is None:
        raise ValueError(f"merge rule {rule.value!r} needs relevance maps")
    if rule == MergeRule.PAPER:
        if gate is not None and gate.ndim != 2:
            raise ValueError(f"the paper rule's text gate is one map per image [b, p], got {tuple(gate.shape)}")
        if normalized:
            return gate, maps, float(maps.shape[1])
        mean = maps.mean(dim=1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
        return gate, maps / mean, 1.0  # a zeroed map (an absent subject) stays zero
    if total is None:
        raise ValueError("the official merge rule needs the total of the maps over subjects")
    if not normalized:  # user regions can leave a position unclaimed: Σ_k A_k = 0 there
        total = torch.where(total > 0, total, torch.full_like(total, math.inf))
    if gate is None:
        return None, maps / total, 1.0
    gate = _as_dtype(gate, maps.dtype)
    return None, maps * ((gate if gate.ndim == 3 else gate.unsqueeze(-1)) / total), 1.0


def routed_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor | None,
    base: torch.Tensor | None,
    *,
    num_conditions: int,
    alpha: float = 1.0,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + alpha·Σ_N weights_N⊙Attn(Q, K_N, V_N)`` without materialising any condition's output.

    One matmul of the queries with every condition's keys, a softmax within each condition, the weights
    folded into those probabilities, one matmul with every condition's values, one add. Memory and time grow with ``N·t`` (a few tokens per condition), not with ``N·p·d``.

    query [b, h, p, d]; keys, values [b, h, t·N, d] in token-major order (row ``j`` holds token ``j // N``
    of condition ``j % N``), keys already scaled by ``1/sqrt(d)``; weights [b, p, N] or None (all 1);
    base [b, h, p, d] (the text branch) or None (the image term alone); num_conditions ``N``; key_bias
    [t·N] or None: added to every query's logits, ``-inf`` on the padding rows of conditions with fewer
    than ``t`` tokens (adapters of different token counts in one call), 0 elsewhere → [b, h, p, d].
    """
    b, h, p, d = query.shape
    if (
        keys.shape[:2] != (b, h)
        or values.shape != keys.shape
        or (base is not None and base.shape != query.shape)
        or keys.shape[2] % num_conditions
    ):
        raise ValueError(
            f"keys {tuple(keys.shape)}, values {tuple(values.shape)} and base "
            f"{None if base is None else tuple(base.shape)} must be "
            f"[b, h, t·N, d] with N={num_conditions} and [b, h, p, d] for a query of {tuple(query.shape)}"
        )
    logits = torch.matmul(query, keys.transpose(-1, -2))  # [b, h, p, t·N]
    if key_bias is not None:
        logits = logits + _as_dtype(key_bias, logits.dtype)
    # Softmax over each condition's t tokens; token-major columns put t on dim -2.
    probs = torch.softmax(logits.view(b, h, p, -1, num_conditions), dim=-2)  # [b, h, p, t, N]
    if weights is not None:
        probs = probs * _as_dtype(weights, probs.dtype)[:, None, :, None, :]  # × weights [b, 1, p, 1, N]
    image = torch.matmul(probs.view(b, h, p, -1), values)  # [b, h, p, d]
    if base is None:
        return image if alpha == 1.0 else image * alpha
    # The sum takes base's memory layout: SDPA writes [b, p, h, d], so the caller's flattening to
    # [b, p, h·d] stays a view (no copy before to_out).
    return torch.add(base, image, alpha=alpha)
