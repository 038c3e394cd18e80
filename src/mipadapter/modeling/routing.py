"""The routing every MIP processor shares, whatever its architecture.

A processor supplies what its attention layer yields — the queries the relevance is measured with, the
queries the image tokens are attended with, the text branch's output (or none, where the image term is
added elsewhere), the learned text gate, and, once per call, its image keys/values and name keys — and
``route`` does the rest with ``mipadapter.ops``: relevance maps, user regions, the merge rule, the
routed image attention, and the recorders. A new architecture (FLUX today, SD3.5 next) is one more
processor of this kind, not a copy of the merge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mipadapter import ops
from mipadapter.modeling.conditioning import LayerInputs, SubjectConditioning


def image_keys_values(
    projections: Sequence[tuple[nn.Module, nn.Module]],
    cond: SubjectConditioning,
    heads: int,
    layer_name: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every condition's image keys (scaled by ``1/sqrt(d)``) and values (scaled by its subject's image
    scale on this layer, its share of the subject and the subject's presence): [b, h, t·N, d] each,
    token-major.

    projections: ``(to_k_ip, to_v_ip)`` of each adapter of the call, in ``cond.adapter_groups`` order
    (one pair without ``cond.adapter_of``). A mixed call projects each adapter's conditions with its own
    pair; the padding tokens of an adapter with fewer than ``t`` tokens get zero keys and values (the
    call's ``key_bias`` keeps them out of the softmax).
    """
    if len(projections) != cond.num_adapters:
        raise ValueError(f"the conditioning mixes {cond.num_adapters} adapters but {len(projections)} were given")
    tokens = cond.image_tokens  # [b, N, t, c_kv]
    b, num_cond, t, _ = tokens.shape
    factor = cond.scales_at(layer_name).index_select(1, cond.owner) * cond.share  # [b, N]: s_i·share of each condition
    if cond.present is not None:
        factor = factor * cond.present.index_select(1, cond.owner).to(factor.dtype)
    if cond.adapter_of is None:
        (to_k_ip, to_v_ip), = projections
        flat = tokens.transpose(1, 2).reshape(b, t * num_cond, -1)  # [b, t·N, c_kv], token-major
        flat = flat.to(to_k_ip.weight.dtype)
        keys = to_k_ip(flat).view(b, t * num_cond, heads, -1)  # [b, t·N, h, d]
        values = to_v_ip(flat).view(b, t * num_cond, heads, -1)
    else:
        keys, values = _mixed_keys_values(projections, cond, heads)
    keys = keys.transpose(1, 2)  # [b, h, t·N, d]
    values = values * factor.repeat(1, t).to(values.dtype)[:, :, None, None]  # token-major repeat
    return (keys * keys.shape[-1] ** -0.5).contiguous(), values.transpose(1, 2).contiguous()


def _mixed_keys_values(
    projections: Sequence[tuple[nn.Module, nn.Module]], cond: SubjectConditioning, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [b, t·N, h, d] (token-major, unscaled) of a call mixing adapters: each adapter's
    conditions through its own projections, once per call and layer (never per step)."""
    b, num_cond, t, _ = cond.image_tokens.shape
    keys = values = None
    for (to_k_ip, to_v_ip), (conditions, count) in zip(projections, cond.adapter_groups, strict=True):
        if conditions.numel() == 0:
            continue
        own = cond.image_tokens.index_select(1, conditions)[:, :, :count].to(to_k_ip.weight.dtype)  # [b, N_a, t_a, c_kv]
        own_keys, own_values = to_k_ip(own), to_v_ip(own)  # [b, N_a, t_a, h·d]
        if keys is None:
            keys = own_keys.new_zeros(b, num_cond, t, own_keys.shape[-1])  # [b, N, t, h·d]
            values = torch.zeros_like(keys)
        keys = keys.index_copy(1, conditions, nn.functional.pad(own_keys, (0, 0, 0, t - count)))
        values = values.index_copy(1, conditions, nn.functional.pad(own_values, (0, 0, 0, t - count)))
    token_major = (b, t * num_cond, heads, -1)
    return keys.transpose(1, 2).reshape(token_major), values.transpose(1, 2).reshape(token_major)


def flat_name_keys(keys: torch.Tensor) -> torch.Tensor:
    """Name keys [b, n, m, h, d] → [b, h, n·m, d] scaled by ``1/sqrt(d)``, the layout ``ops.position_maps``
    takes with ``ops.relevance_weights``."""
    b, n, m, heads, head_dim = keys.shape
    return (keys.permute(0, 3, 1, 2, 4) * head_dim**-0.5).reshape(b, heads, n * m, head_dim)


def check_conditioning(cond, processor: object) -> SubjectConditioning:
    """``cond`` if it is a ``SubjectConditioning``; a ``TypeError`` naming the processor otherwise."""
    if not isinstance(cond, SubjectConditioning):
        raise TypeError(
            f"{type(processor).__name__} takes a SubjectConditioning as ip_hidden_states, got {type(cond).__name__}"
        )
    return cond


def layer_inputs(
    cond: SubjectConditioning,
    heads: int,
    keys_values: tuple[torch.Tensor, torch.Tensor],
    name_keys: Callable[[], torch.Tensor],
    dtype: torch.dtype,
    cache: dict,
    text_weights: Sequence[nn.Module | None] = (),
) -> LayerInputs:
    """A layer's ``LayerInputs``: its image keys/values, and — when the call needs them — its name keys
    (``name_keys()`` → [b, h, n·m, d] scaled by ``1/sqrt(d)``) with the weight matrices, which depend on
    the head count only and are shared through ``cache`` by the layers of one call; text_weights: the
    ``text_to_weight`` of each adapter of the call (None where one has none), for a gated call."""
    keys, values = keys_values
    inputs = LayerInputs(ip_keys=keys, ip_values=values, key_bias=cond.key_bias)
    if cond.needs_relevance:
        inputs.name_keys = name_keys()
        if ("names", heads) not in cache:
            cache["names", heads] = ops.relevance_weights(cond.name_mask, heads, cond.owner, cond.present, dtype=dtype)
        inputs.name_weights = cache["names", heads]
    if cond.image_attention is not None:
        if ("image", heads) not in cache:
            cache["image", heads] = _image_weights(cond, heads, cond.image_tokens.shape[2], dtype)
        inputs.image_weights = cache["image", heads]
    if cond.use_text_weight and text_weights and all(w is not None for w in text_weights):
        if len(text_weights) == 1:
            inputs.gate_weight = text_weights[0].weight  # the parameter itself: training's gradient reaches it
        else:
            inputs.gate_weight = torch.cat([w.weight for w in text_weights])  # [K, c]
            inputs.gate_columns = cond.adapter_of
    return inputs


def text_gate(logits: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """The normalised gate ``g`` from text-weight logits [b, p, K]: [b, p] for one adapter (K = 1), else
    each condition's adapter's gate [b, p, N] (columns [N] pick them)."""
    if columns is None:
        return ops.text_gate(logits.squeeze(-1))
    return ops.text_gate(logits.transpose(1, 2)).transpose(1, 2).index_select(-1, columns)


def route(
    cond: SubjectConditioning,
    layer_name: str,
    *,
    relevance_query: torch.Tensor,
    image_query: torch.Tensor,
    base: torch.Tensor | None,
    gate: Callable[[torch.Tensor], torch.Tensor] | None,
    diagnose: bool,
    spatial: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The routed merge of one layer: ``text_factor⊙base + Σ_N weights_N⊙s_N·Attn(Q, K_N, V_N)``.

    relevance_query [b, h, p, d]: the queries the layer's text attention really uses (the relevance is
    measured against them); image_query [b, h, p, d]: the queries the image tokens are attended with
    (the same tensor on a UNet); base [b, h, p, d]: the text branch's output, or None where the image
    term is returned alone (FLUX adds it to the image stream itself); gate: from a trained text weight,
    ``(base, weight [K, c]) → logits [b, p, K]`` (K the call's text weights: one, or one per adapter of
    a mix), or None; diagnose: report routed shares to the conditioning's meter; spatial:
    the layer's (h, w) when its input says it, else the conditioning places ``p`` on a grid.
    Returns [b, h, p, d].
    """
    b, _, positions, _ = image_query.shape
    if cond.batch_size != b:
        raise ValueError(
            f"subject conditioning was built for {cond.batch_size} batch rows but the model runs {b} "
            "(check classifier-free guidance and num_images_per_prompt)"
        )
    inputs = cond.layer_inputs.get(layer_name)
    if inputs is None:
        raise ValueError(
            f"the subject conditioning was not prepared for layer {layer_name!r}: call "
            "MIPAdapter.prepare(conditioning) before running the model (MIPAdapterPipeline does)"
        )
    columns = None
    if cond.needs_relevance:  # a routing signal: no gradient flows through it (the authors detach it too)
        query = relevance_query.detach() if relevance_query.requires_grad else relevance_query
        columns = ops.position_maps(query, inputs.name_keys, inputs.name_weights)  # [b, p, N + 1]
    regions = cond.regions_at(positions) if cond.regions is not None else None  # [b, p, N]
    relevance, routing, total = ops.routing_maps(
        cond.rule, columns, regions, cond.has_region_per_condition, cond.region_mode, cond.first_of_subject
    )
    _observe(cond, relevance, total, image_query, inputs, diagnose, spatial)
    if cond.text_perturbation is not None:
        if base is None:
            raise ValueError(f"layer {layer_name!r} has no text branch to perturb")
        base = cond.text_perturbation(base, _per_subject(relevance, cond))
    g = None
    if cond.use_text_weight:
        if gate is None or inputs.gate_weight is None:
            raise ValueError("use_text_weight is set but this adapter has no text_to_weight layers")
        g = text_gate(gate(base, inputs.gate_weight), inputs.gate_columns)
    text_factor, weights, alpha = ops.merge_factors(cond.rule, routing, total, g, normalized=regions is None)
    if text_factor is not None:  # the gate g, computed from base itself: in base's dtype (autocast too)
        base = base * text_factor[:, None, :, None]
    return ops.routed_attention(
        image_query,
        inputs.ip_keys,
        inputs.ip_values,
        weights,
        base,
        num_conditions=cond.num_conditions,
        alpha=alpha,
        key_bias=inputs.key_bias,
    )


def _observe(cond, relevance, total, query, inputs: LayerInputs, diagnose: bool, spatial) -> None:
    """Report to the conditioning's recorders and share meter (each only when the caller asked).

    relevance [b, p, N]; total [b, p, 1]: its sum over subjects (the share meter runs under ``paper`` and
    ``official`` only, where the routing maps are the relevance).
    """
    if cond.share_meter is not None and diagnose:
        if cond.regions is None:  # softmax maps: every position is claimed
            shares = relevance / total
        else:
            shares = torch.where(total > 0, relevance / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
        cond.share_meter.add(shares)
    if cond.recorder is None and cond.image_attention is None:
        return
    grid = spatial if spatial is not None else cond.grid(query.shape[2])
    if cond.recorder is not None:
        cond.recorder.add(_per_subject(relevance, cond), grid)
    if cond.image_attention is not None:
        maps = ops.position_maps(query, inputs.ip_keys, inputs.image_weights)  # [b, p, n]
        cond.image_attention.add(maps.transpose(1, 2), grid)


def _per_subject(maps: torch.Tensor, cond: SubjectConditioning) -> torch.Tensor:
    """Condition maps [b, p, N] → each subject's map [b, n, p] (its conditions carry the same map)."""
    return maps.index_select(-1, cond.first_condition).transpose(1, 2)


def _image_weights(cond: SubjectConditioning, heads: int, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """[b, h·t·N, n]: the mean over heads and image tokens of each subject's conditions (by share), for
    image-attention maps; rows in the order of ``ip_keys`` (head, token, condition)."""
    columns = torch.nn.functional.one_hot(cond.owner, cond.num_subjects).to(dtype)  # [N, n]
    if cond.token_mask is None:
        columns = columns * cond.share.to(dtype).unsqueeze(-1) / (heads * tokens)
        rows = columns.repeat(heads * tokens, 1)  # token-major: row (h, t, j) → condition j
    else:  # each condition averages its own adapter's real tokens; padding rows weigh nothing
        columns = columns * cond.share.to(dtype).unsqueeze(-1) / heads
        mask = cond.token_mask.T.to(dtype)  # [t, N]
        per_token = (mask / mask.sum(dim=0, keepdim=True))[:, :, None] * columns[None]  # [t, N, n]
        rows = per_token.reshape(tokens * cond.num_conditions, -1).repeat(heads, 1)
    return rows.unsqueeze(0).expand(cond.batch_size, -1, -1)
