"""The one attention processor of MIP-Adapter, for the UNet's cross-attention layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mipadapter import ops
from mipadapter.config import MergeRule
from mipadapter.modeling.conditioning import SubjectConditioning, layer_grid


class MIPAttnProcessor(nn.Module):
    """Decoupled cross-attention with multi-subject routing.

    The text branch runs on SDPA; all subjects' image attention runs in one folded matmul
    (``ops.routing.routed_attention``: a few tokens per subject make that cheaper than SDPA per subject).

    Without a ``SubjectConditioning`` in the call it computes plain text cross-attention, exactly as
    diffusers' ``AttnProcessor2_0``. With one, each condition's image tokens are attended with the
    shared ``to_k_ip``/``to_v_ip`` and merged into the text output by the call's merge rule.

    Args:
        hidden_size: the layer's inner width ``c`` (``attn.to_k.out_features``).
        cross_attention_dim: width of the text and image tokens.
        text_weight: whether the layer has the learned ``text_to_weight`` (Linear c→1, no bias).
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, text_weight: bool = False) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.text_to_weight = nn.Linear(hidden_size, 1, bias=False) if text_weight else None

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
            out = self._route(attn, query, out, ip_hidden_states, spatial)

        out = out.transpose(1, 2).reshape(batch, positions, -1).to(query.dtype)  # [b, p, c]
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
        """[b, s, h·d] → [b, h, s, d]."""
        return tensor.view(tensor.shape[0], tensor.shape[1], heads, -1).transpose(1, 2)

    def _route(self, attn, query, text_out, cond: SubjectConditioning, spatial) -> torch.Tensor:
        """Merge the subjects' image attention into the text output; query, text_out [b, h, p, d].

        spatial: the (h, w) of a 4-D input, else None (the grid is then derived from the latent size).
        """
        b, heads, positions, head_dim = query.shape
        if cond.batch_size != b:
            raise ValueError(
                f"subject conditioning was built for {cond.batch_size} batch rows but the UNet runs {b} "
                "(check classifier-free guidance and num_images_per_prompt)"
            )
        grid = spatial if spatial is not None else layer_grid(cond.latent_size, positions)
        ip_keys, ip_values = cond.memo(
            (id(self), "ip"), lambda: self._image_keys_values(cond.image_tokens, heads)
        )

        relevance = None
        if cond.needs_relevance:
            name_keys = cond.memo((id(self), "names"), lambda: self._name_keys(attn, cond))
            relevance = ops.relevance_maps(
                query, name_keys, cond.name_mask, check=False
            )  # [b, n, p]; checked at construction
        routing = relevance if cond.rule != MergeRule.UNIFORM else None
        if cond.regions is not None:
            regions = cond.regions_on(grid).to(query.dtype)
            base = routing if routing is not None else torch.ones_like(regions)
            routing = ops.apply_regions(base, regions, cond.has_region, cond.region_mode)
            if relevance is not None:
                relevance = ops.apply_regions(relevance, regions, cond.has_region, cond.region_mode)
        if cond.present is not None:  # padding subjects take no share of any position
            present = cond.present.to(query.dtype).unsqueeze(-1)  # [b, n, 1]
            routing = present.expand(-1, -1, positions) if routing is None else routing * present
        if cond.recorder is not None:
            cond.recorder.add(relevance, grid)
        if cond.text_perturbation is not None:
            text_out = cond.text_perturbation(text_out, relevance)

        gate = None
        if cond.use_text_weight:
            if self.text_to_weight is None:
                raise ValueError("use_text_weight is set but this adapter has no text_to_weight layers")
            flat = text_out.transpose(1, 2).reshape(b, positions, heads * head_dim)  # [b, p, c]
            gate = ops.text_gate(self.text_to_weight(flat).squeeze(-1))  # [b, p]
        text_factor, weights = ops.merge_weights(
            cond.rule, cond.scales.to(query.dtype), routing, gate, positions
        )
        weights = ops.expand_to_conditions(weights, cond.owner, cond.share)  # [b, N, p]
        # = merge_outputs(text_out, subject_attention(...), ...) without the [b, N, h, p, d] outputs
        image = ops.routed_attention(query, ip_keys, ip_values, weights, scale=1.0)  # [b, h, p, d]
        if text_factor is None:
            return text_out + image
        return text_out * text_factor.to(text_out.dtype)[:, None, :, None] + image

    def _image_keys_values(self, image_tokens: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """image_tokens [b, N, t, c_kv] → keys (pre-scaled by 1/sqrt(d)), values [b, h, t·N, d] in the
        token-major order ``ops.routing.routed_attention`` takes."""
        b, num_cond, tokens, _ = image_tokens.shape
        flat = image_tokens.transpose(1, 2).reshape(b, tokens * num_cond, -1)  # [b, t·N, c_kv], token-major
        flat = flat.to(self.to_k_ip.weight.dtype)
        keys = self.to_k_ip(flat).view(b, tokens * num_cond, heads, -1).transpose(1, 2)  # [b, h, t·N, d]
        values = self.to_v_ip(flat).view(b, tokens * num_cond, heads, -1).transpose(1, 2)
        return keys * keys.shape[-1] ** -0.5, values

    @staticmethod
    def _name_keys(attn, cond: SubjectConditioning) -> torch.Tensor:
        """The frozen text keys of the subjects' name rows: [b, n, h, m, d]."""
        names = cond.name_embeds
        b, n, m, _ = names.shape
        flat = names.reshape(b * n, m, -1).to(attn.to_k.weight.dtype)
        if attn.norm_cross:
            flat = attn.norm_encoder_hidden_states(flat)
        with torch.no_grad():
            keys = attn.to_k(flat)
        keys = keys.view(b, n, m, attn.heads, -1).transpose(2, 3)
        return keys if attn.norm_k is None else attn.norm_k(keys)
