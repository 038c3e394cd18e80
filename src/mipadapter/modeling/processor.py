"""MIP-Adapter's attention processor for the cross-attention layers of a UNet (SDXL, SD1.5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mipadapter import ops
from mipadapter.modeling import routing
from mipadapter.modeling.conditioning import LayerInputs, SubjectConditioning


class MIPAttnProcessor(nn.Module):
    """Decoupled cross-attention with multi-subject routing.

    The text branch runs on SDPA; the routing (``modeling.routing.route``, shared with the other
    architectures) runs all conditions' image attention in one folded matmul.

    Without a ``SubjectConditioning`` in the call it computes plain text cross-attention, exactly as
    diffusers' ``AttnProcessor2_0``. With one, each condition's image tokens are attended with its
    adapter's ``to_k_ip``/``to_v_ip`` (this processor's, or in a mixed call another adapter's, given to
    ``prepare`` as its sources) and merged into the text output by the call's merge rule. What does
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
    def prepare(
        self, attn, cond: SubjectConditioning, cache: dict | None = None, sources: Sequence[nn.Module] = ()
    ) -> LayerInputs:
        """This layer's per-call constants for ``cond`` (see ``LayerInputs``); ``cache`` is shared by the
        layers of one call; sources: this layer's processors of the call's adapters, in
        ``cond.adapter_groups`` order (empty: this one alone). The name keys are this layer's own: they
        come from the base model, whatever the adapters."""
        sources = list(sources) or [self]
        return routing.layer_inputs(
            cond,
            attn.heads,
            routing.image_keys_values(
                [(source.to_k_ip, source.to_v_ip) for source in sources], cond, attn.heads, self.layer_name
            ),
            lambda: name_keys(attn, cond.name_embeds),
            ops.working_dtype(attn.to_k.weight.dtype),
            {} if cache is None else cache,
            [source.text_to_weight for source in sources],
        )

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
        query, out, shape = text_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if ip_hidden_states is not None:
            out = routing.route(
                routing.check_conditioning(ip_hidden_states, self),
                self.layer_name,
                relevance_query=query,
                image_query=query,
                base=out,
                gate=self._text_gate,
                diagnose=self.diagnose,
                spatial=None if shape is None else shape[1:],
            )
        return finish_attention(attn, out, hidden_states, shape)

    @staticmethod
    def _text_gate(text_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The text weights' logits from the text branch's output [b, h, p, d] and the call's stacked
        ``text_to_weight`` weights [K, c] → [b, p, K]."""
        b, heads, positions, head_dim = text_out.shape
        flat = text_out.transpose(1, 2).reshape(b, positions, heads * head_dim)  # [b, p, c]
        return F.linear(flat, weight)


def _heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, s, h·d] → [b, h, s, d]."""
    return tensor.view(tensor.shape[0], tensor.shape[1], heads, -1).transpose(1, 2)


def text_attention(
    attn,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    temb: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int] | None]:
    """The attention of diffusers' ``AttnProcessor2_0`` up to ``to_out``: (query, out, shape).

    query, out [b, h, p, d]; shape: (channels, h, w) of a 4-D input, else None. ``finish_attention``
    completes the layer; between the two a processor may change ``out`` (the routed merge, or the
    relevance experiment's noise).
    """
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = None
    if hidden_states.ndim == 4:
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # [b, p, c]
        shape = (channels, height, width)
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

    query = _heads(attn.to_q(hidden_states), attn.heads)  # [b, h, p, d]
    key = _heads(attn.to_k(encoder_hidden_states), attn.heads)  # [b, h, s, d]
    value = _heads(attn.to_v(encoder_hidden_states), attn.heads)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask), shape


def finish_attention(
    attn, out: torch.Tensor, residual: torch.Tensor, shape: tuple[int, int, int] | None
) -> torch.Tensor:
    """``to_out``, the input's shape, the residual and the output scale, as ``AttnProcessor2_0`` ends.

    out [b, h, p, d]; residual: the layer's input; shape: from ``text_attention``.
    """
    batch, _, positions, _ = out.shape
    out = out.transpose(1, 2).reshape(batch, positions, -1)  # [b, p, c]; a view of SDPA's layout
    out = attn.to_out[1](attn.to_out[0](out))
    if shape is not None:
        out = out.transpose(-1, -2).reshape(batch, *shape)
    if attn.residual_connection:
        out = out + residual
    return out if attn.rescale_output_factor == 1.0 else out / attn.rescale_output_factor


def name_keys(attn, names: torch.Tensor) -> torch.Tensor:
    """The layer's frozen text keys of names' rows [b, n, m, c_kv], scaled by ``1/sqrt(d)``: [b, h, n·m, d]."""
    b, n, m, _ = names.shape
    flat = names.reshape(b * n, m, -1).to(attn.to_k.weight.dtype)
    with torch.no_grad():
        if attn.norm_cross:
            flat = attn.norm_encoder_hidden_states(flat)
        keys = attn.to_k(flat).view(b, n, m, attn.heads, -1)  # [b, n, m, h, d]
        if attn.norm_k is not None:
            keys = attn.norm_k(keys)
        return routing.flat_name_keys(keys)
