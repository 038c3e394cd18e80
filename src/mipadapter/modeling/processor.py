"""The one attention processor of MIP-Adapter, for the UNet's cross-attention layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mipadapter import ops
from mipadapter.modeling.conditioning import LayerInputs, SubjectConditioning


class MIPAttnProcessor(nn.Module):
    """Decoupled cross-attention with multi-subject routing.

    The text branch runs on SDPA; all conditions' image attention runs in one folded matmul
    (``ops.routed_attention``: a few tokens per condition make that cheaper than SDPA per condition).

    Without a ``SubjectConditioning`` in the call it computes plain text cross-attention, exactly as
    diffusers' ``AttnProcessor2_0``. With one, each condition's image tokens are attended with the
    shared ``to_k_ip``/``to_v_ip`` and merged into the text output by the call's merge rule. What does
    not depend on the latents (image keys and values, name keys) is computed once per call by
    ``prepare`` and read from the conditioning at every step.

    Args:
        hidden_size: the layer's inner width ``c`` (``attn.to_k.out_features``).
        cross_attention_dim: width of the text and image tokens.
        text_weight: whether the layer has the learned ``text_to_weight`` (Linear c→1, no bias).
        layer_name: the layer's name in the UNet: the key of its ``LayerInputs`` in a conditioning.
        diagnose: whether this layer reports its routed shares to a conditioning's ``share_meter``.
    """

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        text_weight: bool = False,
        layer_name: str = "",
        diagnose: bool = True,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.layer_name = layer_name
        self.diagnose = diagnose
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.text_to_weight = nn.Linear(hidden_size, 1, bias=False) if text_weight else None

    # ------------------------------------------------------------------ once per call
    def prepare(self, attn, cond: SubjectConditioning, weight_cache: dict | None = None) -> LayerInputs:
        """This layer's per-call constants for ``cond`` (see ``LayerInputs``).

        weight_cache: a dict shared by the layers of one call (the relevance weight matrix depends on
        the head count only).
        """
        heads = attn.heads
        tokens = cond.image_tokens  # [b, N, t, c_kv]
        b, num_cond, t, _ = tokens.shape
        flat = tokens.transpose(1, 2).reshape(b, t * num_cond, -1)  # [b, t·N, c_kv], token-major
        flat = flat.to(self.to_k_ip.weight.dtype)
        keys = self.to_k_ip(flat).view(b, t * num_cond, heads, -1).transpose(1, 2)  # [b, h, t·N, d]
        head_dim = keys.shape[-1]
        factor = cond.scales.index_select(1, cond.owner) * cond.share  # [b, N]: s_i·share of each condition
        if cond.present is not None:
            factor = factor * cond.present.index_select(1, cond.owner).to(factor.dtype)
        values = self.to_v_ip(flat).view(b, t * num_cond, heads, -1)  # [b, t·N, h, d]
        values = values * factor.repeat(1, t).to(values.dtype)[:, :, None, None]  # token-major repeat
        inputs = LayerInputs(
            ip_keys=(keys * head_dim**-0.5).contiguous(), ip_values=values.transpose(1, 2).contiguous()
        )
        cache = {} if weight_cache is None else weight_cache
        dtype = ops.working_dtype(attn.to_k.weight.dtype)
        if cond.needs_relevance:
            inputs.name_keys = self._name_keys(attn, cond)
            if ("names", heads) not in cache:
                cache["names", heads] = ops.relevance_weights(
                    cond.name_mask, heads, cond.owner, cond.present, dtype=dtype
                )
            inputs.name_weights = cache["names", heads]
        if cond.image_attention is not None:
            if ("image", heads) not in cache:
                cache["image", heads] = _image_weights(cond, heads, t, dtype)
            inputs.image_weights = cache["image", heads]
        return inputs

    @staticmethod
    def _name_keys(attn, cond: SubjectConditioning) -> torch.Tensor:
        """The frozen text keys of the subjects' name rows, scaled by ``1/sqrt(d)``: [b, h, n·m, d]."""
        names = cond.name_embeds
        b, n, m, _ = names.shape
        flat = names.reshape(b * n, m, -1).to(attn.to_k.weight.dtype)
        with torch.no_grad():
            if attn.norm_cross:
                flat = attn.norm_encoder_hidden_states(flat)
            keys = attn.to_k(flat).view(b, n, m, attn.heads, -1)  # [b, n, m, h, d]
            if attn.norm_k is not None:
                keys = attn.norm_k(keys)
            keys = keys.permute(0, 3, 1, 2, 4)  # [b, h, n, m, d]
            return (keys * keys.shape[-1] ** -0.5).reshape(b, attn.heads, n * m, -1)

    # ------------------------------------------------------------------ every step
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_hidden_states: SubjectConditioning | None = None,
        **unused,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        spatial = None
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # [b, p, c]
            spatial = (height, width)
        batch, positions, _ = hidden_states.shape
        if attention_mask is not None:  # padded to the key length, as AttnProcessor2_0 does
            key_length = positions if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = self._heads(attn.to_q(hidden_states), attn.heads)  # [b, h, p, d]
        key = self._heads(attn.to_k(encoder_hidden_states), attn.heads)  # [b, h, s, d]
        value = self._heads(attn.to_v(encoder_hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)  # [b, h, p, d]

        if ip_hidden_states is not None:
            if not isinstance(ip_hidden_states, SubjectConditioning):
                raise TypeError(
                    f"{type(self).__name__} takes a SubjectConditioning as ip_hidden_states, "
                    f"got {type(ip_hidden_states).__name__}"
                )
            out = self._route(query, out, ip_hidden_states, spatial)

        out = out.transpose(1, 2).reshape(batch, positions, -1)  # [b, p, c]; a view of SDPA's layout
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out if attn.rescale_output_factor == 1.0 else out / attn.rescale_output_factor

    @staticmethod
    def _heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
        """[b, s, h·d] → [b, h, s, d]."""
        return tensor.view(tensor.shape[0], tensor.shape[1], heads, -1).transpose(1, 2)

    def _route(self, query, text_out, cond: SubjectConditioning, spatial) -> torch.Tensor:
        """Merge the conditions' image attention into the text output; query, text_out [b, h, p, d].

        spatial: the (h, w) of a 4-D input, else None (the grid then comes from the latent size).
        """
        b, _, positions, _ = query.shape
        if cond.batch_size != b:
            raise ValueError(
                f"subject conditioning was built for {cond.batch_size} batch rows but the UNet runs {b} "
                "(check classifier-free guidance and num_images_per_prompt)"
            )
        inputs = cond.layer_inputs.get(self.layer_name)
        if inputs is None:
            raise ValueError(
                f"the subject conditioning was not prepared for layer {self.layer_name!r}: call "
                "MIPAdapter.prepare(conditioning) before running the UNet (MIPAdapterPipeline does)"
            )
        num_cond = cond.num_conditions
        columns = None
        if cond.needs_relevance:
            columns = ops.position_maps(query, inputs.name_keys, inputs.name_weights)  # [b, p, N + 1]
        regions = cond.regions_at(positions) if cond.regions is not None else None  # [b, p, N]
        relevance, routing, total = ops.routing_maps(
            cond.rule, columns, regions, cond.has_region_per_condition, cond.region_mode, cond.first_of_subject
        )
        self._observe(cond, query, relevance, total, inputs, spatial)
        if cond.text_perturbation is not None:
            text_out = cond.text_perturbation(text_out, _per_subject(relevance, cond))
        gate = self._text_gate(text_out) if cond.use_text_weight else None
        text_factor, weights, alpha = ops.merge_factors(
            cond.rule, routing, total, gate, normalized=regions is None
        )
        if text_factor is not None:
            factor = text_factor if text_factor.dtype == text_out.dtype else text_factor.to(text_out.dtype)
            text_out = text_out * factor[:, None, :, None]
        return ops.routed_attention(
            query, inputs.ip_keys, inputs.ip_values, weights, text_out, num_conditions=num_cond, alpha=alpha
        )

    def _text_gate(self, text_out: torch.Tensor) -> torch.Tensor:
        """``g`` from the text branch's output [b, h, p, d] → [b, p]."""
        if self.text_to_weight is None:
            raise ValueError("use_text_weight is set but this adapter has no text_to_weight layers")
        b, heads, positions, head_dim = text_out.shape
        flat = text_out.transpose(1, 2).reshape(b, positions, heads * head_dim)  # [b, p, c]
        return ops.text_gate(self.text_to_weight(flat).squeeze(-1))

    def _observe(self, cond, query, relevance, total, inputs: LayerInputs, spatial) -> None:
        """Report to the conditioning's recorders and share meter (each only when the caller asked).

        relevance [b, p, N]; total [b, p, 1]: its sum over subjects (the share meter runs under
        ``paper`` and ``official`` only, where the routing maps are the relevance).
        """
        if cond.share_meter is not None and self.diagnose:
            if cond.regions is None:  # softmax maps: every position is claimed
                shares = relevance / total
            else:
                shares = torch.where(total > 0, relevance / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
            cond.share_meter.add(shares)
        if cond.recorder is None and cond.image_attention is None:
            return
        positions = query.shape[2]
        grid = spatial if spatial is not None else cond.grid(positions)
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
    columns = columns * cond.share.to(dtype).unsqueeze(-1) / (heads * tokens)
    rows = columns.repeat(heads * tokens, 1)  # token-major: row (h, t, j) → condition j
    return rows.unsqueeze(0).expand(cond.batch_size, -1, -1)
