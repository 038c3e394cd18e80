"""The relevance experiment's perturbation on the base model: an eval-only attention processor.

The paper's §4 runs the experiment "in the original text-to-image diffusion model": no adapter, no
reference photos. `TextNoiseProcessor` is diffusers' SDPA attention (``AttnProcessor2_0``) plus one
step in the cross-attention layers: when the call carries a `TextNoisePlan`, the text attention output
``Z_text`` [b, h, p, d] of the *conditional* half of the batch gets noise before ``to_out``:

* uniform: ``level · rms(Z_text) · ε`` per batch row;
* weighted: ``ε ⊙ A_i / mean_p A_i`` rescaled to the uniform noise's norm, where ``A_i`` [p] is the
  relevance of subject i's name (`mipadapter.ops.relevance_maps`: the layer's own query against the
  frozen ``to_k`` of the name's rows, the name encoded on its own by `mipadapter.pipeline.encode_names`).

Classifier-free guidance (the paper says nothing about it): only the conditional half is perturbed and
the relevance maps come from its queries. The unconditional half encodes the negative prompt, where an
object's name has no place; perturbing it too would make guidance (``uncond + w·(cond − uncond)``)
subtract part of the same noise again. So the image sees the noise amplified by the guidance scale
``w``, the same for the uniform and the weighted run. Without CFG the whole batch is conditional.

Per-call data flows through ``cross_attention_kwargs={"text_noise": plan}``; `installed` puts the
processor on every attention layer of a UNet for the duration of a ``with`` block and restores the
processors that were there, so the base pipeline is left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mipadapter import ops

KWARG = "text_noise"

__all__ = ["KWARG", "TextNoisePlan", "TextNoiseProcessor", "installed"]


@dataclass
class TextNoisePlan:
    """One generation call's perturbation.

    perturb: ``f(z [b', h, p, d], relevance [b', n, p]) -> z`` (see `mipadapter.eval.relevance.relevance_noise`),
    applied to the conditional rows; name_embeds [n, m, c_text] and name_mask [n, m] (bool): the
    subjects' name rows; cfg: whether the batch is [unconditional; conditional] halves.
    """

    perturb: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    name_embeds: torch.Tensor
    name_mask: torch.Tensor
    cfg: bool


class TextNoiseProcessor:
    """SDPA attention exactly as diffusers' ``AttnProcessor2_0``; with a plan, cross-attention layers
    add the plan's noise to the conditional rows' ``Z_text`` (module docstring)."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.plain = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        text_noise: TextNoisePlan | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if text_noise is None or encoder_hidden_states is None:  # self-attention, or no experiment
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, encoder_hidden_states.shape[1], batch
            )
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [b, h, p, d]
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [b, h, s, d]
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)  # [b, h, p, d]

        first = batch // 2 if text_noise.cfg else 0  # rows [first:] are conditional
        conditional = query[first:]
        relevance = ops.relevance_maps(
            conditional,
            self._name_keys(attn, text_noise, batch - first),
            text_noise.name_mask.expand(batch - first, -1, -1),
        )  # [b', n, p]
        out = torch.cat([out[:first], text_noise.perturb(out[first:], relevance)])

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # [b, p, c]
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _name_keys(attn, plan: TextNoisePlan, rows: int) -> torch.Tensor:
        """The frozen keys of the names' rows: [rows, n, h, m, d]."""
        names = plan.name_embeds.to(attn.to_k.weight.dtype)  # [n, m, c]
        n, m, _ = names.shape
        if attn.norm_cross:
            names = attn.norm_encoder_hidden_states(names)
        with torch.no_grad():
            keys = attn.to_k(names).view(n, m, attn.heads, -1).transpose(1, 2)  # [n, h, m, d]
        if attn.norm_k is not None:
            keys = attn.norm_k(keys)
        return keys.unsqueeze(0).expand(rows, -1, -1, -1, -1)


@contextlib.contextmanager
def installed(unet) -> Iterator[None]:
    """`TextNoiseProcessor` on every attention layer of ``unet`` inside the block; the previous
    processors are put back afterwards (also on error)."""
    before = dict(unet.attn_processors)
    unet.set_attn_processor({name: TextNoiseProcessor() for name in before})
    try:
        yield
    finally:
        unet.set_attn_processor(before)
